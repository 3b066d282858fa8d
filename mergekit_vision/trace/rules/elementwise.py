"""Rules for ops that keep each channel apart: broadcasting n-ary ops, reductions, spatial ops."""
from __future__ import annotations

from typing import List

from ..layout import DimLayout
from .core import Multi, RuleCall, is_tensor, join_dim, layout_or_none, unknown


def elementwise(call: RuleCall):
    """Broadcasting n-ary ops (add, mul, where ...): dims of equal size are tied together."""
    out = call.out
    if not is_tensor(out):
        return None
    static = list(call.static) + [False] * (len(call.args) - len(call.static) + len(call.kwargs))
    vals = [(v, lay, st) for v, lay, st in zip(list(call.args) + list(call.kwargs.values()),
                                             list(call.largs) + list(call.lkwargs.values()), static) if is_tensor(v)]
    nd = out.dim()
    layout: List[DimLayout] = []
    for d in range(nd):
        size = out.shape[d]
        dims, const = [], []
        for v, lay, st in vals:
            k = d - (nd - v.dim())
            if k < 0 or v.shape[k] != size or (size == 1 and v.dim() != nd):
                continue
            dims.append(layout_or_none(lay, v)[k])
            const.append(st)
        if not all(const) and all(x is None for x, st in zip(dims, const) if not st) and any(
                x is not None for x, st in zip(dims, const) if st):
            # a constant (attention mask, position table) along the input's positions: they stay positions
            for x, st in zip(dims, const):
                if st:
                    call.E.freeze_dim(x, f"{call.where}: a constant's axis meets a non-channel axis")
            layout.append(None)
            continue
        acc = None
        if dims:
            acc = dims[0]
            for other in dims[1:]:
                acc = join_dim(call.E, acc, other, call.where)
        layout.append(acc)
    return tuple(layout)


def reduce_dims(call: RuleCall, dims, keepdim: bool, arg_sensitive: bool = False):
    """Reductions over channel dims are permutation-invariant (sum, mean, max); argmax is not."""
    x, lx = call.args[0], layout_or_none(call.largs[0], call.args[0])
    nd = x.dim()
    if dims is None:
        dims = list(range(nd))
    elif isinstance(dims, int):
        dims = [dims]
    dims = {d % nd for d in dims} if nd else set()
    if arg_sensitive:
        for d in dims:
            call.E.freeze_dim(lx[d], f"{call.where} returns channel indices")
    out = []
    for d in range(nd):
        if d in dims:
            if keepdim:
                out.append(None)
        else:
            out.append(lx[d])
    layout = tuple(out)
    if isinstance(call.out, tuple):  # (values, indices)
        return Multi((layout, layout))
    return layout


def reduction(arg_sensitive=False):
    def rule(call: RuleCall):
        dim = call.arg(1, "dim", None)
        if dim is None and "axis" in call.kwargs:
            dim = call.kwargs["axis"]
        keep = bool(call.arg(2, "keepdim", False))
        if is_tensor(dim):  # torch.max(a, b) is elementwise
            return elementwise(call)
        if not is_tensor(call.out) and not isinstance(call.out, tuple):
            return None
        sens = arg_sensitive or (isinstance(call.out, tuple) and dim is not None)
        return reduce_dims(call, dim, keep, arg_sensitive=sens)
    return rule


def norm_method(call: RuleCall):
    # x.norm(p, dim, keepdim)
    dim = call.arg(2, "dim", None)
    keep = bool(call.arg(3, "keepdim", False))
    return reduce_dims(call, dim, keep)


def spatial_op(call: RuleCall, n_lead: int = 2):
    """Pooling, interpolation: dims ``n_lead..`` are spatial; a channel there is frozen."""
    x = call.args[0] if call.args else call.kwargs.get("input")
    lx = layout_or_none(call.largs[0] if call.largs else call.lkwargs.get("input"), x)
    out = call.out
    if not is_tensor(out) or out.dim() != x.dim():
        return unknown(call)
    layout = list(lx[:n_lead])
    for d in range(n_lead, x.dim()):
        if lx[d] is not None:
            call.E.freeze_dim(lx[d], f"{call.where} works across a channel axis as if it were spatial")
            fresh = call.E.fresh_dim(out.shape[d], call.where, "spatial op over channels") if out.shape[d] > 1 else None
            layout.append(fresh)
        else:
            layout.append(None)
    for d in range(n_lead):
        if out.shape[d] != x.shape[d]:
            return unknown(call)
    return tuple(layout)


def pad_rule(call: RuleCall):
    x, pad = call.args[0], call.arg(1, "pad")
    lx = list(layout_or_none(call.largs[0], x))
    for i in range(0, len(pad), 2):
        d = x.dim() - 1 - i // 2
        if (pad[i] or pad[i + 1]) and lx[d] is not None:
            call.E.freeze_dim(lx[d], f"{call.where} pads a channel axis")
            lx[d] = call.E.fresh_dim(call.out.shape[d], call.where, "padded channel axis")
    return tuple(lx)
