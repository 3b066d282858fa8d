"""The ``mergekit-vision`` command line: inspect, merge, curve, demo."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from .errors import MergeVisionError


def _cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from .sources import create_model
    from .trace import trace_permutation_spec

    model = create_model(args.model, kwargs={"num_classes": args.num_classes} if args.num_classes else None)
    shape = (1, args.in_chans, args.size, args.size)
    spec = trace_permutation_spec(model, torch.randn(*shape))
    print(spec.summary())
    print(spec.table(show_frozen=not args.free_only))
    if args.members:
        for g in spec.groups:
            print(f"\n[{g.name}] size={g.size} blocks={g.blocks}" + (f" frozen: {g.reason}" if g.frozen else ""))
            for m in g.members:
                print(f"    {m}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergekit-vision", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("inspect", help="print a model's permutation groups")
    pi.add_argument("model", help="timm:NAME, torchvision:NAME, mkv:NAME (this package's small models)")
    pi.add_argument("--size", type=int, default=64, help="example input size (pixels)")
    pi.add_argument("--in-chans", type=int, default=3)
    pi.add_argument("--num-classes", type=int, default=None)
    pi.add_argument("--free-only", action="store_true", help="hide frozen groups")
    pi.add_argument("--members", action="store_true", help="list every member of every group")
    pi.set_defaults(func=_cmd_inspect)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except MergeVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
