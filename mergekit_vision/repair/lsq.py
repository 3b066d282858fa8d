"""Least-squares repair: refit every conv/linear layer of the merged network, in graph order, so that
on the calibration data it reproduces the interpolation of the aligned endpoints' values there.

For each *fit* (a conv/linear layer, composed with the BatchNorm right after it when there is one; a
BatchNorm on some other input, per channel) the target is ``sum_k w_k y_k``, each aligned endpoint k
run on its own inputs, and the regressor is the merged network's own input to the layer, with every
earlier layer already refit. The layer's affine map is the ridge solution

    W = (G + lam * mean(diag G) * I)^-1 (H + lam * mean(diag G) * W0)

from streamed float64 sufficient statistics over im2col patches with a bias column, ``G = sum x x^T``
and ``H = sum x y^T`` (positions optionally subsampled), shrunk towards ``W0``, the averaged network's
own map (so a merge of a model with itself is that model for every ``lam``); grouped and depthwise
convolutions solve one block per group. The map is folded back into the layer (and its BatchNorm,
train-consistently: running statistics = the statistics of the layer's new output on the calibration
data), so the result keeps the architecture and state-dict keys.

The walk runs node by node over *all* calibration batches at once (:func:`lsq_pass`): each model's
values of every batch are kept until their last use, so the whole repair costs one forward pass of
each model plus the solves, at the memory of the widest frontier times the calibration set.

Sharded data (data-parallel workers, federated clients): the statistics are sums, so each worker walks
its own batches and ``lsq_pass(reduce=...)`` pools every *round* of fits (:func:`lsq_rounds`: fits
whose regressors do not depend on each other, e.g. a residual block's first conv and its shortcut
conv) right before the solve, plus one last round of the composed BatchNorms' output moments; every
worker then solves and folds the same pooled sums to the same model.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationWarning, DataError
from ..match.stats import ChannelMoments
from ..ops import is_batchnorm
from .sites import bn_eval, module_calls

__all__ = ["LsqSite", "LsqStats", "LsqFit", "find_lsq_sites", "layer_map", "patch_layout", "patches",
           "ridge_solve", "relative_residual", "fold_map", "fold_bn_fit", "lsq_pass", "lsq_rounds", "LsqRound",
           "lsq_moments"]

_TINY = 1e-12
_FIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass
class LsqSite:
    """One fit: ``node`` (a conv/linear call, or a BatchNorm fitted per channel) whose input is the
    regressor; ``value``: the node whose value is the target (``node`` or the BatchNorm after it)."""

    node: str
    module: str
    value: str
    kind: str                  # "conv", "linear" or "bn" (a BatchNorm per channel, on its own input)
    bn: Optional[str] = None   # the BatchNorm composed with the conv/linear (its module path)
    bias: bool = True          # the fitted map has a shift (False: a layer without bias and no norm after it)


def _plain_forward(m: nn.Module) -> bool:
    """A conv/linear whose forward is torch's own (timm's Conv2dSame, weight-standardized convs are not)."""
    base = next((t for t in _FIT_TYPES if isinstance(m, t)), None)
    return base is not None and type(m).forward is base.forward


def _bn_foldable(m: nn.Module) -> bool:
    return (is_batchnorm(m) and type(m).__name__.startswith("BatchNorm") and m.weight is not None
            and m.bias is not None and getattr(m, "running_mean", None) is not None)


def find_lsq_sites(gm: fx.GraphModule) -> Tuple[List[LsqSite], Dict[str, str]]:
    """Every fit of the graph in graph order, and the layers left at the average with why."""
    modules = dict(gm.named_modules())
    calls = module_calls(gm)
    sites: List[LsqSite] = []
    skipped: Dict[str, str] = {}
    composed = set()
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        m = modules[n.target]
        single_input = len(n.args) == 1 and isinstance(n.args[0], fx.Node) and not n.kwargs
        if isinstance(m, _FIT_TYPES):
            if not _plain_forward(m):
                skipped[n.target] = f"{type(m).__name__} has its own forward: left at the average"
                continue
            if calls[n.target] > 1 or not single_input:
                skipped[n.target] = "called more than once or with extra arguments: left at the average"
                continue
            users = list(n.users)
            bn = None
            if len(users) == 1 and users[0].op == "call_module" and users[0].args[:1] == (n,):
                u = modules[users[0].target]
                if _bn_foldable(u) and calls[users[0].target] == 1:
                    bn = users[0]
            kind = "linear" if isinstance(m, nn.Linear) else "conv"
            if bn is not None:
                sites.append(LsqSite(n.name, n.target, bn.name, kind, bn.target, True))
                composed.add(bn.name)
            else:
                sites.append(LsqSite(n.name, n.target, n.name, kind, None, m.bias is not None))
        elif is_batchnorm(m) and n.name not in composed:
            if _bn_foldable(m) and calls[n.target] == 1 and single_input:
                sites.append(LsqSite(n.name, n.target, n.name, "bn", None, True))
            else:
                skipped[n.target] = ("BatchNorm without affine or running statistics, or called more than once: "
                                     "left as it is")
    return sites, skipped


# ---- layouts: a layer's input as patches, its map as a (groups, d + 1, out per group) tensor ----
@dataclass(frozen=True)
class Layout:
    groups: int
    dim: int      # patch dimension per group, without the bias column
    out: int      # output channels per group


def patch_layout(module: nn.Module, kind: str) -> Layout:
    if kind == "bn":
        return Layout(module.num_features, 1, 1)
    if isinstance(module, nn.Linear):
        return Layout(1, module.in_features, module.out_features)
    g = module.groups
    k = math.prod(module.kernel_size)
    return Layout(g, module.in_channels // g * k, module.out_channels // g)


def _as_2d(module: nn.Conv1d):
    """A Conv1d's geometry as Conv2d's over (1, L)."""
    return (1,) + tuple(module.kernel_size), (1,) + tuple(module.dilation), (1,) + tuple(module.stride)


def _positions(total: int, keep: Optional[int], gen: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    if keep is None or keep >= total:
        return None
    return torch.randperm(total, generator=gen)[:keep].sort().values


def patches(x: torch.Tensor, y: torch.Tensor, module: nn.Module, kind: str, positions: Optional[int] = None,
            gen: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The regressors and targets of one batch, ``(groups, rows, dim)`` and ``(groups, rows, out)``:
    im2col patches of the layer input ``x`` (stride, padding, dilation, groups of ``module``) and the
    target ``y`` at the same output positions; ``positions``: at most this many output positions
    per image, the same random ones for the whole batch (``gen``). Only the sampled positions' patches
    are gathered (one strided gather per kernel tap), not every position's."""
    lay = patch_layout(module, kind)
    if kind == "bn" or isinstance(module, nn.Linear):
        c = x.shape[1] if kind == "bn" else x.shape[-1]
        xs = (x.movedim(1, -1) if kind == "bn" else x).reshape(-1, c)
        ys = (y.movedim(1, -1) if kind == "bn" else y).reshape(-1, y.shape[1] if kind == "bn" else y.shape[-1])
        if kind == "bn":  # one "group" per channel, one input per group
            return xs.t().unsqueeze(-1), ys.t().unsqueeze(-1)
        return xs.unsqueeze(0), ys.unsqueeze(0)
    n = x.shape[0]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xp = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        k, dil, st = _as_2d(module)
        xp = xp.unsqueeze(2)
    else:
        k, dil, st = module.kernel_size, module.dilation, module.stride
    out_hw = [(xp.shape[2 + a] - dil[a] * (k[a] - 1) - 1) // st[a] + 1 for a in range(2)]
    length = out_hw[0] * out_hw[1]
    yl = y.reshape(n, y.shape[1], -1)
    if yl.shape[-1] != length:
        raise RuntimeError(f"im2col gives {length} positions where the layer has {yl.shape[-1]}")
    idx = _positions(length, positions, gen)
    if idx is None:
        idx = torch.arange(length)
    else:
        yl = yl[:, :, idx.to(yl.device)]
    idx = idx.to(x.device)
    oi, oj = idx // out_hw[1], idx % out_hw[1]
    ln = idx.numel()
    xl = xp.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): each gather below reads whole channel rows
    taps = [xl[:, oi * st[0] + ki * dil[0], oj * st[1] + kj * dil[1]] for ki in range(k[0]) for kj in range(k[1])]
    cols = torch.stack(taps, 2)  # (N, positions, taps, C): patch entry tap * C_group + c (see layer_map)
    cg = module.in_channels // lay.groups
    ys = yl.transpose(1, 2).reshape(n * ln, lay.groups, lay.out)
    if lay.groups == 1:
        return cols.view(1, n * ln, lay.dim), ys.reshape(1, n * ln, lay.out)
    xs = cols.view(n * ln, len(taps), lay.groups, cg).permute(2, 0, 1, 3).reshape(lay.groups, n * ln, lay.dim)
    return xs, ys.transpose(0, 1).contiguous()


