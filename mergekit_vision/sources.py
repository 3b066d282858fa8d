"""Build models from names: ``timm:resnet50``, ``torchvision:resnet18``, ``mkv:resnet20``, ``hf-hub:...``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

from .errors import MergeVisionError

LIBRARIES = ("timm", "torchvision", "mkv")
_ALIASES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm", "mkv": "mkv",
            "mergekit_vision": "mkv"}


def split_name(name: str) -> Tuple[str, str]:
    """``"tv:resnet18"`` -> ``("torchvision", "resnet18")``; a bare name is timm's; ``hf-hub:`` stays timm's."""
    if name.startswith("hf-hub:") or name.startswith("local-dir:"):
        return "timm", name
    if ":" in name:
        lib, arch = name.split(":", 1)
        if lib not in _ALIASES:
            raise MergeVisionError(f"unknown model library {lib!r} in {name!r}; use one of "
                                   f"{', '.join(LIBRARIES)} (e.g. 'timm:resnet50', 'torchvision:resnet18')")
        return _ALIASES[lib], arch
    return "timm", name


def create_model(name: str, *, pretrained: bool = False, kwargs: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Create an architecture by name (random init unless ``pretrained``)."""
    lib, arch = split_name(name)
    kwargs = dict(kwargs or {})
    if lib == "timm":
        import timm

        if not arch.startswith(("hf-hub:", "local-dir:")) and not timm.is_model(arch):
            close = timm.list_models(f"*{arch[:6]}*")[:8]
            raise MergeVisionError(f"timm has no model {arch!r}; similar names: {close}")
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    if lib == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights="DEFAULT" if pretrained else None, **kwargs)
        except ValueError as exc:
            raise MergeVisionError(f"torchvision has no model {arch!r}: {exc}") from exc
    from . import models

    return models.create_model(arch, **kwargs)
