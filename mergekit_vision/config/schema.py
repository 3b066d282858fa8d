"""The merge config's schema: a YAML file -> a validated ``MergeConfig`` (pydantic v2; unknown keys are
errors, and their messages name the fix). Relative paths are resolved against the config file's
folder; the validated config holds them absolute.
"""
from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..data import guess_dataset_kind
from ..errors import ConfigError, DataError, MergeVisionError
from ..export import parse_size
from ..match import LINEAGE_THRESHOLD, TAP_POLICIES, WEIGHT_TOL
from ..options import METHODS, REPAIR_MODES, check_lsq_memory
from ..sources import split_name

__all__ = ["ModelConfig", "CalibrationConfig", "EvaluationConfig", "MergeConfig", "load_config", "DTYPES",
           "DATA_KINDS", "STATE_DICT_SUFFIXES", "LOADERS"]


DTYPES: Dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                  "bfloat16": torch.bfloat16, "float64": torch.float64}
DATA_KINDS = ("image_folder", "cifar10", "npz")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
LOADERS = ("state_dict", "timm")

# mergekit's keys that are spelled differently here: the "unknown key" message says what to write.
_MERGEKIT_NAMES = {
    "merge_method": "mergekit's 'merge_method' is 'method' here (activation | weight | none)",
    "t": "mergekit's 't' is 'alpha' here (the weight of models[1])",
    "out_dtype": "mergekit's 'out_dtype' is 'dtype' here",
    "base_model": "the reference model is models[0]; models[1] is aligned to it",
    "parameters": "write alpha: at the top level (alpha: 0.5)",
}
# What to write when a required key is missing.
_MISSING_HINTS = {
    "models": "list two or more models, e.g. models: [{model: timm:resnet18, checkpoint: a.safetensors}, ...]",
    "model": "name the architecture, e.g. model: timm:resnet18 (or torchvision:resnet18, mkv:resnet20)",
    "calibration": "every merge traces the model on input images: give calibration: {path: DATA}",
    "path": "give an ImageFolder root, a CIFAR-10 root or a .npz",
}


# ---- schema -------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(v: str, names) -> str:
    """``v`` if it is one of ``names``; otherwise the error that lists them (pydantic adds the field)."""
    if v not in names:
        raise ValueError(f"must be one of {', '.join(names)}, got {v!r}")
    return v


def _base_dir(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or Path.cwd())


def _resolve(given: str, info: ValidationInfo) -> Path:
    p = Path(os.path.expandvars(given)).expanduser()
    return p if p.is_absolute() else (_base_dir(info) / p)


def _missing(given: str, resolved: Path) -> str:
    where = "" if Path(given) == resolved else f" (looked for '{resolved}')"
    return f"{given!r} does not exist{where}"


def _unreadable(given: str, resolved: Path) -> str:
    return f"{given!r} is not readable (no read permission on '{resolved}')"


