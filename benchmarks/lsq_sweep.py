"""Least-squares repair's options on a cached CIFAR-10 pair: midpoint accuracy per (lsq_ridge, lsq_positions).

RESULT: see docs/results.md ("Least-squares repair", options).

    python benchmarks/lsq_sweep.py --data ../shared/data/cifar10 --ckpt checkpoints/ --config resnet20_bn_w1 \
        --calib 1000 --eval-samples 2000 --ridge 1e-4 1e-3 1e-2 --positions 64 256 all
    python benchmarks/lsq_sweep.py ... --settings 1e-3:16 1e-3:64 1e-2:64   # explicit pairs

Matching and the endpoints' statistics are measured once (``prepare_merge``); each setting then runs only
the least-squares pass (``finish_merge`` with the options replaced). Calibration: the same fixed random
training subset as benchmarks/barriers.py; evaluation: the first ``--eval-samples`` test images.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

from train_pairs import calibration_batches, load_checkpoint  # benchmarks/ is this script's folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--ckpt", default="checkpoints")
    p.add_argument("--config", default="resnet20_bn_w1")
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    p.add_argument("--calib", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--ridge", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--positions", nargs="+", default=["64", "256", "all"])
    p.add_argument("--settings", nargs="*", default=None,
                   help="explicit ridge:positions pairs (e.g. 1e-3:64 1e-2:all) instead of the product")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mergekit_vision.data import load_cifar10
    from mergekit_vision.merge import finish_merge, prepare_merge
    from mergekit_vision.options import MergeOptions
    from mergekit_vision.training import evaluate

    train, test = load_cifar10(args.data, "train"), load_cifar10(args.data, "test")
    calib = calibration_batches(train, args.calib)
    test = (test.tensors[0][: args.eval_samples], test.tensors[1][: args.eval_samples])
    a, b = (load_checkpoint(Path(args.ckpt), args.config, s) for s in args.seeds)
    ends = [evaluate(m, test)["acc"] for m in (a, b)]
    print(f"{args.config} s{args.seeds[0]}/s{args.seeds[1]}: endpoints {100 * ends[0]:.2f} / {100 * ends[1]:.2f}% "
          f"on {args.eval_samples} test images; calibration {args.calib}", flush=True)
    prepared = prepare_merge([a, b], calib, MergeOptions.create(repair="lsq", progress=False, diagnostic_batches=0))
    rep = finish_merge(dataclasses.replace(prepared, opts=dataclasses.replace(prepared.opts, repair="repair")),
                       [0.5, 0.5])
    print(f"REPAIR: {100 * evaluate(rep, test)['acc']:.2f}%", flush=True)
    settings = ([(float(r), q) for r, q in (x.split(":") for x in args.settings)] if args.settings
                else list(itertools.product(args.ridge, args.positions)))
    for ridge, pos in settings:
        opts = dataclasses.replace(prepared.opts, lsq_ridge=ridge, lsq_positions=None if pos == "all" else int(pos))
        t0 = time.process_time()
        merged = finish_merge(dataclasses.replace(prepared, opts=opts), [0.5, 0.5])
        t = time.process_time() - t0
        print(f"lsq ridge={ridge:g} positions={pos}: {100 * evaluate(merged, test)['acc']:.2f}% "
              f"({t:.0f} CPU s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