@dataclass
class LsqStats:
    """Float64 sufficient statistics of one fit: ``g = sum x~ x~^T`` (``x~``: the patch and a 1),
    ``h = sum x~ y^T``, per group; ``yy``/``ys``: sums of y^2 and y per output; ``rows``: patches seen.
    ``a + b`` pools two data shards exactly (up to rounding)."""

    g: Optional[torch.Tensor] = None
    h: Optional[torch.Tensor] = None
    yy: Optional[torch.Tensor] = None
    ys: Optional[torch.Tensor] = None
    rows: int = 0

    def observe(self, xs: torch.Tensor, ys: torch.Tensor) -> LsqStats:
        """Add one batch: its products are formed in the activations' precision (at least float32)
        *about the batch's own means* and pooled in float64, as the channel moments are
        (match/stats.py), so a large mean costs no precision."""
        xs, ys = xs.detach(), ys.detach()
        if xs.dtype not in (torch.float32, torch.float64):
            xs, ys = xs.float(), ys.float()
        r = xs.shape[1]
        mx, my = xs.mean(1, keepdim=True), ys.mean(1, keepdim=True)
        xc, yc = xs - mx, ys - my
        f64 = torch.float64
        cxx, cxy = (xc.transpose(1, 2) @ xc).to(f64), (xc.transpose(1, 2) @ yc).to(f64)
        mx, my = mx.to(f64), my.to(f64)
        groups, d = xs.shape[0], xs.shape[2]
        g = torch.empty(groups, d + 1, d + 1, dtype=f64, device=xs.device)
        g[:, :d, :d] = cxx + r * mx.transpose(1, 2) @ mx
        g[:, :d, d] = g[:, d, :d] = r * mx[:, 0]
        g[:, d, d] = r
        h = torch.cat([cxy + r * mx.transpose(1, 2) @ my, r * my], 1)
        yy = yc.pow(2).sum(1).to(f64) + r * my[:, 0].pow(2)
        s = r * my[:, 0]
        if self.g is None:
            self.g, self.h, self.yy, self.ys = g, h, yy, s
        else:
            self.g += g
            self.h += h
            self.yy += yy
            self.ys += s
        self.rows += r
        return self

    def __add__(self, other: LsqStats) -> LsqStats:
        if self.g is None:
            return other
        if other.g is None:
            return self
        return LsqStats(self.g + other.g, self.h + other.h, self.yy + other.yy, self.ys + other.ys,
                        self.rows + other.rows)


