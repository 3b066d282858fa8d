"""A validated config's entries -> models (``load_model``: architecture, checkpoint, state-dict checks)
and data loaders (``load_data``).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .. import data as D
from ..errors import ArchitectureMismatchError, ConfigError, DataError, MergeVisionError
from ..export import load_sharded
from ..sources import create_model
from .schema import CalibrationConfig, ModelConfig

__all__ = ["load_model", "load_data", "file_sha256"]

logger = logging.getLogger(__name__)

_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model")  # {"state_dict": {...}} and friends


# ---- config -> models -------------------------------------------------------------------------------
def file_sha256(path: Union[str, os.PathLike]) -> str:
    """sha256 of a file, or of a folder's weight files and index (name and content, in name order)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.name.endswith((".safetensors", ".safetensors.index.json"))) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_model(mc: ModelConfig, *, where: str = "models[0]", dtype: Optional[torch.dtype] = None,
               ) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build ``mc``'s architecture, load its weights; return (model in eval mode, source record).

    The source record (``model``, ``checkpoint`` file name, ``sha256``) goes into the merge report and
    the safetensors metadata. Errors name ``where`` (the config key) and the fix.
    """

    kwargs = dict(mc.kwargs)
    source: Dict[str, Any] = {"model": mc.model, "kwargs": kwargs, "checkpoint": None, "sha256": None}
    if mc.pretrained:
        try:
            model = create_model(mc.model, pretrained=True, kwargs=kwargs)
        except MergeVisionError as exc:
            raise type(exc)(f"{where}.model: {exc}") from exc
        except Exception as exc:  # network, hub or cache errors
            raise MergeVisionError(f"{where}: cannot load the pretrained weights of {mc.model!r} "
                                   f"({type(exc).__name__}: {exc}); check the name and that you are online, "
                                   "or give checkpoint: PATH") from exc
        return model.eval().to(dtype) if dtype else model.eval(), source

    ckpt = Path(mc.checkpoint)
    source.update(checkpoint=ckpt.name, sha256=file_sha256(ckpt))
    if mc.loader == "timm":
        model = _load_with_timm(mc, ckpt, kwargs, where)
    else:
        model = _build(mc, kwargs, where)
        fix = (f" Set {where}.kwargs to the kwargs the checkpoint was trained with (e.g. num_classes), "
               f"or {where}.model to its architecture.")
        if ckpt.is_dir() or ckpt.suffix.lower() == ".safetensors":

            try:
                state_dict, _ = load_sharded(ckpt)  # a file, or a folder of shards and their index
            except MergeVisionError as exc:
                raise type(exc)(f"{where}.checkpoint: {exc}") from exc
        else:
            state_dict = _read_torch_state_dict(ckpt, where)
        state_dict = _unwrapped(state_dict, model)
        problems = _state_dict_problems(model, state_dict)
        if problems:
            raise ArchitectureMismatchError(f"{where}.checkpoint: {type(model).__name__} ({mc.model}) does not "
                                            f"fit '{ckpt}': {problems}.{fix}")
        model.load_state_dict(state_dict)
    logger.debug("%s: %s from %s (sha256 %s)", where, mc.model, ckpt, source["sha256"][:12])
    return (model.eval().to(dtype) if dtype else model.eval()), source


def _build(mc: ModelConfig, kwargs: Dict[str, Any], where: str) -> nn.Module:

    try:
        return create_model(mc.model, kwargs=kwargs)
    except MergeVisionError as exc:
        raise type(exc)(f"{where}.model: {exc}") from exc
    except TypeError as exc:  # an unknown constructor argument
        raise ConfigError(f"{where}.kwargs: {mc.model!r} does not take these kwargs ({exc}); "
                          "remove or rename them") from exc


def _load_with_timm(mc: ModelConfig, ckpt: Path, kwargs: Dict[str, Any], where: str) -> nn.Module:
    """timm's own loader (pretrained_cfg_overlay file=...): applies the model's checkpoint filter, so
    original-format checkpoints (e.g. a ViT .npz) load too."""
    import timm

    overlay: Dict[str, Any] = {"file": str(ckpt)}
    if "num_classes" in kwargs:
        overlay["num_classes"] = kwargs["num_classes"]  # else timm drops the classifier as "adapted"
    try:
        return timm.create_model(mc.arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}.kwargs: {mc.model!r} does not take these kwargs ({exc})") from exc
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise ArchitectureMismatchError(
            f"{where}.checkpoint: timm cannot load '{ckpt}' into {mc.model!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:400]}). Set {where}.kwargs to the kwargs it was trained with, "
            "or loader: state_dict for a plain state dict.") from exc


def _read_torch_state_dict(path: Path, where: str) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled objects outside the weights-only allow-list
        raise ConfigError(
            f"{where}.checkpoint: cannot read '{path}' with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300]}). Save a plain state dict (torch.save(model.state_dict(), path)) "
            "or a .safetensors file.") from exc
    sd = obj
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        sd = next((obj[k] for k in _STATE_DICT_WRAPPERS if isinstance(obj.get(k), Mapping) and _all_tensors(obj[k])),
                  None)
    if not isinstance(sd, Mapping) or not sd or not _all_tensors(sd):
        found = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise ConfigError(f"{where}.checkpoint: '{path}' holds no state dict (found {found}); expected "
                          f"{{name: tensor}} or one under {' / '.join(_STATE_DICT_WRAPPERS)}.")
    return dict(sd)


# the key prefixes of a state dict saved from a wrapped model: DataParallel/DDP, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """``sd`` without the prefixes a wrapper adds to every key (``module.``, ``_orig_mod.``, nested in
    any order), as long as ``model``'s own keys do not carry that prefix themselves."""
    own = list(model.state_dict())
    while sd:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)
                       and not (own and all(k.startswith(p) for k in own))), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _all_tensors(m: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in m.items())


