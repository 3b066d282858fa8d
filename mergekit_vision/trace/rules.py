"""Coupling rules: what each op does to the channel layouts of its inputs.

A rule gets a ``RuleCall`` (real argument values, their layouts, the real output) and returns the
output's layout, linking element ranges through ``call.E`` on the way. Rules live in module-level
tables keyed by module type, function object or method name; an op found in no table freezes every
channel it touches (``unknown``), which is always safe.
"""
from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layout import DimLayout, Elements, ExtraMember, Seg, pieces, slice_dim


@dataclass
class RuleCall:
    E: Elements
    where: str  # "node 'add_3' (add)" for messages
    args: tuple
    kwargs: dict
    largs: tuple  # layouts of args, same structure, None for non-tensors
    lkwargs: dict
    out: Any
    module: Optional[nn.Module] = None
    prefix: str = ""  # qualified name of the module, for state-dict keys
    declared: set = field(default_factory=set)  # (key, axis) a module rule accounted for

    def arg(self, i: int, name: str, default=None):
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def larg(self, i: int, name: str):
        if len(self.largs) > i:
            return self.largs[i]
        return self.lkwargs.get(name)

    def key(self, pname: str) -> str:
        return f"{self.prefix}.{pname}" if self.prefix else pname


# ---- small helpers -----------------------------------------------------------------------
def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _ndim(v) -> int:
    return v.dim() if _is_tensor(v) else 0


def _layout_or_none(layout, value) -> tuple:
    if layout is None or not isinstance(layout, tuple):
        return tuple(None for _ in range(_ndim(value)))
    return layout


def fresh_layout(E: Elements, value, reason: str, label: str):
    """Layout of a value we do not understand: every non-trivial dim is a new frozen element."""
    if _is_tensor(value):
        return tuple(
            E.fresh_dim(s, label, reason) if (i > 0 and s > 1) else None for i, s in enumerate(value.shape)
        )
    if isinstance(value, (tuple, list)):
        return Multi(fresh_layout(E, v, reason, label) for v in value)
    return None


class Multi(tuple):
    """Layouts of a tuple/list output (split, chunk, max with dim)."""


def iter_layouts(layout):
    """All tensor layouts inside a (possibly nested) layout structure."""
    if layout is None:
        return
    if isinstance(layout, Multi):
        for lay in layout:
            yield from iter_layouts(lay)
    elif isinstance(layout, dict):
        for lay in layout.values():
            yield from iter_layouts(lay)
    elif isinstance(layout, tuple):
        yield layout


def freeze_all(E: Elements, layouts, reason: str) -> None:
    for lay in layouts:
        for tl in iter_layouts(lay):
            for d in tl:
                E.freeze_dim(d, reason)


def join_dim(E: Elements, a: DimLayout, b: DimLayout, why: str) -> DimLayout:
    """Tie two layouts of the same positions; a channel axis against a non-channel axis freezes it."""
    if a is None and b is None:
        return None
    if a is None or b is None:
        E.freeze_dim(a or b, f"{why}: channel axis meets a non-channel axis")
        return a or b
    for pc in pieces(a, b):
        if pc is None:
            E.freeze_dim(a, f"{why}: flattened channel blocks do not line up")
            E.freeze_dim(b, f"{why}: flattened channel blocks do not line up")
            return a
        sa, sb = pc
        E.join(sa.elem, sa.off, sb.elem, sb.off, sa.length, why)
    return a