@dataclass
class LsqFit:
    """A solved fit: ``w`` (groups, d + 1, out) with the bias row last (zero when the map has no
    shift); ``ridge``: the absolute regularization added (per group); ``jitter``: extra diagonal a
    singular system needed; residuals relative to the target's variance before (``w0``) and after."""

    w: torch.Tensor
    ridge: torch.Tensor
    jitter: float = 0.0
    residual_before: Optional[float] = None
    residual_after: Optional[float] = None
    rows: int = 0
    dim: int = 0
    scale: Optional[torch.Tensor] = None  # conv->BatchNorm: the conv's output is the map divided by this


def ridge_solve(g: torch.Tensor, h: torch.Tensor, w0: torch.Tensor, lam: float, bias: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """``W = (G + r I)^-1 (H + r W0)`` per group, ``r = lam * mean(diag G)`` over the patch entries
    (the bias column is not shrunk); ``bias=False`` solves without the bias column (its row of W is 0).
    A system still singular (``lam`` 0, dead inputs) gets a growing diagonal until Cholesky succeeds:
    returned as ``jitter`` (relative to mean(diag G)). Never NaN for finite statistics."""
    g, h, w0 = g.double(), h.double(), w0.double()
    d = g.shape[-1] - 1
    keep = d + 1 if bias else d
    gs, hs, ws = g[:, :keep, :keep], h[:, :keep], w0[:, :keep]
    diag = g[:, :d, :d].diagonal(dim1=1, dim2=2)
    scale = diag.mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # dead inputs: any positive scale
    r = lam * scale
    reg = torch.zeros(g.shape[0], keep, dtype=g.dtype, device=g.device)
    reg[:, :d] = r[:, None]
    a = gs + torch.diag_embed(reg)
    rhs = hs + reg[:, :, None] * ws
    jitter = 0.0
    eye = torch.eye(keep, dtype=g.dtype, device=g.device)
    for _ in range(20):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale[:, None, None] * eye)
        if not bool(info.any()):
            break
        jitter = 1e-10 if jitter == 0 else jitter * 100
    else:
        raise RuntimeError("least-squares system not positive definite even with a large diagonal")
    w = torch.cholesky_solve(rhs, chol)
    if not bias:
        w = torch.cat([w, torch.zeros_like(w[:, :1])], 1)
    return w, r, jitter


