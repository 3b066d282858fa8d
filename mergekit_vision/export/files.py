"""Weights files: a state dict -> safetensors (one file or shards) and back, and the atomic writes every
file the library writes goes through.

Every file the library writes goes through `atomic_write`, so an interrupted run never leaves a
half-written file under the final name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from ..errors import ArchitectureMismatchError, ConfigError, ExportError

__all__ = [
    "atomic_write",
    "write_text_atomic",
    "write_json_atomic",
    "to_jsonable",
    "dumps_json",
    "save_safetensors",
    "load_safetensors",
    "load_into",
    "parse_size",
    "save_sharded",
    "load_sharded",
    "CONFIG_NAME",
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

# Keys this module reserves in a safetensors header: `format` is what transformers/timm expect;
# JSON_KEYS lists the user keys whose value was JSON-encoded, so a str that merely looks like
# JSON ("1.5") is returned as a str.
FORMAT_KEY = "format"
JSON_KEYS_KEY = "mergekit_vision.json_keys"
_RESERVED_KEYS = (FORMAT_KEY, JSON_KEYS_KEY)

SAFE_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
CONFIG_NAME = "config.json"

_MAX_LISTED = 10  # keys listed in a mismatch message before "... and N more"


# ----------------------------------------------------------------------------- atomic writes

@contextmanager
def atomic_write(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` only if the block succeeds.

    The temporary file lives in the same directory (so `os.replace` is an atomic rename) and is
    named `.<name>.tmp-<pid>-<random>`. On any exception, KeyboardInterrupt included, it is removed
    and an existing file at `path` is left untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"Cannot write '{path}': it is a directory. Pass a file path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        if not tmp.is_file():
            raise ExportError(f"Nothing was written to the temporary file for '{path}'.")
        _fsync_file(tmp)  # data on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_umask())  # writers that create 0600 files: the usual mode instead
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened on Windows, hence best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write `text` (UTF-8, `\\n` line endings) to `path` atomically; return the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    return path


def to_jsonable(obj: Any) -> Any:
    """`json.dumps(default=...)` hook: numpy/torch scalars and arrays, paths, sets, dataclasses."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist()
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def dumps_json(obj: Any, indent: Optional[int] = 2) -> str:
    """JSON as the library writes it: sorted keys, numpy/torch values converted (``to_jsonable``)."""
    return json.dumps(obj, sort_keys=True, indent=indent, default=to_jsonable)


def write_json_atomic(path: PathLike, obj: Any) -> Path:
    """Write `obj` as JSON (sorted keys, indent 2, numpy/torch scalars converted) atomically."""
    try:
        text = dumps_json(obj) + "\n"
    except TypeError as e:
        raise ExportError(f"Cannot write '{path}' as JSON: {e}. Convert the value to a JSON type.") from e
    return write_text_atomic(path, text)


# ----------------------------------------------------------------------------- single file

def _state_dict_of(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]]) -> Mapping:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise ExportError(
        f"Expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}."
    )


