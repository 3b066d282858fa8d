"""Matching statistics of this tree against those of another revision, on the same activations.

RESULT: see docs/results.md ("Speed and memory of `merge` against its floor": statistics equivalence).

    python benchmarks/stats_equivalence.py --data ../shared/data/cifar10 --ckpt ../ckpt \\
        --configs timm_resnet18_stem4 resnet20_bn_w1 --against main

One lockstep pass of a trained pair (benchmarks/train_pairs.py's checkpoints) over the calibration
images; at every matching tap (default policy) the same two activations go to three accumulators:
this tree's ``CrossMoments``, the one of ``--against`` (``git show REV:mergekit_vision/match/stats.py``)
and a float64 reference (this tree's code on float64 copies of the activations). Printed per config:
the largest difference of the groups' correlation matrices between each two, and how many groups'
assignments (``match_from_correlations``) differ.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import torch

from train_pairs import calibration_batches, load_checkpoint  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parent.parent


def old_stats(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:mergekit_vision/match/stats.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(f"stats_{rev}")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:stats.py", "exec"), mod.__dict__)
    return mod


def compare(a, b, calib, policy, Old) -> dict:
    """The three accumulators at every tap of one lockstep pass of ``a`` and ``b`` over ``calib``."""
    from mergekit_vision.calibration import plan_calibration
    from mergekit_vision.engine import Lockstep
    from mergekit_vision.match.activation import match_from_correlations, tap_plan
    from mergekit_vision.match.stats import CrossMoments

    plan = plan_calibration(a, calib[0][:1], repair=False)
    taps = tap_plan(plan.spec, policy)
    acc = {kind: {} for kind in ("new", "old", "f64")}

    def hook(node, values):
        va, vb = values
        for g, t in taps[node.name]:
            for kind, cls, x, y in (("new", CrossMoments, va, vb), ("old", Old, va, vb),
                                    ("f64", CrossMoments, va.double(), vb.double())):
                acc[kind].setdefault((g, t.node), cls()).observe(x, y, t.dim, t.start, t.length)

    lock = Lockstep([a, b], plan.gm)
    with torch.no_grad():
        for x in calib:
            lock.run(x, {n: hook for n in taps})
    corrs = {}
    for kind, moms in acc.items():
        per: dict = {}
        for (g, _), m in moms.items():
            per.setdefault(g, []).append(m.correlation())
        corrs[kind] = {g: torch.stack(cs).mean(0) for g, cs in per.items()}
    perms = {k: match_from_correlations(plan.spec, c) for k, c in corrs.items()}
    row = dict(taps=sum(map(len, taps.values())), groups=len(corrs["new"]))
    for x, y in (("new", "old"), ("new", "f64"), ("old", "f64")):
        row[f"max_corr_diff_{x}_{y}"] = max(float((corrs[x][g] - corrs[y][g]).abs().max()) for g in corrs[x])
        row[f"groups_assigned_differently_{x}_{y}"] = sum(not torch.equal(perms[x][g], perms[y][g])
                                                          for g in perms[x])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--calib", type=int, default=5000)
    p.add_argument("--against", default="main")
    p.add_argument("--taps", default="all")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from mergekit_vision.data import load_cifar10

    Old = old_stats(args.against).CrossMoments
    train = load_cifar10(args.data, "train")
    calib = calibration_batches(train, args.calib)
    for config in args.configs:
        a, b = (load_checkpoint(Path(args.ckpt), config, s) for s in (0, 1))
        row = compare(a, b, calib, args.taps, Old)
        print(json.dumps(dict(config=config, images=args.calib, against=args.against, **row)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
