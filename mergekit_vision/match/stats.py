"""Streamed sufficient statistics in float64: counts, sums, second and cross moments.

They are plain sums, so statistics from data shards, workers or federated clients add exactly
(``a + b``, or ``torch.distributed.all_reduce`` on ``as_tensors()``); means, variances and
correlations are derived only at the end. Each batch's contribution is computed in the activations'
own precision (at least float32: the matmul over positions dominates the cost of a merge) and
accumulated across batches in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def channels_last_2d(x: torch.Tensor, dim: int, start: int = 0, length: Optional[int] = None) -> torch.Tensor:
    """(positions, channels) view of ``x`` with channel axis ``dim``, positions ``start:start+length``."""
    x = x.detach()
    if length is not None and (start != 0 or length != x.shape[dim]):
        x = x.narrow(dim, start, length)
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def channel_sums(x: torch.Tensor, dim: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """Per-channel ``(count, sum, sum of squares)`` of ``x`` along channel axis ``dim``, reduced in
    place over the other axes (no channels-last copy), in the activations' working precision."""
    x = _work(x.detach())
    c = x.shape[dim]
    n = x.numel() // c if c else 0
    if x.dim() >= 3 and dim == 1 and x[0, 0].numel() > 1:  # NC...: reduce positions, then samples
        v = x.flatten(2)
        return n, v.sum(2).sum(0), v.square().sum(2).sum(0)
    dims = tuple(d for d in range(x.dim()) if d != dim % x.dim())
    return n, x.sum(dims), x.square().sum(dims)


def cross_sum(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum over positions of a[:, i] * b[:, j]`` for channel axis ``dim``: the (C_a, C_b) matrix.

    NCHW maps with large spatial extent take a batched matmul over samples (no transposed copies,
    about 2-3x faster than one tall matmul on CPU), in chunks that keep the per-sample products small.
    """
    a, b = _work(a.detach()), _work(b.detach())
    if a.dim() >= 3 and dim == 1 and a[0, 0].numel() >= 64:
        af, bf = a.flatten(2), b.flatten(2).transpose(1, 2)
        chunk = max(1, min(a.shape[0], (1 << 23) // max(1, a.shape[1] * b.shape[1])))
        out = None
        for i in range(0, a.shape[0], chunk):
            part = torch.bmm(af[i:i + chunk], bf[i:i + chunk]).sum(0)
            out = part if out is None else out.add_(part)
        return out
    a2 = a.movedim(dim, 0).reshape(a.shape[dim], -1)
    b2 = b.movedim(dim, 0).reshape(b.shape[dim], -1)
    return a2 @ b2.T


@dataclass
class ChannelMoments:
    """Per-channel count, sum and sum of squares (REPAIR statistics)."""

    n: float = 0.0
    s: Optional[torch.Tensor] = None
    ss: Optional[torch.Tensor] = None

    def update(self, x2d: torch.Tensor) -> None:
        """Add a (positions, channels) batch."""
        x = _work(x2d)
        self.add_sums(x.shape[0], x.sum(0), (x * x).sum(0))

    def observe(self, x: torch.Tensor, dim: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
        """Add a batch with channel axis ``dim`` (any layout; same sums as ``update(channels_last_2d(x, dim))``);
        returns the batch's own ``channel_sums``."""
        sums = channel_sums(x, dim)
        self.add_sums(*sums)
        return sums

    def add_sums(self, n: int, s: torch.Tensor, ss: torch.Tensor) -> None:
        if self.s is None:  # own copies: the batch's sums may be shared with other accumulators
            self.s, self.ss = s.to(torch.float64, copy=True), ss.to(torch.float64, copy=True)
        else:
            self.s += s
            self.ss += ss
        self.n += n

    def __add__(self, other: "ChannelMoments") -> "ChannelMoments":
        if self.s is None:
            return other
        if other.s is None:
            return self
        return ChannelMoments(self.n + other.n, self.s + other.s, self.ss + other.ss)

    @property
    def mean(self) -> torch.Tensor:
        return self.s / self.n

    @property
    def var(self) -> torch.Tensor:
        """Population variance over all positions of all samples."""
        return (self.ss / self.n - self.mean ** 2).clamp_min(0)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def as_tensors(self) -> List[torch.Tensor]:
        return [torch.tensor([self.n], dtype=torch.float64, device=self.s.device), self.s, self.ss]

    @classmethod
    def from_tensors(cls, ts: List[torch.Tensor]) -> "ChannelMoments":
        return cls(float(ts[0].item()), ts[1], ts[2])


@dataclass
class CrossMoments:
    """Moments of two (positions, C) activations observed together: enough for their correlation."""

    n: float = 0.0
    sa: Optional[torch.Tensor] = None
    sb: Optional[torch.Tensor] = None
    saa: Optional[torch.Tensor] = None
    sbb: Optional[torch.Tensor] = None
    sab: Optional[torch.Tensor] = None

    def update(self, a2d: torch.Tensor, b2d: torch.Tensor) -> None:
        """Add a batch of two (positions, C) activations."""
        a, b = _work(a2d), _work(b2d)
        self._add(a.shape[0], (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b))

    def observe(self, a: torch.Tensor, b: torch.Tensor, dim: int, start: int = 0, length: Optional[int] = None,
                sums: Optional[Tuple[tuple, tuple]] = None) -> None:
        """Add a batch of two activations with channel axis ``dim``, channels ``start:start+length``
        (same sums as ``update`` on the channels-last views, computed without copying them).
        ``sums``: the two values' ``channel_sums`` over all their channels, if already computed."""
        if length is not None and (start != 0 or length != a.shape[dim]):
            a, b = a.narrow(dim, start, length), b.narrow(dim, start, length)
            sums = None
        n, sa, saa = sums[0] if sums is not None else channel_sums(a, dim)
        _, sb, sbb = sums[1] if sums is not None else channel_sums(b, dim)
        self._add(n, (sa, sb, saa, sbb, cross_sum(a, b, dim)))

    def _add(self, n: int, sums) -> None:
        if self.sa is None:  # own copies: the batch's sums may be shared with other accumulators
            self.sa, self.sb, self.saa, self.sbb, self.sab = (t.to(torch.float64, copy=True) for t in sums)
        else:
            for name, v in zip(("sa", "sb", "saa", "sbb", "sab"), sums):
                getattr(self, name).add_(v)
        self.n += n

    def __add__(self, other: "CrossMoments") -> "CrossMoments":
        if self.sa is None:
            return other
        if other.sa is None:
            return self
        return CrossMoments(self.n + other.n, self.sa + other.sa, self.sb + other.sb, self.saa + other.saa,
                            self.sbb + other.sbb, self.sab + other.sab)

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation matrix corr[i, j] between channel i of A and channel j of B."""
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma[:, None] * mb[None, :]
        sa = (self.saa / n - ma ** 2).clamp_min(0).sqrt()
        sb = (self.sbb / n - mb ** 2).clamp_min(0).sqrt()
        return cov / (sa[:, None] * sb[None, :] + eps)

    def as_tensors(self) -> List[torch.Tensor]:
        return [torch.tensor([self.n], dtype=torch.float64, device=self.sa.device), self.sa, self.sb, self.saa,
                self.sbb, self.sab]

    @classmethod
    def from_tensors(cls, ts: List[torch.Tensor]) -> "CrossMoments":
        return cls(float(ts[0].item()), *ts[1:])
