"""Rules for multi-head attention: the view of a channel axis as (q/k/v, heads, head dim), the
per-head products ``q @ k^T`` and ``attn @ v`` (explicit or fused in ``F.scaled_dot_product_attention``),
and selecting q, k, v out of a fused projection.

The symmetry they record (docs/spec.md, "Attention heads"): channel ``(h, d)`` of q and k may move
within head ``h`` (the same move for q's and k's channel, since ``q_h . k_h`` sums over ``d``), and
likewise v's channel with the output projection's column; and whole heads may move together (q, k, v
blocks, the projection's column blocks and every per-head tensor along its head axis). A split records
the view (``Elements.head_split``); its head dim is a virtual element that only these rules translate:
the contraction joins q's channel ``(h, d)`` to k's ``(h, d)`` once both are seen on aligned head axes.
"""
from __future__ import annotations

from typing import List, Optional

from ..layout import DimLayout, Elements, HeadSplit, Seg, slice_dim
from .core import Multi, RuleCall, channel_free, is_tensor, join_dim, layout_or_none, param_dim, unknown


def split_view(E: Elements, where: str, segs, sizes) -> Optional[List[DimLayout]]:
    """Layouts of the dims ``sizes`` (``(heads, dim)`` or ``(outer, heads, dim)``) that a reshape makes
    of one channel dim laid out as ``segs``; None where this is not such a view."""
    if len(sizes) not in (2, 3) or any(s.inner != 1 for s in segs) or min(sizes) < 1 or where in E.plain_reshapes:
        return None
    outer = sizes[0] if len(sizes) == 3 else 1
    heads, dim = sizes[-2], sizes[-1]
    s = E.head_split(tuple(segs), heads, dim, outer, where)
    s.where = where
    out: List[DimLayout] = []
    if len(sizes) == 3:
        out.append((Seg(s.selector, 0, outer),) if s.selector is not None else None)
    out.append((Seg(s.head, 0, heads),) if heads > 1 else None)
    out.append((Seg(s.within, 0, dim),))
    return out


def _single(E: Elements, dim: DimLayout, attr: str) -> Optional[HeadSplit]:
    """The split whose virtual ``attr`` ('within' or 'selector') fills ``dim`` entirely."""
    if dim is None or len(dim) != 1:
        return None
    s = E.split(dim[0].elem)
    if s is None or getattr(s, attr) != dim[0].elem or dim[0].off != 0 or dim[0].inner != 1:
        return None
    return s if dim[0].length == (s.dim if attr == "within" else s.outer) else None


def within_of(E: Elements, dim: DimLayout) -> Optional[HeadSplit]:
    return _single(E, dim, "within")


def is_head_dim(dim: DimLayout, s: HeadSplit) -> bool:
    return dim is not None and tuple(dim) == (Seg(s.head, 0, s.heads),)


def merge_view(E: Elements, ins) -> Optional[DimLayout]:
    """The channel layout a reshape back gives: ``(heads, dim)`` or ``(outer, heads, dim)`` of one split,
    in that order (None for anything else)."""
    s = within_of(E, ins[-1]) if ins else None
    if s is None:
        return None
    if len(ins) == 2 and s.outer == 1 and is_head_dim(ins[0], s):
        return s.chan
    if len(ins) == 3 and _single(E, ins[0], "selector") is s and is_head_dim(ins[1], s):
        return s.chan
    return None


def merge_shared(E: Elements, where: str, ins) -> Optional[DimLayout]:
    """``(heads, c)`` back into one channel dim where ``c`` is an ordinary channel axis every head
    shares (LambdaNet: each head's output carries v's channels, the lambda being shared): the merged
    channels are a split of their own on the heads' axis whose head dim is ``c``'s channels (one
    permutation shared by all heads). None for anything else."""
    if len(ins) != 2 or ins[0] is None or ins[1] is None or len(ins[0]) != 1:
        return None
    seg = ins[0][0]
    hs = next((s for s in E.splits if s.head == seg.elem), None)
    if hs is None or not hs.root.role or (seg.off, seg.length, seg.inner) != (0, hs.heads, 1) \
            or any(c.inner != 1 or c.elem in E.split_of for c in ins[1]):
        return None
    dim = sum(c.length for c in ins[1])
    n = hs.heads * dim
    chan = (Seg(E.new(n, where), 0, n),)
    s = E.head_split(chan, hs.heads, dim, 1, where, head=hs.head)
    s.where, s.role = where, "vo"
    join_dim(E, (Seg(s.within, 0, dim),), ins[1], where)
    return chan


