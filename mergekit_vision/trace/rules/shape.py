"""Rules for ops that move axes and positions: reshape, permute, expand, index, concatenate, split."""
from __future__ import annotations

import math
from typing import Any, List

import torch

from ..layout import DimLayout, Elements, Seg, slice_dim
from .attention import merge_shared, merge_view, select, slice_within, split_view, unbind_selector
from .core import Multi, RuleCall, cut_slice, fresh_layout, is_tensor, join_dim, layout_or_none, unknown


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
        if len(a) > 1 or len(b) > 1:  # merged or split, a repeating dim repeats no more
            ins = [None if E.constant_along(lay) else lay for lay in ins]
        if all(lay is None for lay in ins):
            continue
        merged = merge_view(E, ins) if len(b) == 1 and len(a) in (2, 3) else None
        if merged is None and len(b) == 1 and len(a) == 2:
            merged = merge_shared(E, where, ins)
        if len(a) == 1 and len(b) == 1:
            out[b[0]] = ins[0]
        elif merged is not None:  # heads and head dim back into one channel axis
            out[b[0]] = merged
        elif (len(b) == 1 and ins[-1] is not None and all(lay is None for lay in ins[:-1])
              and all(s.inner == 1 for s in ins[-1])):
            # positions outer, channels inner (Swin's patch merging, space-to-depth): each position's
            # block holds the same channels
            out[b[0]] = tuple(ins[-1]) * math.prod(in_shape[k] for k in a[:-1])
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
            view = split_view(E, where, ins[0], [out_shape[k] for k in b]) if len(a) == 1 else None
            if view is not None:  # (q/k/v,) heads, head dim: settled by the attention rules
                for k, lay in zip(b, view):
                    out[k] = lay
                continue
            for lay in ins:
                E.freeze_dim(lay, f"{where} reshapes a channel axis (mixes or splits channels)")
            for k in b:
                out[k] = E.fresh_dim(out_shape[k], where, "output of a channel-mixing reshape")
    return tuple(out)


def reshape_rule(call: RuleCall):
    x = call.args[0]
    if not is_tensor(call.out) or not is_tensor(x):
        return unknown(call)
    return reshape_layout(call.E, call.where, x.shape, layout_or_none(call.largs[0], x), call.out.shape)


def permute_rule(call: RuleCall):
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    dims = call.args[1:] if len(call.args) > 1 else call.kwargs.get("dims")
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return tuple(lx[d % x.dim()] for d in dims)


def transpose_rule(call: RuleCall):
    x = call.args[0]
    lx = list(layout_or_none(call.largs[0], x))
    if x.dim() < 2:
        return tuple(lx)
    d0 = call.arg(1, "dim0", -2) % x.dim()
    d1 = call.arg(2, "dim1", -1) % x.dim()
    lx[d0], lx[d1] = lx[d1], lx[d0]
    return tuple(lx)


def movedim_rule(call: RuleCall):
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    src, dst = call.arg(1, "source"), call.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    order = [d for d in range(x.dim()) if d not in [s % x.dim() for s in src]]
    for s, d in sorted(zip([s % x.dim() for s in src], [d % x.dim() for d in dst]), key=lambda t: t[1]):
        order.insert(d, s)
    return tuple(lx[d] for d in order)


def expand_rule(call: RuleCall):
    x, out = call.args[0], call.out
    lx = layout_or_none(call.largs[0], x)
    nd = out.dim()
    layout = []
    static = bool(call.static) and call.static[0]
    for d in range(nd):
        k = d - (nd - x.dim())
        if static and k >= 0 and x.shape[k] == 1 and out.shape[d] > 1:
            # a constant (an attention mask) repeated along a dim: it may meet channels there (heads)
            e = call.E.new(out.shape[d], call.where)
            call.E.broadcast.add(e)
            layout.append((Seg(e, 0, out.shape[d]),))
        elif k < 0 or x.shape[k] != out.shape[d]:
            layout.append(None)  # broadcast of a size-1 dim: the same value everywhere
        else:
            layout.append(lx[k])
    return tuple(layout)