def _state_dict_problems(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"'{k}': {tuple(sd[k].shape)} in file vs {tuple(v.shape)} in model"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]

    def few(keys: List[str]) -> str:
        return ", ".join(f"'{k}'" if "'" not in k else k for k in keys[:5]) + (
            f" ... and {len(keys) - 5} more" if len(keys) > 5 else "")

    parts = []
    if shapes:
        parts.append("shape mismatch at " + few(shapes))
    if missing:
        parts.append("missing from the file: " + few(missing))
    if unexpected:
        parts.append("not in the model: " + few(unexpected))
    return "; ".join(parts)


# ---- config -> data ----------------------------------------------------------------------------------
def load_data(dc: CalibrationConfig, *, where: str = "calibration", seed: int = 0,
              model: Optional[nn.Module] = None, labels: bool = False) -> DataLoader:
    """A DataLoader over ``dc``: its split, a seeded random subset of ``samples`` (all when null),
    ``batch_size``, no shuffling. ``labels=True`` requires labelled data (an evaluation set)."""
    p = Path(dc.path)
    try:
        if dc.kind == "image_folder":
            root = p / dc.split if (p / dc.split).is_dir() else p
            size = dc.image_size or _default_image_size(model)
            ds: Dataset = D.load_image_folder(root, image_size=size, mean=dc.mean or D.IMAGENET_MEAN,
                                              std=dc.std or D.IMAGENET_STD)
        elif dc.kind == "cifar10":
            ds = D.load_cifar10(p, dc.split, normalize=dc.mean is None)
            if dc.mean is not None:
                ds = TensorDataset(_normalize(ds.tensors[0], dc.mean, dc.std), ds.tensors[1])
        else:
            with np.load(p, allow_pickle=False) as arrays:
                names = set(arrays.files)
            x_key, y_key = (f"x_{dc.split}", f"y_{dc.split}") if f"x_{dc.split}" in names else ("x", "y")
            ds = D.load_npz(p, x_key, y_key, mean=dc.mean, std=dc.std)
    except DataError as exc:
        raise DataError(f"{where}.path: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}.path: cannot read '{p}' as {dc.kind} ({type(exc).__name__}: {exc})") from exc

    if isinstance(ds, TensorDataset) and dc.image_size and tuple(ds.tensors[0].shape[-2:]) != (dc.image_size,) * 2:
        x = torch.nn.functional.interpolate(ds.tensors[0], size=(dc.image_size, dc.image_size), mode="bilinear",
                                            align_corners=False, antialias=True)
        ds = TensorDataset(x, *ds.tensors[1:])
    if labels and isinstance(ds, TensorDataset) and len(ds.tensors) < 2:
        raise DataError(f"{where}.path: '{p}' has images but no labels; an evaluation set needs integer labels "
                        "(a 'y' array in the .npz).")
    n = len(ds)
    if dc.samples is not None and dc.samples < n:
        # A random subset: the first N of a class-sorted folder would be a few classes only.
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:dc.samples].sort().values
        ds = TensorDataset(*(t[idx] for t in ds.tensors)) if isinstance(ds, TensorDataset) else Subset(ds, idx.tolist())
    logger.info("%s: %d samples (%s, split %s) from %s", where, len(ds), dc.kind, dc.split, p)
    return DataLoader(ds, batch_size=dc.batch_size, shuffle=False, num_workers=dc.workers)


def _normalize(x: torch.Tensor, mean: List[float], std: List[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
    return (x - m) / s


def _default_image_size(model: Optional[nn.Module]) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return int(size[-1]) if size else 224