def select(E: Elements, layout, dim: int, index: int):
    """The layout of ``x.select(dim, index)`` where ``dim`` is a split's q/k/v axis: one of its parts,
    a split of its own that shares the parent's head axis. None when ``dim`` is no such axis."""
    s = _single(E, layout[dim], "selector")
    if s is None:
        return None
    hd = s.heads * s.dim
    chan = slice_dim(s.chan, index * hd, (index + 1) * hd)
    sub = E.head_split(chan, s.heads, s.dim, 1, f"{s.where}[{index}]", head=s.head)
    sub.where, sub.parent = s.where, s
    old = (Seg(s.within, 0, s.dim),)
    return tuple((Seg(sub.within, 0, s.dim),) if lay == old else lay for k, lay in enumerate(layout) if k != dim)


def contract(E: Elements, where: str, ca: DimLayout, cb: DimLayout, batch_a, batch_b) -> None:
    """``sum_c a[..., c] b[..., c]``: the contracted dims must carry the same channels. Two head dims
    seen on aligned head axes tie q's channel (h, d) to k's (h, d); otherwise the dims are joined as
    they stand (a virtual head dim touched so becomes one permutation shared by all heads)."""
    sa, sb = within_of(E, ca), within_of(E, cb)
    if sa is not None and sb is not None and sa.dim == sb.dim and sa.heads == sb.heads and any(
            is_head_dim(x, sa) and is_head_dim(y, sb) for x, y in zip(batch_a, batch_b)):
        join_dim(E, sa.chan, sb.chan, where)
        sa.role = sb.role = "qk"
        return
    for s, other in ((sa, cb), (sb, ca)):
        # one head dim against an ordinary channel axis (LambdaNet's queries against a lambda every head
        # shares): a real use of the split, its head dim one permutation for all heads (the join below)
        if s is not None and other is not None and all(c.elem not in E.split_of for c in other):
            s.role = s.role or "qk"
    join_dim(E, ca, cb, where)


def _batch(E: Elements, where: str, out_shape, operands, prefer=None) -> List[DimLayout]:
    """Broadcast batch dims of several operands (``(value, layout)``), joined; ``prefer``: the operand
    whose layout the output keeps where it holds its split's head axis (so a reshape back sees it)."""
    nb = len(out_shape)
    out: List[DimLayout] = []
    for d in range(nb):
        dims = []
        for v, lay in operands:
            k = d - (nb - (v.dim() - 2))
            if k >= 0 and v.shape[k] == out_shape[d] and out_shape[d] > 1:
                dims.append(lay[k])
        if prefer is not None:
            v, lay = prefer
            k = d - (nb - (v.dim() - 2))
            if k >= 0 and v.shape[k] == out_shape[d] and out_shape[d] > 1:
                dims.insert(0, lay[k])
        acc = dims[0] if dims else None
        for other in dims[1:]:
            acc = join_dim(E, acc, other, where)
        out.append(acc)
    return out


def matmul_rule(call: RuleCall):
    a, b = call.args[0], call.args[1]
    if not (is_tensor(a) and is_tensor(b) and is_tensor(call.out)) or a.dim() < 2 or b.dim() < 2:
        return unknown(call)
    E = call.E
    la, lb = layout_or_none(call.largs[0], a), layout_or_none(call.largs[1], b)
    out = call.out
    batch_shape = out.shape[:-2]
    sv = within_of(E, lb[-1])
    batch = _batch(E, call.where, batch_shape, [(a, la), (b, lb)], prefer=(b, lb) if sv is not None else None)
    nb = len(batch_shape)

    def aligned(v, lay):
        return [lay[d - (nb - (v.dim() - 2))] if d - (nb - (v.dim() - 2)) >= 0 else None for d in range(nb)]

    contract(E, call.where, la[-1], lb[-2], aligned(a, la), aligned(b, lb))
    for s in (sv, within_of(E, la[-2])):  # v's head dim reaches the output (attn @ v, or v @ attn^T)
        if s is not None:
            s.role = s.role or "vo"
    return tuple(batch) + (la[-2], lb[-1])


