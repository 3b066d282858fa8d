"""Calibration batches from any loader: ``iter_inputs`` (a DataLoader, a list of batches, a Dataset or a
batch-first Tensor -> input tensors, checked), ``check_reiterable``, ``count_samples``.
"""
from __future__ import annotations

from collections import abc
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import DataError

__all__ = ["iter_inputs", "check_reiterable", "count_samples"]

_CHUNK = 256  # batch size used when a bare Tensor or a Dataset is given instead of a loader
_INPUT_KEYS = ("image", "input", "x", "pixel_values")


# ----------------------------------------------------------------------------------------------------
# Calibration batches
# ----------------------------------------------------------------------------------------------------

def _batches(loader: Any) -> Iterable[Any]:
    """The loader as an iterable of batches: a bare Tensor or a Dataset is cut into chunks of 256."""
    if isinstance(loader, torch.Tensor):
        if loader.dim() == 0:
            raise DataError("calibration data is a 0-d tensor; pass a batch-first tensor (N, C, H, W).")
        return loader.split(_CHUNK)
    if isinstance(loader, TensorDataset):
        return zip(*(t.split(_CHUNK) for t in loader.tensors))
    if isinstance(loader, Dataset) and hasattr(loader, "__len__") and not isinstance(loader, (list, tuple)):
        # A map-style Dataset yields single samples; batch them (deterministic order).
        return DataLoader(loader, batch_size=_CHUNK, shuffle=False)
    if isinstance(loader, (str, bytes, Path)):
        raise DataError(
            f"calibration loader is a path ({loader!r}); load it first, e.g. "
            "mergekit_vision.data.load_dataset(path), and pass the dataset or a DataLoader."
        )
    if not isinstance(loader, abc.Iterable):
        raise DataError(
            f"calibration loader of type {type(loader).__name__} is not iterable; pass a DataLoader, "
            "a Dataset, a list of batches or a batch-first Tensor."
        )
    return loader


def _input_of(batch: Any, index: int) -> torch.Tensor:
    """The input tensor of one batch: the tensor, the first item of a tuple/list, or a dict's image key."""
    x = batch
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise DataError(f"calibration batch {index} is an empty {type(batch).__name__}; "
                            "expected (inputs, labels, ...) with the inputs first.")
        x = batch[0]
    elif isinstance(batch, dict):
        key = next((k for k in _INPUT_KEYS if k in batch), None)
        if key is None:
            raise DataError(f"calibration batch {index} is a dict with keys {sorted(map(str, batch))}; "
                            f"expected one of {list(_INPUT_KEYS)} to hold the inputs. Rename the key.")
        x = batch[key]
    if not isinstance(x, torch.Tensor):
        where = "" if x is batch else f" (its input item has type {type(x).__name__})"
        raise DataError(
            f"calibration batch {index} has type {type(batch).__name__}{where}; expected a Tensor, a tuple/list "
            f"whose first item is the input Tensor, or a dict with one of the keys {list(_INPUT_KEYS)}. "
            "Add a transform that converts images to tensors (e.g. torchvision ToTensor)."
        )
    if x.dim() == 0 or x.shape[0] == 0:
        raise DataError(f"calibration batch {index} has no samples (shape {tuple(x.shape)}); "
                        "drop empty batches or use a batch-first tensor (N, ...).")
    if x.dim() == 1:
        what = ("integers: that looks like labels, not images" if not x.is_floating_point()
                else "values: one number per sample, not images")
        raise DataError(f"calibration batch {index} is a 1-D tensor of shape {tuple(x.shape)} holding "
                        f"{str(x.dtype).removeprefix('torch.')} {what}. Each batch must hold the inputs, batch "
                        "first (N, C, H, W): a Tensor, or a tuple/list with the inputs first ((images, labels)).")
    return x


def _check_batch(x: torch.Tensor, index: int, first: Optional[torch.Tensor],
                 dtype: Optional[torch.dtype]) -> None:
    """A batch the models can take: floating point when they are, and shaped like the first batch."""
    if dtype is not None and dtype.is_floating_point and x.dtype == torch.uint8:
        raise DataError(
            f"calibration batch {index} holds uint8 values (raw pixels, 0..255?) and the models take "
            f"{str(dtype).removeprefix('torch.')} inputs: convert the images to float and normalize them as in "
            "training, e.g. torchvision.transforms.ToTensor() (or ConvertImageDtype(torch.float32)) followed by "
            "Normalize(mean, std).")
    if first is not None and (x.dim() != first.dim() or x.shape[1] != first.shape[1]):
        raise DataError(
            f"calibration batch {index} has shape {tuple(x.shape)} but batch 0 had {tuple(first.shape)}: every "
            "batch needs the first one's number of dimensions and of channels (dim 1; spatial sizes may "
            "differ). Check the transform, e.g. convert every image to RGB (PIL: image.convert('RGB')).")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"calibration batch {index} has NaN or inf values; fix the data or its normalization "
                        "(e.g. a division by a zero std).")


