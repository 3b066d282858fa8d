"""Small labelled data sets, from the paths their users give: scikit-learn digits, CIFAR-10, ``.npz``
arrays, image folders, as TensorDatasets or Datasets (``load_dataset`` guesses which).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..errors import DataError

__all__ = ["digits_dataset", "load_image_folder", "load_cifar10", "load_npz", "load_dataset", "guess_dataset_kind",
           "DATASET_KINDS", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD"]

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CIFAR_JPEG_KEYS = ("train_jpeg_blob", "train_jpeg_offsets", "test_jpeg_blob", "test_jpeg_offsets")


# ----------------------------------------------------------------------------------------------------
# Digits: a small, bundled, labelled image set for tests and demos
# ----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _digits_arrays(size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()  # 1,797 8x8 images with values 0..16, bundled with scikit-learn
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=450, stratify=d.target,
                                           random_state=seed)
    idx_train, idx_test = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_test))
    mean, std = x[idx_train].mean(), x[idx_train].std()  # train-split statistics for both splits
    x = (x - mean) / std
    return x[idx_train].contiguous(), y[idx_train], x[idx_test].contiguous(), y[idx_test]


def digits_dataset(size: int = 16, split: str = "train", seed: int = 0) -> TensorDataset:
    """scikit-learn's bundled digits as a TensorDataset of (N, 1, size, size) float32 images and int64 labels.

    The 8x8 images are bilinearly upsampled to ``size`` and normalized with the train split's mean/std.
    The split is stratified and deterministic for ``seed``: 1,347 train / 450 test images. No download.
    """
    if split not in ("train", "test"):
        raise DataError(f"digits_dataset: split must be 'train' or 'test', got {split!r}.")
    if not isinstance(size, int) or size < 1:
        raise DataError(f"digits_dataset: size must be a positive int, got {size!r}.")
    x_tr, y_tr, x_te, y_te = _digits_arrays(size, seed)
    return TensorDataset(x_tr.clone(), y_tr.clone()) if split == "train" else TensorDataset(x_te.clone(),
                                                                                           y_te.clone())


# ----------------------------------------------------------------------------------------------------
# Array helpers
# ----------------------------------------------------------------------------------------------------

def _to_nchw(x: np.ndarray, name: str) -> np.ndarray:
    if x.ndim == 3:  # (N, H, W): one channel
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{name}: expected images of shape (N, C, H, W) or (N, H, W, C), got {x.shape}.")
    channels_last = x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if channels_last else x


def _images_to_tensor(x: np.ndarray, mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                      name: str) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; float images kept; then (x - mean) / std per channel."""
    x = _to_nchw(x, name)
    if x.dtype == np.uint8:
        t = torch.from_numpy(x).float().div_(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise DataError(f"{name}: images must be uint8 (0..255) or floating point, got dtype {x.dtype}.")
    if (mean is None) != (std is None):
        raise DataError(f"{name}: give both mean and std, or neither.")
    if mean is not None:
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if m.shape[1] not in (1, t.shape[1]) or s.shape[1] not in (1, t.shape[1]):
            raise DataError(f"{name}: mean/std have {m.shape[1]}/{s.shape[1]} values for "
                            f"{t.shape[1]}-channel images; give one value per channel.")
        t.sub_(m).div_(s)
    return t


def _labels_to_tensor(y: np.ndarray, n: int, name: str) -> torch.Tensor:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DataError(f"{name}: {n} images but {len(y)} labels; they must match one to one.")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be integers, got dtype {y.dtype}.")
    return torch.from_numpy(y.astype(np.int64))


def _check_readable(path: Union[str, os.PathLike], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what}: path {str(p)!r} does not exist. Check the path (e.g. the --data argument).")
    if not os.access(p, os.R_OK):
        raise DataError(f"{what}: path {str(p)!r} is not readable; check its permissions.")
    return p


def _open_npz(p: Path, what: str):
    try:
        return np.load(p, allow_pickle=False)
    except Exception as e:  # zipfile/ValueError/OSError: all mean "not a readable npz"
        raise DataError(f"{what}: cannot read {str(p)!r} as a .npz archive ({type(e).__name__}: {e}).") from e


# ----------------------------------------------------------------------------------------------------
# .npz of arrays
# ----------------------------------------------------------------------------------------------------

def load_npz(path: Union[str, os.PathLike], x_key: str = "x", y_key: Optional[str] = "y", *,
             mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
             max_samples: Optional[int] = None) -> TensorDataset:
    """A TensorDataset from a ``.npz`` of arrays: images under ``x_key``, integer labels under ``y_key``.

    Images may be (N, C, H, W) or (N, H, W, C) (channels last is recognized by a last axis of 1, 3 or 4)
    or (N, H, W) for one channel; uint8 is scaled to [0, 1], floats are kept as they are. With
    ``mean``/``std``, images are normalized per channel. If ``y_key`` is None or absent, the dataset
    holds the images only (enough for calibration). ``max_samples`` keeps the first N.
    """
    p = _check_readable(path, "load_npz")
    with _open_npz(p, "load_npz") as d:
        if x_key not in d.files:
            raise DataError(f"load_npz: {str(p)!r} has no array {x_key!r}; it has {sorted(d.files)}. "
                            "Pass x_key=<name of the image array>.")
        x = d[x_key][:max_samples]
        y = d[y_key][:max_samples] if (y_key is not None and y_key in d.files) else None
    if len(x) == 0:
        raise DataError(f"load_npz: array {x_key!r} in {str(p)!r} is empty.")
    t = _images_to_tensor(x, mean, std, f"load_npz({p.name})")
    if y is None:
        if y_key is not None:
            logger.info("load_npz: %s has no %r array; returning images only", p, y_key)
        return TensorDataset(t)
    return TensorDataset(t, _labels_to_tensor(y, len(t), f"load_npz({p.name})"))


# ----------------------------------------------------------------------------------------------------
# CIFAR-10: torchvision's python pickles, or a .npz of JPEG bytes (+ offsets)
# ----------------------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    return Path(os.environ.get("MERGEKIT_VISION_CACHE", Path.home() / ".cache" / "mergekit_vision"))


def _read_cifar_pickles(folder: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        f = folder / name
        if not f.is_file():
            raise DataError(f"load_cifar10: {str(folder)!r} lacks {name!r}; expected torchvision's "
                            "cifar-10-batches-py layout (data_batch_1..5, test_batch).")
        try:
            with open(f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")  # the format torchvision reads
        except Exception as e:
            raise DataError(f"load_cifar10: cannot unpickle {str(f)!r} ({type(e).__name__}: {e}).") from e
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"]))
    return np.concatenate(xs), np.concatenate(ys)


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image  # Pillow comes with torchvision

    raw = blob.tobytes()
    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(out)):
        with Image.open(io.BytesIO(raw[offsets[i]:offsets[i + 1]])) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def _read_cifar_npz(p: Path, split: str) -> Tuple[np.ndarray, np.ndarray]:
    with _open_npz(p, "load_cifar10") as d:
        if f"x_{split}" in d.files and f"y_{split}" in d.files:  # already decoded uint8 arrays
            return d[f"x_{split}"], d[f"y_{split}"]
        need = (f"{split}_jpeg_blob", f"{split}_jpeg_offsets", f"y_{split}")
        missing = [k for k in need if k not in d.files]
        if missing:
            raise DataError(f"load_cifar10: {str(p)!r} lacks {missing}; expected JPEG bytes "
                            f"('{split}_jpeg_blob', '{split}_jpeg_offsets') and 'y_{split}', or decoded "
                            f"'x_{split}'/'y_{split}' arrays. It has {sorted(d.files)}.")
        y = d[f"y_{split}"]
        st = p.stat()
        # The cache key follows the source file, so an edited or replaced archive is decoded again.
        key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{split}".encode()).hexdigest()[:16]
        cache = _cache_dir() / f"cifar10_{split}_{key}.npy"
        if cache.is_file():
            try:
                x = np.load(cache, allow_pickle=False)
                if len(x) == len(y):
                    return x, y
            except Exception:  # a truncated cache file: decode again
                logger.warning("load_cifar10: ignoring unreadable cache %s", cache)
        logger.info("load_cifar10: decoding %d %s JPEGs from %s (cached in %s)", len(y), split, p, cache)
        x = _decode_jpegs(d[f"{split}_jpeg_blob"], d[f"{split}_jpeg_offsets"])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, x)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees a half-written cache
    except OSError as e:
        logger.warning("load_cifar10: could not write cache %s (%s); continuing without it", cache, e)
    return x, y


def _find_cifar_source(p: Path) -> Path:
    """The cifar-10-batches-py folder or the .npz inside/at ``p``."""
    if p.is_file():
        return p
    if (p / "cifar-10-batches-py").is_dir():
        return p / "cifar-10-batches-py"
    if (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
        return p
    npzs = sorted(p.glob("*.npz"))
    for f in npzs:
        if _npz_is_cifar(f):
            return f
    raise DataError(f"load_cifar10: {str(p)!r} holds neither torchvision's 'cifar-10-batches-py' folder nor a "
                    "CIFAR-10 .npz. Pass the folder given to torchvision.datasets.CIFAR10(root) or the .npz file.")


def load_cifar10(root: Union[str, os.PathLike], split: str = "train", *, normalize: bool = True,
                 max_samples: Optional[int] = None) -> TensorDataset:
    """CIFAR-10 as a TensorDataset of (N, 3, 32, 32) float32 images and int64 labels, in the official order.

    ``root`` is the folder given to ``torchvision.datasets.CIFAR10(root)`` (holding ``cifar-10-batches-py``),
    that folder itself, or a ``.npz`` with JPEG bytes ``{split}_jpeg_blob`` + ``{split}_jpeg_offsets`` and
    labels ``y_{split}`` (decoded once with Pillow and cached as uint8 in ``$MERGEKIT_VISION_CACHE``,
    default ``~/.cache/mergekit_vision``); decoded ``x_{split}`` uint8 arrays (N, 32, 32, 3) are read
    as they are. Images are scaled to [0, 1] and, with ``normalize``, standardized with the CIFAR-10
    mean/std. ``max_samples`` keeps the first N.
    """
    if split not in ("train", "test"):
        raise DataError(f"load_cifar10: split must be 'train' or 'test', got {split!r}.")
    src = _find_cifar_source(_check_readable(root, "load_cifar10"))
    x, y = _read_cifar_npz(src, split) if src.is_file() else _read_cifar_pickles(src, split)
    x, y = x[:max_samples], y[:max_samples]
    if len(x) == 0:
        raise DataError(f"load_cifar10: the {split} split in {str(src)!r} is empty.")
    name = f"load_cifar10({src.name})"
    t = _images_to_tensor(x, CIFAR10_MEAN if normalize else None, CIFAR10_STD if normalize else None, name)
    return TensorDataset(t, _labels_to_tensor(y, len(t), name))


# ----------------------------------------------------------------------------------------------------
# Image folders (torchvision ImageFolder layout: root/<class>/<image>)
# ----------------------------------------------------------------------------------------------------

def load_image_folder(root: Union[str, os.PathLike], image_size: Union[int, Tuple[int, int]] = 224,
                      mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Dataset:
    """A torchvision ImageFolder (``root/<class>/<image>``) that yields normalized (3, H, W) float tensors.

    Images are resized (shorter side to ``image_size``, or exactly to an (H, W) pair), center-cropped to
    ``image_size``, scaled to [0, 1] and normalized with ``mean``/``std``. Decoding is lazy.
    """
    from torchvision import datasets, transforms

    p = _check_readable(root, "load_image_folder")
    if not p.is_dir():
        raise DataError(f"load_image_folder: {str(p)!r} is not a directory; expected root/<class>/<image>.")
    tf = transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    try:
        ds = datasets.ImageFolder(str(p), transform=tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"load_image_folder: {str(p)!r} is not an image folder ({e}). Expected one "
                        "sub-folder per class holding .jpg/.png images.") from e
    logger.info("load_image_folder: %d images in %d classes from %s", len(ds), len(ds.classes), p)
    return ds


# ----------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------

def _npz_is_cifar(p: Path) -> bool:
    try:
        with np.load(p, allow_pickle=False) as d:
            files = set(d.files)
    except Exception:
        return False
    return set(_CIFAR_JPEG_KEYS) & files != set() or {"x_train", "y_train", "x_test", "y_test"} <= files


# Dataset kinds the CLI can name: kind -> loader(path, **kwargs).
DATASET_KINDS = {
    "cifar10": load_cifar10,
    "npz": load_npz,
    "image_folder": load_image_folder,
}


def guess_dataset_kind(p: Path) -> str:
    if p.is_file():
        if p.suffix.lower() != ".npz":
            raise DataError(f"load_dataset: cannot tell the kind of {str(p)!r}; expected a .npz file or a "
                            f"directory. Pass kind= one of {sorted(DATASET_KINDS)}.")
        return "cifar10" if _npz_is_cifar(p) else "npz"
    if (p / "cifar-10-batches-py").is_dir() or (p / "data_batch_1").is_file() or (p / "test_batch").is_file():
        return "cifar10"
    if any(_npz_is_cifar(f) for f in p.glob("*.npz")):
        return "cifar10"
    if any(c.is_dir() for c in p.iterdir()):
        return "image_folder"
    raise DataError(f"load_dataset: cannot tell what {str(p)!r} holds: no cifar-10-batches-py, no class "
                    f"sub-folders, no CIFAR .npz. Pass kind= one of {sorted(DATASET_KINDS)}.")


def load_dataset(path: Union[str, os.PathLike], kind: Optional[str] = None, **kwargs: Any) -> Dataset:
    """Load ``path`` with the loader for ``kind`` (one of :data:`DATASET_KINDS`), guessing it when None:
    a folder holding ``cifar-10-batches-py`` or a ``.npz`` with CIFAR JPEG keys -> "cifar10", another
    ``.npz`` -> "npz", a folder holding a CIFAR ``.npz`` -> "cifar10", a folder of class sub-folders ->
    "image_folder". ``kwargs`` go to the loader.
    """
    p = _check_readable(path, "load_dataset")
    if kind is None:
        kind = guess_dataset_kind(p)
        logger.info("load_dataset: %s looks like %r", p, kind)
    try:
        loader = DATASET_KINDS[kind]
    except (KeyError, TypeError):
        raise DataError(f"load_dataset: unknown kind {kind!r}; expected one of {sorted(DATASET_KINDS)}.") from None
    return loader(p, **kwargs)