def sdpa_rule(call: RuleCall):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, ...)`` = softmax(q k^T s + mask) v, per head."""
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    out = call.out
    if not all(is_tensor(t) for t in (q, k, v, out)) or q.dim() < 3 or call.kwargs.get("enable_gqa") \
            or q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1]:
        return unknown(call)
    E = call.E
    lq, lk, lv = (layout_or_none(call.larg(i, n), t) for i, n, t in ((0, "query", q), (1, "key", k), (2, "value", v)))
    sv = within_of(E, lv[-1])
    batch = _batch(E, call.where, out.shape[:-2], [(q, lq), (k, lk), (v, lv)], prefer=(v, lv) if sv else None)
    contract(E, call.where, lq[-1], lk[-1], list(lq[:-2]), list(lk[:-2]))
    join_dim(E, lk[-2], lv[-2], call.where)  # key tokens against value tokens: no channels there
    mask = call.arg(3, "attn_mask")
    if is_tensor(mask):
        lm = layout_or_none(call.larg(3, "attn_mask"), mask)
        full = list(batch) + [lq[-2], lk[-2]]
        for d in range(mask.dim()):
            j = d + len(full) - mask.dim()
            if j >= 0 and mask.shape[d] > 1:
                full[j] = join_dim(E, full[j], lm[d], call.where)
    if sv is not None:
        sv.role = sv.role or "vo"
    return tuple(batch) + (lq[-2], lv[-1])


def unbind_selector(call: RuleCall):
    """``qkv.unbind(dim)`` over a split's q/k/v axis (None when ``dim`` is not one)."""
    x = call.args[0]
    lx = layout_or_none(call.largs[0], x)
    dim = call.arg(1, "dim", 0) % x.dim()
    if _single(call.E, lx[dim], "selector") is None:
        return None
    return Multi(select(call.E, lx, dim, o) for o in range(x.shape[dim]))


def attention_mask(call: RuleCall):
    """A function that builds an attention mask from the call's masks: None without one (nothing to
    track); otherwise the mask is not understood."""
    return None if call.out is None else unknown(call)


