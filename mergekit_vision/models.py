"""Small reference architectures (the REPAIR paper's CIFAR ResNet-20 and VGG-11, plus a tiny ResNet for
fast tests): plain torch.nn modules, traceable by ``torch.fx.symbolic_trace``.

Build one with :func:`create_model` (``create_model("resnet20", width=4, norm="ln")``) or call the builders.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

import torch
from torch import nn

from .errors import MergeVisionError

__all__ = ["BasicBlock", "CifarResNet", "VGG", "resnet20", "vgg11", "tiny_resnet", "MODELS", "NORMS",
           "UnknownNameError", "create_model", "make_norm"]


class UnknownNameError(MergeVisionError, ValueError):
    """An unknown model or norm name (the message lists the valid ones)."""


def _groups_for(channels: int, target: int) -> int:
    # The largest divisor of `channels` not above `target`: GroupNorm needs groups | channels.
    for g in range(max(1, min(target, channels)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _batch_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def _layer_norm(channels: int) -> nn.Module:
    # LayerNorm over (C, H, W) with a per-channel affine, as the REPAIR paper builds it.
    return nn.GroupNorm(1, channels)


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(_groups_for(channels, min(32, max(1, channels // 4))), channels)


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


# Norm registry: name -> factory(channels). Convs carry a bias unless the norm is BatchNorm.
NORMS: Dict[str, Callable[[int], nn.Module]] = {
    "bn": _batch_norm,
    "ln": _layer_norm,
    "gn": _group_norm,
    "none": _no_norm,
}


def make_norm(norm: str, channels: int) -> nn.Module:
    """The norm layer ``norm`` (one of :data:`NORMS`) for ``channels`` channels."""
    try:
        factory = NORMS[norm]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown norm {norm!r}; expected one of {sorted(NORMS)} "
            "('bn' BatchNorm2d, 'ln' GroupNorm(1, C), 'gn' GroupNorm, 'none' no norm)."
        ) from None
    return factory(channels)


def _check_width(width: Union[int, float], name: str) -> None:
    if not isinstance(width, (int, float)) or isinstance(width, bool) or width <= 0:
        raise MergeVisionError(f"{name}: width must be a positive number, got {width!r}.")


def _channels(base: int, width: Union[int, float]) -> int:
    return max(1, int(round(base * width)))


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm plus a shortcut (1x1 conv + norm when the shape changes), then relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "bn") -> None:
        super().__init__()
        bias = norm != "bn"  # without BN a conv bias is where a per-channel shift can be folded
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.norm2 = make_norm(norm, planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            # Option B: a learned projection, so the residual stream can be permuted per stage.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=bias),
                make_norm(norm, planes),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class CifarResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, stages of BasicBlocks, global average pool, linear head."""

    def __init__(self, stage_channels: Sequence[int], blocks_per_stage: Sequence[int], norm: str = "bn",
                 num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if len(stage_channels) != len(blocks_per_stage) or not stage_channels:
            raise MergeVisionError(
                f"CifarResNet: stage_channels {list(stage_channels)} and blocks_per_stage "
                f"{list(blocks_per_stage)} must be non-empty and of equal length."
            )
        make_norm(norm, 1)  # validate the name before building anything
        bias = norm != "bn"
        c0 = stage_channels[0]
        self.conv1 = nn.Conv2d(in_chans, c0, 3, stride=1, padding=1, bias=bias)
        self.norm1 = make_norm(norm, c0)
        self.relu = nn.ReLU()
        in_planes = c0
        for i, (planes, n) in enumerate(zip(stage_channels, blocks_per_stage)):
            blocks: List[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride=stride, norm=norm))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(x)))
        for i in range(self.num_stages):  # a fixed Python loop: fx unrolls it
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


class VGG(nn.Module):
    """VGG for 32x32 inputs: conv3x3(-norm)-relu stacks with 2x2 max pools, flatten, linear head."""

    def __init__(self, cfg: Sequence[Union[int, str]], norm: str = "none", num_classes: int = 10,
                 in_chans: int = 3) -> None:
        super().__init__()
        make_norm(norm, 1)
        layers: List[nn.Module] = []
        c = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.Conv2d(c, int(v), 3, padding=1, bias=norm != "bn"))
                if norm != "none":
                    layers.append(make_norm(norm, int(v)))
                layers.append(nn.ReLU())
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


_VGG11_CFG: Sequence[Union[int, str]] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def resnet20(width: int = 1, norm: str = "bn", num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-20: 3 stages of 3 BasicBlocks with 16/32/64 x ``width`` channels, option-B shortcuts.

    ``norm``: "bn" (BatchNorm2d, convs without bias), "ln" (GroupNorm(1, C)), "gn" (GroupNorm), "none".
    Takes 32x32 inputs (any size >= 4 works: the head follows a global average pool).
    """
    _check_width(width, "resnet20")
    chans = [_channels(c, width) for c in (16, 32, 64)]
    return CifarResNet(chans, [3, 3, 3], norm=norm, num_classes=num_classes, in_chans=in_chans)


def vgg11(width: int = 1, norm: str = "none", num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """CIFAR VGG-11 (64,M,128,M,256,256,M,512,512,M,512,512,M) with channels x ``width``.

    Convs carry a bias; ``norm`` defaults to "none" (the REPAIR paper's plain VGG), "bn"/"ln"/"gn" add
    one norm after each conv. Needs 32x32 inputs: five max pools bring them to 1x1 before the head.
    """
    _check_width(width, "vgg11")
    cfg = [v if v == "M" else _channels(int(v), width) for v in _VGG11_CFG]
    return VGG(cfg, norm=norm, num_classes=num_classes, in_chans=in_chans)


def tiny_resnet(width: int = 8, norm: str = "bn", num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A tiny ResNet for fast tests: stem conv (``width`` channels), one BasicBlock at ``width`` and one
    downsampling block (projection shortcut) at 2 x ``width``, average pool, linear. For 16x16 inputs.
    """
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise MergeVisionError(f"tiny_resnet: width must be a positive int (channels), got {width!r}.")
    return CifarResNet([width, 2 * width], [1, 1], norm=norm, num_classes=num_classes, in_chans=in_chans)


# Model registry: name -> builder(**kwargs).
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "vgg11": vgg11,
    "tiny_resnet": tiny_resnet,
}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` (one of :data:`MODELS`) with the builder's ``kwargs``."""
    try:
        builder = MODELS[name]
    except (KeyError, TypeError):
        raise UnknownNameError(f"unknown model {name!r}; expected one of {sorted(MODELS)}.") from None
    return builder(**kwargs)
