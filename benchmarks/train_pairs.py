"""Train endpoint pairs on CIFAR-10 from different seeds (different init AND data order) and cache them.

RESULT: see docs/results.md ("Training cost" and "Barriers"): seconds per epoch on this machine and the
test accuracy of every cached checkpoint. Machine: 2-core x86_64 CPU shared with 3 other jobs, no GPU,
1 thread.

    python benchmarks/train_pairs.py --data ../shared/data/cifar10 --config resnet20_bn_w1 --seeds 0 1 \
        --epochs 30 --out checkpoints/
    python benchmarks/train_pairs.py --data PATH --config resnet20_bn_w1 vgg11_none --time-only 20
                                              # seconds per epoch, measured on 20 steps (no checkpoint)

``--data`` is the folder given to ``torchvision.datasets.CIFAR10(root)`` or the offline .npz copy.
Writes ``{out}/{config}_s{seed}.safetensors`` (metadata: the config, seed, epochs and accuracy) and
``{out}/{config}_s{seed}.json``; an existing checkpoint with the same settings is kept (``--force``
retrains). Training: ``mergekit_vision.training.train_classifier``, SGD + Nesterov, one-cycle linear
schedule, random crop (pad 4) + horizontal flip.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

logger = logging.getLogger("train_pairs")


def _timm_resnet18_cifar() -> nn.Module:
    """timm's resnet18 adapted to 32x32 inputs: a 3x3 stride-1 stem and no max pool (as in the
    REPAIR paper's CIFAR ResNet-18)."""
    import timm

    m = timm.create_model("resnet18", pretrained=False, num_classes=10)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _timm_resnet18_default_stem() -> nn.Module:
    """timm's resnet18 as it is (7x7 stride-2 stem + max pool) on 32x32 inputs: an 8x8 map after the
    stem, about a CIFAR ResNet-20's compute per image (the stride-1 variant costs ~14x more)."""
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def _timm_resnet50_default_stem() -> nn.Module:
    """timm's resnet50 as it is on 32x32 inputs (8x8 after the stem, 1x1 in the last stage): a trained
    bottleneck pair at about twice a CIFAR ResNet-20's compute, for the tap-policy and weight-matching
    measurements on 2,048-channel residual streams."""
    import timm

    return timm.create_model("resnet50", pretrained=False, num_classes=10)