def _fused_heads(call: RuleCall, inputs, qkv, proj, embed: int, heads: int):
    """The fused-projection attention of a leaf module: ``qkv = (weight, bias)`` names the in-projection
    whose rows are q, k and v (each ``heads`` blocks of ``embed // heads``) and reads every layout of
    ``inputs``; ``proj`` the output projection, which reads v's channels. Returns q's split (its head
    axis is every part's) and the layout of the output projection's rows."""
    E = call.E
    w_out, w_in = param_dim(call, qkv[0], 0), param_dim(call, qkv[0], 1)
    for lay in inputs:
        join_dim(E, lay, w_in, call.where)
    o_out, o_in = param_dim(call, proj[0], 0), param_dim(call, proj[0], 1)
    for name, lay in ((qkv[1], w_out), (proj[1], o_out)):
        bias = param_dim(call, name, 0)
        if bias is not None:
            join_dim(E, lay, bias, call.where)
    parts = [E.head_split(slice_dim(w_out, i * embed, (i + 1) * embed), heads, embed // heads, 1, call.where)
             for i in range(3)]
    for s in parts[1:]:  # one head axis for q, k and v
        E.join(parts[0].head, 0, s.head, 0, heads, call.where)
    sq, sk, sv = parts
    join_dim(E, sq.chan, sk.chan, call.where)
    sq.role = sk.role = "qk"
    sv.role = "vo"
    join_dim(E, sv.chan, o_in, call.where)
    return sq, o_out


def multihead_attention_module(call: RuleCall):
    """``nn.MultiheadAttention`` (torchvision's ViT): the fused in-projection's rows are q, k and v,
    each ``num_heads`` blocks of ``head_dim``; the output projection reads v's channels."""
    m = call.module
    q, k, v = (call.arg(i, n) for i, n in enumerate(("query", "key", "value")))
    lq, lk, lv = (layout_or_none(call.larg(i, n), t) for i, n, t in ((0, "query", q), (1, "key", k), (2, "value", v)))
    masks = [call.arg(i, n) for i, n in ((3, "key_padding_mask"), (5, "attn_mask"))]
    if (not getattr(m, "_qkv_same_embed_dim", False) or m.bias_k is not None or m.bias_v is not None
            or m.add_zero_attn or any(is_tensor(x) for x in masks) or not all(is_tensor(t) for t in (q, k, v))
            or any(lay is not None for t in (lq, lk, lv) for lay in t[:-1])):
        return unknown(call)
    heads = m.num_heads
    sq, o_out = _fused_heads(call, (lq[-1], lk[-1], lv[-1]), ("in_proj_weight", "in_proj_bias"),
                             ("out_proj.weight", "out_proj.bias"), m.embed_dim, heads)
    out = (None,) * (q.dim() - 1) + (o_out,)
    if isinstance(call.out, tuple):
        weights = call.out[1]
        if weights is None:
            return Multi((out, None))
        lw: List[DimLayout] = [None] * weights.dim()
        if weights.dim() == q.dim() + 1 and weights.shape[-3] == heads:  # per head (average_attn_weights=False)
            lw[-3] = (Seg(sq.head, 0, heads),)
        return Multi((out, tuple(lw)))
    return out


def slice_within(E: Elements, where: str, dim: DimLayout, start: int, stop: int) -> Optional[DimLayout]:
    """Positions ``start:stop`` of a whole head dim (LeViT splits each head's q, k and v out of it): the
    head dim of a split of its own, over those positions of every head, on the same head axis. None
    where ``dim`` is not a whole head dim."""
    s = within_of(E, dim)
    if s is None or s.outer != 1 or not 0 <= start < stop <= s.dim:
        return None
    chan = []
    for h in range(s.heads):
        part = slice_dim(s.chan, h * s.dim + start, h * s.dim + stop)
        if part is None:
            return None
        chan.extend(part)
    sub = E.head_split(tuple(chan), s.heads, stop - start, 1, where, head=s.head)
    sub.where, sub.parent = s.where, s
    s.covered += stop - start
    return (Seg(sub.within, 0, stop - start),)


def window_attention_module(call: RuleCall):
    """torchvision's ``ShiftedWindowAttention`` (Swin) and ``ShiftedWindowAttentionV2``, as a leaf: the
    module hands its weights to the fx-wrapped ``shifted_window_attention``, which cuts a channels-last
    map ``(B, H, W, C)`` into (shifted) windows, runs ``qkv`` → ``(3, heads, head_dim)`` → attention with
    a per-head relative-position bias → ``proj``, and puts the windows back. Windows, the shift and the
    padding move positions only. The symmetry is ``nn.MultiheadAttention``'s (q, k, v blocks of the
    fused projection on one head axis, q/k and v/o within heads) plus the per-head tensors: V1's bias
    table (axis 1), V2's ``logit_scale`` (axis 0) and its position-bias MLP's output rows. V2's cosine
    attention normalizes q and k over the head dim, which a permutation within the head leaves alone;
    the MLP's hidden units see only the constant coordinate table, so no activation shows them (fixed)."""
    m = call.module
    x = call.args[0] if call.args else call.kwargs.get("x")
    lx = layout_or_none(call.largs[0] if call.largs else call.lkwargs.get("x"), x)
    if not (is_tensor(x) and is_tensor(call.out)) or x.dim() != 4 or call.out.shape != x.shape \
            or any(lay is not None for lay in lx[:-1]) or not hasattr(m, "qkv") or not hasattr(m, "proj"):
        return unknown(call)
    E = call.E
    heads = m.num_heads
    sq, o_out = _fused_heads(call, (lx[-1],), ("qkv.weight", "qkv.bias"), ("proj.weight", "proj.bias"),
                             x.shape[-1], heads)
    head = (Seg(sq.head, 0, heads),)
    per_head = [("relative_position_bias_table", 1), ("logit_scale", 0), ("cpb_mlp.2.weight", 0)]
    for pname, axis in per_head:
        lay = param_dim(call, pname, axis)
        if lay is not None:
            join_dim(E, head, lay, call.where)
    hidden = param_dim(call, "cpb_mlp.0.weight", 0)  # the bias MLP's hidden units (V2)
    if hidden is not None:
        for pname, axis in (("cpb_mlp.0.bias", 0), ("cpb_mlp.2.weight", 1)):
            join_dim(E, hidden, param_dim(call, pname, axis), call.where)
    why = "relative positions and their coordinates, not channels"
    for pname, axes in (("relative_position_bias_table", (0,)), ("relative_position_index", (0,)),
                        ("relative_coords_table", (0, 1, 2, 3)), ("cpb_mlp.0.weight", (1,)),
                        ("logit_scale", (1, 2))):
        channel_free(call, pname, axes, why)
    return (None, None, None, o_out)
