"""REPAIR vs least-squares repair on the README demo's digits pair (scikit-learn's digits, no download).

RESULT: see docs/results.md ("Least-squares repair").

    python benchmarks/lsq_digits.py

The pair and calibration set are the demo's (mergekit_vision/demo.py: tiny_resnet width 32 on 16x16
digits, seeds 0 and 1, cached; calibration: the training images); accuracy on the digits test split.
"""
from __future__ import annotations

import sys

import torch


def main() -> int:
    torch.set_num_threads(1)
    from mergekit_vision import merge
    from mergekit_vision.data import digits_dataset
    from mergekit_vision.demo import DEMO_CONFIG, digits_pair
    from mergekit_vision.training import evaluate

    size = DEMO_CONFIG["size"]
    train, test = digits_dataset(size, "train"), digits_dataset(size, "test")
    a, b = digits_pair((0, 1))
    calib = [x for x, _ in zip(train.tensors[0].split(256), range(100))]
    ends = [evaluate(m, test)["acc"] for m in (a, b)]
    print(f"digits {size}x{size}: endpoints {100 * ends[0]:.2f} / {100 * ends[1]:.2f}%, "
          f"{sum(x.shape[0] for x in calib)} calibration images, {len(test)} test images")
    for repair in (False, True, "lsq"):
        acc = evaluate(merge(a, b, calib, repair=repair, progress=False), test)["acc"]
        print(f"aligned, repair={repair!r}: {100 * acc:.2f}% (barrier {100 * (sum(ends) / 2 - acc):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
