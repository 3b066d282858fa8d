"""Streamed sufficient statistics: counts, means and centred second and cross moments.

Each batch is reduced in the activations' own precision (at least float32: the matmul over positions
dominates the cost of a merge) *about its own mean*, so no raw moment E[xy] is ever formed next to
E[x]E[y]: a channel with a large mean or a nearly constant value keeps its variance and correlations
instead of losing them to cancellation. Batches are then combined in float64 with the pairwise update
of Chan, Golub and LeVeque (1979): ``n = n1 + n2``, ``mean = mean1 + d*n2/n`` and
``M2 = M2_1 + M2_2 + d*d'*n1*n2/n`` with ``d = mean2 - mean1``. The same update pools statistics of
data shards, workers or federated clients (``a + b``), exactly up to rounding and in any order.
Correlations are formed at the end, with channels that carry no variance on the calibration data
(constant relative to their own scale) given correlation 0, and clamped to [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

# A channel whose standard deviation is below this fraction of its RMS value is constant on the
# calibration data: batches are reduced in (at least) float32, whose centring leaves rounding noise
# of about 1e-7 of a value's magnitude, so a smaller spread is indistinguishable from none.
REL_STD_TOL = 1e-5


class BatchMoments(NamedTuple):
    """One batch's per-channel moments about its own mean, in the activations' working precision."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor  # sum over positions of (x - mean)^2


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _shape(x: torch.Tensor, dim: int) -> List[int]:
    shape = [1] * x.dim()
    shape[dim] = -1
    return shape


def channels_last_2d(x: torch.Tensor, dim: int, start: int = 0, length: Optional[int] = None) -> torch.Tensor:
    """(positions, channels) view of ``x`` with channel axis ``dim``, positions ``start:start+length``."""
    x = x.detach()
    if length is not None and (start != 0 or length != x.shape[dim]):
        x = x.narrow(dim, start, length)
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _channel_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel sum over every other axis, reduced in place (NC...: positions, then samples; about
    5x faster on CPU than one reduction over (0, 2, 3))."""
    if x.dim() >= 3 and dim % x.dim() == 1 and x[0, 0].numel() > 1:
        return x.flatten(2).sum(2).to(torch.float64).sum(0)  # per-sample partial sums, pooled in float64
    others = tuple(d for d in range(x.dim()) if d != dim % x.dim())
    return x.sum(others, dtype=torch.float64) if others else x.double()  # a bare channel vector: one position


def _channel_sqsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-channel sum of squares over every other axis, as a squared vector norm: one pass, no
    squared copy (as fast as a plain sum on CPU)."""
    if x.dim() >= 3 and dim % x.dim() == 1 and x[0, 0].numel() > 1:
        return torch.linalg.vector_norm(x.flatten(2), dim=2).square().sum(0)
    others = tuple(d for d in range(x.dim()) if d != dim % x.dim())
    return torch.linalg.vector_norm(x, dim=others).square() if others else x * x


def _centred(x: torch.Tensor, dim: int) -> Tuple[BatchMoments, torch.Tensor]:
    """The batch's moments by the two-pass algorithm (mean, then the sum of squares about it), and the
    centred values themselves (a cross-moment reuses them)."""
    x = _work(x.detach())
    c = x.shape[dim]
    n = x.numel() // c if c else 0
    mean = _channel_sum(x, dim) / max(n, 1)  # accumulated in float64: the centring is then exact to x's rounding
    centred = x - mean.to(x.dtype).view(_shape(x, dim))
    return BatchMoments(n, mean, _channel_sqsum(centred, dim)), centred


def channel_moments(x: torch.Tensor, dim: int) -> BatchMoments:
    """Per-channel ``(count, mean, centred sum of squares)`` of ``x`` along channel axis ``dim``,
    reduced in place over the other axes (no channels-last copy), in the activations' precision."""
    return _centred(x, dim)[0]


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


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64, copy=True)  # own copies: a batch's moments may be shared with other accumulators


def _pool(n1: float, n2: float, mean1: torch.Tensor, mean2: torch.Tensor) -> Tuple[float, torch.Tensor, float]:
    """Chan et al.'s pairwise update: pooled count, the mean difference d and the weight n1*n2/n."""
    n = n1 + n2
    return n, mean2.to(torch.float64) - mean1, n1 * n2 / n


