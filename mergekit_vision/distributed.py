"""Calibration statistics across data-parallel workers: each worker measures its shard, the shards'
float64 moments are gathered with ``torch.distributed`` and pooled, and every worker merges to the same model
(``repair="lsq"`` too: each round of the least-squares walk is pooled the same way).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .calibration import LocalCollector, Statistics
from .errors import DataError, MergeVisionError
from .merge import merge_many
from .repair.lsq import LsqRound
from .report import MergeReport

__all__ = ["all_reduce_statistics", "all_reduce_lsq", "gather_tensors", "merge_many_distributed"]

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
    return _pool(gather_tensors(stats.as_tensors(), group, device, "all_reduce_statistics"), Statistics)


def all_reduce_lsq(rnd: LsqRound, group: Any = None, device: Optional[Union[str, torch.device]] = None) -> LsqRound:
    """The least-squares walk's ``reduce`` across the ranks of ``group``: this rank's round of fit
    statistics (or the last round's BatchNorm moments) pooled with every rank's, in rank order, so
    every rank solves the same sums (one flat float64 all-gather per round, as for
    :func:`all_reduce_statistics`)."""
    return _pool(gather_tensors(rnd.as_tensors(), group, device, "all_reduce_lsq"), LsqRound)


def _pool(parts: List[Dict[str, torch.Tensor]], kind):
    """Every rank's flat tensors back into ``kind`` (``from_tensors``) and summed in rank order."""
    pooled = None
    for part in parts:
        st = kind.from_tensors(part)
        pooled = st if pooled is None else pooled + st
    return pooled


def gather_tensors(tensors: Dict[str, torch.Tensor], group: Any = None,
                   device: Optional[Union[str, torch.device]] = None,
                   caller: str = "gather_tensors") -> List[Dict[str, torch.Tensor]]:
    """Every rank's ``tensors`` (the same names and shapes on every rank), in rank order, as float64 on
    this rank's tensors' devices: one flat buffer per rank, all-gathered on ``device`` (default: where
    the tensors are) after a check that the layouts agree (sizes and a fingerprint of the names)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise MergeVisionError(f"{caller} needs an initialized torch.distributed process group: "
                               "call torch.distributed.init_process_group(...) on every worker first")
    names = list(tensors)
    dev = torch.device(device) if device is not None else next(iter(tensors.values())).device
    flat = torch.cat([t.reshape(-1).to(dev, torch.float64) for t in tensors.values()])
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
    parts = []
    for buf in gathered:
        out, i = {}, 0
        for name, t in tensors.items():
            out[name] = buf[i:i + t.numel()].reshape(t.shape).to(t.device)
            i += t.numel()
        parts.append(out)
    return parts


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
    per rank. Other keyword arguments go to ``merge_many``. ``repair="lsq"``: each rank walks its
    shard and every round of fits is all-gathered before it is solved (:func:`all_reduce_lsq`; the
    rounds and their bytes are in ``report.lsq_round_bytes``).
    """
    import torch.distributed as dist

    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    reduce = functools.partial(all_reduce_statistics, group=group, device=reduce_device)
    collect = LocalCollector(shard_loader, max_batches=max_batches, max_samples=max_samples, device=device,
                             progress=progress and rank == 0, reduce=reduce,
                             lsq_reduce=functools.partial(all_reduce_lsq, group=group, device=reduce_device))
    return merge_many(models, shard_loader, collect=collect, device=device, progress=progress and rank == 0,
                      **kwargs)
