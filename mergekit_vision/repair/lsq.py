"""Least-squares repair: refit every conv/linear layer of the merged network, in graph order, so that
on the calibration data it reproduces the interpolation of the aligned endpoints' values there.

For each *fit* (a conv/linear layer, composed with the BatchNorm right after it when there is one; a
BatchNorm on some other input, per channel) the target is ``sum_k w_k y_k``, each aligned endpoint k
run on its own inputs, and the regressor is the merged network's own input to the layer, with every
earlier layer already refit. The layer's affine map ``x -> x W + b`` is the ridge solution

    W = (Cxx + lam * mean(diag Cxx) * I)^-1 (Cxy + lam * mean(diag Cxx) * W0),   b = my - mx W

from streamed float64 sufficient statistics over im2col patches, *centred* (means ``mx``, ``my`` and
the centred sums ``Cxx = sum (x - mx)(x - mx)^T``, ``Cxy = sum (x - mx)(y - my)^T``, positions
optionally subsampled; the bias is not shrunk, so this is exactly the ridge problem with a bias
column), shrunk towards ``W0``, the averaged network's own map (so a merge of a model with itself is
that model for every ``lam``); grouped and depthwise convolutions solve one block per group. The map is
folded back into the layer (and its BatchNorm, train-consistently: running statistics = the statistics
of the layer's new output on the calibration data), so the result keeps the architecture and
state-dict keys.

The walk runs node by node over *all* calibration batches at once (:func:`lsq_pass`): each model's
values of every batch are kept until their last use, so the whole repair costs one forward pass of
each model plus the solves, at the memory of the widest frontier times the calibration set.

Sharded data (data-parallel workers, federated clients): the statistics are sums, so each worker walks
its own batches and ``lsq_pass(reduce=...)`` pools every *round* of fits (:func:`lsq_rounds`: fits
whose regressors do not depend on each other, e.g. a residual block's first conv and its shortcut
conv) right before the solve, plus one last round of the composed BatchNorms' output moments; every
worker then solves and folds the same pooled sums to the same model.

A classifier's logits (a linear fit whose value the network returns) can take another target,
``lsq_logits="probs"`` (:func:`logit_sites`): the log of the endpoints' averaged class probabilities,
``log sum_k w_k softmax(y_k)`` — what the ensemble of the endpoints predicts — shifted per sample to the
mean of ``sum_k w_k y_k`` (softmax ignores that shift; it makes an endpoint's target its own logits).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationWarning, DataError
from ..match.stats import ChannelMoments, batch_key, sample_positions, values_at
from ..ops import is_batchnorm, is_eval_identity
from .sites import bn_affine, bn_eval, module_calls

__all__ = ["LsqSite", "LsqStats", "LsqRows", "LsqFit", "find_lsq_sites", "layer_map", "patch_layout", "patches",
           "patch_rows", "conv_positions", "conv_cols", "conv_classes", "conv_live_dim", "conv_targets",
           "at_positions", "live_entries",
           "ridge_solve", "dual_solve", "stats_numel", "relative_residual", "rows_residual", "fold_map", "fold_bn_fit",
           "lsq_pass", "lsq_rounds", "LsqRound", "lsq_moments", "LSQ_LOGITS", "logit_sites", "prob_target"]

_TINY = 1e-12
SPLIT_PADDING = 0.25  # conv patches are split by the taps reading padding where at least this much is padding
_FIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
LSQ_LOGITS = ("mean", "probs")  # the target of a fit whose value the network returns (lsq_logits)
_PASS_METHODS = ("contiguous", "flatten")  # with torch.flatten and nn.Flatten: no-ops on a classifier's 2-D logits


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
    target: str = "mean"       # "probs": the log of the endpoints' averaged softmax (logit_sites, prob_target)


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


def _returned(gm: fx.GraphModule) -> set:
    """Names of the nodes whose value the graph returns, looking through the modules that are identities
    in eval (:func:`~mergekit_vision.ops.is_eval_identity`: timm's ``head.flatten`` Identity, dropout) and
    ``flatten`` of a 2-D value."""
    modules = dict(gm.named_modules())
    out = set()
    todo = [a for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes]
    while todo:
        n = todo.pop()
        out.add(n.name)
        passes = (is_eval_identity(n, modules) or (n.op == "call_module" and isinstance(modules[n.target], nn.Flatten))
                  or (n.op == "call_method" and n.target in _PASS_METHODS)
                  or (n.op == "call_function" and n.target is torch.flatten))
        if passes and n.args and isinstance(n.args[0], fx.Node):
            todo.append(n.args[0])
    return out


def logit_sites(sites: Sequence[LsqSite], gm: fx.GraphModule, logits: str = "mean") -> List[LsqSite]:
    """``sites`` with the target ``logits`` given to every linear fit whose value the network returns (a
    classifier's logits; ``"mean"``: every fit interpolates its values). The others are unchanged."""
    if logits not in LSQ_LOGITS:
        raise ValueError(f"unknown lsq_logits {logits!r}; valid: {', '.join(LSQ_LOGITS)}")
    returned = _returned(gm)
    return [replace(s, target=logits) if s.kind == "linear" and s.bn is None and s.value in returned else s
            for s in sites]


def prob_target(ys: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The ``"probs"`` target from the endpoints' logits ``ys`` (classes last): ``log sum_k w_k
    softmax(y_k)`` (weights normalized to sum 1; a log-sum-exp, no probability is rounded to zero),
    shifted per row so that its mean over classes is that of ``sum_k w_k y_k``. One endpoint of weight 1
    gets its own logits back (to rounding)."""
    f64 = torch.float64
    w = torch.tensor([float(x) for x in weights], dtype=f64, device=ys[0].device)
    if not bool((w > 0).all()):
        raise ValueError(f"lsq_logits='probs' averages probabilities: it needs positive weights, got {weights}")
    w = (w / w.sum()).view(-1, *([1] * ys[0].dim()))
    z = torch.stack([y.to(f64) for y in ys])
    logp = torch.logsumexp(w.log() + z.log_softmax(-1), 0)
    mean = (w * z).sum(0).mean(-1, keepdim=True)
    return (logp - logp.mean(-1, keepdim=True) + mean).to(ys[0].dtype)


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


def _geometry(module: nn.Module):
    """Kernel, dilation and stride as 2-d tuples (a Conv1d as Conv2d over (1, L))."""
    if isinstance(module, nn.Conv1d):
        return _as_2d(module)
    return module.kernel_size, module.dilation, module.stride


def _out_hw(shape: Sequence[int], module: nn.Module) -> Tuple[int, int]:
    """The conv's output grid for an input of ``shape`` (its padding included)."""
    k, dil, st = _geometry(module)
    pad = module._reversed_padding_repeated_twice  # (before, after) per spatial dim, last dim first
    pads = [pad[2 * a] + pad[2 * a + 1] for a in range(len(pad) // 2)][::-1]
    spatial = list(shape[2:])
    if isinstance(module, nn.Conv1d):
        pads, spatial = [0] + pads, [1] + spatial
    return tuple((spatial[a] + pads[a] - dil[a] * (k[a] - 1) - 1) // st[a] + 1 for a in range(2))


def conv_positions(shape: Sequence[int], module: nn.Module, positions: Optional[int],
                   gen: Optional[torch.Generator]) -> Tuple[Optional[torch.Tensor], Tuple[int, int]]:
    """The output positions a conv fit samples for one batch (None: all) and the output grid."""
    out_hw = _out_hw(shape, module)
    return sample_positions(out_hw[0] * out_hw[1], positions, gen), out_hw


def _channels_last_padded(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """The conv input padded as the conv pads it, channels-last ``(N, Hp, Wp, C)`` (Conv1d: Hp = 1)."""
    pad = tuple(module._reversed_padding_repeated_twice)
    x4 = x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x
    if module.padding_mode == "zeros":  # pad the channels-last view: one copy, already in gather layout
        pad4 = pad + (0, 0) if isinstance(module, nn.Conv1d) else pad
        return F.pad(x4.permute(0, 2, 3, 1), (0, 0) + pad4).contiguous()
    xp = F.pad(x, pad, mode=module.padding_mode)
    return (xp.unsqueeze(2) if isinstance(module, nn.Conv1d) else xp).permute(0, 2, 3, 1).contiguous()


def _taps(module: nn.Module, pos: torch.Tensor, out_hw: Tuple[int, int]):
    """For output positions ``pos``: each tap's row and column in the padded input, ``(positions, taps)``."""
    k, dil, st = _geometry(module)
    oi, oj = pos // out_hw[1], pos % out_hw[1]
    ti = torch.arange(k[0], device=pos.device).repeat_interleave(k[1]) * dil[0]
    tj = torch.arange(k[1], device=pos.device).repeat(k[0]) * dil[1]
    return oi[:, None] * st[0] + ti, oj[:, None] * st[1] + tj


def _gather(xl: torch.Tensor, src: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Rows ``(groups, N * positions, taps * C_group)`` of the padded channels-last input at the flat
    padded indices ``src`` ``(positions, taps)``: one row gather (patch entry ``tap * C_group + c``)."""
    lay = patch_layout(module, "conv")
    n, c = xl.shape[0], xl.shape[3]
    cols = xl.view(n, -1, c).index_select(1, src.reshape(-1))  # (N, positions * taps, C)
    rows, taps = n * src.shape[0], src.shape[1]
    if lay.groups == 1:
        return cols.view(1, rows, taps * c)
    cg = c // lay.groups
    return cols.view(rows, taps, lay.groups, cg).permute(2, 0, 1, 3).reshape(lay.groups, rows, taps * cg)


def conv_cols(x: torch.Tensor, module: nn.Module, idx: Optional[torch.Tensor], out_hw: Tuple[int, int]
              ) -> torch.Tensor:
    """im2col patches ``(groups, N * positions, dim)`` of ``x`` at the output positions ``idx`` (None:
    all): the input padded once into channels-last, then one row gather (patch entry
    ``tap * C_group + c``, the order of :func:`layer_map`)."""
    xl = _channels_last_padded(x, module)
    pos = torch.arange(out_hw[0] * out_hw[1], device=x.device) if idx is None else idx.to(x.device)
    ri, rj = _taps(module, pos, out_hw)
    return _gather(xl, ri * xl.shape[2] + rj, module)


def _inside(x_shape: Sequence[int], module: nn.Module, ri: torch.Tensor, rj: torch.Tensor) -> torch.Tensor:
    """Which taps (padded coordinates ``ri``, ``rj``) read the input itself rather than zero padding."""
    pad = module._reversed_padding_repeated_twice
    if isinstance(module, nn.Conv1d):
        h, w, top, left = 1, x_shape[-1], 0, pad[0]
    else:
        h, w, top, left = x_shape[-2], x_shape[-1], pad[2], pad[0]
    ri, rj = ri - top, rj - left
    return (ri >= 0) & (ri < h) & (rj >= 0) & (rj < w)


def conv_live_dim(x_shape: Sequence[int], module: nn.Module) -> int:
    """Patch entries per group that read the input at some output position (the others only ever read
    zero padding: a 3x3 conv on a 1x1 map has 1/9 of them): the fit's unknowns, without the bias."""
    lay = patch_layout(module, "conv")
    if module.padding_mode != "zeros":
        return lay.dim
    out_hw = _out_hw(x_shape, module)
    ri, rj = _taps(module, torch.arange(out_hw[0] * out_hw[1]), out_hw)
    live = int(_inside(x_shape, module, ri, rj).any(0).sum())
    return lay.dim // math.prod(_geometry(module)[0]) * live


def conv_classes(x: torch.Tensor, y_at: torch.Tensor, module: nn.Module, idx: Optional[torch.Tensor],
                 out_hw: Tuple[int, int]):
    """The batch's patches and targets split by which taps read zero padding, each part without those
    taps: ``(entries or None, xs, ys)``, ``entries`` the patch entries of ``xs``'s columns (None: all).
    The same statistics as :func:`conv_cols` (rows in another order), without the products of zeros:
    on the small maps of deep layers most of a patch is padding."""
    xl = _channels_last_padded(x, module)
    pos = torch.arange(out_hw[0] * out_hw[1], device=x.device) if idx is None else idx.to(x.device)
    ri, rj = _taps(module, pos, out_hw)
    src = ri * xl.shape[2] + rj
    inside = _inside(x.shape, module, ri, rj) if module.padding_mode == "zeros" else None
    # a split costs a gather and a set of products per part: worth it where much of the patch is padding
    if inside is None or float(inside.float().mean()) > 1 - SPLIT_PADDING:
        yield None, _gather(xl, src, module), conv_targets(y_at, module)
        return
    cg = module.in_channels // patch_layout(module, "conv").groups
    kinds, which = torch.unique(inside, dim=0, return_inverse=True)
    for c in range(kinds.shape[0]):
        sel = (which == c).nonzero().flatten()
        taps = kinds[c].nonzero().flatten()
        entries = (taps[:, None] * cg + torch.arange(cg, device=x.device)).flatten()
        ys = conv_targets(y_at.index_select(2, sel.to(y_at.device)), module)
        yield (None if taps.numel() == src.shape[1] else entries), _gather(xl, src[sel][:, taps], module), ys


def conv_targets(y_at: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Targets ``(N, out, positions)`` at the sampled positions as ``(groups, N * positions, out)``."""
    lay = patch_layout(module, "conv")
    n, ln = y_at.shape[0], y_at.shape[-1]
    ys = y_at.transpose(1, 2).reshape(n * ln, lay.groups, lay.out)
    return ys.reshape(1, n * ln, lay.out) if lay.groups == 1 else ys.transpose(0, 1).contiguous()


def at_positions(y: torch.Tensor, idx: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """A conv output ``(N, C, ...)`` as ``(N, C, positions)`` at the sampled positions ``idx``."""
    yl = y.reshape(y.shape[0], y.shape[1], -1)
    if yl.shape[-1] != length:
        raise RuntimeError(f"im2col gives {length} positions where the layer has {yl.shape[-1]}")
    return yl if idx is None else values_at(yl, 1, idx)


def patches(x: torch.Tensor, y: torch.Tensor, module: nn.Module, kind: str, positions: Optional[int] = None,
            gen: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The regressors and targets of one batch, ``(groups, rows, dim)`` and ``(groups, rows, out)``:
    im2col patches of the layer input ``x`` (stride, padding, dilation, groups of ``module``) and the
    target ``y`` at the same output positions; ``positions``: at most this many output positions
    per image, the same random ones for the whole batch (``gen``). Only the sampled positions' patches
    are gathered, not every position's."""
    if kind == "bn" or isinstance(module, nn.Linear):
        c = x.shape[1] if kind == "bn" else x.shape[-1]
        xs = (x.movedim(1, -1) if kind == "bn" else x).reshape(-1, c)
        ys = (y.movedim(1, -1) if kind == "bn" else y).reshape(-1, y.shape[1] if kind == "bn" else y.shape[-1])
        if kind == "bn":  # one "group" per channel, one input per group
            return xs.t().unsqueeze(-1), ys.t().unsqueeze(-1)
        return xs.unsqueeze(0), ys.unsqueeze(0)
    idx, out_hw = conv_positions(x.shape, module, positions, gen)
    y_at = at_positions(y, idx, out_hw[0] * out_hw[1])
    return conv_cols(x, module, idx, out_hw), conv_targets(y_at, module)


def patch_rows(shape: Sequence[int], module: nn.Module, kind: str, positions: Optional[int] = None) -> int:
    """How many patch rows per group :func:`patches` gives for a layer input of ``shape``, without
    forming them (so a fit's row count is known before its pass)."""
    if kind == "bn":
        return math.prod(shape) // shape[1]
    if isinstance(module, nn.Linear):
        return math.prod(shape[:-1])
    oh, ow = _out_hw(shape, module)
    return shape[0] * (oh * ow if positions is None else min(oh * ow, positions))


def _gram(xc: torch.Tensor) -> torch.Tensor:
    """``xc^T xc`` per group, ``(groups, d, d)``: on CPU by BLAS ``syrk`` (one triangle: about 2/3 of
    the time of the full product for wide patches), mirrored; elsewhere by a matmul."""
    if xc.device.type != "cpu" or xc.dtype not in (torch.float32, torch.float64) or xc.shape[-1] < 64:
        return xc.transpose(1, 2) @ xc
    from scipy.linalg import blas

    syrk = blas.ssyrk if xc.dtype == torch.float32 else blas.dsyrk
    out = []
    for grp in xc.contiguous():
        up = torch.from_numpy(syrk(1.0, grp.numpy().T))  # (d, rows) in Fortran order: no copy; upper triangle
        full = up + up.transpose(0, 1)  # the lower triangle of syrk's fresh output is zero
        full.diagonal().sub_(up.diagonal())
        out.append(full)
    return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)


_MOMENTS = ("mx", "my", "cxx", "cxy", "cyy")  # LsqStats' tensors, in their constructor's order


@dataclass
class LsqStats:
    """Float64 sufficient statistics of one fit, per group, *centred*: ``rows`` patches seen, the means
    ``mx`` (groups, d) of the patch entries and ``my`` (groups, out) of the targets, and the centred sums
    ``cxx = sum (x - mx)(x - mx)^T``, ``cxy = sum (x - mx)(y - my)^T``, ``cyy = sum (y - my)^2``.
    Each batch's products are formed in the activations' precision (at least float32) about the batch's
    own means and pooled with the pairwise update of match/stats.py, so no raw moment is ever differenced:
    an input with a large mean (after a ReLU, an un-normalized image) keeps its precision, and the solve
    works on the centred system instead of an augmented Gram whose condition grows with (mean/std)^2.
    ``a + b`` pools two data shards exactly (up to rounding)."""

    rows: int = 0
    mx: Optional[torch.Tensor] = None
    my: Optional[torch.Tensor] = None
    cxx: Optional[torch.Tensor] = None
    cxy: Optional[torch.Tensor] = None
    cyy: Optional[torch.Tensor] = None

    @property
    def empty(self) -> bool:
        return self.cxx is None or not self.rows

    @property
    def device(self) -> torch.device:
        return self.cxx.device

    def observe(self, xs: torch.Tensor, ys: torch.Tensor, consume: bool = False) -> LsqStats:
        """Add one batch of rows ``xs`` (groups, rows, d), targets ``ys`` (groups, rows, out).
        ``consume``: ``xs`` is the caller's own scratch (fresh patches), centred in place (no second
        patch-sized allocation)."""
        xs, ys = xs.detach(), ys.detach()
        if xs.dtype not in (torch.float32, torch.float64):
            xs, ys = xs.float(), ys.float()
        r = xs.shape[1]
        if not r:
            return self
        mx, my = xs.mean(1, keepdim=True), ys.mean(1, keepdim=True)
        xc, yc = (xs.sub_(mx) if consume else xs - mx), ys - my
        cxx = _gram(xc)
        cxy = (yc.transpose(1, 2) @ xc).transpose(1, 2)  # (Y^T X)^T: the faster layout for BLAS
        self._add(r, mx[:, 0], my[:, 0], cxx, cxy, yc.pow(2).sum(1))
        return self

    def _add(self, r: int, mx, my, cxx, cxy, cyy) -> None:
        """Pool a part with ``r`` rows and its own centred moments into this one (in place)."""
        f64 = torch.float64
        if self.empty:
            self.rows = int(r)
            self.mx, self.my, self.cxx, self.cxy, self.cyy = (
                t.to(f64, copy=True) for t in (mx, my, cxx, cxy, cyy))
            return
        n = self.rows + r
        dx, dy, w = mx.to(f64) - self.mx, my.to(f64) - self.my, self.rows * r / n
        self.cxx.add_(cxx).baddbmm_(dx.unsqueeze(2), dx.unsqueeze(1), alpha=w)
        self.cxy.add_(cxy).baddbmm_(dx.unsqueeze(2), dy.unsqueeze(1), alpha=w)
        self.cyy.add_(cyy).add_(dy * dy, alpha=w)
        self.mx.add_(dx, alpha=r / n)
        self.my.add_(dy, alpha=r / n)
        self.rows = n

    @staticmethod
    def embedded(parts: Sequence[Tuple[Optional[torch.Tensor], LsqStats]], dim: int) -> LsqStats:
        """The statistics of the whole ``dim``-wide patch from parts whose patches held only the patch
        entries ``entries`` (every other entry zero in their rows: the taps that read padding; None:
        every entry), pooled exactly: an entry absent from a part is zero there (mean and centred sums
        zero). One pass: the pooled means, each part's centred sums added into its block, and the parts'
        mean offsets as one rank-``len(parts)`` update, ``C = sum_p C_p + n_p (m_p - m)(m_p - m)^T``."""
        parts = [(e, p) for e, p in parts if not p.empty]
        if not parts:
            return LsqStats()
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1]
        ref = parts[0][1]
        groups, out, dev, f64 = ref.cxy.shape[0], ref.cxy.shape[-1], ref.device, ref.cxx.dtype
        n = sum(p.rows for _, p in parts)
        means = []  # each part's means over the whole patch
        for entries, p in parts:
            if entries is None:
                means.append(p.mx)
            else:
                m = torch.zeros(groups, dim, dtype=f64, device=dev)
                m[:, entries.to(dev)] = p.mx
                means.append(m)
        mx = sum(p.rows * m for m, (_, p) in zip(means, parts)) / n
        my = sum(p.rows * p.my for _, p in parts) / n
        cxx = torch.zeros(groups, dim, dim, dtype=f64, device=dev)
        cxy = torch.zeros(groups, dim, out, dtype=f64, device=dev)
        cyy = torch.zeros(groups, out, dtype=f64, device=dev)
        for entries, p in parts:
            if entries is None:
                cxx += p.cxx
                cxy += p.cxy
            else:
                ix = entries.to(dev)
                cxx[:, ix[:, None], ix] += p.cxx
                cxy[:, ix] += p.cxy
            cyy += p.cyy + p.rows * (p.my - my).pow(2)
        root = torch.tensor([float(p.rows) for _, p in parts], dtype=f64, device=dev).sqrt()
        dx = (torch.stack(means, -1) - mx.unsqueeze(-1)) * root  # (groups, dim, parts)
        dy = (torch.stack([p.my for _, p in parts], -1) - my.unsqueeze(-1)) * root
        cxx.baddbmm_(dx, dx.transpose(1, 2))
        cxy.baddbmm_(dx, dy.transpose(1, 2))
        return LsqStats(n, mx, my, cxx, cxy, cyy)

    def __add__(self, other: LsqStats) -> LsqStats:
        if self.empty:
            return other
        if other.empty:
            return self
        out = LsqStats(self.rows, *(getattr(self, f).clone() for f in _MOMENTS))
        out._add(other.rows, *(getattr(other, f) for f in _MOMENTS))
        return out

    def augmented(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The raw normal-equation sums ``G = sum x~ x~^T`` (groups, d + 1, d + 1) and ``H = sum x~ y^T``
        (``x~``: the patch and a 1, last) — sums of the centred parts and the means' share, no
        difference — for reference and tests; the solve itself stays centred."""
        n, d = float(self.rows), self.mx.shape[-1]
        groups, out = self.cxy.shape[0], self.cxy.shape[-1]
        g = self.cxx.new_zeros(groups, d + 1, d + 1)
        g[:, :d, :d] = self.cxx + n * self.mx.unsqueeze(2) * self.mx.unsqueeze(1)
        g[:, :d, d] = g[:, d, :d] = n * self.mx
        g[:, d, d] = n
        h = self.cxy.new_zeros(groups, d + 1, out)
        h[:, :d] = self.cxy + n * self.mx.unsqueeze(2) * self.my.unsqueeze(1)
        h[:, d] = n * self.my
        return g, h


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
    solver: str = "primal"                # "dual": fewer rows than unknowns, solved from the rows (dual_solve)


def live_entries(st: LsqStats) -> Optional[torch.Tensor]:
    """The patch entries that any row ever made nonzero in any group (None: all). An entry whose mean and
    centred sum of squares are zero in every group is zero in every row (a tap that only ever reads
    padding, a dead input), so its rows and columns of the statistics are exactly zero."""
    live = ((st.cxx.diagonal(dim1=1, dim2=2) != 0) | (st.mx != 0)).any(0)
    return None if bool(live.all()) else live.nonzero().flatten()


def _live_view(st: LsqStats, w: torch.Tensor, live: Optional[torch.Tensor]):
    """``(Cxx, Cxy, mx, W without its bias row)`` restricted to the entries ``live`` (None: all, no copy)."""
    d = st.mx.shape[-1]
    if live is None:
        return st.cxx, st.cxy, st.mx, w[:, :d]
    return st.cxx[:, live][:, :, live], st.cxy[:, live], st.mx[:, live], w[:, live]


def ridge_solve(st: LsqStats, w0: torch.Tensor, lam: float, bias: bool = True
                ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The ridge fit ``min ||X W + 1 b - Y||^2 + r ||W - W0||^2`` per group from the statistics, the
    bias unshrunk. With a bias the problem separates exactly: ``W = (Cxx + r I)^-1 (Cxy + r W0)`` on the
    centred sums and ``b = my - mx W``, with ``r = lam * mean(diag Cxx)`` — so the fit does not change
    when an input is shifted by a constant (the bias absorbs it), however large the shift.
    ``bias=False`` solves the uncentred system (``Cxx + n mx mx^T``: a sum, never a difference), ``r``
    relative to its diagonal, and leaves the bias row 0. Entries zero in every row
    (:func:`live_entries`) decouple exactly: their rows of ``W`` are ``W0``'s and the rest is solved
    without them (a 3x3 conv on a 1x1 map: 1/9 of the system). A system still singular (``lam`` 0, dead
    or duplicated inputs) gets a growing diagonal until Cholesky succeeds: returned as ``jitter``
    (relative to the system's mean diagonal). Never NaN for finite statistics."""
    w0 = w0.double().to(st.device)
    n, d = float(st.rows), st.mx.shape[-1]
    diag = st.cxx.diagonal(dim1=1, dim2=2)
    scale = (diag if bias else diag + n * st.mx.pow(2)).mean(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # dead inputs: any positive scale
    r = lam * scale
    live = live_entries(st) if lam > 0 else None  # lam 0: a dead entry is singular, as it always was
    cxx, cxy, mx, wx0 = _live_view(st, w0, live)
    if bias:
        a, rhs = cxx, cxy
    else:
        a = cxx + n * mx.unsqueeze(2) * mx.unsqueeze(1)
        rhs = cxy + n * mx.unsqueeze(2) * st.my.unsqueeze(1)
    wx, jitter = _ridge(a, rhs, wx0, r, scale)
    w = w0.clone()
    if live is None:
        w[:, :d] = wx
    else:
        w[:, live] = wx
    w[:, d] = st.my - (mx.unsqueeze(1) @ wx).squeeze(1) if bias else 0
    return w, r, jitter


def _ridge(a: torch.Tensor, rhs: torch.Tensor, w0: torch.Tensor, r: torch.Tensor, scale: torch.Tensor
           ) -> Tuple[torch.Tensor, float]:
    """The Cholesky solve of ``(A + r I) W = RHS + r W0``, with the growing diagonal of
    :func:`ridge_solve`."""
    a = a.clone()
    a.diagonal(dim1=1, dim2=2).add_(r[:, None])
    rhs = rhs + r[:, None, None] * w0
    jitter = 0.0
    for _ in range(20):
        aj = a
        if jitter:
            aj = a.clone()
            aj.diagonal(dim1=1, dim2=2).add_(jitter * scale[:, None])
        chol, info = torch.linalg.cholesky_ex(aj)
        if not bool(info.any()):
            break
        jitter = 1e-10 if jitter == 0 else jitter * 100
    else:
        raise RuntimeError("least-squares system not positive definite even with a large diagonal")
    return torch.cholesky_solve(rhs, chol), jitter


@dataclass
class LsqRows:
    """The patch rows themselves, for a fit known to have fewer rows than unknowns: ``(groups, rows, d)``
    regressors and ``(groups, rows, out)`` targets in float64 (smaller than the ``(d + 1)^2`` Gram they
    replace). Not poolable across workers: the dual solve needs every row in one place."""

    xs: List[torch.Tensor] = field(default_factory=list)
    ys: List[torch.Tensor] = field(default_factory=list)
    rows: int = 0

    def observe(self, xs: torch.Tensor, ys: torch.Tensor, consume: bool = False) -> LsqRows:
        self.xs.append(xs.detach().double())
        self.ys.append(ys.detach().double())
        self.rows += xs.shape[1]
        return self

    def stacked(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.xs, 1), torch.cat(self.ys, 1)


def dual_solve(xs: torch.Tensor, ys: torch.Tensor, w0: torch.Tensor, lam: float, bias: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`ridge_solve`'s solution from the rows ``xs`` (groups, n, d), ``ys`` (groups, n, out) in
    ``n^3`` instead of ``d^3``, for ``n <= d``. With the bias column unshrunk, the bias is
    ``b = mean(y) - mean(x) W`` for any ``W``, so the ridge problem is ``min ||Xc W - Yc||^2 +
    r ||W - W0||^2`` on the rows centred by their means, whose solution
    ``W0 + Xc^T (Xc Xc^T + r I)^-1 (Yc - Xc W0)`` is the primal one (push-through identity);
    ``bias=False``: the same without centring, bias row 0. ``r`` as for :func:`ridge_solve`. The
    centred rows' Gram always has ``1`` in its null space; that direction is deflated exactly (see
    below). A system still singular (``lam`` 0 and duplicated rows) gets the same growing diagonal
    (``jitter``), which here shrinks towards ``W0``: the fit closest to the average."""
    xs, ys, w0 = xs.double(), ys.double(), w0.double()
    d = xs.shape[-1]
    if bias:
        mx, my = xs.mean(1, keepdim=True), ys.mean(1, keepdim=True)
        xs, ys = xs - mx, ys - my
    scale = xs.pow(2).sum(1).mean(-1)  # the mean diagonal of the (centred with a bias) Gram, as in ridge_solve
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    r = lam * scale
    wx0 = w0[:, :d]
    resid = ys - xs @ wx0
    k = xs @ xs.transpose(1, 2)
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    a = k + r[:, None, None] * eye
    if bias:  # centred rows: 1 is in K's null space and orthogonal to the right-hand side, so adding
        # s 11^T changes no solution and keeps ``lam=0`` well-posed when the rows span n - 1 directions
        kd = k.diagonal(dim1=1, dim2=2).mean(-1)
        a = a + torch.where(kd > 0, kd, torch.ones_like(kd))[:, None, None] / k.shape[-1]
    jitter = 0.0
    floor = 1e-13 * a.diagonal(dim1=1, dim2=2).amax(-1)  # a pivot below this is rounding: treat as singular
    for _ in range(20):
        chol, info = torch.linalg.cholesky_ex(a + jitter * scale[:, None, None] * eye)
        if not bool(info.any()) and bool((chol.diagonal(dim1=1, dim2=2).pow(2).amin(-1) > floor).all()):
            break
        jitter = 1e-10 if jitter == 0 else jitter * 100
    else:
        raise RuntimeError("least-squares dual system not positive definite even with a large diagonal")
    wx = wx0 + xs.transpose(1, 2) @ torch.cholesky_solve(resid, chol)
    b = (my - mx @ wx) if bias else torch.zeros_like(wx[:, :1])
    return torch.cat([wx, b], 1), r, jitter


def rows_residual(xs: torch.Tensor, ys: torch.Tensor, w: torch.Tensor) -> float:
    """:func:`relative_residual` from the rows themselves: ``||X~ W - Y||^2 / ||Y - mean(Y)||^2``."""
    xs, ys, w = xs.double(), ys.double(), w.double()
    fit = (xs @ w[:, :-1] + w[:, -1:] - ys).pow(2).sum()
    var = (ys - ys.mean(1, keepdim=True)).pow(2).sum()
    return float(fit / var.clamp_min(_TINY))


def relative_residual(st: LsqStats, w: torch.Tensor) -> float:
    """``||X~ W - Y||^2 / ||Y - mean(Y)||^2`` over all groups and outputs, from the centred statistics:
    the centred residual's quadratic form plus the rows times the squared error of the means (the cross
    term vanishes: centred sums are zero)."""
    w = w.double().to(st.device)
    n, d = float(st.rows), st.mx.shape[-1]
    cxx, cxy, mx, wx = _live_view(st, w, live_entries(st))  # dead entries add nothing (the product is d^2 * out)
    quad = (wx * (cxx @ wx)).sum() - 2 * (wx * cxy).sum() + st.cyy.sum()
    off = (mx.unsqueeze(1) @ wx).squeeze(1) + w[:, d] - st.my
    fit = quad.clamp_min(0) + n * off.pow(2).sum()
    return float(fit / st.cyy.sum().clamp_min(_TINY))


# ---- a layer's map and back ----------------------------------------------------------------
def layer_map(module: nn.Module, kind: str, bn: Optional[nn.Module] = None) -> torch.Tensor:
    """The layer's current affine map as a (groups, d + 1, out) float64 tensor, bias row last;
    composed with the BatchNorm ``bn`` after it; for ``kind="bn"`` the BatchNorm's own eval map."""
    lay = patch_layout(module, kind)
    if kind == "bn":
        s, t = bn_affine(module)
        return torch.stack([s, t], -1).unsqueeze(-1)  # (C, 2, 1)
    w = module.weight.detach().double()
    # (out, C_group, taps) -> (out, taps, C_group): the patch order of ``patches``
    wt = w.reshape(w.shape[0], w.shape[1], -1).transpose(1, 2).reshape(lay.groups, lay.out, lay.dim)
    b = module.bias.detach().double() if module.bias is not None else torch.zeros(
        module.weight.shape[0], dtype=torch.float64, device=module.weight.device)
    if bn is not None:
        s, t = bn_affine(bn)
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
def _fit_numel(st) -> int:
    """Float64 numbers one fit's statistics take in a round (the centred sums, the means, rows,
    unknowns); a fit kept as rows (:class:`LsqRows`, unsharded walks only) counts the statistics it
    would send."""
    if isinstance(st, LsqRows):
        if not st.xs:
            return 0
        groups, d, out = st.xs[0].shape[0], st.xs[0].shape[-1], st.ys[0].shape[-1]
    elif st.empty:
        return 0
    else:
        groups, d, out = st.cxy.shape
    return stats_numel(groups, d, out)


def stats_numel(groups: int, d: int, out: int) -> int:
    """Float64 numbers of a fit's :class:`LsqStats` as sent in a round: per block ``Cxx`` (d^2), ``Cxy``
    (d * out), the means (d + out) and ``Cyy`` (out); then its row count and its unknowns."""
    return groups * (d * d + d * out + d + 2 * out) + 2


@dataclass
class LsqRound:
    """One statistics round of the walk, as pooled across data shards: ``fits`` (fitted value node ->
    :class:`LsqStats`) of the round's fits, or, in the walk's last round, ``moments`` (fitted value node
    -> the channel moments of a composed conv's new output: its BatchNorm's running statistics);
    ``dims``: each fit's unknowns per group without the bias (the patch entries that read the input,
    from the layer's input shape: a walk without data of its own, a federated server, learns them
    here); ``samples``: inputs seen. ``a + b`` pools two shards; ``as_tensors()`` / ``from_tensors()``
    give a flat ``{name: float64 tensor}`` view (to all-gather, or to send as a Flower ArrayRecord)."""

    index: int
    fits: Dict[str, LsqStats] = field(default_factory=dict)
    moments: Dict[str, ChannelMoments] = field(default_factory=dict)
    samples: int = 0
    dims: Dict[str, int] = field(default_factory=dict)

    def __add__(self, other: LsqRound) -> LsqRound:
        if not isinstance(other, LsqRound):
            return NotImplemented
        if other.index != self.index:
            raise DataError(f"least-squares statistics of round {self.index} and round {other.index} cannot be "
                            "pooled: every shard must answer the same round")
        fits, moments, dims = dict(self.fits), dict(self.moments), dict(self.dims)
        for k, v in other.fits.items():
            fits[k] = fits[k] + v if k in fits else v
        for k, v in other.moments.items():
            moments[k] = moments[k] + v if k in moments else v
        for k, v in other.dims.items():  # the same on every shard of one input size; else the widest
            dims[k] = max(dims.get(k, 0), v)
        return LsqRound(self.index, fits, moments, self.samples + other.samples, dims)

    def as_tensors(self) -> Dict[str, torch.Tensor]:
        """``{name: float64 tensor}`` in a fixed (sorted) order; statistics of no data are left out."""
        f64 = torch.float64
        out = {"round": torch.tensor([float(self.index)], dtype=f64),
               "samples": torch.tensor([float(self.samples)], dtype=f64)}
        for name, st in sorted(self.fits.items()):
            if isinstance(st, LsqRows):
                raise DataError(f"least-squares fit {name} keeps its patch rows (the dual solve), which cannot be "
                                "pooled: walk sharded data with reduce= (it turns the dual solve off)")
            if not st.empty:
                dev = st.device
                out.update({f"fit/{name}/{f}": getattr(st, f) for f in _MOMENTS})
                out.update({f"fit/{name}/rows": torch.tensor([float(st.rows)], dtype=f64, device=dev),
                            f"fit/{name}/dim": torch.tensor([float(self.dims.get(name, 0))], dtype=f64,
                                                            device=dev)})
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
            rnd.fits[node] = LsqStats(int(fs["rows"].reshape(-1)[0]), *(fs[f] for f in _MOMENTS))
            if "dim" in fs:
                rnd.dims[node] = int(fs["dim"].reshape(-1)[0])
        for node, fs in parts["moments"].items():
            rnd.moments[node] = ChannelMoments.from_tensors([fs["n"].reshape(-1), fs["mean"], fs["m2"]])
        return rnd

    @property
    def nbytes(self) -> int:
        """Bytes of this round's float64 statistics: what each shard sends (an unsharded walk's fit kept
        as rows counts as the statistics it would send)."""
        n = 2 + sum(_fit_numel(st) for st in self.fits.values())
        n += sum(t.numel() for m in self.moments.values() if m.mean is not None for t in m.as_tensors())
        return 8 * n


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


# ---- the walk ------------------------------------------------------------------------------------
@dataclass
class LsqResult:
    fits: Dict[str, LsqFit] = field(default_factory=dict)        # by the fitted value's node
    notes: Dict[str, str] = field(default_factory=dict)          # module -> why it was left alone
    samples: int = 0
    spilled_bytes: int = 0     # bytes written to the spill directory (0: everything stayed in memory)
    peak_held_bytes: int = 0   # the most bytes of values the walk held in memory at once
    round_bytes: List[int] = field(default_factory=list)         # float64 statistics per shard, per round


def memory_budget(memory: Union[int, str, None]) -> Optional[int]:
    """The walk's budget in bytes for ``lsq_memory``: None (no limit), an int of bytes, a size string
    ("4GB", "512MiB") or "auto" (half the memory the system reports available now; no limit where it
    reports none)."""
    if memory is None:
        return None
    if isinstance(memory, str) and memory.strip().lower() == "auto":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024 // 2
        except OSError:
            pass
        return None
    if isinstance(memory, str):
        from ..export.files import parse_size

        return parse_size(memory)
    return int(memory)


class _Spilled:
    """A value written to the spill directory: read back bit for bit."""

    __slots__ = ("path", "dtype", "shape")

    def __init__(self, path: str, dtype: torch.dtype, shape: torch.Size):
        self.path, self.dtype, self.shape = path, dtype, shape

    def load(self) -> torch.Tensor:
        raw = torch.from_numpy(np.fromfile(self.path, dtype=np.uint8))
        return raw.view(self.dtype).reshape(self.shape)


def _nbytes(v) -> Tuple[Optional[int], int]:
    """A held value's storage (id, bytes): dense CPU tensors only; anything else is neither counted nor
    spilled."""
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and not (v.is_sparse or v.is_quantized):
        st = v.untyped_storage()
        return st.data_ptr(), st.nbytes()
    return None, 0


class _Store:
    """Every model's values per batch during the walk, keyed ``(model, batch, node index)``. Held in
    memory up to ``budget`` bytes (storage shared by several values counted once); beyond it the values
    whose next use is farthest ahead (then the later batches) are written to a temporary directory and
    read back when next needed, bit for bit, so the walk's arithmetic and results do not change. A
    value read back keeps its file until its last use (evicting it again writes nothing)."""

    def __init__(self, budget: Optional[int], next_use):
        self.budget, self.next_use = budget, next_use
        self.mem: Dict[Tuple[int, int, int], object] = {}
        self.disk: Dict[Tuple[int, int, int], _Spilled] = {}
        self.refs: Dict[int, List[int]] = {}   # storage id -> [bytes, values holding it]
        self.held = self.peak = self.spilled = 0
        self.now = 0
        self.dir: Optional[str] = None

    def _hold(self, key, v) -> None:
        self.mem[key] = v
        sid, nb = _nbytes(v)
        if sid is not None:
            ref = self.refs.setdefault(sid, [nb, 0])
            if ref[1] == 0:
                self.held += nb
            ref[1] += 1
            self.peak = max(self.peak, self.held)

    def _release(self, key) -> None:
        v = self.mem.pop(key)
        sid, _ = _nbytes(v)
        if sid is not None:
            ref = self.refs[sid]
            ref[1] -= 1
            if ref[1] == 0:
                self.held -= ref[0]
                del self.refs[sid]

    def put(self, key, v, pin=()) -> None:
        self._hold(key, v)
        self._shrink(set(pin) | {key})

    def get(self, key, pin=()):
        if key not in self.mem:
            self._hold(key, self.disk[key].load())
            self._shrink(set(pin) | {key})
        return self.mem[key]

    def shape(self, key) -> torch.Size:
        return self.mem[key].shape if key in self.mem else self.disk[key].shape

    def pop(self, key) -> None:
        if key in self.mem:
            self._release(key)
        sp = self.disk.pop(key, None)
        if sp is not None:
            os.remove(sp.path)

    def _shrink(self, pin) -> None:
        if self.budget is None or self.held <= self.budget:
            return
        order = sorted((k for k, v in self.mem.items() if k not in pin and _nbytes(v)[0] is not None),
                       key=lambda k: (self.next_use(k[2], self.now), k[1]), reverse=True)
        for key in order:
            if self.held <= self.budget:
                break
            if key not in self.disk:
                v = self.mem[key]
                if self.dir is None:
                    self.dir = tempfile.mkdtemp(prefix="mergekit_lsq_")
                path = os.path.join(self.dir, f"{key[0]}_{key[1]}_{key[2]}.bin")
                v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tofile(path)
                self.disk[key] = _Spilled(path, v.dtype, v.shape)
                self.spilled += v.numel() * v.element_size()
            self._release(key)

    def close(self) -> None:
        self.mem.clear()
        self.disk.clear()
        self.refs.clear()
        self.held = 0
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@torch.no_grad()
def lsq_pass(merged: nn.Module, endpoints: Sequence[nn.Module], weights: Sequence[float], gm: fx.GraphModule,
             batches: Sequence[torch.Tensor], *, ridge: float = 1e-3, positions: Optional[int] = None,
             seed: int = 0, sites: Optional[List[LsqSite]] = None, dual: bool = True,
             memory: Union[int, str, None] = None,
             reduce: Optional[Callable[[LsqRound], LsqRound]] = None) -> LsqResult:
    """Refit ``merged`` (in place) layer after layer to ``sum_k weights[k] * endpoints[k]``'s values.

    ``endpoints``: the models already aligned to ``merged``'s channel order (not changed); ``gm``: the
    traced graph all of them share; ``batches``: the calibration inputs (every model's values are kept
    per batch until their last use). ``dual``: a fit with fewer patch rows than unknowns keeps its rows
    and is solved by :func:`dual_solve` (same solution, rows^3 instead of d^3); off whenever ``reduce``
    is set (raw rows cannot be pooled across workers). ``memory``: the bytes of values held in
    memory (:func:`memory_budget`; None: no limit); beyond it values are spilled to a temporary
    directory (``TMPDIR``) and read back, with the same results bit for bit. Returns the fits, the
    layers left at the average, the bytes spilled and each round's statistics bytes.

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
    dual = dual and reduce is None  # pooled statistics: the rows stay on their shard
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
    at = {n.name: i for i, n in enumerate(nodes)}
    inputs = [[index[a] for a in n.all_input_nodes] for n in nodes]
    uses: Dict[int, List[int]] = {}  # node index -> the node indices reading its value, in order
    for i, ins in enumerate(inputs):
        for a in ins:
            uses.setdefault(a, []).append(i)
    for s in sites:  # a fit reads its own node's values (the endpoints' targets, the merged net's fold)
        i = at[s.node]
        uses.setdefault(i, []).insert(0, i)
    last_use = {a: u[-1] for a, u in uses.items()}
    free_after: Dict[int, List[int]] = {}
    for a, i in last_use.items():
        free_after.setdefault(i, []).append(a)

    def next_use(a: int, now: int) -> int:
        return next((u for u in uses.get(a, ()) if u >= now), len(nodes))

    store = _Store(memory_budget(memory), next_use)
    keys = [batch_key(x) for x in batches]
    local_samples = sum(int(x.shape[0]) for x in batches)
    result = LsqResult(notes=dict(skipped), samples=local_samples)
    rounds = lsq_rounds(graph, sites)
    leads = {r[0].node: (ri, r) for ri, r in enumerate(rounds)}
    ahead = set()  # nodes the endpoints ran early, for a round's later fits
    composed: Dict[str, ChannelMoments] = {s.value: ChannelMoments() for s in sites if s.bn is not None}

    first_input = next(i for i, n in enumerate(nodes) if n.op == "placeholder")

    def value(k: int, b: int, a: int, pin=()):
        op = nodes[a].op
        if op == "placeholder":  # the caller holds the batches: not stored again
            if a == first_input:
                return batches[b]
            # a further argument the trace fixed (timm's attn_mask=None): its default, as Interpreter.run
            return nodes[a].args[0] if nodes[a].args else None
        if op == "get_attr":  # a parameter or buffer of the model itself
            return interps[k].fetch_attr(node_lists[k][a].target)
        return store.get((k, b, a), pin)

    def shape(k: int, b: int, a: int) -> torch.Size:
        return value(k, b, a).shape if nodes[a].op in ("placeholder", "get_attr") else store.shape((k, b, a))

    def run(k: int, b: int, i: int):
        it, nk = interps[k], node_lists[k][i]
        if nk.op in ("placeholder", "get_attr"):
            return
        pin = [(k, b, a) for a in inputs[i]]
        it.env = {node_lists[k][a]: value(k, b, a, pin) for a in inputs[i]}
        out = it.run_node(nk)
        it.env = {}
        if i in uses:
            store.put((k, b, i), out, pin)

    def pool(rnd: LsqRound) -> LsqRound:
        got = reduce(rnd) if reduce is not None else rnd
        if got.index != rnd.index or set(got.fits) != set(rnd.fits) or set(got.moments) != set(rnd.moments):
            raise DataError(f"least-squares round {rnd.index}: the pooled statistics name other fits than this "
                            "walk's; every worker must merge the same models with the same options")
        result.samples = got.samples
        result.round_bytes.append(got.nbytes)
        return got

    try:
        for i, n in enumerate(nodes):
            store.now = i
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
                rnd = LsqRound(ri, samples=local_samples)
                for s in members:
                    t = at[s.node]
                    rnd.fits[s.value], rnd.dims[s.value] = _observe(
                        s, t, index[nodes[t].args[0]], mods, active, value, shape, batches, keys, positions, seed,
                        dual)
                rnd = pool(rnd)
                for s in members:
                    result.fits[s.value] = _solve(s, mods[me], rnd.fits[s.value], rnd.dims.get(s.value, 0), ridge)
                del rnd
            for b in range(len(batches)):
                run(me, b, i)
            site = by_node.get(n.name)
            if site is not None and site.bn is not None:  # train-consistent fold: the new output's statistics
                for b in range(len(batches)):
                    composed[site.value].observe(value(me, b, i).detach(), 1)
            for dead in free_after.get(i, ()):
                for k in range(len(models)):
                    for b in range(len(batches)):
                        store.pop((k, b, dead))
        result.spilled_bytes, result.peak_held_bytes = store.spilled, store.peak
    finally:
        store.close()
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


def _observe(site, i, j, mods, active, value, shape, batches, keys, positions, seed, dual):
    """This shard's statistics of one fit (node index ``i``, its input node ``j``) from every batch's
    values (``value(k, b, a)``; ``shape(k, b, a)``: a value's shape without reading it back): the merged
    net's inputs and the endpoints' interpolated targets, positions sampled per batch by the batch's
    contents. Returns the :class:`LsqStats` (or, ``dual`` and fewer rows than unknowns, the
    :class:`LsqRows`) and the fit's unknowns per group without the bias (0: no batch to tell)."""
    me = len(mods) - 1
    module = mods[me][site.module]
    pos = None if site.kind == "bn" else positions
    lay = patch_layout(module, site.kind)
    # the row count and the unknowns (patch entries that ever read the input) are known from the shapes
    # before any patch is formed: fewer rows than unknowns keep the rows (smaller than the Gram) and
    # solve in rows^3
    if site.kind == "conv":
        dim = conv_live_dim(shape(me, 0, j), module) if batches else 0
    else:
        dim = lay.dim
    acc = LsqStats()
    if dual and site.kind != "bn":
        rows = sum(patch_rows(shape(me, b, j), module, site.kind, pos) for b in range(len(batches)))
        if rows < dim + 1:
            acc = LsqRows()
    kinds: Dict[Optional[tuple], Tuple[Optional[torch.Tensor], LsqStats]] = {}
    for b in range(len(batches)):
        gen = torch.Generator().manual_seed(((seed + i) * 1_000_003 + keys[b]) & (2 ** 63 - 1))
        a = j if site.kind == "bn" else i  # a BatchNorm fit: the endpoint's BatchNorm on its own input
        pin = [(me, b, j)] + [(k, b, a) for k in range(me)]
        x = value(me, b, j, pin)
        if site.kind == "conv":  # the targets only at the sampled positions: a fraction of the map
            idx, out_hw = conv_positions(x.shape, module, pos, gen)
            length = out_hw[0] * out_hw[1]
        tgt, logits = None, []
        for k, (_, wk) in enumerate(active):
            yk = value(k, b, a, pin)
            if site.kind == "conv":
                yk = at_positions(yk, idx, length)
            yk = bn_eval(mods[k][site.module], yk) if site.kind == "bn" else _target(site, k, yk, mods)
            if site.target == "probs":
                logits.append(yk)
            else:
                tgt = wk * yk if tgt is None else tgt + wk * yk
        if logits:
            tgt = prob_target(logits, [wk for _, wk in active])
        del logits
        if site.kind == "conv":
            if isinstance(acc, LsqRows):
                acc.observe(conv_cols(x, module, idx, out_hw), conv_targets(tgt, module))
            else:  # fresh patches, split by the taps that read padding: one accumulator per split
                for entries, xs, ys in conv_classes(x, tgt, module, idx, out_hw):
                    key = None if entries is None else tuple(entries.tolist())
                    kinds.setdefault(key, (entries, LsqStats()))[1].observe(xs, ys, consume=True)
        else:
            acc.observe(*patches(x, tgt, module, site.kind, pos, gen))
        del tgt, x
    if kinds:
        acc = LsqStats.embedded(list(kinds.values()), lay.dim)
    return acc, dim


def _solve(site: LsqSite, mods, st, dim: int, ridge: float) -> LsqFit:
    """Solve one fit from its (pooled) statistics, or its rows (:class:`LsqRows`, unsharded), and fold
    it into the merged net's modules ``mods``; ``dim``: its unknowns per group without the bias (0:
    unknown, every patch entry counted)."""
    module = mods[site.module]
    bn = mods[site.bn] if site.bn is not None else None
    dim = dim or patch_layout(module, site.kind).dim
    w0 = layer_map(module, site.kind, bn)
    if isinstance(st, LsqRows):
        if not st.xs:
            raise DataError(f"least-squares repair: no rows for {site.module} (no calibration data reached it)")
        xs, ys = st.stacked()
        w0 = w0.to(xs.device)
        w, r, jitter = dual_solve(xs, ys, w0, ridge, site.bias)
        fit = LsqFit(w, r, jitter, rows_residual(xs, ys, w0), rows_residual(xs, ys, w), st.rows,
                     dim + (1 if site.bias else 0), solver="dual")
        del xs, ys
    else:
        if st.empty:
            raise DataError(f"least-squares repair: no statistics for {site.module} (no calibration data reached it)")
        w0 = w0.to(st.device)
        w, r, jitter = ridge_solve(st, w0, ridge, site.bias)
        fit = LsqFit(w, r, jitter, relative_residual(st, w0), relative_residual(st, w), st.rows,
                     dim + (1 if site.bias else 0))
    if site.kind == "bn":
        # the per-channel patch is the channel itself: its mean and centred variance are the fit's own
        fold_bn_fit(module, st.mx[:, 0], st.cxx[:, 0, 0] / max(st.rows, 1), st.rows, w[:, 0, 0], w[:, 1, 0])
    elif bn is None:
        fold_map(module, w)
    else:  # the conv keeps its scale (the old BatchNorm's s per channel); the BatchNorm takes the rest
        s, _ = bn_affine(bn)
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
    fold_bn_fit(mods[site.bn], moments.mean, moments.var.clamp_min(0), int(moments.n), fit.scale,
                fit.w[:, -1].reshape(-1))


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