def _timm_vit_cifar() -> nn.Module:
    """A small ViT for 32x32 inputs (issue 14's transformer pair): timm's VisionTransformer with 4x4
    patches (64 tokens + class token), width 192, 6 blocks of 3 heads of 64, MLP ratio 4 (5.4M
    parameters). Trained with AdamW (the config's ``optimizer``)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=192,
                             depth=6, num_heads=3, num_classes=10)


def _mkv(name: str, kaiming: bool = False, **kw) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from mergekit_vision.models import create_model

        m = create_model(name, **kw)
        if kaiming:
            # Without normalization, PyTorch's default conv init shrinks the signal ~250x over VGG-11's
            # eight convs and SGD stalls at chance; He init keeps it at unit scale.
            for mod in m.modules():
                if isinstance(mod, nn.Conv2d):
                    nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                    nn.init.zeros_(mod.bias)
        return m
    return build


# name -> (builder, training settings). lr is the peak of the one-cycle schedule at batch 128;
# nets without BatchNorm get a lower one (no norm to absorb a large step).
CONFIGS: Dict[str, dict] = {
    "resnet20_bn_w1": dict(build=_mkv("resnet20", width=1, norm="bn"), lr=0.1),
    "resnet20_bn_w2": dict(build=_mkv("resnet20", width=2, norm="bn"), lr=0.1),
    "resnet20_bn_w4": dict(build=_mkv("resnet20", width=4, norm="bn"), lr=0.1),
    "resnet20_ln_w1": dict(build=_mkv("resnet20", width=1, norm="ln"), lr=0.05),
    "resnet20_ln_w4": dict(build=_mkv("resnet20", width=4, norm="ln"), lr=0.05),
    "vgg11_none": dict(build=_mkv("vgg11", kaiming=True, width=1, norm="none"), lr=0.02),
    "timm_resnet18": dict(build=_timm_resnet18_cifar, lr=0.1),
    "timm_resnet18_stem4": dict(build=_timm_resnet18_default_stem, lr=0.1),
    "timm_resnet50_stem4": dict(build=_timm_resnet50_default_stem, lr=0.1),
    "timm_vit_p4_d192_l6": dict(build=_timm_vit_cifar, lr=1e-3, optimizer="adamw", weight_decay=0.05),
}


def _optim(config: str) -> dict:
    """The config's optimizer settings beyond SGD's defaults (recorded in the checkpoint's settings only
    when set, so checkpoints of the SGD configs stay cached)."""
    return {k: CONFIGS[config][k] for k in ("optimizer", "weight_decay") if k in CONFIGS[config]}


def build(config: str) -> nn.Module:
    if config not in CONFIGS:
        raise SystemExit(f"unknown config {config!r}; valid: {', '.join(CONFIGS)}")
    return CONFIGS[config]["build"]()


def checkpoint_path(out: Path, config: str, seed: int) -> Path:
    return out / f"{config}_s{seed}.safetensors"


def train_one(config: str, seed: int, train, test, *, epochs: int, batch_size: int, lr: float, out: Path,
              force: bool, max_train, precision: str = "fp32") -> dict:
    from mergekit_vision.export import save_safetensors, write_json_atomic
    from mergekit_vision.training import evaluate, train_classifier

    path = checkpoint_path(out, config, seed)
    meta_path = path.with_suffix(".json")
    settings = dict(config=config, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                    train_samples=len(train), augment="crop_flip", precision=precision, **_optim(config))
    if path.exists() and meta_path.exists() and not force:
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in settings.items()):
            logger.info("%s: cached (test acc %.2f%%)", path.name, 100 * meta["test_acc"])
            return meta
        logger.info("%s: cached with other settings; retraining", path.name)
    torch.manual_seed(seed)  # the initialization; train_classifier's seed fixes data order and augmentation
    model = build(config)
    t0 = time.perf_counter()
    train_classifier(model, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment="crop_flip",
                     precision=precision, channels_last=precision == "bf16", **_optim(config))
    seconds = time.perf_counter() - t0
    model.eval()
    t0 = time.perf_counter()
    r = evaluate(model, test)
    eval_seconds = time.perf_counter() - t0
    meta = dict(settings, test_acc=r["acc"], test_loss=r["loss"], train_seconds=seconds,
                seconds_per_epoch=seconds / epochs, seconds_per_epoch_50k=seconds / epochs * 50000 / len(train),
                eval_seconds=eval_seconds, threads=torch.get_num_threads(), max_train=max_train,
                machine=f"{platform.machine()} {os.cpu_count()} CPUs", torch=torch.__version__)
    save_safetensors(model, path, metadata=meta)
    write_json_atomic(meta_path, meta)
    logger.info("%s: test acc %.2f%% loss %.4f; %.0fs training (%.0f s/epoch, %.0f s per 50k-image epoch)",
                path.name, 100 * r["acc"], r["loss"], seconds, seconds / epochs, meta["seconds_per_epoch_50k"])
    return meta


def time_epoch(config: str, train, *, batch_size: int, lr: float, steps: int, precision: str = "fp32") -> float:
    """CPU seconds per 50,000-image epoch, from ``steps`` training steps (nothing is saved)."""
    from mergekit_vision.training import train_classifier

    n = min(len(train), steps * batch_size)
    sub = (train.tensors[0][:n], train.tensors[1][:n])
    torch.manual_seed(0)
    model = build(config)
    warm = (sub[0][:3 * batch_size], sub[1][:3 * batch_size])
    kw = dict(_optim(config), precision=precision, channels_last=precision == "bf16")
    train_classifier(model, warm, epochs=1, batch_size=batch_size, lr=lr, seed=0, augment="crop_flip", **kw)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    train_classifier(model, sub, epochs=1, batch_size=batch_size, lr=lr, seed=1, augment="crop_flip", **kw)
    per_epoch = (time.perf_counter() - t0) * 50000 / n
    cpu_per_epoch = (time.process_time() - c0) * 50000 / n  # what other jobs on the machine do not inflate
    logger.info("%s: %.0f CPU s (%.0f wall s) per 50k-image epoch (%d steps of %d, %d thread(s))", config,
                cpu_per_epoch, per_epoch, math.ceil(n / batch_size), batch_size, torch.get_num_threads())
    return cpu_per_epoch


def calibration_batches(train, n: int, batch_size: int = 250, seed: int = 0) -> list:
    """The benchmarks' calibration set: ``n`` training images, a fixed random subset (``seed``), in batches."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return list(train.tensors[0][idx].split(batch_size))


def load_checkpoint(out: Path, config: str, seed: int) -> nn.Module:
    from mergekit_vision.export import load_into

    return load_into(build(config), checkpoint_path(out, config, seed)).eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-10: torchvision's root folder or the .npz copy")
    p.add_argument("--config", nargs="+", required=True, help=f"one or more of: {', '.join(CONFIGS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=None, help="required unless --time-only")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--max-train", type=int, default=None, help="train on the first N images only (smoke runs)")
    p.add_argument("--out", default="checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast + channels_last (about 2.2x faster on this CPU; weights stay float32)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every epoch")
    p.add_argument("--time-only", type=int, default=None, metavar="STEPS",
                   help="only measure seconds per epoch from STEPS training steps (after 3 warm-up steps)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.verbose:
        logging.getLogger("mergekit_vision.training").setLevel(logging.DEBUG)
    torch.set_num_threads(args.threads)
    from mergekit_vision.data import load_cifar10

    for config in args.config:
        if config not in CONFIGS:
            raise SystemExit(f"unknown config {config!r}; valid: {', '.join(CONFIGS)}")
    train = load_cifar10(args.data, "train", max_samples=args.max_train)
    if args.time_only:
        for config in args.config:
            time_epoch(config, train, batch_size=args.batch_size, steps=args.time_only,
                       lr=args.lr if args.lr is not None else CONFIGS[config]["lr"],
                       precision="bf16" if args.bf16 else "fp32")
        return 0
    if args.epochs is None:
        raise SystemExit("--epochs is required (or --time-only STEPS)")
    test = load_cifar10(args.data, "test")
    out = Path(args.out)
    for config in args.config:
        for seed in args.seeds:
            train_one(config, seed, train, test, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr if args.lr is not None else CONFIGS[config]["lr"], out=out, force=args.force,
                      max_train=args.max_train, precision="bf16" if args.bf16 else "fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
