"""The hub side of an output folder: ``config.json`` as timm's ``local-dir:`` / Hugging Face loaders
read it (timm: ``save_config_for_hf``; torchvision: the architecture and its kwargs), and the folder of
weights + config.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, ExportError
from .files import CONFIG_NAME, PathLike, dumps_json, save_sharded, write_json_atomic

__all__ = ["timm_config", "save_model_folder"]


def _library_of(model_name: str, model: Optional[nn.Module], library: Optional[str]) -> str:
    if library is not None:
        if library not in ("timm", "torchvision"):
            raise ConfigError(f"library '{library}' is not supported. Use 'timm' or 'torchvision'.")
        return library
    if model is not None:
        if hasattr(model, "pretrained_cfg"):
            return "timm"
        if type(model).__module__.startswith("torchvision."):
            return "torchvision"
        raise ExportError(
            f"{type(model).__name__} is neither a timm model (no pretrained_cfg) nor a torchvision model. "
            f"Pass library='timm' or library='torchvision'."
        )
    import timm
    import torchvision

    if timm.is_model(model_name):
        return "timm"
    if model_name in torchvision.models.list_models():
        return "torchvision"
    raise ExportError(f"'{model_name}' is neither a timm nor a torchvision model name.")


def _timm_config(model_name: str, model: Optional[nn.Module], extra: dict[str, Any]) -> dict[str, Any]:
    import timm

    if model is None:
        with torch.device("meta"):  # the config needs the model's attributes, not its weights
            model = timm.create_model(model_name, pretrained=False)
    try:
        from timm.models._hub import save_config_for_hf
    except ImportError:
        save_config_for_hf = None
    if save_config_for_hf is not None:
        # timm's own exporter, so the payload is exactly what this timm's `hf-hub:`/`local-dir:` loaders read.
        with tempfile.TemporaryDirectory() as tmp_dir:
            cfg_path = Path(tmp_dir) / CONFIG_NAME
            try:
                save_config_for_hf(model, cfg_path, model_config=dict(extra))
            except (ValueError, AssertionError) as e:
                raise ExportError(f"timm cannot export the config of '{model_name}': {e}") from e
            return json.loads(cfg_path.read_text(encoding="utf-8"))
    return _timm_config_minimal(model, extra)


def _timm_config_minimal(model: nn.Module, extra: dict[str, Any]) -> dict[str, Any]:
    """The core of timm's hub config, for timm versions without `save_config_for_hf`."""
    from timm.models._pretrained import filter_pretrained_cfg

    source = {k: v for k, v in model.pretrained_cfg.items() if k != "state_dict"}
    pretrained_cfg = filter_pretrained_cfg(source, remove_source=True, remove_null=True)
    pretrained_cfg.update(extra.pop("pretrained_cfg", {}))
    pretrained_cfg["num_classes"] = model.num_classes
    config = {
        "architecture": pretrained_cfg.pop("architecture"),
        "num_classes": model.num_classes,
        "num_features": model.num_features,
    }
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str) and pool:
        config["global_pool"] = pool
    config["pretrained_cfg"] = pretrained_cfg
    config.update(extra)
    return json.loads(dumps_json(config))  # tuples -> lists, as in the written file


def _torchvision_config(model_name: str, model: Optional[nn.Module], extra: dict[str, Any]) -> dict[str, Any]:
    import torchvision

    if model is None:
        with torch.device("meta"):
            model = torchvision.models.get_model(model_name, weights=None)
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None and heads:
        num_classes = heads[-1].out_features
    config = {"library": "torchvision", "architecture": model_name, "num_classes": num_classes}
    if heads:
        config["num_features"] = heads[-1].in_features
    config.update(extra)
    return json.loads(dumps_json(config))


def timm_config(
    model_name: str,
    model: Optional[nn.Module] = None,
    *,
    library: Optional[str] = None,
    **extra: Any,
) -> dict[str, Any]:
    """A `config.json` payload: timm's hub format for timm models, a minimal dict for torchvision.

    timm: `{"architecture", "num_classes", "num_features", "global_pool", "model_args",
    "pretrained_cfg"}`, as `timm.models.push_to_hf_hub` writes it, so
    `timm.create_model("local-dir:<folder>")` rebuilds the model from the folder. torchvision:
    `{"library": "torchvision", "architecture", "num_classes", "num_features"}`. `extra` keys go to
    the top level. Without `model`, the architecture is built on the meta device (no weights);
    a name known to both libraries is taken as timm unless `library` says otherwise.
    """
    lib = _library_of(model_name, model, library)
    if lib == "timm":
        return _timm_config(model_name, model, extra)
    return _torchvision_config(model_name, model, extra)


def save_model_folder(
    model: nn.Module,
    out_dir: PathLike,
    model_name: str,
    *,
    metadata: Optional[Mapping[str, Any]] = None,
    max_shard_size: Union[int, str] = "5GB",
    library: Optional[str] = None,
    config_extra: Optional[Mapping[str, Any]] = None,
) -> list[Path]:
    """Weights (`save_sharded`) and `config.json` (`timm_config`) in one folder; return the paths.

    For a timm model saved as a single file, `timm.create_model("local-dir:<out_dir>")` loads the folder.
    The config is written before the weights' index, so the folder still completes last.
    """
    out_dir = Path(out_dir)
    config = timm_config(model_name, model, library=library, **dict(config_extra or {}))
    config_path = write_json_atomic(out_dir / CONFIG_NAME, config)
    return [config_path] + save_sharded(model, out_dir, max_shard_size=max_shard_size, metadata=metadata)