def relative_residual(st: LsqStats, w: torch.Tensor) -> float:
    """``||X~ W - Y||^2 / ||Y - mean(Y)||^2`` over all groups and outputs, from the statistics alone."""
    w = w.double()
    fit = (w * (st.g @ w)).sum() - 2 * (w * st.h).sum() + st.yy.sum()
    var = (st.yy - st.ys.pow(2) / max(st.rows, 1)).sum()
    return float(fit.clamp_min(0) / var.clamp_min(_TINY))


# ---- a layer's map and back ----------------------------------------------------------------
def _bn_scale_shift(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as ``s*u + t``."""
    f64 = torch.float64
    s = bn.weight.double() / (bn.running_var.to(f64) + bn.eps).sqrt()
    return s, bn.bias.double() - s * bn.running_mean.to(f64)


def layer_map(module: nn.Module, kind: str, bn: Optional[nn.Module] = None) -> torch.Tensor:
    """The layer's current affine map as a (groups, d + 1, out) float64 tensor, bias row last;
    composed with the BatchNorm ``bn`` after it; for ``kind="bn"`` the BatchNorm's own eval map."""
    lay = patch_layout(module, kind)
    if kind == "bn":
        s, t = _bn_scale_shift(module)
        return torch.stack([s, t], -1).unsqueeze(-1)  # (C, 2, 1)
    w = module.weight.detach().double()
    # (out, C_group, taps) -> (out, taps, C_group): the patch order of ``patches``
    wt = w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 2).reshape(lay.groups, lay.out, lay.dim)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(
        module.weight.shape[0], dtype=torch.float64, device=module.weight.device)
    if bn is not None:
        s, t = _bn_scale_shift(bn)
        wt = wt * s.view(lay.groups, lay.out, 1)
        b = s * b + t
    return torch.cat([wt.transpose(1, 2), b.view(lay.groups, 1, lay.out)], 1)


