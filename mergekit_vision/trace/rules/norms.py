"""Rules for the norms: BatchNorm (and InstanceNorm, timm's norm + activation modules), GroupNorm, LayerNorm."""
from __future__ import annotations

from typing import Sequence

from ...ops import is_pointwise_module
from ..layout import DimLayout
from .core import RuleCall, channel_free, cut_dim, is_tensor, join_dim, layout_or_none, param_dim


def join_channel_params(call: RuleCall, lchan: DimLayout, names: Sequence[str]) -> None:
    for pname in names:
        t = getattr(call.module, pname, None)
        if is_tensor(t) and t.dim() >= 1:
            join_dim(call.E, lchan, param_dim(call, pname, 0), call.where)
            channel_free(call, pname, range(1, t.dim()), "trailing singleton axis")


def batchnorm_module(call: RuleCall):
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    join_channel_params(call, lx[1], ("weight", "bias", "running_mean", "running_var"))
    if is_tensor(getattr(call.module, "num_batches_tracked", None)):
        call.declared.add((call.key("num_batches_tracked"), 0))
    # timm's BatchNormAct2d / FrozenBatchNormAct2d: BN, then drop and act, both must be elementwise
    for sub in ("drop", "act"):
        s = getattr(call.module, sub, None)
        if s is not None and not is_pointwise_module(s):
            call.E.freeze_dim(lx[1], f"{call.where}: its {sub} ({type(s).__name__}) is not elementwise")
    return lx


def batchnorm_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = layout_or_none(call.larg(0, "input"), x)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        v = call.arg(i, name)
        if is_tensor(v):
            join_dim(call.E, lx[1], layout_or_none(call.larg(i, name), v)[0], call.where)
    return lx


def groupnorm_core(call: RuleCall, x, lx, num_groups: int, lweight, lbias):
    C = x.shape[1]
    if num_groups > 1:
        cut_dim(call.E, lx[1], C // num_groups)
    join_dim(call.E, lx[1], lweight, call.where)
    join_dim(call.E, lx[1], lbias, call.where)
    return lx


def groupnorm_module(call: RuleCall):
    m = call.module
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    lw = param_dim(call, "weight", 0) if getattr(m, "weight", None) is not None else None
    lb = param_dim(call, "bias", 0) if getattr(m, "bias", None) is not None else None
    for sub in ("drop", "act"):
        s = getattr(m, sub, None)
        if s is not None and not is_pointwise_module(s):
            call.E.freeze_dim(lx[1], f"{call.where}: its {sub} ({type(s).__name__}) is not elementwise")
    return groupnorm_core(call, x, lx, m.num_groups, lw, lb)


def groupnorm_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = layout_or_none(call.larg(0, "input"), x)
    ng = call.arg(1, "num_groups")
    w, b = call.arg(2, "weight"), call.arg(3, "bias")
    lw = layout_or_none(call.larg(2, "weight"), w)[0] if is_tensor(w) else None
    lb = layout_or_none(call.larg(3, "bias"), b)[0] if is_tensor(b) else None
    return groupnorm_core(call, x, lx, ng, lw, lb)


def layernorm_core(call: RuleCall, x, lx, k: int, lweight, lbias):
    """Normalizes over the last ``k`` dims: statistics are invariant to any permutation there."""
    nd = x.dim()
    for i in range(k):
        d = nd - k + i
        for lp in (lweight, lbias):
            if lp is None:
                continue
            pd = lp[i] if i < len(lp) else None
            if x.shape[d] == 1:
                continue
            join_dim(call.E, lx[d], pd, call.where)
    return lx


def layernorm_module(call: RuleCall):
    m = call.module
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    k = len(m.normalized_shape)
    lps = []
    for pname in ("weight", "bias"):
        t = getattr(m, pname, None)
        if is_tensor(t):
            lps.append(tuple(param_dim(call, pname, a) if t.shape[a] > 1 else None for a in range(t.dim())))
            for a in range(t.dim()):
                call.declared.add((call.key(pname), a))
        else:
            lps.append(None)
    return layernorm_core(call, x, lx, k, lps[0], lps[1])


def layernorm_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = layout_or_none(call.larg(0, "input"), x)
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    w, b = call.arg(2, "weight"), call.arg(3, "bias")
    lw = layout_or_none(call.larg(2, "weight"), w) if is_tensor(w) else None
    lb = layout_or_none(call.larg(3, "bias"), b) if is_tensor(b) else None
    return layernorm_core(call, x, lx, k, lw, lb)