def _spread(m2: torch.Tensor, n: float, mean: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(std, alive): the population std and whether the channel varies relative to its RMS value."""
    var = m2 / n
    std = var.sqrt()
    rms = (var + mean * mean).sqrt()
    return std, std > REL_STD_TOL * rms


@dataclass
class ChannelMoments:
    """Per-channel count, mean and centred sum of squares (REPAIR statistics), pooled in float64."""

    n: float = 0.0
    mean: Optional[torch.Tensor] = None
    m2: Optional[torch.Tensor] = None

    def observe(self, x: torch.Tensor, dim: int) -> BatchMoments:
        """Add a batch with channel axis ``dim`` (any layout); returns the batch's own moments."""
        mom = channel_moments(x, dim)
        self.add_batch(mom)
        return mom

    def update(self, x2d: torch.Tensor) -> None:
        """Add a (positions, channels) batch."""
        self.observe(x2d, 1)

    def add_batch(self, mom: BatchMoments) -> None:
        n2, mean2, m2 = mom
        if not n2:
            return
        if self.mean is None or not self.n:
            self.n, self.mean, self.m2 = float(n2), _f64(mean2), _f64(m2)
            return
        n, d, w = _pool(self.n, n2, self.mean, mean2)
        self.m2 = self.m2 + m2.to(torch.float64) + d * d * w
        self.mean = self.mean + d * (n2 / n)
        self.n = n

    def __add__(self, other: ChannelMoments) -> ChannelMoments:
        if self.mean is None or not self.n:
            return other
        if other.mean is None or not other.n:
            return self
        out = ChannelMoments(self.n, self.mean.clone(), self.m2.clone())
        out.add_batch(BatchMoments(other.n, other.mean, other.m2))
        return out

    @property
    def var(self) -> torch.Tensor:
        """Population variance over all positions of all samples."""
        return self.m2 / self.n

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @property
    def alive(self) -> torch.Tensor:
        """Channels that vary on the calibration data (relative to their own scale)."""
        return _spread(self.m2, self.n, self.mean)[1]

    def as_tensors(self) -> List[torch.Tensor]:
        return [torch.tensor([self.n], dtype=torch.float64, device=self.mean.device), self.mean, self.m2]

    @classmethod
    def from_tensors(cls, ts: List[torch.Tensor]) -> ChannelMoments:
        return cls(float(ts[0].item()), ts[1], ts[2])


@dataclass
class CrossMoments:
    """Moments of two (positions, C) activations observed together: enough for their correlation.

    ``ma``/``mb`` are the means, ``maa``/``mbb`` the centred sums of squares, ``mab`` the centred
    cross sum ``sum (a - ma)(b - mb)^T``, all float64."""

    n: float = 0.0
    ma: Optional[torch.Tensor] = None
    mb: Optional[torch.Tensor] = None
    maa: Optional[torch.Tensor] = None
    mbb: Optional[torch.Tensor] = None
    mab: Optional[torch.Tensor] = None

    def update(self, a2d: torch.Tensor, b2d: torch.Tensor) -> None:
        """Add a batch of two (positions, C) activations."""
        self.observe(a2d, b2d, 1)

    def observe(self, a: torch.Tensor, b: torch.Tensor, dim: int, start: int = 0, length: Optional[int] = None,
                moments: Optional[Tuple[BatchMoments, BatchMoments]] = None) -> None:
        """Add a batch of two activations with channel axis ``dim``, channels ``start:start+length``.
        ``moments``: the two values' ``channel_moments`` over all their channels, if already computed."""
        if length is not None and (start != 0 or length != a.shape[dim]):
            a, b = a.narrow(dim, start, length), b.narrow(dim, start, length)
            moments = None
        a, b = _work(a.detach()), _work(b.detach())
        if moments is not None:  # centred before the product: no cancellation
            (mom_a, mom_b), ac, bc = moments, a - moments[0].mean.to(a.dtype).view(_shape(a, dim)), \
                b - moments[1].mean.to(b.dtype).view(_shape(b, dim))
        else:
            (mom_a, ac), (mom_b, bc) = _centred(a, dim), _centred(b, dim)
        if not mom_a.n:
            return
        self._add(mom_a.n, mom_a.mean, mom_b.mean, mom_a.m2, mom_b.m2, cross_sum(ac, bc, dim))

    def _add(self, n2, ma, mb, maa, mbb, mab) -> None:
        if self.ma is None or not self.n:
            self.n = float(n2)
            self.ma, self.mb, self.maa, self.mbb, self.mab = (_f64(t) for t in (ma, mb, maa, mbb, mab))
            return
        n, da, w = _pool(self.n, n2, self.ma, ma)
        db = mb.to(torch.float64) - self.mb
        self.maa = self.maa + maa.to(torch.float64) + da * da * w
        self.mbb = self.mbb + mbb.to(torch.float64) + db * db * w
        self.mab = self.mab + mab.to(torch.float64) + torch.outer(da, db) * w
        self.ma = self.ma + da * (n2 / n)
        self.mb = self.mb + db * (n2 / n)
        self.n = n

    def __add__(self, other: CrossMoments) -> CrossMoments:
        if self.ma is None or not self.n:
            return other
        if other.ma is None or not other.n:
            return self
        out = CrossMoments(self.n, self.ma.clone(), self.mb.clone(), self.maa.clone(), self.mbb.clone(),
                           self.mab.clone())
        out._add(other.n, other.ma, other.mb, other.maa, other.mbb, other.mab)
        return out

    def alive(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(A's, B's) channels that vary on the calibration data."""
        return _spread(self.maa, self.n, self.ma)[1], _spread(self.mbb, self.n, self.mb)[1]

    def correlation(self) -> torch.Tensor:
        """Pearson correlation matrix corr[i, j] between channel i of A and channel j of B, in [-1, 1];
        0 for a channel that is constant on the calibration data (it carries no evidence)."""
        sa, alive_a = _spread(self.maa, self.n, self.ma)
        sb, alive_b = _spread(self.mbb, self.n, self.mb)
        one = torch.ones_like(sa)
        den = torch.outer(torch.where(alive_a, sa, one), torch.where(alive_b, sb, torch.ones_like(sb))) * self.n
        corr = self.mab / den
        corr = torch.where(torch.outer(alive_a, alive_b), corr, torch.zeros_like(corr))
        return corr.clamp_(-1.0, 1.0)

    def as_tensors(self) -> List[torch.Tensor]:
        return [torch.tensor([self.n], dtype=torch.float64, device=self.ma.device), self.ma, self.mb, self.maa,
                self.mbb, self.mab]

    @classmethod
    def from_tensors(cls, ts: List[torch.Tensor]) -> CrossMoments:
        return cls(float(ts[0].item()), *ts[1:])
