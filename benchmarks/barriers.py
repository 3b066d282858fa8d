"""Interpolation barriers on CIFAR-10 for every cached endpoint pair, next to the REPAIR paper's numbers.

RESULT: see docs/results.md ("Barriers"): the tables and plots there were produced by this script on a
2-core x86_64 CPU (shared, 1 thread, no GPU) from checkpoints written by benchmarks/train_pairs.py.

    python benchmarks/barriers.py --data ../shared/data/cifar10 --ckpt checkpoints/ --out docs/

For each configuration with at least two cached seeds, each pair of seeds (first two by default, all
with --all-pairs): ``mergekit_vision.evaluate.interpolation_curve`` on the CIFAR-10 test set, modes
naive / aligned / aligned + RESET / aligned + REPAIR / aligned + REPAIR with residual-stream
corrections (``repair="stream"``) and, on request (``--modes ... lsq``), aligned + least-squares
repair (``repair="lsq"``), matching and statistics on ``--calib`` training
images (a fixed random subset, no augmentation). Writes ``{out}/barriers.md`` (the table),
``{out}/barriers.json`` (every curve) and ``{out}/img/{config}_s{a}_s{b}.png``.
Barrier = mean endpoint accuracy minus midpoint accuracy; reduction = 1 - barrier(REPAIR) / barrier(aligned).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from train_pairs import CONFIGS, calibration_batches, load_checkpoint  # benchmarks/ is this script's folder

logger = logging.getLogger("barriers")

# REPAIR's stored results (Jordan et al. 2023), CIFAR-10 test accuracy (%) at alpha = 0.5:
# endpoints, aligned without correction, aligned + REPAIR (RESET for BN nets where it is the same), reduction.
PAPER = {
    "resnet20_bn_w1": (93.6, 12.7, 67.6, 0.68),
    "resnet20_bn_w2": (95.2, 16.1, 85.5, 0.88),
    "resnet20_bn_w4": (96.1, 34.8, 92.1, 0.93),
    "resnet20_ln_w1": (92.4, 50.7, 73.5, 0.55),
    "resnet20_ln_w4": (95.5, 88.5, 92.0, 0.50),
    "vgg11_none": (92.2, 61.3, 88.2, 0.87),
    "timm_resnet18": (95.6, 66.0, 94.1, 0.95),
    "timm_resnet18_stem4": (95.6, 66.0, 94.1, 0.95),  # the paper's ResNet-18 has the stride-1 stem
}
# issue 4's targets for aligned + REPAIR's barrier reduction
TARGET = {"resnet20_bn_w1": 0.75, "resnet20_bn_w2": 0.95, "resnet20_bn_w4": 0.95, "resnet20_ln_w4": 0.95,
          "vgg11_none": 0.90}


def cached_seeds(ckpt: Path):
    found = {}
    for p in sorted(ckpt.glob("*_s*.json")):
        m = re.fullmatch(r"(.+)_s(\d+)\.json", p.name)
        if m and m.group(1) in CONFIGS and p.with_suffix(".safetensors").exists():
            found.setdefault(m.group(1), []).append((int(m.group(2)), json.loads(p.read_text())))
    return found


def _pm(values, scale=100.0, fmt="{:.1f}") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return fmt.format(mean)
    return fmt.format(mean) + " ± " + fmt.format(statistics.pstdev(values) * scale)


CORRECTED = ("reset", "repair", "stream", "lsq")
TITLES = {"reset": "+ RESET", "repair": "+ REPAIR", "stream": "+ REPAIR (streams)", "lsq": "+ least squares"}


def summarize(config, curves) -> dict:
    """Midpoint accuracies, barriers and reductions of every mode, as lists over the pairs."""
    row = dict(config=config, pairs=len(curves), epochs=sorted({c.meta.get("epochs") for c in curves}),
               endpoints=[c.mean_endpoint() for c in curves])
    for mode in ("naive", "aligned") + CORRECTED:
        have = [c for c in curves if mode in c.acc]
        row[mode] = [c.acc[mode][c.alphas.index(0.5)] for c in have]
        row[f"barrier_{mode}"] = [c.barrier(mode)["mid"] for c in have]
        # a reduction is relative to the aligned-only midpoint: none where the curve has no "aligned" mode
        row[f"reduction_{mode}"] = [r for c in have if "aligned" in c.acc and (r := c.reduction(mode)) is not None]
    return row


def markdown(rows) -> str:
    corrected = [m for m in CORRECTED if any(r[m] for r in rows)]
    head = (["configuration", "pairs", "epochs", "endpoints (mean)", "naive", "aligned"]
            + [TITLES[m] for m in corrected] + ["barrier aligned"] + [f"barrier {TITLES[m]}" for m in corrected]
            + [f"reduction {TITLES[m]}" for m in corrected]
            + ["paper: endpoints, aligned, corrected, reduction", "target reduction"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        paper = PAPER.get(r["config"])
        tgt = TARGET.get(r["config"])
        cells = ([r["config"], str(r["pairs"]), ",".join(map(str, r["epochs"])), _pm(r["endpoints"]), _pm(r["naive"]),
                  _pm(r["aligned"])] + [_pm(r[m]) for m in corrected] + [_pm(r["barrier_aligned"])]
                 + [_pm(r[f"barrier_{m}"]) for m in corrected]
                 + [_pm(r[f"reduction_{m}"], fmt="{:.0f}%") for m in corrected]
                 + [f"{paper[0]}, {paper[1]}, {paper[2]}, {100 * paper[3]:.0f}%" if paper else "-",
                    f"≥ {round(100 * tgt)}%" if tgt else "-"])
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10: torchvision's root folder or the .npz copy")
    p.add_argument("--ckpt", default="checkpoints")
    p.add_argument("--out", default="docs")
    p.add_argument("--configs", nargs="*", default=None, help="default: every configuration with 2+ seeds cached")
    p.add_argument("--all-pairs", action="store_true", help="every pair of cached seeds, not only the first two")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--calib", type=int, default=5000, help="training images for matching and statistics")
    p.add_argument("--eval-samples", type=int, default=None, help="test images (default: all 10,000)")
    p.add_argument("--method", default="activation", choices=["activation", "weight"])
    p.add_argument("--modes", nargs="+", default=["naive", "aligned", "reset", "repair", "stream"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--streams-only", action="store_true",
                   help="attention heads left unaligned (spec.without_heads()): the curves are stored as "
                        "{config}_s{a}_s{b}_streams, outside the table, to set against the full spec's")
    p.add_argument("--rotate", action="store_true",
                   help="the matched modes also rotate the residual streams where that folds exactly "
                        "(merge(rotate_stream=True)); the curves are stored as {config}_s{a}_s{b}_rot (with "
                        "--streams-only: _streams_rot), outside the table")
    p.add_argument("--lsq-logits", default="mean", choices=["mean", "probs"],
                   help="the lsq mode's target for the logits (merge(lsq_logits=...)); 'probs' stores the curves "
                        "as {config}_s{a}_s{b}_probs, outside the table")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    logging.getLogger("mergekit_vision").setLevel(logging.WARNING)  # one summary per curve, not per merge
    torch.set_num_threads(args.threads)
    from mergekit_vision.data import load_cifar10
    from mergekit_vision.evaluate import Curve, interpolation_curve, plot_curve
    from mergekit_vision.export import write_json_atomic, write_text_atomic

    ckpt, out = Path(args.ckpt), Path(args.out)
    train, test = load_cifar10(args.data, "train"), load_cifar10(args.data, "test")
    calib = calibration_batches(train, args.calib)
    found = cached_seeds(ckpt)
    configs = args.configs or [c for c in CONFIGS if len(found.get(c, [])) >= 2]
    if not configs:
        raise SystemExit(f"no configuration has two cached seeds in {ckpt}; run benchmarks/train_pairs.py first")
    json_path = out / "barriers.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    for config in configs:
        seeds = found.get(config, [])
        if len(seeds) < 2:
            logger.warning("%s: %d seed(s) cached, need 2; skipped", config, len(seeds))
            continue
        pairs = list(itertools.combinations(seeds, 2)) if args.all_pairs else [tuple(seeds[:2])]
        for (sa, meta_a), (sb, _) in pairs:
            key = f"{config}_s{sa}_s{sb}" + ("_streams" if args.streams_only else "") + ("_rot" if args.rotate else "")
            key += "_probs" if args.lsq_logits == "probs" else ""
            t0 = time.perf_counter()
            a, b = load_checkpoint(ckpt, config, sa), load_checkpoint(ckpt, config, sb)
            spec = None
            if args.streams_only:
                from mergekit_vision import trace_permutation_spec

                spec = trace_permutation_spec(a, calib[0][:1]).without_heads()
            curve = interpolation_curve(a, b, test, calib_loader=calib, alphas=args.alphas, method=args.method,
                                        modes=args.modes, spec=spec, rotate_stream=args.rotate,
                                        lsq_logits=args.lsq_logits, max_samples=args.eval_samples, progress=False)
            curve.meta.update(config=config, seeds=[sa, sb], epochs=meta_a["epochs"],
                              train_samples=meta_a["train_samples"], seconds=time.perf_counter() - t0,
                              streams_only=args.streams_only, rotate=args.rotate, lsq_logits=args.lsq_logits)
            logger.info("%s (%.0fs)\n%s", key, curve.meta["seconds"], curve.table())
            plot_curve(curve, out / "img" / f"{key}.png",
                       title=f"{config}, seeds {sa}/{sb}, epochs: {meta_a['epochs']}"
                       + (", streams only" if args.streams_only else "") + (", stream rotated" if args.rotate else ""))
            results[key] = curve.to_dict()
            write_json_atomic(json_path, results)
    # the table covers every curve in barriers.json: runs of other configurations accumulate
    by_config = {}
    for d in results.values():
        c = Curve.from_dict(d)
        ablation = c.meta.get("streams_only") or c.meta.get("rotate") or c.meta.get("lsq_logits", "mean") != "mean"
        if not ablation:  # ablations stay in barriers.json
            by_config.setdefault(c.meta["config"], []).append(c)
    rows = [summarize(config, by_config[config]) for config in CONFIGS if config in by_config]
    header = (f"<!-- written by benchmarks/barriers.py on {platform.machine()}, {os.cpu_count()} CPUs, "
              f"{args.threads} thread(s); calibration {args.calib} training images; method {args.method} -->\n")
    table = markdown(rows)
    write_text_atomic(out / "barriers.md", header + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