@torch.no_grad()
def fold_map(module: nn.Module, w: torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
    """Write the map ``w`` (groups, d + 1, out) into a conv/linear in place, divided per output
    channel by ``scale`` (a BatchNorm after it will multiply it back). The bias row goes into the
    layer's bias when it has one; otherwise it must be zero (the caller folds it elsewhere)."""
    shape = module.weight.shape
    taps = math.prod(shape[2:]) if len(shape) > 2 else 1
    wt = w[:, :-1].transpose(1, 2).reshape(shape[0], taps, shape[1]).transpose(1, 2)  # (out, C_group, taps)
    b = w[:, -1].reshape(-1)
    if scale is not None:
        wt = wt / scale.view(-1, 1, 1)
    module.weight.copy_(wt.reshape(shape).to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_((b if scale is None else torch.zeros_like(b)).to(module.bias.dtype))


@torch.no_grad()
def fold_bn_fit(bn: nn.Module, mean: torch.Tensor, var: torch.Tensor, n: int, a: torch.Tensor,
                c: torch.Tensor) -> None:
    """Make the BatchNorm compute ``a*u + c`` of its input ``u`` in eval mode *and* on a train-mode
    batch with the calibration statistics: running statistics = ``u``'s measured mean and (unbiased)
    variance, ``gamma = a*sqrt(var + eps)``, ``beta = a*mean + c``."""
    f64 = torch.float64
    mean, var, a, c = mean.to(f64), var.to(f64), a.to(f64), c.to(f64)
    rv = var * n / max(n - 1, 1)
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(rv.to(bn.running_var.dtype))
    bn.weight.copy_((a * (rv + bn.eps).sqrt()).to(bn.weight.dtype))
    bn.bias.copy_((a * mean + c).to(bn.bias.dtype))


@torch.no_grad()
def _fold_bn_canonical(bn: nn.Module, a: torch.Tensor, c: torch.Tensor) -> None:
    """The BatchNorm computes ``a*u + c`` in eval mode from parameters of the fit alone (running mean 0,
    variance 1): what the walk runs until the output moments are known (pooled, on sharded data);
    :func:`fold_bn_fit` with those moments replaces them at the end."""
    f64 = torch.float64
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.copy_((a.to(f64) * math.sqrt(1.0 + bn.eps)).to(bn.weight.dtype))
    bn.bias.copy_(c.to(bn.bias.dtype))


# ---- rounds: what sharded data pools, and when ---------------------------------------------------
@dataclass
class LsqRound:
    """One statistics round of the walk, as pooled across data shards: ``fits`` (fitted value node ->
    :class:`LsqStats`) of the round's fits, or, in the walk's last round, ``moments`` (fitted value node
    -> the channel moments of a composed conv's new output: its BatchNorm's running statistics);
    ``samples``: inputs seen. ``a + b`` pools two shards; ``as_tensors()`` / ``from_tensors()`` give a
    flat ``{name: float64 tensor}`` view (to all-gather, or to send as a Flower ArrayRecord)."""

    index: int
    fits: Dict[str, LsqStats] = field(default_factory=dict)
    moments: Dict[str, ChannelMoments] = field(default_factory=dict)
    samples: int = 0

    def __add__(self, other: LsqRound) -> LsqRound:
        if not isinstance(other, LsqRound):
            return NotImplemented
        if other.index != self.index:
            raise DataError(f"least-squares statistics of round {self.index} and round {other.index} cannot be "
                            "pooled: every shard must answer the same round")
        fits, moments = dict(self.fits), dict(self.moments)
        for k, v in other.fits.items():
            fits[k] = fits[k] + v if k in fits else v
        for k, v in other.moments.items():
            moments[k] = moments[k] + v if k in moments else v
        return LsqRound(self.index, fits, moments, self.samples + other.samples)

    def as_tensors(self) -> Dict[str, torch.Tensor]:
        """``{name: float64 tensor}`` in a fixed (sorted) order; statistics of no data are left out."""
        f64 = torch.float64
        out = {"round": torch.tensor([float(self.index)], dtype=f64),
               "samples": torch.tensor([float(self.samples)], dtype=f64)}
        for name, st in sorted(self.fits.items()):
            if st.g is not None:
                out.update({f"fit/{name}/g": st.g, f"fit/{name}/h": st.h, f"fit/{name}/yy": st.yy,
                            f"fit/{name}/ys": st.ys,
                            f"fit/{name}/rows": torch.tensor([float(st.rows)], dtype=f64, device=st.g.device)})
        for name, m in sorted(self.moments.items()):
            if m.mean is not None:
                out.update({f"moments/{name}/{f}": t for f, t in zip(("n", "mean", "m2"), m.as_tensors())})
        return out

    @classmethod
    def from_tensors(cls, tensors) -> LsqRound:
        """The inverse of :meth:`as_tensors` (any mapping of names to tensors or arrays)."""
        t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in tensors.items()}
        parts: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {"fit": {}, "moments": {}}
        for name, v in t.items():
            kind, _, rest = name.partition("/")
            if kind in parts:
                node, _, f = rest.rpartition("/")
                parts[kind].setdefault(node, {})[f] = v
            elif name not in ("round", "samples"):
                raise DataError(f"least-squares statistics tensor {name!r} is not one of round, samples, fit/..., "
                                "moments/...; pass what LsqRound.as_tensors() produced")
        if "round" not in t:
            raise DataError("least-squares statistics without their round index; pass what LsqRound.as_tensors() "
                            "produced")
        rnd = cls(int(t["round"].reshape(-1)[0]), samples=int(t["samples"].reshape(-1)[0]) if "samples" in t else 0)
        for node, fs in parts["fit"].items():
            rnd.fits[node] = LsqStats(fs["g"], fs["h"], fs["yy"], fs["ys"], int(fs["rows"].reshape(-1)[0]))
        for node, fs in parts["moments"].items():
            rnd.moments[node] = ChannelMoments.from_tensors([fs["n"].reshape(-1), fs["mean"], fs["m2"]])
        return rnd

    @property
    def nbytes(self) -> int:
        """Bytes of this round's float64 statistics: what each shard sends."""
        return sum(v.numel() * 8 for v in self.as_tensors().values())


def lsq_rounds(graph: fx.Graph, sites: Sequence[LsqSite]) -> List[List[LsqSite]]:
    """The fits of ``sites`` grouped into the walk's statistics rounds, in order. A round starts at the
    first fit not yet taken (graph order) and takes every later fit whose node reads only values
    computed before that first one (a residual block's shortcut conv joins the block's first conv;
    parallel branches on one input join each other): their regressors and targets are all known at the
    round's first fit and none depends on another's solve, so solving them together gives exactly what
    solving them one by one gives. The next round needs values this round changes. Deterministic from
    the graph: every worker and client derives the same rounds."""
    nodes = {n.name: n for n in graph.nodes}
    index = {name: i for i, name in enumerate(nodes)}
    order = sorted(sites, key=lambda s: index[s.node])
    rounds: List[List[LsqSite]] = []
    taken = set()
    for s in order:
        if s.node in taken:
            continue
        first = index[s.node]
        group = [s]
        for t in order:
            if t.node not in taken and index[t.node] > first and all(
                    index[a.name] < first for a in nodes[t.node].all_input_nodes):
                group.append(t)
        taken.update(t.node for t in group)
        rounds.append(group)
    return rounds


def _batch_key(x: torch.Tensor) -> int:
    """A fingerprint of a batch's contents: its positions' sampling seed, so that a batch samples the
    same positions whichever shard holds it and wherever in the stream it comes."""
    v = x.detach().reshape(-1)
    v = v[::max(1, v.numel() // 4096)].cpu().contiguous()
    h = hashlib.blake2b(str((tuple(x.shape), str(x.dtype))).encode(), digest_size=8)
    h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return int.from_bytes(h.digest(), "little") >> 1


# ---- the walk ------------------------------------------------------------------------------------
@dataclass
class LsqResult:
    fits: Dict[str, LsqFit] = field(default_factory=dict)        # by the fitted value's node
    notes: Dict[str, str] = field(default_factory=dict)          # module -> why it was left alone
    samples: int = 0
    round_bytes: List[int] = field(default_factory=list)         # float64 statistics per shard, per round


@torch.no_grad()
def lsq_pass(merged: nn.Module, endpoints: Sequence[nn.Module], weights: Sequence[float], gm: fx.GraphModule,
             batches: Sequence[torch.Tensor], *, ridge: float = 1e-3, positions: Optional[int] = None,
             seed: int = 0, sites: Optional[List[LsqSite]] = None,
             reduce: Optional[Callable[[LsqRound], LsqRound]] = None) -> LsqResult:
    """Refit ``merged`` (in place) layer after layer to ``sum_k weights[k] * endpoints[k]``'s values.

    ``endpoints``: the models already aligned to ``merged``'s channel order (not changed); ``gm``: the
    traced graph all of them share; ``batches``: the calibration inputs (all held: every model's values
    are kept per batch until their last use). Returns the fits and the layers left at the average.

    ``reduce``: the batches are one shard of the data; ``reduce(round)`` returns the :class:`LsqRound`
    pooled over all shards (an all-gather across workers, a query to federated clients), the same on
    every worker. It is called once per round of :func:`lsq_rounds`, with the round's statistics right
    before its fits are solved, and last with the composed BatchNorms' output moments (when there are
    any); every worker must walk the same models, graph and options. Fits are then solved from the
    pooled sums alone (``reduce`` set: no solve that needs the raw patches). ``None``: the batches are
    all the data (the same rounds, pooled with nothing)."""
    from ..engine import bind

    if sites is None:
        sites, skipped = find_lsq_sites(gm)
    else:
        skipped = {}
    by_node = {s.node: s for s in sites}
    active = [(m, float(w)) for m, w in zip(endpoints, weights) if float(w) != 0.0]
    models = [m for m, _ in active] + [merged]
    me = len(models) - 1
    graph = gm.graph
    gms = [bind(m, gm) for m in models]
    interps = [fx.Interpreter(g, garbage_collect_values=False) for g in gms]
    nodes = list(graph.nodes)
    node_lists = [nodes if g.graph is graph else list(g.graph.nodes) for g in gms]
    mods = [dict(m.named_modules()) for m in models]
    index = {n: i for i, n in enumerate(nodes)}
    last_use: Dict[int, int] = {}
    for i in reversed(range(len(nodes))):
        for a in nodes[i].all_input_nodes:
            last_use.setdefault(index[a], i)
    free_after: Dict[int, List[int]] = {}
    for a, i in last_use.items():
        free_after.setdefault(i, []).append(a)
    envs = [[{} for _ in batches] for _ in models]
    keys = [_batch_key(x) for x in batches]
    local_samples = sum(int(x.shape[0]) for x in batches)
    result = LsqResult(notes=dict(skipped), samples=local_samples)
    rounds = lsq_rounds(graph, sites)
    leads = {r[0].node: (ri, r) for ri, r in enumerate(rounds)}
    at = {n.name: i for i, n in enumerate(nodes)}
    ahead = set()  # nodes the endpoints ran early, for a round's later fits
    composed: Dict[str, ChannelMoments] = {s.value: ChannelMoments() for s in sites if s.bn is not None}

    def run(k: int, b: int, i: int):
        it, nk = interps[k], node_lists[k][i]
        it.env = envs[k][b]
        if nk.op == "placeholder":
            it.args_iter = iter([batches[b]])
        envs[k][b][nk] = it.run_node(nk)

    def pool(rnd: LsqRound) -> LsqRound:
        got = reduce(rnd) if reduce is not None else rnd
        if got.index != rnd.index or set(got.fits) != set(rnd.fits) or set(got.moments) != set(rnd.moments):
            raise DataError(f"least-squares round {rnd.index}: the pooled statistics name other fits than this "
                            "walk's; every worker must merge the same models with the same options")
        result.samples = got.samples
        result.round_bytes.append(got.nbytes)
        return got

    for i, n in enumerate(nodes):
        if i not in ahead:
            for k in range(me):  # the endpoints never change: their values first
                for b in range(len(batches)):
                    run(k, b, i)
        lead = leads.get(n.name)
        if lead is not None:
            ri, members = lead
            for s in members[1:]:  # the round's later fits: their inputs are computed, their targets now
                ahead.add(at[s.node])
                for k in range(me):
                    for b in range(len(batches)):
                        run(k, b, at[s.node])
            rnd = LsqRound(ri, {s.value: _observe(s, at[s.node], at[nodes[at[s.node]].args[0].name], mods, active,
                                                  envs, node_lists, batches, keys, positions, seed)
                                for s in members}, samples=local_samples)
            rnd = pool(rnd)
            for s in members:
                result.fits[s.value] = _solve(s, mods[me], rnd.fits[s.value], ridge)
        for b in range(len(batches)):
            run(me, b, i)
        site = by_node.get(n.name)
        if site is not None and site.bn is not None:  # train-consistent fold: the new output's statistics
            for b in range(len(batches)):
                composed[site.value].observe(envs[me][b][node_lists[me][i]], 1)
        for dead in free_after.get(i, ()):
            for k in range(len(models)):
                for env in envs[k]:
                    env.pop(node_lists[k][dead], None)
    for k in range(len(models)):
        for env in envs[k]:
            env.clear()
    if composed:
        final = pool(LsqRound(len(rounds), moments=composed, samples=local_samples))
        for s in sites:
            if s.bn is not None:
                _fold_composed(s, mods[me], final.moments[s.value], result.fits[s.value])
    return result


@torch.no_grad()
def lsq_moments(merged: nn.Module, gm: fx.GraphModule, sites: Sequence[LsqSite], batches: Sequence[torch.Tensor],
                index: int) -> LsqRound:
    """The walk's last round on one shard, for a worker that does not walk (a stateless federated
    client): the channel moments of every composed conv's output in ``merged`` (fitted, its BatchNorms as
    the walk leaves them) over ``batches``, as round ``index`` (``len(lsq_rounds(...))``)."""
    from ..engine import bind

    watch = {s.node: s.value for s in sites if s.bn is not None}
    moments = {v: ChannelMoments() for v in watch.values()}

    class Watch(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in watch:
                moments[watch[n.name]].observe(out, 1)
            return out

    g = bind(merged, gm)
    for x in batches:
        Watch(g, garbage_collect_values=True).run(x)
    return LsqRound(index, moments=moments, samples=sum(int(x.shape[0]) for x in batches))


def _target(site: LsqSite, k: int, y: torch.Tensor, mods) -> torch.Tensor:
    if site.bn is not None:
        return bn_eval(mods[k][site.bn], y)
    if site.kind == "bn":
        return bn_eval(mods[k][site.module], y)
    return y


def _observe(site, i, j, mods, active, envs, node_lists, batches, keys, positions, seed) -> LsqStats:
    """This shard's statistics of one fit (node ``i``, its input node ``j``): the merged net's inputs and
    the endpoints' interpolated targets, positions sampled per batch by the batch's contents."""
    me = len(mods) - 1
    module = mods[me][site.module]
    st = LsqStats()
    for b in range(len(batches)):
        x = envs[me][b][node_lists[me][j]]
        tgt = None
        for k, (_, wk) in enumerate(active):
            if site.kind == "bn":  # the endpoint's BatchNorm on its own input
                yk = bn_eval(mods[k][site.module], envs[k][b][node_lists[k][j]])
            else:
                yk = _target(site, k, envs[k][b][node_lists[k][i]], mods)
            tgt = wk * yk if tgt is None else tgt + wk * yk
        gen = torch.Generator().manual_seed(((seed + i) * 1_000_003 + keys[b]) & (2 ** 63 - 1))
        xs, ys = patches(x, tgt, module, site.kind, None if site.kind == "bn" else positions, gen)
        st.observe(xs, ys)
        del tgt, xs, ys
    return st


def _solve(site: LsqSite, mods, st: LsqStats, ridge: float) -> LsqFit:
    """Solve one fit from its (pooled) statistics and fold it into the merged net's modules ``mods``."""
    module = mods[site.module]
    bn = mods[site.bn] if site.bn is not None else None
    if st.g is None:
        raise DataError(f"least-squares repair: no statistics for {site.module} (no calibration data reached it)")
    w0 = layer_map(module, site.kind, bn)
    w, r, jitter = ridge_solve(st.g, st.h, w0.to(st.g.device), ridge, site.bias)
    w0 = w0.to(st.g.device)
    fit = LsqFit(w, r, jitter, relative_residual(st, w0), relative_residual(st, w), st.rows,
                 int(st.g.shape[-1]) - (0 if site.bias else 1))
    if site.kind == "bn":
        x_mean = st.g[:, 0, 1] / max(st.rows, 1)  # the per-channel patch is the channel itself
        x_var = (st.g[:, 0, 0] / max(st.rows, 1) - x_mean.pow(2)).clamp_min(0)
        fold_bn_fit(module, x_mean, x_var, st.rows, w[:, 0, 0], w[:, 1, 0])
    elif bn is None:
        fold_map(module, w)
    else:  # the conv keeps its scale (the old BatchNorm's s per channel); the BatchNorm takes the rest
        s, _ = _bn_scale_shift(bn)
        s = torch.where(s.abs() > _TINY, s, torch.ones_like(s))
        fold_map(module, w, scale=s)
        fit.scale = s
        _fold_bn_canonical(bn, s, w[:, -1].reshape(-1))
    return fit


def _fold_composed(site: LsqSite, mods, moments: ChannelMoments, fit: LsqFit) -> None:
    """The conv now writes ``u = (W x) / s``; the BatchNorm after it becomes ``s*u + b`` with running
    statistics those of ``u`` on the calibration data (all shards)."""
    if moments.mean is None or not moments.n:
        return  # no data reached it: the walk's fold computes the same map
    fold_bn_fit(mods[site.bn], moments.mean, moments.var, int(moments.n), fit.scale, fit.w[:, -1].reshape(-1))


def warn_underdetermined(fits: Dict[str, LsqFit], sites: List[LsqSite], samples: int) -> Optional[str]:
    """A CalibrationWarning naming the fits with fewer patches than unknowns per group, and the
    calibration size that would give each as many patches as unknowns."""
    thin = []
    by_value = {s.value: s for s in sites}
    for value, f in fits.items():
        if f.rows < f.dim:
            per_image = f.rows / max(samples, 1)
            need = math.ceil(f.dim / max(per_image, 1e-12))
            thin.append(f"{by_value[value].module} ({f.rows} patches for {f.dim} unknowns; about {need} images "
                        "would suffice)")
    if not thin:
        return None
    msg = (f"least-squares repair: {len(thin)} layer(s) have fewer calibration patches than unknowns; their fits "
           "are regularized towards the average (raise the calibration size or lsq_positions): " + "; ".join(thin))
    warnings.warn(msg, CalibrationWarning, stacklevel=3)
    return msg
