"""A trained checkpoint merged with a randomly permuted copy of itself: how close to the model does each
repair land? Matching must undo the permutation (then the plain average is the model, bit for bit), and a
repair of a merge that needs none should change nothing.

RESULT: see docs/results.md ("A trained model merged with a permuted copy of itself").

    python benchmarks/self_merge.py --data ../shared/data/cifar10 --ckpt /path/to/ckpt --config timm_resnet50_stem4

Loads ``{config}_s{seed}`` written by benchmarks/train_pairs.py, permutes every free group of its spec at
random, merges with ``repair=False``, ``True`` (REPAIR) and ``"lsq"`` on ``--calib`` training images, and
prints per repair the test accuracy on ``--eval-samples`` images and the largest logit difference to the
model on the first 1,000 of them, relative to the model's largest logit.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from train_pairs import calibration_batches, load_checkpoint  # benchmarks/ is this script's folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10 folder (mergekit_vision.data.load_cifar10)")
    p.add_argument("--ckpt", required=True, help="folder of benchmarks/train_pairs.py checkpoints")
    p.add_argument("--config", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib", type=int, default=5000, help="training images for matching and statistics")
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mergekit_vision import merge, trace_permutation_spec
    from mergekit_vision.data import load_cifar10
    from mergekit_vision.permute import permute, random_perms
    from mergekit_vision.training import evaluate

    train, test = load_cifar10(args.data, "train"), load_cifar10(args.data, "test")
    calib = calibration_batches(train, args.calib)
    xt, yt = test.tensors[0][: args.eval_samples], test.tensors[1][: args.eval_samples]
    a = load_checkpoint(Path(args.ckpt), args.config, args.seed).eval()
    spec = trace_permutation_spec(a, calib[0][:1])
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        ref = torch.cat([a(x) for x in xt[:1000].split(500)])
    print(f"{args.config} s{args.seed}: the model {100 * evaluate(a, (xt, yt))['acc']:.2f}% on {len(yt)} test images")
    print("| repair | accuracy | max logit difference / max logit | seconds |")
    print("|---|---|---|---|")
    for repair in (False, True, "lsq"):
        t0 = time.perf_counter()
        m = merge(a, b, calib, repair=repair, progress=False)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            out = torch.cat([m(x) for x in xt[:1000].split(500)])
        diff = float((out - ref).abs().max() / ref.abs().max())
        print(f"| {repair!r} | {100 * evaluate(m, (xt, yt))['acc']:.2f}% | {diff:.1e} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