def check_reiterable(loader: Any, name: str = "calib_loader") -> None:
    """Raise DataError when ``loader`` is a one-shot iterator (a generator, ``iter(list)``, ``zip``, ...).

    A merge reads its calibration data several times (a batch to trace the model, the statistics
    pass, REPAIR's pass), and a second read of an iterator finds only what the first left: the
    tracing batch would be missing from the statistics, or a later pass would get nothing. Refusing
    it up front is the one behaviour that never drops data silently; keeping a copy of every batch
    instead would hold a whole (possibly streamed, possibly large) data set in memory unasked.
    """
    if isinstance(loader, abc.Iterator):
        raise DataError(
            f"{name} is a one-shot iterator ({type(loader).__name__}): a merge reads the calibration data "
            "several times (to trace the model, for the statistics, for REPAIR), so an iterator would lose "
            "batches. Pass data that can be read again: a list of batches (e.g. list(generator)), a "
            "DataLoader, a Dataset or a batch-first Tensor."
        )


def iter_inputs(loader: Any, *, max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                device: Optional[Union[str, torch.device]] = None,
                dtype: Optional[torch.dtype] = None) -> Iterator[torch.Tensor]:
    """Yield the input tensors of ``loader``, batch by batch, on ``device``.

    ``loader`` is any iterable of batches (a DataLoader, a list, ...) where a batch is a Tensor, a
    tuple/list whose first item is the inputs, or a dict with key "image", "input", "x" or "pixel_values".
    A bare Tensor or a TensorDataset is read in chunks of 256 along dim 0; another map-style Dataset
    through a DataLoader (batch size 256, no shuffling).

    At most ``max_batches`` batches and ``max_samples`` samples are yielded (the last batch is cut).
    ``dtype`` applies to floating inputs only (integer inputs such as token ids keep theirs).

    A merge reads its calibration data several times, so ``loader`` must be re-iterable: a DataLoader,
    a list or a Tensor is; a generator or another one-shot iterator is not (``merge`` and
    ``merge_many`` refuse one up front: :func:`check_reiterable`).

    Raises:
        DataError: the loader yields nothing; a batch is not a tensor/tuple/dict, is empty, is 1-D
        (labels only), holds NaN/inf, or has another number of dimensions or channels (dim 1) than the
        first; uint8 inputs for a floating ``dtype`` (unconverted images).
    """
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be >= 1 or None, got {max_batches}.")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples must be >= 1 or None, got {max_samples}.")
    batches = _batches(loader)
    # A generator is its own iterator: a second pass over it finds nothing (the error says so).
    one_shot = batches is loader and isinstance(loader, abc.Iterator)
    seen = 0
    n_batches = 0
    first = None
    for i, batch in enumerate(batches):
        x = _input_of(batch, i)
        _check_batch(x, i, first, dtype)
        first = x if first is None else first
        if max_samples is not None:
            x = x[: max_samples - seen]
        if dtype is not None and x.is_floating_point():
            x = x.to(device=device, dtype=dtype)
        elif device is not None:
            x = x.to(device=device)
        seen += x.shape[0]
        n_batches += 1
        yield x
        if (max_samples is not None and seen >= max_samples) or (max_batches is not None
                                                                  and n_batches >= max_batches):
            break
    if n_batches == 0:
        if one_shot:
            raise DataError(
                f"calibration loader is empty: the {type(loader).__name__} yielded no batches, probably because "
                "it is a one-shot iterator (e.g. a generator) that an earlier pass used up. A merge reads the "
                "data several times: pass a DataLoader, a list of batches or a Tensor instead."
            )
        raise DataError(
            f"calibration loader is empty: the {type(loader).__name__} yielded no batches. Check the data "
            "path and any filtering, and that drop_last=True is not dropping the only (partial) batch."
        )


def count_samples(loader: Any, *, max_samples: Optional[int] = None) -> int:
    """The number of samples ``iter_inputs(loader, max_samples=...)`` yields (reads the loader once
    unless it is a Tensor or a sized Dataset)."""
    if isinstance(loader, torch.Tensor) and loader.dim() > 0:
        n = int(loader.shape[0])
    elif isinstance(loader, Dataset) and hasattr(loader, "__len__") and not isinstance(loader, (list, tuple)):
        n = len(loader)  # type: ignore[arg-type]
    else:
        return sum(int(x.shape[0]) for x in iter_inputs(loader, max_samples=max_samples))
    if n == 0:
        raise DataError(f"calibration data is empty: the {type(loader).__name__} has 0 samples.")
    return n if max_samples is None else min(n, max_samples)