def _prepare_tensors(state_dict: Mapping) -> StateDict:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is cloned.

    safetensors refuses tensors that share memory (tied weights); a clone stores each key in full,
    which is what `load_state_dict` expects back. The caller's tensors are never modified.
    """
    out: StateDict = {}
    seen_storages: set[tuple[str, int]] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ExportError(f"State dict key {key!r} is not a str.")
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"State dict entry '{key}' is a {type(value).__name__}, not a tensor; safetensors stores "
                f"tensors only. Drop it or store it in metadata."
            )
        if value.device.type == "meta":
            raise ExportError(f"State dict entry '{key}' is on the meta device and holds no data.")
        tensor = value.detach().to("cpu").contiguous()
        if tensor.numel() > 0:
            storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
            if storage in seen_storages:
                tensor = tensor.clone()
            else:
                seen_storages.add(storage)
        out[key] = tensor
    return out


def _encode_metadata(metadata: Optional[Mapping[str, Any]]) -> dict[str, str]:
    """User metadata -> safetensors header (str -> str); non-str values become JSON text."""
    encoded = {FORMAT_KEY: "pt"}
    json_keys = []
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise ExportError(f"Metadata key {key!r} is not a str.")
        if key in _RESERVED_KEYS:
            raise ExportError(f"Metadata key '{key}' is reserved by mergekit_vision. Rename it.")
        if isinstance(value, str):
            encoded[key] = value
            continue
        try:
            encoded[key] = dumps_json(value, indent=None)
        except TypeError as e:
            raise ExportError(f"Metadata '{key}' is not JSON serializable: {e}.") from e
        json_keys.append(key)
    if json_keys:
        encoded[JSON_KEYS_KEY] = json.dumps(sorted(json_keys))
    return encoded


def _decode_metadata(header: Optional[Mapping[str, str]]) -> dict[str, Any]:
    """Inverse of `_encode_metadata`; reserved keys are dropped. Foreign files come back as str -> str."""
    header = dict(header or {})
    json_keys = set(json.loads(header.get(JSON_KEYS_KEY, "[]")))
    return {
        key: json.loads(value) if key in json_keys else value
        for key, value in header.items()
        if key not in _RESERVED_KEYS
    }


def _write_safetensors(tensors: StateDict, path: Path, header: dict[str, str]) -> None:
    with atomic_write(path) as tmp:
        # Looked up at call time so tests can simulate a crash mid-write.
        safetensors.torch.save_file(tensors, os.fspath(tmp), metadata=header)
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file at `path` with its metadata keys sorted.

    safetensors keeps the metadata in a Rust HashMap, whose order is random per process, so the same
    tensors and metadata gave different bytes on every run. The tensor entries (their order and
    offsets) are kept as written; only `__metadata__` is reordered. The data starts where the header
    ends: a header of the same length is rewritten in place, another one means copying the data.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        ordered = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-(8 + len(text)) % 8)  # the data stays 8-byte aligned, as safetensors writes it
        if len(text) == n:
            f.seek(8)
            f.write(text)
            return
        f.seek(8 + n)
        rest = path.with_name(path.name + ".data")
        try:
            with open(rest, "wb") as g:
                shutil.copyfileobj(f, g)
            f.seek(0)
            f.truncate()
            f.write(len(text).to_bytes(8, "little") + text)
            with open(rest, "rb") as g:
                shutil.copyfileobj(g, f)
        finally:
            rest.unlink(missing_ok=True)


def save_safetensors(
    model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]],
    path: PathLike,
    metadata: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write every parameter and buffer (keys exactly as in `state_dict()`) to one safetensors file.

    `metadata` values that are not str are stored as JSON text and decoded by `load_safetensors`.
    A model returned by `merge` also records its provenance (method, alpha, repair mode, calibration
    size, library version, the sources' sha256) unless `metadata` overrides those keys.
    The file loads directly with `timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path))` or `model.load_state_dict(safetensors.torch.load_file(path))`.
    """
    path = Path(path)
    report = getattr(model_or_state_dict, "merge_report", None)
    if report is not None:  # a merged model carries its provenance; explicit metadata wins
        metadata = {**report.provenance(), **dict(metadata or {})}
    tensors = _prepare_tensors(_state_dict_of(model_or_state_dict))
    _write_safetensors(tensors, path, _encode_metadata(metadata))
    _logger.info("Saved %d tensors (%s) to %s", len(tensors), _format_size(_nbytes(tensors)), path)
    return path


