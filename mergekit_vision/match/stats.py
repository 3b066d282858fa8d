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

import hashlib
import zlib
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch

# A channel whose standard deviation is below this fraction of its RMS value is constant on the
# calibration data: batches are reduced in (at least) float32, whose centring leaves rounding noise
# of about 1e-7 of a value's magnitude, so a smaller spread is indistinguishable from none.
REL_STD_TOL = 1e-5


def batch_key(x: torch.Tensor) -> int:
    """A fingerprint of a batch's contents, the seed of the positions it samples: a batch samples the
    same positions whichever shard holds it and wherever in the stream it comes."""
    v = x.detach().reshape(-1)
    v = v[::max(1, v.numel() // 4096)].cpu().contiguous()
    h = hashlib.blake2b(str((tuple(x.shape), str(x.dtype))).encode(), digest_size=8)
    h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return int.from_bytes(h.digest(), "little") >> 1


def sample_positions(total: int, keep: Optional[int], gen: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """``keep`` of ``total`` positions drawn without replacement by ``gen``, sorted (None: all of them)."""
    if keep is None or keep >= total:
        return None
    return torch.randperm(total, generator=gen)[:keep].sort().values


def tap_generator(key: int, node: str) -> torch.Generator:
    """The generator of the positions a matching tap at ``node`` samples from the batch ``key``
    (:func:`batch_key`): stable across processes (no Python ``hash``), different for every tap."""
    return torch.Generator().manual_seed((key * 1_000_003 + zlib.crc32(node.encode())) & (2 ** 63 - 1))


def values_at(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (batch first, channel axis ``dim``) as ``(N, C, len(idx))``: every sample's values at the
    positions ``idx`` of its flattened other axes (the same positions for every sample and channel)."""
    xl = x.detach().movedim(dim, 1)
    xl = xl.reshape(xl.shape[0], xl.shape[1], -1)
    idx = idx.to(xl.device).view(1, 1, -1).expand(xl.shape[0], xl.shape[1], -1)
    return xl.gather(2, idx)  # (3x faster than index_select along the last dim on CPU)


class BatchMoments(NamedTuple):
    """One batch's per-channel moments about its own mean, in the activations' working precision."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor  # sum over positions of (x - mean)^2


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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


# Positions per float32 partial product: a cross-moment over a batch is the sum of GEMMs over chunks
# of about this many positions, each accumulated in float64, so its rounding is that of a dot product
# of this length (as the per-sample products before), not of the whole batch's positions.
CHUNK = 2048


# Values per block of samples that channel_moments and _sqsum centre at a time on the CPU: about 1 MB (a
# core's L2), reused from block to block, where centring the whole batch at once writes (and page-faults)
# a batch-sized copy.
MOMENT_BLOCK = 1 << 18


def _block_samples(x: torch.Tensor, n: int, per_sample: int) -> int:
    """Samples per block of :data:`MOMENT_BLOCK` values; the whole batch on a GPU, where a kernel launch per
    block would cost more than the copy (its caching allocator reuses the memory, and nothing page-faults)."""
    if x.device.type != "cpu":
        return max(n, 1)
    return max(1, MOMENT_BLOCK // max(per_sample, 1))


class Rows(NamedTuple):
    """A batch's values about ``mean`` with the channel axis first, ``(C, samples, positions)``: what a
    cross-moment multiplies (``rows_a @ rows_b.T`` over chunks of samples). Centred a chunk at a time,
    into a reused buffer, when the product needs it: never as a batch-sized copy (one that large is
    written, and page-faulted, once per batch and tap)."""

    values: torch.Tensor  # the batch's values with the channel axis first: (C, samples, ...)
    mean: torch.Tensor  # in the values' dtype, shaped (C, 1, ...) to broadcast over them

    @property
    def shape(self) -> Tuple[int, int, int]:
        c, n = self.values.shape[0], self.values.shape[1]
        return c, n, self.values.numel() // (c * n) if c * n else 0

    def centred(self, start: int, count: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Samples ``start:start+count`` about the mean, as a contiguous (C, count * positions) matrix
        (written into the front of the flat buffer ``out`` if given)."""
        v = self.values[:, start:start + count]
        size = v.numel()
        dst = torch.empty(size, dtype=v.dtype, device=v.device) if out is None else out[:size]
        torch.sub(v, self.mean, out=dst.view(v.shape))
        return dst.view(v.shape[0], size // v.shape[0] if v.shape[0] else 0)


class Centred(NamedTuple):
    """One batch's moments and its values about their mean (:class:`Rows`), which a cross-moment reuses."""

    moments: BatchMoments
    rows: Rows


def _rows(x: torch.Tensor, dim: int, mean: torch.Tensor) -> Rows:
    """``x`` about ``mean`` with the channel axis first (a view: centred when multiplied)."""
    moved = _work(x.detach()).movedim(dim, 0)
    moved = moved if moved.dim() > 1 else moved.unsqueeze(1)
    return Rows(moved, mean.to(moved.dtype).view((moved.shape[0],) + (1,) * (moved.dim() - 1)))  # cast once


def _chunk_buffers(ra: Rows, rb: Rows, step: int):
    """One flat buffer per side, the size of a chunk of ``step`` samples: reused from chunk to chunk."""
    (c_a, n, p), c_b = ra.shape, rb.shape[0]
    k = min(step, n)
    return (torch.empty(c_a * k * p, dtype=ra.values.dtype, device=ra.values.device),
            torch.empty(c_b * k * p, dtype=rb.values.dtype, device=rb.values.device))


# Elements per block in which a float64 accumulator takes a float32 (or float64) matrix: on the CPU one
# mixed-precision add of a 2048 x 2048 matrix takes ~20 ms where the same add in blocks of this size takes
# 3 (measured on this machine's torch; the same sums, element by element).
ADD_BLOCK = 1 << 18


def _accumulate(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst += src`` for 2-D matrices, in row blocks on the CPU (element-wise: the same result)."""
    if dst.device.type != "cpu" or dst.dim() != 2 or dst.numel() <= ADD_BLOCK:
        return dst.add_(src)
    step = max(1, ADD_BLOCK // max(dst.shape[1], 1))
    for i in range(0, dst.shape[0], step):
        dst[i:i + step].add_(src[i:i + step])
    return dst


def _gram(ra: Rows, rb: Rows, batched: Optional[bool] = None) -> torch.Tensor:
    """``sum over samples and positions of ra[i] * rb[j]``: float32 GEMMs over chunks, pooled in float64.
    On a GPU (``batched``) the whole chunks go in one batched GEMM: a launch per chunk would cost more
    than the work. On the CPU each chunk is centred into a reused buffer just before its GEMM."""
    c_a, n, p = ra.shape
    c_b = rb.shape[0]
    step = max(1, CHUNK // max(p, 1))
    out = None
    done = 0
    if (ra.values.device.type != "cpu" if batched is None else batched) and n >= 2 * step:
        done = n - n % step
        pa = ra.centred(0, done).view(c_a, done // step, step * p).transpose(0, 1)
        pb = rb.centred(0, done).view(c_b, done // step, step * p).transpose(0, 1)
        out = torch.bmm(pa, pb.transpose(1, 2)).sum(0, dtype=torch.float64)
    if out is not None and done == n:
        return out
    buf_a, buf_b = _chunk_buffers(ra, rb, step)
    if out is None and n - done <= step:  # one chunk: its float32 product, promoted when it is pooled
        return ra.centred(done, n - done, buf_a) @ rb.centred(done, n - done, buf_b).T
    if out is None:
        out = torch.zeros((c_a, c_b), dtype=torch.float64, device=ra.values.device)
    for i in range(done, n, step):
        k = min(step, n - i)
        _accumulate(out, ra.centred(i, k, buf_a) @ rb.centred(i, k, buf_b).T)
    return out


def _sqsum(rows: Rows) -> torch.Tensor:
    """Per-channel sum of squares of rows about their mean: each sample's norm over its positions
    (centred a block of samples at a time), pooled in float64."""
    c, n, p = rows.shape
    norms = torch.empty((c, n), dtype=rows.values.dtype, device=rows.values.device)
    step = _block_samples(rows.values, n, c * p)
    buf = torch.empty(c * min(step, n) * p, dtype=rows.values.dtype, device=rows.values.device)
    for i in range(0, n, step):
        k = min(step, n - i)
        norms[:, i:i + k] = torch.linalg.vector_norm(rows.centred(i, k, buf).view(c, k, p), dim=2)
    return norms.square().sum(1, dtype=torch.float64)


def centre(x: torch.Tensor, dim: int, mean: Optional[torch.Tensor] = None) -> Centred:
    """The batch's moments by the two-pass algorithm (the mean, accumulated in float64, then the sum of
    squares about it) and its rows about the mean (a cross-moment reuses them). ``mean``: this
    batch's mean if already known."""
    x = _work(x.detach())
    c = x.shape[dim]
    n = x.numel() // c if c else 0
    if mean is None and _blockwise(x, dim):
        mom = channel_moments(x, dim)  # the same sums, centred in the batch's own layout (no transpose)
        return Centred(mom, _rows(x, dim, mom.mean))
    if mean is None:
        mean = _channel_sum(x, dim) / max(n, 1)  # in float64: the centring is then exact to x's rounding
    rows = _rows(x, dim, mean)
    return Centred(BatchMoments(n, mean, _sqsum(rows)), rows)


def _blockwise(x: torch.Tensor, dim: int) -> bool:
    """Whether :func:`channel_moments` centres ``x`` in blocks of samples in its own layout: channels on
    axis 1 of a contiguous batch, several positions per sample."""
    return x.dim() >= 3 and dim % x.dim() == 1 and x.is_contiguous() and x[0, 0].numel() >= 2


def channel_moments(x: torch.Tensor, dim: int) -> BatchMoments:
    """Per-channel ``(count, mean, centred sum of squares)`` of ``x`` along channel axis ``dim``, in the
    activations' precision (at least float32), pooled over samples in float64: :func:`centre`'s
    two-pass moments, the same sums in the same order, without keeping the centred values (a batch
    with channels on axis 1 is centred a block of samples at a time, in one reused buffer)."""
    x = _work(x.detach())
    if not _blockwise(x, dim):
        return centre(x, dim).moments  # (blocks of samples with the channel axis first)
    n, c = x.shape[0], x.shape[1]
    mean = _channel_sum(x, dim) / (x.numel() // c)
    xl = x.view(n, c, -1)
    step = _block_samples(x, n, c * xl.shape[2])
    buf = torch.empty((min(step, n),) + xl.shape[1:], dtype=x.dtype, device=x.device)
    mv = mean.to(x.dtype).view(1, c, 1)
    norms = torch.empty((c, n), dtype=x.dtype, device=x.device)  # each sample's norm, laid out as _sqsum's
    for i in range(0, n, step):
        block = buf[:min(step, n - i)]
        torch.sub(xl[i:i + step], mv, out=block)
        norms[:, i:i + step] = torch.linalg.vector_norm(block, dim=2).T
    return BatchMoments(x.numel() // c, mean, norms.square().sum(1, dtype=torch.float64))


def cross_sum(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum over positions of a[:, i] * b[:, j]`` for channel axis ``dim``: the (C_a, C_b) matrix
    (float64), by GEMMs over chunks of samples."""
    zero = torch.zeros((), dtype=torch.float64)
    return _gram(_rows(a, dim, zero.expand(a.shape[dim])), _rows(b, dim, zero.expand(b.shape[dim]))).to(torch.float64)


def _centred_as(x: torch.Tensor, dim: int, known: Union[Centred, BatchMoments, None]) -> Centred:
    if isinstance(known, Centred):
        return known
    if known is None:
        return centre(x, dim)
    return Centred(known, _rows(x, dim, known.mean))


def mean_correlations(pairs) -> Dict[str, torch.Tensor]:
    """group -> the mean of its taps' correlation matrices, for ``(group, CrossMoments)`` pairs: summed as
    they are formed (one matrix per group held, not one per tap)."""
    total: Dict[str, torch.Tensor] = {}
    count: Dict[str, int] = {}
    for g, mom in pairs:
        c = mom.correlation()
        if g in total:
            total[g].add_(c)
        else:
            total[g] = c
        count[g] = count.get(g, 0) + 1
    return {g: t.div_(count[g]) for g, t in total.items()}


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

    def observe_centred(self, x: torch.Tensor, dim: int) -> Centred:
        """As :meth:`observe`, returning the batch's :func:`centre` (its rows serve a cross-moment)."""
        c = centre(x, dim)
        self.add_batch(c.moments)
        return c

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
                moments: Optional[Tuple[Union[Centred, BatchMoments], Union[Centred, BatchMoments]]] = None) -> None:
        """Add a batch of two activations with channel axis ``dim``, channels ``start:start+length``.
        ``moments``: the two values' :func:`centre` (or only their ``channel_moments``) over all their
        channels, if already computed."""
        if length is not None and (start != 0 or length != a.shape[dim]):
            a, b = a.narrow(dim, start, length), b.narrow(dim, start, length)
            moments = None
        ca, cb = (_centred_as(x, dim, m) for x, m in zip((a, b), moments or (None, None)))
        if not ca.moments.n:
            return
        (mom_a, mom_b) = ca.moments, cb.moments
        # centred before the product (no cancellation); GEMMs in the activations' precision
        self._add(mom_a.n, mom_a.mean, mom_b.mean, mom_a.m2, mom_b.m2, _gram(ca.rows, cb.rows))

    def _add(self, n2, ma, mb, maa, mbb, mab) -> None:
        if self.ma is None or not self.n:
            self.n = float(n2)
            self.ma, self.mb, self.maa, self.mbb, self.mab = (_f64(t) for t in (ma, mb, maa, mbb, mab))
            return
        n, da, w = _pool(self.n, n2, self.ma, ma)
        db = mb.to(torch.float64) - self.mb
        self.maa = self.maa + maa.to(torch.float64) + da * da * w
        self.mbb = self.mbb + mbb.to(torch.float64) + db * db * w
        # in place (an accumulator owns its tensors: copied when first set, cloned by +): two passes over
        # the C x C float64 matrix and no new one per batch
        _accumulate(self.mab, mab).addr_(da, db, alpha=w)  # a float32 batch is promoted in the add
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
        # one C x C temporary, reused in place (a 2,048-channel tap's is 32 MB)
        corr = torch.outer(torch.where(alive_a, sa, one), torch.where(alive_b, sb, torch.ones_like(sb))).mul_(self.n)
        torch.div(self.mab, corr, out=corr)
        corr.masked_fill_(~torch.outer(alive_a, alive_b), 0.0)
        return corr.clamp_(-1.0, 1.0)

    def as_tensors(self) -> List[torch.Tensor]:
        return [torch.tensor([self.n], dtype=torch.float64, device=self.ma.device), self.ma, self.mb, self.maa,
                self.mbb, self.mab]

    @classmethod
    def from_tensors(cls, ts: List[torch.Tensor]) -> CrossMoments:
        return cls(float(ts[0].item()), *(_f64(t) for t in ts[1:]))  # its own copies: batches add in place
