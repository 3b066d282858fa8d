"""The README's main job, on data that ships with scikit-learn (no download).

Train (or load from the cache) two small ResNets from different seeds on the digits data, merge them
naively, aligned, and aligned + REPAIR, print the accuracy table, write ``merged.safetensors``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .data import digits_dataset
from .export import load_into, save_safetensors, write_json_atomic, write_text_atomic
from .merge import merge
from .models import tiny_resnet
from .training import evaluate, train_classifier

logger = logging.getLogger(__name__)

DEMO_CONFIG = dict(width=32, size=16, epochs=10, batch_size=128, lr=0.1)


def _cache_dir(cache_dir: Optional[str]) -> Path:
    base = cache_dir or os.environ.get("MERGEKIT_VISION_CACHE") or Path.home() / ".cache" / "mergekit_vision"
    return Path(base) / "demo"


def train_digits_model(seed: int, *, width: int = 32, size: int = 16, epochs: int = 10, batch_size: int = 128,
                       lr: float = 0.1, cache_dir: Optional[str] = None, progress: bool = False) -> nn.Module:
    """A tiny_resnet trained on digits from ``seed`` (init and data order), cached as safetensors;
    ``progress`` shows a bar while it trains (a minute or two on a CPU, once)."""
    torch.manual_seed(seed)
    model = tiny_resnet(width=width, norm="bn", in_chans=1)
    path = _cache_dir(cache_dir) / f"tiny_resnet_w{width}_s{size}_e{epochs}_seed{seed}.safetensors"
    if path.exists():
        try:
            return load_into(model, path).eval()
        except Exception:  # a stale or foreign file: retrain
            logger.warning("ignoring unreadable cache file %s", path)
    logger.info("training the demo's model for seed %d (%d epochs); cached for the next run in %s",
                seed, epochs, path.parent)
    train_classifier(model, digits_dataset(size, "train"), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                     progress=progress)
    model.eval()
    save_safetensors(model, path, metadata={"seed": seed, "config": DEMO_CONFIG})
    return model


def digits_pair(seeds: Tuple[int, int] = (0, 1), cache_dir: Optional[str] = None, progress: bool = False,
                **cfg) -> Tuple[nn.Module, nn.Module]:
    c = {**DEMO_CONFIG, **cfg}
    return tuple(train_digits_model(s, cache_dir=cache_dir, progress=progress, **c)  # type: ignore[return-value]
                 for s in seeds)


def run_demo(out_dir: str = "demo_out", *, quiet: bool = False, cache_dir: Optional[str] = None,
             seeds: Tuple[int, int] = (0, 1)) -> Dict[str, object]:
    """Returns the accuracies and ``"table"`` (the text to show); writes ``merged.safetensors``,
    ``results.json`` and ``results.md`` into ``out_dir``."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    out = Path(out_dir)
    size = DEMO_CONFIG["size"]
    train, test = digits_dataset(size, "train"), digits_dataset(size, "test")
    progress = not quiet
    a, b = digits_pair(seeds, cache_dir=cache_dir, progress=progress)
    calib = [x for x, _ in zip(train.tensors[0].split(256), range(100))]
    results = {
        "model A": evaluate(a, test)["acc"],
        "model B": evaluate(b, test)["acc"],
        "naive average": evaluate(merge(a, b, calib, method="none", repair=False, progress=progress), test)["acc"],
        "naive average + RESET": evaluate(merge(a, b, calib, method="none", repair="reset", progress=progress),
                                          test)["acc"],
        "aligned": evaluate(merge(a, b, calib, repair=False, progress=progress), test)["acc"],
    }
    merged, report = merge(a, b, calib, repair=True, progress=progress, return_report=True)
    results["aligned + REPAIR"] = evaluate(merged, test)["acc"]
    # least-squares repair: every layer refit, in sequence, to the interpolated aligned features
    results["aligned + least squares (repair='lsq')"] = evaluate(
        merge(a, b, calib, repair="lsq", progress=progress), test)["acc"]
    ends = (results["model A"] + results["model B"]) / 2
    barrier = ends - results["aligned"]
    removed = 1 - (ends - results["aligned + REPAIR"]) / barrier if barrier > 0 else float("nan")
    lines = [f"digits ({size}x{size}), tiny_resnet width {DEMO_CONFIG['width']}, two seeds; test accuracy:",
             "", "| model | accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in results.items()]
    summary = report.summary().splitlines()
    removed_lsq = (1 - (ends - results["aligned + least squares (repair='lsq')"]) / barrier if barrier > 0
                   else float("nan"))
    lines += ["", f"barrier of the aligned midpoint removed by REPAIR: {100 * removed:.0f}%, "
              f"by least squares: {100 * removed_lsq:.0f}%",
              f"variance collapse: {summary[2].strip() if len(summary) > 2 else ''}",
              f"total time {time.perf_counter() - t0:.1f}s"]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(merged, out / "merged.safetensors",
                     metadata={"method": "activation", "alpha": 0.5, "repair": "repair",
                               "calibration_samples": report.calibration_samples, "sources": ["seed 0", "seed 1"],
                               "version": report.version})
    write_json_atomic(out / "results.json", {"accuracy": results, "barrier_removed": removed,
                                             "report": report.to_dict()})
    write_text_atomic(out / "results.md", text + "\n")
    results["barrier_removed"] = removed
    results["table"] = text + f"\nwrote {out / 'merged.safetensors'}"
    return results