def load_safetensors(path: PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Read a safetensors file -> (state dict on CPU, decoded user metadata)."""
    path = Path(path)
    if not path.is_file():
        hint = " It is a directory; use load_sharded()." if path.is_dir() else ""
        raise ExportError(f"Weights file '{path}' not found.{hint}")
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            header = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # SafetensorError is not exported under a stable name
        raise ExportError(
            f"'{path}' is not a readable safetensors file ({type(e).__name__}: {e}). "
            f"It may be truncated or in another format (e.g. a torch.save checkpoint)."
        ) from e
    try:
        metadata = _decode_metadata(header)
    except (json.JSONDecodeError, TypeError) as e:
        raise ExportError(f"'{path}' has malformed mergekit_vision metadata: {e}.") from e
    return tensors, metadata


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" ... and {more} more" if more > 0 else "")


def load_into(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load a safetensors file, or a folder written by `save_sharded`, into `model`; return `model`.

    Shape mismatches always raise; missing/unexpected keys raise when `strict`, else are logged.
    """
    path = Path(path)
    state_dict, _ = load_sharded(path) if path.is_dir() else load_safetensors(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"'{k}': {tuple(state_dict[k].shape)} in file vs {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch at {'; '.join(mismatched[:_MAX_LISTED])}"
                        + (f" ... and {len(mismatched) - _MAX_LISTED} more" if len(mismatched) > _MAX_LISTED else ""))
    if strict and missing:
        problems.append(f"missing from the file: {_list_keys(missing)}")
    if strict and unexpected:
        problems.append(f"not in the model: {_list_keys(unexpected)}")
    if problems:
        raise ArchitectureMismatchError(
            f"{type(model).__name__} does not fit '{path}': " + "; ".join(problems) + ". "
            "Build the model with the same architecture name and kwargs (e.g. num_classes) as the saved one"
            + ("." if strict else ", or pass strict=False to skip missing/unexpected keys.")
        )
    if missing:
        _logger.warning("Keys missing from '%s', left as initialised: %s", path, _list_keys(missing))
    if unexpected:
        _logger.warning("Keys in '%s' not used by the model: %s", path, _list_keys(unexpected))
    model.load_state_dict(state_dict, strict=strict)
    _logger.info("Loaded %d tensors from %s into %s", len(state_dict), path, type(model).__name__)
    return model


# ----------------------------------------------------------------------------- sharding

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "1.5GiB" (GB = 10**9, GiB = 2**30, as HF)."""
    if isinstance(size, bool):
        raise ConfigError(f"Shard size {size!r} is not a size. Use an int of bytes or e.g. '5GB'.")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        match = _SIZE_RE.match(size)
        unit = match.group(2).upper() if match else None
        if unit not in _SIZE_UNITS:
            raise ConfigError(
                f"Shard size '{size}' is not understood. Use an int of bytes or a number with one of "
                f"{', '.join(u for u in _SIZE_UNITS if u)}, e.g. '5GB' or '500MB'."
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ConfigError(f"Shard size must be an int or a str like '5GB', got {type(size).__name__}.")
    if value <= 0:
        raise ConfigError(f"Shard size must be positive, got {size!r}.")
    return value


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _format_size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"


def _split_shards(tensors: StateDict, max_bytes: int) -> list[StateDict]:
    """Greedy in state-dict order, as transformers does; a tensor above the limit gets a shard of its own."""
    shards: list[StateDict] = [{}]
    current = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > max_bytes:
            shards.append({})
            current = 0
        shards[-1][key] = tensor
        current += size
    return shards


def _shard_name(base_name: str, index: int, count: int) -> str:
    return f"{base_name}-{index:05d}-of-{count:05d}{SAFE_SUFFIX}"


def _weight_files(out_dir: Path, base_name: str) -> list[Path]:
    """Single-file and shard files of `base_name` present in `out_dir`."""
    shard_re = re.compile(re.escape(base_name) + r"-\d{5}-of-\d{5}" + re.escape(SAFE_SUFFIX) + "$")
    return sorted(
        p for p in out_dir.iterdir()
        if p.is_file() and (p.name == base_name + SAFE_SUFFIX or shard_re.match(p.name))
    )


def _check_base_name(base_name: str) -> None:
    if not base_name or os.sep in base_name or "/" in base_name or base_name.startswith("."):
        raise ConfigError(f"base_name '{base_name}' must be a plain file stem such as 'model'.")


def save_sharded(
    state_dict_or_model: Union[nn.Module, Mapping[str, torch.Tensor]],
    out_dir: PathLike,
    *,
    max_shard_size: Union[int, str] = "5GB",
    metadata: Optional[Mapping[str, Any]] = None,
    base_name: str = "model",
) -> list[Path]:
    """Write `<base>.safetensors`, or `<base>-0000i-of-0000N.safetensors` plus `<base>.safetensors.index.json`.

    The index (Hugging Face format) is written last, so an interrupted run never looks complete.
    Weight files of `base_name` left by an earlier run are removed first. `metadata` goes into the
    header of every shard. Returns the written paths, the index last.
    """
    _check_base_name(base_name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    max_bytes = parse_size(max_shard_size)
    tensors = _prepare_tensors(_state_dict_of(state_dict_or_model))
    header = _encode_metadata(metadata)
    shards = _split_shards(tensors, max_bytes)

    index_path = out_dir / (base_name + INDEX_SUFFIX)
    if len(shards) == 1:
        names = [base_name + SAFE_SUFFIX]
    else:
        names = [_shard_name(base_name, i + 1, len(shards)) for i in range(len(shards))]
    # The old index goes first: from here on the folder does not claim to be a complete sharded
    # checkpoint. Stale files are deleted rather than left for a loader to pick up; files that
    # keep their name are replaced atomically below. A single file from an earlier run is only
    # removed when the new layout is sharded, so an interrupted single-file save keeps the old file.
    index_path.unlink(missing_ok=True)
    for stale in _weight_files(out_dir, base_name):
        if stale.name not in names:
            _logger.info("Removing stale weight file %s", stale)
            stale.unlink()

    written = []
    for name, shard in zip(names, shards):
        _write_safetensors(shard, out_dir / name, header)
        written.append(out_dir / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": _nbytes(tensors)},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        write_json_atomic(index_path, index)
        written.append(index_path)
    _logger.info("Saved %d tensors (%s) to %s in %d file(s)",
                 len(tensors), _format_size(_nbytes(tensors)), out_dir, len(shards))
    return written


def load_sharded(out_dir: PathLike, base_name: str = "model") -> tuple[StateDict, dict[str, Any]]:
    """Read what `save_sharded` wrote (index + shards, or a single file) -> (state dict, metadata).

    `out_dir` may also be a safetensors file. Metadata is read from the first shard.
    """
    out_dir = Path(out_dir)
    if out_dir.is_file():
        return load_safetensors(out_dir)
    if not out_dir.is_dir():
        raise ExportError(f"Output folder '{out_dir}' not found.")
    index_path = out_dir / (base_name + INDEX_SUFFIX)
    single_path = out_dir / (base_name + SAFE_SUFFIX)
    if not index_path.is_file():
        if single_path.is_file():
            return load_safetensors(single_path)
        found = [p.name for p in _weight_files(out_dir, base_name)]
        raise ExportError(
            f"'{out_dir}' holds neither '{single_path.name}' nor '{index_path.name}'"
            + (f" (found only {', '.join(found)}: an interrupted save?)" if found else "")
            + ". Save it again with save_sharded()."
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map: dict[str, str] = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"'{index_path}' is not a safetensors index ({e}).") from e

    state_dict: StateDict = {}
    metadata: dict[str, Any] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard_path = out_dir / shard_name
        if not shard_path.is_file():
            raise ExportError(f"'{index_path}' lists '{shard_name}', which is missing. Save the model again.")
        tensors, shard_metadata = load_safetensors(shard_path)
        expected = {k for k, v in weight_map.items() if v == shard_name}
        if set(tensors) != expected:
            diff = sorted(set(tensors) ^ expected)
            raise ExportError(
                f"'{shard_path}' does not match '{index_path}' at {_list_keys(diff)}: the folder mixes "
                f"files from different saves. Save the model again."
            )
        state_dict.update(tensors)
        metadata = metadata or shard_metadata
    total = index.get("metadata", {}).get("total_size")
    if total is not None and total != _nbytes(state_dict):
        raise ExportError(
            f"'{index_path}' declares total_size {total} but its shards hold {_nbytes(state_dict)} bytes."
        )
    return state_dict, metadata
