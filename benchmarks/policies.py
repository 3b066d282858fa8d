"""The choices behind merge's speed options, measured on trained CIFAR-10 pairs: tap policies and the
weight-matching stop tolerance.

RESULT: see docs/results.md ("Tap policies" and "Weight matching against rebasin"), produced by the
commands below on a 2-core x86_64 CPU (shared, 1 thread, no GPU) from benchmarks/train_pairs.py's
checkpoints.

    python benchmarks/policies.py --data ../shared/data/cifar10 --ckpt checkpoints/ \\
        --configs resnet20_bn_w1 timm_resnet18_stem4 timm_resnet50_stem4 --out docs/bench/policies.jsonl

For each configuration (seeds 0 and 1):
  * taps: ``merge(a, b, calib, taps=policy)`` with REPAIR for every policy in --taps: midpoint test
    accuracy, the number of taps, and the merge's CPU seconds with its A/B pass (where the taps cost);
  * weight matching: ``match_weights`` from three sweep-order seeds run to a fixed point, with the
    objective's improvement after every sweep (how far the default tolerance stops short, against
    the spread between seeds), and the REPAIRed midpoint accuracy of ``method="weight"`` at
    ``weight_tol=0`` and at the default.
One JSON object per measurement is appended to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from train_pairs import calibration_batches, load_checkpoint  # benchmarks/ is this script's folder

clock = time.process_time  # CPU seconds of this process: the other jobs on the machine leave them alone


def _emit(path, row):
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10: torchvision's root folder or the .npz copy")
    p.add_argument("--ckpt", default="checkpoints")
    p.add_argument("--configs", nargs="+", required=True)
    p.add_argument("--taps", nargs="*", default=["all", "lean", "blocks"])
    p.add_argument("--tap-positions", nargs="+", default=["none"],
                   help="merge's tap_positions values to run each policy with ('none': every position)")
    p.add_argument("--calib-seeds", type=int, nargs="+", default=[0],
                   help="calibration subsets (their spread is the noise a policy is compared against)")
    p.add_argument("--weight", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure weight matching (convergence and the tolerance)")
    p.add_argument("--weight-tols", type=float, nargs="*", default=None,
                   help="weight_tol values for the weight-matching merges (default: 0 and the library's default)")
    p.add_argument("--order-seeds", type=int, nargs="+", default=[0],
                   help="sweep-order seeds (merge's seed=) for the weight-matching merges")
    p.add_argument("--convergence", action=argparse.BooleanOptionalAction, default=True,
                   help="record weight matching's objective per sweep from three order seeds")
    p.add_argument("--calib", type=int, default=5000, help="training images for matching and statistics")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mergekit_vision import merge, trace_permutation_spec
    from mergekit_vision.data import load_cifar10
    from mergekit_vision.match.activation import tap_plan
    from mergekit_vision.match.weight import WEIGHT_TOL, match_weights
    from mergekit_vision.training import evaluate

    train, test = load_cifar10(args.data, "train"), load_cifar10(args.data, "test")
    calibs = {cs: calibration_batches(train, args.calib, seed=cs) for cs in args.calib_seeds}
    calib = calibs[args.calib_seeds[0]]
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, {args.threads} thread(s)"
    for config in args.configs:
        a, b = (load_checkpoint(Path(args.ckpt), config, s) for s in (0, 1))
        spec = trace_permutation_spec(a, calib[0][:2])
        for policy in args.taps:
            for positions in [None if v == "none" else int(v) for v in args.tap_positions]:
                for cs, batches in calibs.items():
                    t0 = clock()
                    merged, report = merge(a, b, batches, taps=policy, tap_positions=positions, progress=False,
                                           return_report=True)
                    seconds = clock() - t0
                    _emit(args.out, dict(kind="taps", config=config, taps=policy, tap_positions=positions,
                                         calib_seed=cs, acc=evaluate(merged, test)["acc"],
                                         n_taps=sum(map(len, tap_plan(spec, policy).values())), merge_cpu_s=seconds,
                                         wall_timings=report.timings, machine=machine))
        if not args.weight:
            continue
        sd_a, sd_b = a.state_dict(), b.state_dict()
        for order_seed in (0, 1, 2) if args.convergence else ():
            history = []
            t0 = clock()
            match_weights(spec, sd_a, sd_b, seed=order_seed, tol=0.0, history=history)
            seconds = clock() - t0
            gains = [y - x for x, y in zip([0.0] + history, history)]
            stop = next(i for i, g in enumerate(gains)
                        if g == 0.0 or g <= WEIGHT_TOL * history[i] or i == len(gains) - 1)
            _emit(args.out, dict(kind="weight_convergence", config=config, order_seed=order_seed,
                                 sweeps_to_fixed_point=len(history), cpu_s=seconds, objective=history,
                                 default_tol=WEIGHT_TOL, default_stops_after=stop + 1,
                                 default_objective=history[stop], machine=machine))
        for order_seed in args.order_seeds:
            for tol in args.weight_tols if args.weight_tols is not None else (0.0, WEIGHT_TOL):
                t0 = clock()
                merged, report = merge(a, b, calib, method="weight", weight_tol=tol, seed=order_seed, progress=False,
                                       return_report=True)
                seconds = clock() - t0
                _emit(args.out, dict(kind="weight_merge", config=config, weight_tol=tol, order_seed=order_seed,
                                     acc=evaluate(merged, test)["acc"], match_wall_s=report.timings["match"],
                                     merge_cpu_s=seconds, machine=machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
