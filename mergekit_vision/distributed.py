"""Calibration statistics across data-parallel workers: each worker measures its shard, the shards'
float64 moments are gathered with ``torch.distributed`` and pooled, and every worker merges to the same model.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calibration import LocalCollector, Statistics
from .errors import DataError, MergeVisionError
from .merge import merge_many
from .report import MergeReport

__all__ = ["all_reduce_statistics", "merge_many_distributed"]

logger = logging.getLogger(__name__)


def all_reduce_statistics(stats: Statistics, group: Any = None,
                          device: Optional[Union[str, torch.device]] = None) -> Statistics:
    """The pooled ``stats`` of all ranks of ``group`` (default: the whole world), on every rank.

    All ranks must have run the same request on the same models (the statistics then have the same
    names and shapes). Moments about each shard's own mean do not add as plain sums, so every rank's
    statistics travel as one flat float64 buffer (an all-gather, on ``device``, default where the
    statistics are: CPU tensors for gloo, CUDA tensors for NCCL) and are pooled in rank order with
    ``Statistics.__add__``: every rank computes the same result.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise MergeVisionError("all_reduce_statistics needs an initialized torch.distributed process group: "
                               "call torch.distributed.init_process_group(...) on every worker first")
    tensors = stats.as_tensors()
    names = list(tensors)
    dev = torch.device(device) if device is not None else next(iter(tensors.values())).device
    flat = torch.cat([t.reshape(-1).to(dev, torch.float64) for t in tensors.values()])
    # the layouts must agree before the statistics are pooled: compare sizes and a fingerprint of the names
    sig = torch.tensor([float(flat.numel()), float(_fingerprint(names))], dtype=torch.float64, device=dev)
    lo, hi = sig.clone(), sig.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        raise DataError(f"rank {dist.get_rank(group)}: the workers' statistics differ in layout "
                        f"({int(sig[0])} numbers here, {int(lo[0])}..{int(hi[0])} across ranks). Every worker "
                        "must call the same merge with the same models, and every shard must be non-empty.")
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    pooled = None
    for buf in gathered:
        out, i = {}, 0
        for name, t in tensors.items():
            out[name] = buf[i:i + t.numel()].reshape(t.shape).to(t.device)
            i += t.numel()
        part = Statistics.from_tensors(out)
        pooled = part if pooled is None else pooled + part
    return pooled


def _fingerprint(names: Sequence[str]) -> int:
    # a small deterministic hash (Python's hash() is salted per process), exact in float64
    h = 0
    for n in names:
        for ch in n.encode():
            h = (h * 131 + ch) % 1_000_003
    return h


def merge_many_distributed(models: Sequence[nn.Module], shard_loader: Any, *, group: Any = None,
                           max_batches: Optional[int] = None, max_samples: Optional[int] = None,
                           device: Optional[Union[str, torch.device]] = None, progress: bool = True,
                           reduce_device: Optional[Union[str, torch.device]] = None,
                           **kwargs) -> Union[nn.Module, Tuple[nn.Module, MergeReport]]:
    """:func:`~mergekit_vision.merge_many.merge_many` on data split across the ranks of ``group``.

    Call it on every rank with the same ``models`` and keyword arguments and that rank's
    ``shard_loader``; every statistics pass is all-reduced, so every rank returns the model that one
    process would compute on the union of the shards' batches. ``max_batches``/``max_samples`` are
    per rank. Other keyword arguments go to ``merge_many``.
    """
    import torch.distributed as dist

    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    reduce = functools.partial(all_reduce_statistics, group=group, device=reduce_device)
    collect = LocalCollector(shard_loader, max_batches=max_batches, max_samples=max_samples, device=device,
                             progress=progress and rank == 0, reduce=reduce)
    return merge_many(models, shard_loader, collect=collect, device=device, progress=progress and rank == 0,
                      **kwargs)