def cut_dim(E: Elements, dim: DimLayout, block: int) -> None:
    """Channels may only move within consecutive blocks of ``block`` positions of this dim."""
    if not dim or block <= 0:
        return
    pos = 0
    for s in dim:
        for b in range((pos // block + 1) * block, pos + s.span, block):
            if (b - pos) % s.inner:
                E.freeze(s.elem, "block boundary falls inside a flattened channel")
            else:
                E.cut(s.elem, s.off + (b - pos) // s.inner)
        pos += s.span


def cut_slice(E: Elements, dim: DimLayout, start: int, stop: int) -> None:
    """The positions ``start:stop`` are used on their own: keep them invariant."""
    if not dim:
        return
    pos = 0
    for s in dim:
        for b in (start, stop):
            if pos < b < pos + s.span:
                if (b - pos) % s.inner:
                    E.freeze(s.elem, "slice boundary falls inside a flattened channel")
                else:
                    E.cut(s.elem, s.off + (b - pos) // s.inner)
        pos += s.span


def param_dim(call: RuleCall, pname: str, axis: int) -> DimLayout:
    """The layout of axis ``axis`` of the module's parameter/buffer ``pname`` (declares it)."""
    t = getattr(call.module, pname, None)
    if not _is_tensor(t):
        return None
    key = call.key(pname)
    call.declared.add((key, axis))
    return call.E.full(call.E.param(key, axis, t.shape[axis]))


def channel_free(call: RuleCall, pname: str, axes: Sequence[int], why: str) -> None:
    t = getattr(call.module, pname, None)
    if _is_tensor(t):
        for a in axes:
            key = call.key(pname)
            call.declared.add((key, a))
            call.E.channel_free[(key, a)] = why


# ---- generic rules -----------------------------------------------------------------------
def unknown(call: RuleCall):
    reason = f"{call.where} is not understood"
    freeze_all(call.E, list(call.largs) + list(call.lkwargs.values()), reason)
    if call.module is not None:
        for pname, t in list(call.module.named_parameters()) + list(call.module.named_buffers()):
            key = call.key(pname)
            for a in range(t.dim()):
                if t.shape[a] > 1:
                    call.E.freeze(call.E.param(key, a, t.shape[a]), f"parameter of opaque module {call.where}")
                call.declared.add((key, a))
    return fresh_layout(call.E, call.out, reason, call.where)


def passthrough(call: RuleCall):
    """Same shape, channel c of the output depends on channel c of the input only."""
    x = call.args[0] if call.args else next(iter(call.kwargs.values()))
    lx = call.largs[0] if call.largs else next(iter(call.lkwargs.values()))
    if _is_tensor(call.out) and _is_tensor(x) and call.out.shape == x.shape:
        return _layout_or_none(lx, x)
    return unknown(call)


def elementwise(call: RuleCall):
    """Broadcasting n-ary ops (add, mul, where ...): dims of equal size are tied together."""
    out = call.out
    if not _is_tensor(out):
        return None
    vals = [(v, lay) for v, lay in zip(list(call.args) + list(call.kwargs.values()),
                                   list(call.largs) + list(call.lkwargs.values())) if _is_tensor(v)]
    nd = out.dim()
    layout: List[DimLayout] = []
    for d in range(nd):
        size = out.shape[d]
        dims = []
        for v, lay in vals:
            k = d - (nd - v.dim())
            if k < 0 or v.shape[k] != size or (size == 1 and v.dim() != nd):
                continue
            dims.append(_layout_or_none(lay, v)[k])
        acc = None
        if dims:
            acc = dims[0]
            for other in dims[1:]:
                acc = join_dim(call.E, acc, other, call.where)
        layout.append(acc)
    return tuple(layout)


def reduce_dims(call: RuleCall, dims, keepdim: bool, arg_sensitive: bool = False):
    """Reductions over channel dims are permutation-invariant (sum, mean, max); argmax is not."""
    x, lx = call.args[0], _layout_or_none(call.largs[0], call.args[0])
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


def _reduce_rule(arg_sensitive=False):
    def rule(call: RuleCall):
        dim = call.arg(1, "dim", None)
        if dim is None and "axis" in call.kwargs:
            dim = call.kwargs["axis"]
        keep = bool(call.arg(2, "keepdim", False))
        if _is_tensor(dim):  # torch.max(a, b) is elementwise
            return elementwise(call)
        if not _is_tensor(call.out) and not isinstance(call.out, tuple):
            return None
        sens = arg_sensitive or (isinstance(call.out, tuple) and dim is not None)
        return reduce_dims(call, dim, keep, arg_sensitive=sens)
    return rule


def along_dim(call: RuleCall):
    """softmax/normalize along a dim: equivariant, every dim passes through."""
    return passthrough(call)


def spatial_op(call: RuleCall, n_lead: int = 2):
    """Pooling, interpolation: dims ``n_lead..`` are spatial; a channel there is frozen."""
    x = call.args[0] if call.args else call.kwargs.get("input")
    lx = _layout_or_none(call.largs[0] if call.largs else call.lkwargs.get("input"), x)
    out = call.out
    if not _is_tensor(out) or out.dim() != x.dim():
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
    lx = list(_layout_or_none(call.largs[0], x))
    for i in range(0, len(pad), 2):
        d = x.dim() - 1 - i // 2
        if (pad[i] or pad[i + 1]) and lx[d] is not None:
            call.E.freeze_dim(lx[d], f"{call.where} pads a channel axis")
            lx[d] = call.E.fresh_dim(call.out.shape[d], call.where, "padded channel axis")
    return tuple(lx)


# ---- shape rules -------------------------------------------------------------------------
def reshape_layout(E: Elements, where: str, in_shape, lx, out_shape):
    """Map a layout through a reshape by walking matching-product chunks of the two shapes."""
    in_shape, out_shape = list(in_shape), list(out_shape)
    out: List[DimLayout] = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0 = i, j
        pi = pj = 1
        # grow the chunk until products match (size-1 dims attach to the current chunk)
        if i < len(in_shape):
            pi *= in_shape[i]
            i += 1
        if j < len(out_shape):
            pj *= out_shape[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi *= in_shape[i]
                i += 1
            elif j < len(out_shape):
                pj *= out_shape[j]
                j += 1
            else:
                break
        while (i < len(in_shape) and in_shape[i] == 1 and lx[i] is None
               and not (j < len(out_shape) and out_shape[j] == 1)):
            i += 1
        a = [k for k in range(i0, i) if in_shape[k] != 1]
        b = [k for k in range(j0, j) if out_shape[k] != 1]
        ins = [lx[k] for k in a]
        if all(lay is None for lay in ins):
            continue
        if len(a) == 1 and len(b) == 1:
            out[b[0]] = ins[0]
        elif len(b) == 1 and ins[0] is not None:  # merge: channel outermost, the rest become inner
            for lay in ins[1:]:
                E.freeze_dim(lay, f"{where} flattens an axis inside another channel axis")
            inner = math.prod(in_shape[k] for k in a[1:])
            out[b[0]] = tuple(Seg(s.elem, s.off, s.length, s.inner * inner) for s in ins[0])
        elif len(a) == 1 and ins[0] is not None and all(
            s.inner % math.prod(out_shape[k] for k in b[1:]) == 0 for s in ins[0]
        ):  # unflatten of a flattened channel axis
            rest = math.prod(out_shape[k] for k in b[1:])
            out[b[0]] = tuple(Seg(s.elem, s.off, s.length, s.inner // rest) for s in ins[0])
        else:
            for lay in ins:
                E.freeze_dim(lay, f"{where} reshapes a channel axis (mixes or splits channels)")
            for k in b:
                out[k] = E.fresh_dim(out_shape[k], where, "output of a channel-mixing reshape")
    return tuple(out)


def reshape_rule(call: RuleCall):
    x = call.args[0]
    if not _is_tensor(call.out) or not _is_tensor(x):
        return unknown(call)
    return reshape_layout(call.E, call.where, x.shape, _layout_or_none(call.largs[0], x), call.out.shape)


def permute_rule(call: RuleCall):
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    dims = call.args[1:] if len(call.args) > 1 else call.kwargs.get("dims")
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return tuple(lx[d % x.dim()] for d in dims)


def transpose_rule(call: RuleCall):
    x = call.args[0]
    lx = list(_layout_or_none(call.largs[0], x))
    if x.dim() < 2:
        return tuple(lx)
    d0 = call.arg(1, "dim0", -2) % x.dim()
    d1 = call.arg(2, "dim1", -1) % x.dim()
    lx[d0], lx[d1] = lx[d1], lx[d0]
    return tuple(lx)


def movedim_rule(call: RuleCall):
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    src, dst = call.arg(1, "source"), call.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    order = [d for d in range(x.dim()) if d not in [s % x.dim() for s in src]]
    for s, d in sorted(zip([s % x.dim() for s in src], [d % x.dim() for d in dst]), key=lambda t: t[1]):
        order.insert(d, s)
    return tuple(lx[d] for d in order)


def expand_rule(call: RuleCall):
    x, out = call.args[0], call.out
    lx = _layout_or_none(call.largs[0], x)
    nd = out.dim()
    layout = []
    for d in range(nd):
        k = d - (nd - x.dim())
        if k < 0 or x.shape[k] != out.shape[d]:
            layout.append(None)  # broadcast of a size-1 dim: the same value everywhere
        else:
            layout.append(lx[k])
    return tuple(layout)


def repeat_rule(call: RuleCall):
    x, out = call.args[0], call.out
    lx = _layout_or_none(call.largs[0], x)
    nd = out.dim()
    layout = []
    for d in range(nd):
        k = d - (nd - x.dim())
        if k < 0 or x.shape[k] == out.shape[d]:
            layout.append(lx[k] if k >= 0 else None)
        elif x.shape[k] == 1:
            layout.append(None)
        else:
            call.E.freeze_dim(lx[k], f"{call.where} tiles a channel axis")
            layout.append(call.E.fresh_dim(out.shape[d], call.where, "tiled channel axis") if lx[k] else None)
    return tuple(layout)


def getitem_rule(call: RuleCall):
    obj, idx = call.args[0], call.args[1]
    lobj = call.largs[0]
    if not _is_tensor(obj):
        if isinstance(lobj, Multi) and isinstance(idx, int):
            return lobj[idx]
        if isinstance(lobj, dict):
            return lobj.get(idx)
        if isinstance(lobj, Multi) and isinstance(idx, slice):
            return Multi(lobj[idx])
        return None if not _is_tensor(call.out) else fresh_layout(call.E, call.out, f"{call.where}", call.where)
    lx = list(_layout_or_none(lobj, obj))
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(_is_tensor(i) or isinstance(i, (list,)) for i in idx):
        return unknown(call)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: List[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (obj.dim() - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (obj.dim() - sum(1 for i in expanded if i is not None)))
    out: List[DimLayout] = []
    d = 0
    for i in expanded:
        if i is None:
            out.append(None)
            continue
        ld, size = lx[d], obj.shape[d]
        if isinstance(i, int):
            if ld is not None:
                call.E.freeze_dim(ld, f"{call.where} selects a single channel")
        elif isinstance(i, slice):
            start, stop, step = i.indices(size)
            if ld is None or (start, stop, step) == (0, size, 1):
                out.append(ld)
            elif step != 1:
                call.E.freeze_dim(ld, f"{call.where} takes strided channels")
                out.append(call.E.fresh_dim(len(range(start, stop, step)), call.where, "strided channel slice"))
            else:
                sl = slice_dim(ld, start, stop)
                cut_slice(call.E, ld, start, stop)
                if sl is None:
                    call.E.freeze_dim(ld, f"{call.where} slices inside a flattened channel")
                    sl = call.E.fresh_dim(stop - start, call.where, "slice inside flattened channel")
                out.append(sl)
        else:
            return unknown(call)
        d += 1
    return tuple(out)


def cat_rule(call: RuleCall):
    tensors = call.arg(0, "tensors")
    ltensors = call.larg(0, "tensors") or [None] * len(tensors)
    dim = call.arg(1, "dim", 0)
    out = call.out
    nd = out.dim()
    dim %= nd
    lts = [_layout_or_none(lay, t) for t, lay in zip(tensors, ltensors)
           if (_is_tensor(t) and t.numel() > 0) or t.dim() == nd]
    ts = [t for t in tensors if _is_tensor(t) and (t.numel() > 0 or t.dim() == nd)]
    layout: List[DimLayout] = []
    for d in range(nd):
        if d == dim:
            segs: List[Seg] = []
            if all(lay[d] is None for lay in lts):
                layout.append(None)
                continue
            for t, lay in zip(ts, lts):
                if lay[d] is None:
                    if t.shape[d] > 0:
                        segs.extend(call.E.fresh_dim(t.shape[d], call.where, "non-channel part of a channel concat"))
                else:
                    segs.extend(lay[d])
            layout.append(tuple(segs))
        else:
            acc = lts[0][d]
            for lay in lts[1:]:
                acc = join_dim(call.E, acc, lay[d], call.where)
            layout.append(acc)
    return tuple(layout)


def stack_rule(call: RuleCall):
    tensors = call.arg(0, "tensors")
    ltensors = call.larg(0, "tensors") or [None] * len(tensors)
    dim = call.arg(1, "dim", 0) % call.out.dim()
    lts = [_layout_or_none(lay, t) for t, lay in zip(tensors, ltensors)]
    layout: List[DimLayout] = []
    for d in range(tensors[0].dim()):
        acc = lts[0][d]
        for lay in lts[1:]:
            acc = join_dim(call.E, acc, lay[d], call.where)
        layout.append(acc)
    layout.insert(dim, None)
    return tuple(layout)


def split_rule(call: RuleCall):
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    dim = call.arg(2, "dim", 0) % x.dim()
    outs = call.out
    res = []
    pos = 0
    for o in outs:
        n = o.shape[dim]
        layout = list(lx)
        if lx[dim] is not None:
            sl = slice_dim(lx[dim], pos, pos + n)
            cut_slice(call.E, lx[dim], pos, pos + n)
            if sl is None:
                call.E.freeze_dim(lx[dim], f"{call.where} splits inside a flattened channel")
                sl = call.E.fresh_dim(n, call.where, "split inside flattened channel")
            layout[dim] = sl
        res.append(tuple(layout))
        pos += n
    return Multi(res)


def chunk_rule(call: RuleCall):
    x = call.args[0]
    dim = call.arg(2, "dim", 0)
    return split_rule(RuleCall(call.E, call.where, (x, None, dim), {}, call.largs[:1], {}, call.out))


def unbind_rule(call: RuleCall):
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    dim = call.arg(1, "dim", 0) % x.dim()
    call.E.freeze_dim(lx[dim], f"{call.where} unbinds a channel axis")
    rest = tuple(lay for k, lay in enumerate(lx) if k != dim)
    return Multi(rest for _ in call.out)


def flatten_rule(call: RuleCall):
    return reshape_rule(call)


def getattr_rule(call: RuleCall):
    attr = call.args[1]
    if attr in ("T", "mT") and _is_tensor(call.out):
        x = call.args[0]
        lx = list(_layout_or_none(call.largs[0], x))
        if attr == "T":
            return tuple(reversed(lx))
        lx[-1], lx[-2] = lx[-2], lx[-1]
        return tuple(lx)
    if _is_tensor(call.out):
        return unknown(call)
    return None


# ---- parametric layers -------------------------------------------------------------------
def conv_core(call: RuleCall, x, lx, lw: Sequence[DimLayout], lb: DimLayout, groups: int,
              weight_key: Optional[str], in_ch: int, out_ch: int, transposed: bool = False):
    E = call.E
    out = call.out
    layout: List[DimLayout] = [lx[0]]
    # spatial dims of the input must not carry channels (ECA's conv1d over channels does)
    for d in range(2, x.dim()):
        E.freeze_dim(lx[d], f"{call.where} convolves across a channel axis (e.g. ECA)")
    if transposed:
        lw = [lw[1], lw[0]] + list(lw[2:])
    lout = lw[0]
    for d in lw[2:]:
        E.freeze_dim(d, f"{call.where}: conv kernel spatial axis")
    if lout is None:
        lout = E.fresh_dim(out_ch, call.where, "conv weight of unknown provenance")
    if lb is not None:
        join_dim(E, lout, lb, call.where)
    cin = lx[1]
    if groups == 1:
        join_dim(E, cin, lw[1], call.where)
    elif groups == in_ch == out_ch and not transposed:  # depthwise: channel c -> channel c
        join_dim(E, cin, lout, call.where)
    elif groups == in_ch and not transposed:
        E.freeze_dim(cin, f"{call.where}: depthwise conv with a channel multiplier")
        E.freeze_dim(lout, f"{call.where}: depthwise conv with a channel multiplier")
    else:
        ipg, opg = in_ch // groups, out_ch // groups
        cut_dim(E, lout, opg)
        cut_dim(E, cin, ipg)
        if lw[1] is not None:  # a weight axis we already track cannot hold per-block permutations
            E.freeze_dim(lw[1], f"{call.where}: grouped conv weight in-axis")
            E.freeze_dim(cin, f"{call.where}: grouped conv weight in-axis seen elsewhere")
        elif cin is not None and weight_key is not None and not transposed:
            pos = 0
            for s in cin:
                if s.inner != 1:
                    E.freeze(s.elem, f"{call.where}: flattened channels into a grouped conv")
                else:
                    E.extra_members.append(ExtraMember(s.elem, s.off, s.length, weight_key, 1, pos, 1, groups))
                pos += s.span
        else:
            E.freeze_dim(cin, f"{call.where}: grouped transposed conv")
            E.freeze_dim(lout, f"{call.where}: grouped transposed conv")
    layout.append(lout)
    layout.extend(None for _ in range(2, out.dim()))
    return tuple(layout)


def conv_module(call: RuleCall):
    m = call.module
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    transposed = bool(getattr(m, "transposed", False))
    w = m.weight
    lw = [param_dim(call, "weight", 0)]
    if m.groups == 1:
        lw.append(param_dim(call, "weight", 1))
    else:
        call.declared.add((call.key("weight"), 1))
        lw.append(None)
    channel_free(call, "weight", range(2, w.dim()), "conv kernel spatial axis")
    lw.extend([None] * (w.dim() - 2))
    lb = param_dim(call, "bias", 0) if getattr(m, "bias", None) is not None else None
    for extra in ("gain",):  # ScaledStdConv: a per-output-channel gain of shape (out, 1, 1, 1)
        if _is_tensor(getattr(m, extra, None)):
            g = getattr(m, extra)
            if g.shape[0] == m.out_channels and g.numel() == m.out_channels:
                join_dim(call.E, lw[0] if not transposed else lw[1], param_dim(call, extra, 0), call.where)
    if transposed and m.groups == 1:
        lw = [lw[0], lw[1]] + lw[2:]  # weight is (in, out, ...); conv_core swaps
    return conv_core(call, x, lx, lw, lb, m.groups, call.key("weight"), m.in_channels, m.out_channels, transposed)


def conv_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = _layout_or_none(call.larg(0, "input"), x)
    w = call.arg(1, "weight")
    lw = list(_layout_or_none(call.larg(1, "weight"), w))
    b = call.arg(2, "bias")
    lb = _layout_or_none(call.larg(2, "bias"), b)[0] if _is_tensor(b) else None
    groups = call.arg(6, "groups", 1)
    return conv_core(call, x, lx, lw, lb, groups, None, x.shape[1], w.shape[0])


def linear_core(call: RuleCall, x, lx, lw, lb, weight_key: Optional[str]):
    E = call.E
    cin = lx[-1]
    lout = lw[0]
    if lout is None:
        lout = E.fresh_dim(call.out.shape[-1], call.where, "linear weight of unknown provenance")
    if lb is not None:
        join_dim(E, lout, lb, call.where)
    if cin is not None and any(s.inner != 1 for s in cin):
        if lw[1] is not None or weight_key is None:
            E.freeze_dim(cin, f"{call.where}: flattened features into a weight axis tracked elsewhere")
            E.freeze_dim(lw[1], f"{call.where}: flattened features")
        else:
            pos = 0
            for s in cin:
                E.extra_members.append(ExtraMember(s.elem, s.off, s.length, weight_key, 1, pos, s.inner, 1))
                pos += s.span
    else:
        join_dim(E, cin, lw[1], call.where)
    return tuple(list(lx[:-1]) + [lout])


def linear_module(call: RuleCall):
    m = call.module
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    lw = [param_dim(call, "weight", 0), None]
    cin = lx[-1]
    if cin is not None and any(s.inner != 1 for s in cin):
        call.declared.add((call.key("weight"), 1))
    else:
        lw[1] = param_dim(call, "weight", 1)
    lb = param_dim(call, "bias", 0) if m.bias is not None else None
    return linear_core(call, x, lx, lw, lb, call.key("weight"))


def linear_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = _layout_or_none(call.larg(0, "input"), x)
    w = call.arg(1, "weight")
    lw = list(_layout_or_none(call.larg(1, "weight"), w))
    b = call.arg(2, "bias")
    lb = _layout_or_none(call.larg(2, "bias"), b)[0] if _is_tensor(b) else None
    return linear_core(call, x, lx, lw, lb, None)


def _channel_params(call: RuleCall, lchan: DimLayout, names: Sequence[str]) -> None:
    for pname in names:
        t = getattr(call.module, pname, None)
        if _is_tensor(t) and t.dim() >= 1:
            join_dim(call.E, lchan, param_dim(call, pname, 0), call.where)
            channel_free(call, pname, range(1, t.dim()), "trailing singleton axis")


def batchnorm_module(call: RuleCall):
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    _channel_params(call, lx[1], ("weight", "bias", "running_mean", "running_var"))
    if _is_tensor(getattr(call.module, "num_batches_tracked", None)):
        call.declared.add((call.key("num_batches_tracked"), 0))
    # timm's BatchNormAct2d / FrozenBatchNormAct2d: BN, then drop and act, both must be elementwise
    for sub in ("drop", "act"):
        s = getattr(call.module, sub, None)
        if s is not None and not isinstance(s, ELEMENTWISE_MODULES):
            call.E.freeze_dim(lx[1], f"{call.where}: its {sub} ({type(s).__name__}) is not elementwise")
    return lx


def batchnorm_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = _layout_or_none(call.larg(0, "input"), x)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        v = call.arg(i, name)
        if _is_tensor(v):
            join_dim(call.E, lx[1], _layout_or_none(call.larg(i, name), v)[0], call.where)
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
    lx = _layout_or_none(call.largs[0], x)
    lw = param_dim(call, "weight", 0) if getattr(m, "weight", None) is not None else None
    lb = param_dim(call, "bias", 0) if getattr(m, "bias", None) is not None else None
    for sub in ("drop", "act"):
        s = getattr(m, sub, None)
        if s is not None and not isinstance(s, ELEMENTWISE_MODULES):
            call.E.freeze_dim(lx[1], f"{call.where}: its {sub} ({type(s).__name__}) is not elementwise")
    return groupnorm_core(call, x, lx, m.num_groups, lw, lb)


def groupnorm_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = _layout_or_none(call.larg(0, "input"), x)
    ng = call.arg(1, "num_groups")
    w, b = call.arg(2, "weight"), call.arg(3, "bias")
    lw = _layout_or_none(call.larg(2, "weight"), w)[0] if _is_tensor(w) else None
    lb = _layout_or_none(call.larg(3, "bias"), b)[0] if _is_tensor(b) else None
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
    lx = _layout_or_none(call.largs[0], x)
    k = len(m.normalized_shape)
    lps = []
    for pname in ("weight", "bias"):
        t = getattr(m, pname, None)
        if _is_tensor(t):
            lps.append(tuple(param_dim(call, pname, a) if t.shape[a] > 1 else None for a in range(t.dim())))
            for a in range(t.dim()):
                call.declared.add((call.key(pname), a))
        else:
            lps.append(None)
    return layernorm_core(call, x, lx, k, lps[0], lps[1])


def layernorm_functional(call: RuleCall):
    x = call.arg(0, "input")
    lx = _layout_or_none(call.larg(0, "input"), x)
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    w, b = call.arg(2, "weight"), call.arg(3, "bias")
    lw = _layout_or_none(call.larg(2, "weight"), w) if _is_tensor(w) else None
    lb = _layout_or_none(call.larg(3, "bias"), b) if _is_tensor(b) else None
    return layernorm_core(call, x, lx, k, lw, lb)


def prelu_module(call: RuleCall):
    x = call.args[0]
    lx = _layout_or_none(call.largs[0], x)
    if call.module.weight.numel() > 1:
        join_dim(call.E, lx[1], param_dim(call, "weight", 0), call.where)
    else:
        call.declared.add((call.key("weight"), 0))
    return lx


def identity_module(call: RuleCall):
    return passthrough(call)


def pool_module(call: RuleCall):
    return spatial_op(call)


def softmax_module(call: RuleCall):
    return passthrough(call)


def flatten_module(call: RuleCall):
    return reshape_rule(call)


def unflatten_module(call: RuleCall):
    return reshape_rule(call)


def mixes_channels(call: RuleCall):
    reason = f"{call.where} mixes channels"
    freeze_all(call.E, list(call.largs), reason)
    return fresh_layout(call.E, call.out, reason, call.where)


# ---- the tables --------------------------------------------------------------------------
ELEMENTWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold,
)

MODULE_RULES: Dict[type, Callable[[RuleCall], Any]] = {
    nn.Conv1d: conv_module, nn.Conv2d: conv_module, nn.Conv3d: conv_module,
    nn.ConvTranspose1d: conv_module, nn.ConvTranspose2d: conv_module, nn.ConvTranspose3d: conv_module,
    nn.Linear: linear_module,
    nn.modules.batchnorm._BatchNorm: batchnorm_module,
    nn.modules.instancenorm._InstanceNorm: batchnorm_module,
    nn.GroupNorm: groupnorm_module,
    nn.LayerNorm: layernorm_module,
    nn.PReLU: prelu_module,
    nn.MaxPool1d: pool_module, nn.MaxPool2d: pool_module, nn.MaxPool3d: pool_module,
    nn.AvgPool1d: pool_module, nn.AvgPool2d: pool_module, nn.AvgPool3d: pool_module,
    nn.AdaptiveAvgPool1d: pool_module, nn.AdaptiveAvgPool2d: pool_module, nn.AdaptiveAvgPool3d: pool_module,
    nn.AdaptiveMaxPool1d: pool_module, nn.AdaptiveMaxPool2d: pool_module, nn.AdaptiveMaxPool3d: pool_module,
    nn.Upsample: pool_module, nn.UpsamplingNearest2d: pool_module, nn.UpsamplingBilinear2d: pool_module,
    nn.ZeroPad2d: pool_module, nn.ConstantPad2d: pool_module, nn.ReflectionPad2d: pool_module,
    nn.ReplicationPad2d: pool_module,
    nn.Softmax: softmax_module, nn.LogSoftmax: softmax_module, nn.Softmax2d: softmax_module,
    nn.Flatten: flatten_module, nn.Unflatten: unflatten_module,
    nn.ChannelShuffle: mixes_channels, nn.PixelShuffle: mixes_channels, nn.PixelUnshuffle: mixes_channels,
    nn.LocalResponseNorm: mixes_channels, nn.GLU: mixes_channels,
}
for _t in ELEMENTWISE_MODULES:
    MODULE_RULES[_t] = identity_module


def _register_timm_modules() -> None:
    """timm's own leaf modules that have a plain channel rule; the others stay opaque."""
    global ELEMENTWISE_MODULES
    try:
        from timm import layers as tl
        from timm.layers import activations as ta, activations_me as tam
    except Exception:
        return
    # timm's activation modules are pointwise functions (PReLU, which has a per-channel weight, is not here)
    pointwise = [getattr(mod, n, None) for mod, names in (
        (ta, ("GELU", "GELUTanh", "HardMish", "HardSigmoid", "HardSwish", "Mish", "QuickGELU", "Sigmoid", "Swish",
              "Tanh")),
        (tam, ("HardMishMe", "HardSigmoidMe", "HardSwishMe", "MishMe", "SwishMe"))) for n in names]
    pointwise = tuple(t for t in pointwise if isinstance(t, type))
    ELEMENTWISE_MODULES = ELEMENTWISE_MODULES + pointwise
    for t in pointwise:
        MODULE_RULES.setdefault(t, identity_module)
    for name, rule in (
        ("BatchNormAct2d", batchnorm_module), ("SyncBatchNormAct", batchnorm_module),
        ("FrozenBatchNormAct2d", batchnorm_module), ("FrozenBatchNorm2d", batchnorm_module),
        ("GroupNormAct", groupnorm_module),
        ("Conv2dSame", conv_module), ("StdConv2dSame", conv_module), ("ScaledStdConv2dSame", conv_module),
        ("AvgPool2dSame", pool_module), ("MaxPool2dSame", pool_module),
    ):
        t = getattr(tl, name, None)
        if isinstance(t, type):
            MODULE_RULES.setdefault(t, rule)


_TIMM_RULE_TYPES: set = set()
_LIBRARY_RULES = {"timm": _register_timm_modules, "torchvision": None}  # filled below: torchvision's
_registered: set = set()


def ensure_library_rules() -> None:
    """Register timm's and torchvision's rules once each library is imported: a model holding their
    modules or functions has imported them, and ``import mergekit_vision`` does not pay for importing
    them (most of its import time)."""
    for name, register in _LIBRARY_RULES.items():
        if name not in _registered and name in sys.modules:
            _registered.add(name)
            register()
            _TIMM_RULE_TYPES.clear()



def timm_rule_types() -> set:
    """timm module types with a rule here (kept as leaves when tracing)."""
    ensure_library_rules()
    if not _TIMM_RULE_TYPES:
        _TIMM_RULE_TYPES.update(t for t in MODULE_RULES if t.__module__.startswith("timm."))
    return _TIMM_RULE_TYPES


def _register_torchvision_ops() -> None:
    try:
        import torchvision.ops as tvops
    except Exception:
        return
    # stochastic depth drops whole samples (a per-sample scalar): channel-equivariant
    MODULE_RULES.setdefault(tvops.StochasticDepth, identity_module)
    FUNCTION_RULES.setdefault(tvops.stochastic_depth, passthrough)
    FUNCTION_RULES.setdefault(tvops.misc.__dict__.get("stochastic_depth", tvops.stochastic_depth), passthrough)

_PASS_FUNCS = [
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
    F.softplus, F.hardtanh, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.threshold, F.logsigmoid, F.softsign,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, torch.clamp, torch.clip, torch.erf, torch.square, torch.reciprocal, torch.sign, torch.sin,
    torch.cos, torch.nan_to_num, torch.clamp_min, torch.clamp_max, torch.log1p, torch.expm1,
    torch.nn.functional.relu_, operator.neg, operator.pos,
]
_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul, torch.addcdiv, torch.pow,
    torch.rsub, torch.fmax, torch.fmin,
]

FUNCTION_RULES: Dict[Any, Callable[[RuleCall], Any]] = {}
for _f in _PASS_FUNCS:
    FUNCTION_RULES[_f] = passthrough
for _f in _ELEMENTWISE_FUNCS:
    FUNCTION_RULES[_f] = elementwise
FUNCTION_RULES.update({
    F.conv1d: conv_functional, F.conv2d: conv_functional, F.conv3d: conv_functional,
    F.linear: linear_functional,
    F.batch_norm: batchnorm_functional, F.instance_norm: batchnorm_functional,
    F.group_norm: groupnorm_functional, F.layer_norm: layernorm_functional,
    F.max_pool1d: spatial_op, F.max_pool2d: spatial_op, F.max_pool3d: spatial_op,
    F.avg_pool1d: spatial_op, F.avg_pool2d: spatial_op, F.avg_pool3d: spatial_op,
    F.adaptive_avg_pool1d: spatial_op, F.adaptive_avg_pool2d: spatial_op, F.adaptive_avg_pool3d: spatial_op,
    F.adaptive_max_pool1d: spatial_op, F.adaptive_max_pool2d: spatial_op, F.adaptive_max_pool3d: spatial_op,
    F.interpolate: spatial_op, F.upsample: spatial_op, F.pad: pad_rule,
    F.softmax: along_dim, F.log_softmax: along_dim, torch.softmax: along_dim, torch.log_softmax: along_dim,
    F.normalize: along_dim,
    torch.flatten: reshape_rule, torch.reshape: reshape_rule, torch.squeeze: reshape_rule,
    torch.unsqueeze: reshape_rule,
    torch.permute: permute_rule, torch.transpose: transpose_rule, torch.swapaxes: transpose_rule,
    torch.movedim: movedim_rule,
    torch.cat: cat_rule, torch.concat: cat_rule, torch.concatenate: cat_rule, torch.stack: stack_rule,
    torch.split: split_rule, torch.chunk: chunk_rule, torch.unbind: unbind_rule,
    torch.mean: _reduce_rule(), torch.sum: _reduce_rule(), torch.amax: _reduce_rule(),
    torch.amin: _reduce_rule(), torch.max: _reduce_rule(), torch.min: _reduce_rule(),
    torch.std: _reduce_rule(), torch.var: _reduce_rule(), torch.logsumexp: _reduce_rule(),
    torch.prod: _reduce_rule(), torch.argmax: _reduce_rule(True), torch.argmin: _reduce_rule(True),
    operator.getitem: getitem_rule, getattr: getattr_rule,
    F.channel_shuffle: mixes_channels, F.pixel_shuffle: mixes_channels, F.pixel_unshuffle: mixes_channels,
    F.glu: mixes_channels, F.local_response_norm: mixes_channels,
})

METHOD_RULES: Dict[str, Callable[[RuleCall], Any]] = {}
for _m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt", "abs",
           "neg", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clip", "contiguous", "clone",
           "detach", "float", "double", "half", "bfloat16", "to", "type", "square", "reciprocal", "sign",
           "sin", "cos", "erf", "exp_", "hardtanh", "gelu", "silu", "nan_to_num", "requires_grad_", "cpu",
           "cuda", "log1p", "expm1", "sigmoid"):
    METHOD_RULES[_m] = passthrough
for _m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "pow_", "maximum", "minimum",
           "type_as", "masked_fill", "masked_fill_", "where", "lerp", "addcmul", "addcmul_", "rsub", "__add__",
           "__mul__", "__radd__", "__rmul__", "__sub__", "__truediv__"):
    METHOD_RULES[_m] = elementwise
METHOD_RULES.update({
    "view": reshape_rule, "reshape": reshape_rule, "flatten": reshape_rule, "unflatten": reshape_rule,
    "squeeze": reshape_rule, "unsqueeze": reshape_rule, "view_as": reshape_rule, "reshape_as": reshape_rule,
    "permute": permute_rule, "transpose": transpose_rule, "swapaxes": transpose_rule, "movedim": movedim_rule,
    "expand": expand_rule, "expand_as": expand_rule, "broadcast_to": expand_rule, "repeat": repeat_rule,
    "split": split_rule, "chunk": chunk_rule, "unbind": unbind_rule,
    "mean": _reduce_rule(), "sum": _reduce_rule(), "amax": _reduce_rule(), "amin": _reduce_rule(),
    "max": _reduce_rule(), "min": _reduce_rule(), "std": _reduce_rule(), "var": _reduce_rule(),
    "logsumexp": _reduce_rule(), "prod": _reduce_rule(), "norm": _reduce_rule(),
    "argmax": _reduce_rule(True), "argmin": _reduce_rule(True),
    "softmax": along_dim, "log_softmax": along_dim,
    "size": lambda call: None, "dim": lambda call: None, "numel": lambda call: None,
})


def _type_as_layout(call: RuleCall):
    return passthrough(call)


METHOD_RULES["type_as"] = _type_as_layout  # the second tensor only donates a dtype


def _norm_rule(call: RuleCall):
    # x.norm(p, dim, keepdim)
    dim = call.arg(2, "dim", None)
    keep = bool(call.arg(3, "keepdim", False))
    return reduce_dims(call, dim, keep)


METHOD_RULES["norm"] = _norm_rule


_LIBRARY_RULES["torchvision"] = _register_torchvision_ops


def module_rule(module: nn.Module) -> Optional[Callable[[RuleCall], Any]]:
    ensure_library_rules()
    for t in type(module).__mro__:
        if t in MODULE_RULES:
            return MODULE_RULES[t]
    return None