class ModelConfig(_Strict):
    """One model to merge: an architecture name plus where its weights come from."""

    model: str
    checkpoint: Optional[str] = None
    kwargs: Dict[str, Any] = Field(default_factory=dict)
    pretrained: Optional[bool] = None
    loader: Optional[str] = None
    weight: Optional[float] = Field(None, ge=0.0)  # its share of the average (e.g. sample counts); default equal

    @field_validator("model")
    @classmethod
    def _known_library(cls, v: str) -> str:

        if not v.strip():
            raise ValueError("is empty; " + _MISSING_HINTS["model"])
        try:
            split_name(v)
        except MergeVisionError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is None:
            return None
        p = _resolve(v, info)
        if not p.exists():
            raise ValueError(f"{_missing(v, p)} — give a .safetensors, .pt or .pth state dict "
                             "(or a folder written by mergekit-vision merge)")
        if not os.access(p, os.R_OK):
            raise ValueError(_unreadable(v, p))
        return str(p.resolve())

    @field_validator("loader")
    @classmethod
    def _known_loader(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in LOADERS:
            raise ValueError(f"must be one of {', '.join(LOADERS)} (or null: by the file's suffix), got {v!r}")
        return v

    @model_validator(mode="after")
    def _weights_given(self) -> ModelConfig:

        lib, arch = split_name(self.model)
        hub = arch.startswith(("hf-hub:", "local-dir:"))
        if self.pretrained and self.checkpoint:
            raise ValueError("give either checkpoint: or pretrained: true, not both")
        if self.pretrained is None:
            self.pretrained = hub and self.checkpoint is None
        if not self.checkpoint and not self.pretrained:
            raise ValueError(f"{self.model!r} has no weights: give checkpoint: PATH (a .safetensors/.pt/.pth "
                             "state dict), or pretrained: true for the library's pretrained weights")
        if self.pretrained and lib == "mkv":
            raise ValueError(f"{self.model!r} has no pretrained weights; give checkpoint: PATH")
        if self.loader == "timm" and lib != "timm":
            raise ValueError(f"loader: timm needs a timm model, got {self.model!r}; use loader: state_dict")
        if self.checkpoint and self.loader is None:
            suffix = Path(self.checkpoint).suffix.lower()
            if Path(self.checkpoint).is_dir() or suffix in STATE_DICT_SUFFIXES:
                self.loader = "state_dict"
            elif lib == "timm":
                self.loader = "timm"  # e.g. an original-format .npz that timm's filter_fn converts
            else:
                raise ValueError(f"checkpoint: cannot tell how to read {Path(self.checkpoint).name!r}; give a "
                                 f"{', '.join(STATE_DICT_SUFFIXES)} file (torch.save(model.state_dict(), path))")
        return self

    @property
    def library(self) -> str:

        return split_name(self.model)[0]

    @property
    def arch(self) -> str:

        return split_name(self.model)[1]


class CalibrationConfig(_Strict):
    """A data set on disk: which files, which split, how many samples, how they are batched."""

    path: str
    kind: Optional[str] = Field(None, validate_default=True)
    split: str = "train"
    samples: Optional[int] = Field(2000, ge=1)
    batch_size: int = Field(128, ge=1)
    image_size: Optional[int] = Field(None, ge=1)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    workers: int = Field(0, ge=0)

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str, info: ValidationInfo) -> str:
        p = _resolve(v, info)
        if not p.exists():
            raise ValueError(f"{_missing(v, p)} — " + _MISSING_HINTS["path"])
        if not os.access(p, os.R_OK):
            raise ValueError(_unreadable(v, p))
        return str(p.resolve())

    @field_validator("kind")
    @classmethod
    def _kind_known(cls, v: Optional[str], info: ValidationInfo) -> Optional[str]:
        if v is not None:
            if v not in DATA_KINDS:
                raise ValueError(f"must be one of {', '.join(DATA_KINDS)} (or null to detect it), got {v!r}")
            return v
        path = info.data.get("path")
        if path is None:  # the path itself is invalid and already reported
            return None
        try:
            return _guess_data_kind(Path(path))
        except DataError as exc:
            raise ValueError(f"{exc} Set kind: to one of {', '.join(DATA_KINDS)}.") from None

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, v: Optional[List[float]], info: ValidationInfo) -> Optional[List[float]]:
        if v is not None:
            if len(v) not in (1, 3):
                raise ValueError(f"give 1 or 3 values (one per channel), got {len(v)}")
            if info.field_name == "std" and min(v) <= 0:
                raise ValueError(f"must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CalibrationConfig:
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean: and std:, or neither")
        if self.kind == "cifar10" and self.split not in ("train", "test"):
            raise ValueError(f"split: CIFAR-10 has splits 'train' and 'test', got {self.split!r}")
        return self


def _guess_data_kind(p: Path) -> str:
    """data's guess, except that a .npz of x_train/y_train/x_test/y_test arrays is CIFAR-10 only if its
    images are (N, 32, 32, 3) uint8: any other split .npz is a plain "npz" (read as x_{split}/y_{split})."""
    kind = guess_dataset_kind(p)
    if kind == "cifar10" and p.is_file():
        with np.load(p, allow_pickle=False) as arrays:
            if "x_train" in arrays.files and "train_jpeg_blob" not in arrays.files:
                with arrays.zip.open("x_train.npy") as f:  # the header only, not the array
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                if dtype != np.uint8 or tuple(shape[1:]) != (32, 32, 3):
                    return "npz"
    return kind


class EvaluationConfig(CalibrationConfig):
    """Labelled data to measure accuracy on: the calibration keys, with the test split, all samples."""

    split: str = "test"
    samples: Optional[int] = Field(None, ge=1)


class MergeConfig(_Strict):
    """A merge: two or more models, how to align and average them, the data, and where it runs.

    Two models interpolate at ``alpha`` (the weight of models[1]); more are averaged with their
    ``weight:`` entries (default equal), every model aligned to models[0] first."""

    models: List[ModelConfig]
    method: str = "activation"
    alpha: float = 0.5
    repair: str = "repair"
    lsq_ridge: float = Field(1e-3, ge=0.0, allow_inf_nan=False)
    lsq_positions: Optional[int] = Field(64, ge=1)
    lsq_memory: Union[int, str, None] = "auto"
    lsq_logits: Literal["mean", "probs"] = "mean"
    rotate_stream: bool = False
    taps: str = "all"
    tap_positions: Optional[int] = Field(None, ge=1)
    weight_tol: float = Field(WEIGHT_TOL, ge=0.0)
    lineage_threshold: Optional[float] = Field(LINEAGE_THRESHOLD, ge=-1.0, le=1.0)
    calibration: CalibrationConfig
    evaluation: Optional[EvaluationConfig] = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = Field(0, ge=0)
    out_shard_size: Union[int, str] = "5GB"

    @field_validator("models")
    @classmethod
    def _two_models(cls, v: List[ModelConfig]) -> List[ModelConfig]:
        if len(v) < 2:
            raise ValueError(f"need at least 2 models for merge, got {len(v)}")
        given = [m.weight is not None for m in v]
        if any(given) and not all(given):
            raise ValueError("give weight: for every model or for none (none: equal weights)")
        if all(given) and sum(m.weight for m in v) <= 0:
            raise ValueError("the models' weight: entries are all 0; give at least one positive weight")
        return v

    @model_validator(mode="after")
    def _alpha_or_weights(self) -> MergeConfig:
        weighted = self.models[0].weight is not None
        if "alpha" in self.model_fields_set and (len(self.models) > 2 or weighted):
            raise ValueError("alpha: is the weight of models[1] in a two-model merge; with "
                             + ("more than two models" if len(self.models) > 2 else "weight: per model")
                             + " give each model a weight: instead (or none, for equal weights)")
        if len(self.models) == 2 and weighted:
            w0, w1 = self.models[0].weight, self.models[1].weight
            self.alpha = w1 / (w0 + w1)
        return self

    @property
    def weights(self) -> Optional[List[float]]:
        """The models' weight: entries, or None (equal weights)."""
        return [m.weight for m in self.models] if self.models[0].weight is not None else None

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _one_of(v, METHODS)

    @field_validator("taps")
    @classmethod
    def _taps(cls, v: str) -> str:
        return _one_of(v, TAP_POLICIES)

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number in [0, 1] (the weight of models[1]), got {v!r}")
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"must be in [0, 1], got {v!r} (alpha is the weight of models[1])")
        return float(v)

    @field_validator("repair", mode="before")
    @classmethod
    def _repair(cls, v: Any) -> str:
        if v is True:
            return "repair"
        if v is False or v is None:
            return "none"
        if v not in REPAIR_MODES:
            raise ValueError(f"must be one of {', '.join(REPAIR_MODES)} (or true/false), got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        try:
            torch.device(v)
        except (RuntimeError, TypeError):
            raise ValueError(f"{v!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of(v, DTYPES)

    @field_validator("lsq_memory", mode="before")
    @classmethod
    def _lsq_memory(cls, v: Any) -> Union[int, str, None]:
        try:
            check_lsq_memory(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("out_shard_size", mode="before")
    @classmethod
    def _shard_size(cls, v: Any) -> Union[int, str]:

        try:
            parse_size(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_yaml(self) -> str:
        """The validated config as YAML (defaults filled in, paths absolute); ``load_config`` reads it back."""
        d = self.model_dump(mode="json")
        for m in d["models"]:
            if m.get("weight") is None:
                m.pop("weight", None)
        if self.weights is not None or len(self.models) > 2:
            d.pop("alpha")  # the weights say it
        return yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: Union[str, os.PathLike, None] = None,
                  source: str = "config") -> MergeConfig:
        """Validate a dict (e.g. parsed YAML); relative paths are taken from ``base_dir`` (default: cwd)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of keys (models:, method:, alpha:, ...), "
                              f"got {type(data).__name__}")
        try:
            return cls.model_validate(dict(data), context={"base_dir": base_dir})
        except ValidationError as exc:
            raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def load_config(path: Union[str, os.PathLike], overrides: Optional[Mapping[str, Any]] = None) -> MergeConfig:
    """Read and validate a YAML merge config; ``overrides`` (e.g. from the command line) replace top-level keys.

    Raises ConfigError naming the file, the key and the fix.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a UTF-8 text file ({exc})") from None
    if data is None:
        raise ConfigError(f"{p}: the file is empty; see docs/config.md for an example")
    if overrides and isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return MergeConfig.from_dict(data, base_dir=p.resolve().parent, source=str(p))


# ---- error messages ----------------------------------------------------------------------------------
def _loc(loc: Tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def _schema_at(loc: Tuple[Any, ...]) -> Optional[type]:
    """The schema class whose keys live at ``loc`` (e.g. ("models", 0) -> ModelConfig)."""
    cls: Any = MergeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = _inner_schema(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _inner_schema(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _inner_schema(arg)
        if found is not None:
            return found
    return None


def _describe(err: Mapping[str, Any]) -> str:
    loc, kind = tuple(err["loc"]), err["type"]
    if kind == "extra_forbidden":
        key, parent = str(loc[-1]), _schema_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        if key in _MERGEKIT_NAMES and parent is MergeConfig:
            hint = _MERGEKIT_NAMES[key]
        elif close:
            hint = f"did you mean {close[0]!r}?"
        else:
            hint = "valid keys: " + ", ".join(valid)
        return f"{_loc(loc)}: unknown key — {hint}"
    if kind == "missing":
        hint = _MISSING_HINTS.get(str(loc[-1]), "")
        return f"{_loc(loc)}: missing" + (f" — {hint}" if hint else "")
    msg = err["msg"]
    if kind == "value_error":
        return f"{_loc(loc)}: {msg.removeprefix('Value error, ')}"
    return f"{_loc(loc)}: {msg[0].lower() + msg[1:]}, got {err.get('input')!r}"