def repeat_rule(call: RuleCall):
    x, out = call.args[0], call.out
    lx = layout_or_none(call.largs[0], x)
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


def repeat_interleave_rule(call: RuleCall):
    """``x.repeat_interleave(repeats, dim)``: each position of ``dim`` repeated (GCViT repeats a global
    query for every window of its image along the batch). Every other dim keeps its channels; a
    channel axis repeated so is frozen; without ``dim`` (the flattened tensor) it is not understood."""
    x, out = call.args[0], call.out
    dim = call.arg(2, "dim")
    if not (is_tensor(x) and is_tensor(out)) or dim is None or out.dim() != x.dim():
        return unknown(call)
    dim %= x.dim()
    lx = list(layout_or_none(call.largs[0], x))
    if lx[dim] is not None:
        call.E.freeze_dim(lx[dim], f"{call.where} repeats each channel of a channel axis")
        lx[dim] = call.E.fresh_dim(out.shape[dim], call.where, "repeated channel axis")
    return tuple(lx)


def getitem_rule(call: RuleCall):
    obj, idx = call.args[0], call.args[1]
    lobj = call.largs[0]
    if not is_tensor(obj):
        if isinstance(lobj, Multi) and isinstance(idx, int):
            return lobj[idx]
        if isinstance(lobj, dict):
            return lobj.get(idx)
        if isinstance(lobj, Multi) and isinstance(idx, slice):
            return Multi(lobj[idx])
        return None if not is_tensor(call.out) else fresh_layout(call.E, call.out, f"{call.where}", call.where)
    lx = list(layout_or_none(lobj, obj))
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(is_tensor(i) or isinstance(i, (list,)) for i in idx):
        return gather_rule(call, obj, lx, idx)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: List[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (obj.dim() - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (obj.dim() - sum(1 for i in expanded if i is not None)))
    ints = [k for k, i in enumerate(i for i in expanded if i is not None) if isinstance(i, int)]
    if len(ints) == 1 and all(i is None or isinstance(i, int) or i == slice(None) for i in expanded) \
            and None not in expanded:
        picked = select(call.E, tuple(lx), ints[0], expanded[ints[0]] % obj.shape[ints[0]])
        if picked is not None:  # qkv[0]: q out of a fused projection
            return picked
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
    lts = [layout_or_none(lay, t) for t, lay in zip(tensors, ltensors)
           if (is_tensor(t) and t.numel() > 0) or t.dim() == nd]
    ts = [t for t in tensors if is_tensor(t) and (t.numel() > 0 or t.dim() == nd)]
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
    lts = [layout_or_none(lay, t) for t, lay in zip(tensors, ltensors)]
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
    lx = layout_or_none(call.largs[0], x)
    dim = call.arg(2, "dim", 0) % x.dim()
    outs = call.out
    res = []
    pos = 0
    for o in outs:
        n = o.shape[dim]
        layout = list(lx)
        part = slice_within(call.E, call.where, lx[dim], pos, pos + n)
        if part is not None:  # q, k, v of every head out of one head dim (LeViT)
            layout[dim] = part
        elif lx[dim] is not None:
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
    parts = unbind_selector(call)
    if parts is not None:
        return parts
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    dim = call.arg(1, "dim", 0) % x.dim()
    call.E.freeze_dim(lx[dim], f"{call.where} unbinds a channel axis")
    rest = tuple(lay for k, lay in enumerate(lx) if k != dim)
    return Multi(rest for _ in call.out)


def getattr_rule(call: RuleCall):
    attr = call.args[1]
    if attr in ("T", "mT") and is_tensor(call.out):
        x = call.args[0]
        lx = list(layout_or_none(call.largs[0], x))
        if attr == "T":
            return tuple(reversed(lx))
        lx[-1], lx[-2] = lx[-2], lx[-1]
        return tuple(lx)
    if is_tensor(call.out):
        return unknown(call)
    return None


def gather_rule(call: RuleCall, obj, lx, idx):
    """``x[index]`` / ``x[:, index]`` with one integer index tensor (a relative-position table read at its
    index buffer): the indexed dim's positions are gathered, so a channel axis there freezes; the other
    dims keep their channels; the dims the index adds carry none."""
    k = next(i for i, v in enumerate(idx) if is_tensor(v) or isinstance(v, list))
    if not (is_tensor(idx[k]) and not idx[k].is_floating_point() and idx[k].dtype != torch.bool) \
            or any(i != slice(None) for j, i in enumerate(idx) if j != k) or len(idx) > obj.dim():
        return unknown(call)
    lidx = call.largs[1][k] if isinstance(call.args[1], tuple) and isinstance(call.largs[1], Multi) else call.largs[1]
    for lay in layout_or_none(lidx, idx[k]):
        call.E.freeze_dim(lay, f"{call.where} indexes with a channel axis")
    call.E.freeze_dim(lx[k], f"{call.where} gathers along a channel axis")
    return tuple(lx[:k]) + (None,) * idx[k].dim() + tuple(lx[k + 1:])


def roll_rule(call: RuleCall):
    """``torch.roll(x, shifts, dims)``: positions move along ``dims``; a channel axis there freezes."""
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    dims = call.arg(2, "dims", None)
    dims = range(x.dim()) if dims is None else ([dims] if isinstance(dims, int) else dims)
    for d in dims:
        call.E.freeze_dim(lx[d % x.dim()], f"{call.where} rolls along a channel axis")
    return lx


def tokens_last(call: RuleCall):
    """A function that only moves positions of a channels-last tensor (timm's ``window_reverse``): the
    last dim's channels pass through; a channel axis anywhere else is not understood."""
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    if not (is_tensor(x) and is_tensor(call.out)) or x.shape[-1] != call.out.shape[-1] or any(
            lay is not None for lay in lx[:-1]):
        return unknown(call)
    return (None,) * (call.out.dim() - 1) + (lx[-1],)


def patch_merging_pad(call: RuleCall):
    """torchvision Swin's ``_patch_merging_pad``: ``(..., H, W, C)`` padded to even H, W, and the four
    pixels of each 2×2 patch laid side by side on the channel axis: ``(..., H/2, W/2, 4C)``, each a copy
    of the C channels. A channel axis anywhere but last is not understood."""
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    if not (is_tensor(x) and is_tensor(call.out)) or call.out.shape[-1] != 4 * x.shape[-1] or any(
            lay is not None for lay in lx[:-1]):
        return unknown(call)
    return (None,) * (call.out.dim() - 1) + ((tuple(lx[-1]) * 4) if lx[-1] is not None else None,)


def unfold_rule(call: RuleCall):
    """``x.unfold(dim, size, step)``: windows of ``size`` positions of ``dim`` (HaloNet's overlapping
    key/value blocks). ``dim`` becomes the window index and a new last dim the position in the window;
    both are positions, so a channel axis there freezes; every other dim keeps its channels."""
    x = call.args[0]
    if not (is_tensor(x) and is_tensor(call.out)) or call.out.dim() != x.dim() + 1:
        return unknown(call)
    lx = list(layout_or_none(call.largs[0], x))
    dim = call.arg(1, "dimension") % x.dim()
    if lx[dim] is not None:
        call.E.freeze_dim(lx[dim], f"{call.where} unfolds windows along a channel axis")
        lx[dim] = call.E.fresh_dim(call.out.shape[dim], call.where, "windows of a channel axis")
        return tuple(lx) + (call.E.fresh_dim(call.out.shape[-1], call.where, "windows of a channel axis"),)
    return tuple(lx) + (None,)
