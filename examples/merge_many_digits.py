"""Star alignment vs iterative MergeMany for merging K independently trained models (the default's evidence).

Result: 4 tiny_resnets (width 32, digits 16x16, 99% each) merge at 89.3% (seeds 0-3) and 90.7% (seeds
4-7) with activation MergeMany + REPAIR, vs 89.6% / 80.0% for star alignment to model 0 (74.7-90.0%
depending on the reference) and 9.6% for the naive average. Machine: 2-core AMD EPYC VM shared with
other jobs, 1 thread, torch 2.14.1 CPU; ~6 min per run with cached models. Full table:
docs/recipes/merge_many.md.

    python examples/merge_many_digits.py --seeds 0 1 2 3 --out merge_many_digits.json

Trains (or loads from the cache) one tiny_resnet per seed on scikit-learn's digits, then merges all of
them with each alignment (star to model 0, MergeMany sweeps), method and repair mode, and prints test
accuracy next to the mean member and the logit ensemble (the upper bound a single model can aim for).
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from mergekit_vision.data import digits_dataset
from mergekit_vision.demo import DEMO_CONFIG, train_digits_model
from mergekit_vision.merge_many import merge_many
from mergekit_vision.training import evaluate


class Ensemble(torch.nn.Module):
    def __init__(self, models):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([m(x).softmax(-1) for m in self.models]).mean(0).log()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--iterations", type=int, default=10, help="MergeMany sweeps at most")
    ap.add_argument("--calib-batches", type=int, default=10, help="calibration batches of 128 training images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    size = DEMO_CONFIG["size"]
    train, test = digits_dataset(size, "train"), digits_dataset(size, "test")
    models = [train_digits_model(s) for s in args.seeds]
    calib = [x for x, _ in zip(train.tensors[0].split(128), range(args.calib_batches))]
    members = [evaluate(m, test)["acc"] for m in models]
    rows = {"mean member": sum(members) / len(members), "best member": max(members),
            "logit ensemble": evaluate(Ensemble(models), test)["acc"]}
    details = {}
    for method in ("none", "weight", "activation"):
        for iters in ((0,) if method == "none" else (0, args.iterations)):
            for repair in (False, "reset", True):
                name = f"{method} {'star' if iters == 0 else 'MergeMany'} repair={repair}"
                if method == "none":
                    name = f"naive average repair={repair}"
                t0 = time.perf_counter()
                merged, rep = merge_many(models, calib, method=method, iterations=iters, repair=repair,
                                         progress=False, return_report=True)
                dt = time.perf_counter() - t0
                rows[name] = evaluate(merged, test)["acc"]
                details[name] = {"seconds": dt, "sweeps": rep.sweeps, "converged": rep.converged,
                                 "changes_per_sweep": rep.changes_per_sweep, "moved": rep.moved()}
                print(f"{name:45s} {100 * rows[name]:5.1f}%  {dt:6.1f}s  sweeps={rep.sweeps} "
                      f"changes={rep.changes_per_sweep}", flush=True)
    # star alignment's dependence on the reference
    for r in range(1, len(models)):
        merged = merge_many(models, calib, reference=r, progress=False)
        rows[f"activation star repair=True reference={r}"] = evaluate(merged, test)["acc"]
    print("\n| merge | test accuracy |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {100 * v:.1f}% |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"members": members, "accuracy": rows, "details": details, "args": vars(args)}, fh, indent=2)


if __name__ == "__main__":
    main()
