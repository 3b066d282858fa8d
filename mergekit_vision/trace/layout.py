"""Channel layouts of traced tensors and the one union-find that joins them.

An *element* is a run of channels with one identity: a conv's output channels, a parameter axis,
the model input. A tensor dim that carries channels is laid out as a tuple of ``Seg``s, each a range
of one element; a dim that carries no channels (batch, spatial, tokens) is ``None``. Rules record
links between ranges of elements; ``Elements.resolve`` turns them into atoms and components.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple


class Seg(NamedTuple):
    """Positions of a dim holding channels ``off .. off+length`` of ``elem``, each repeated
    ``inner`` times contiguously (``inner > 1`` only after flattening channels with spatial dims)."""

    elem: int
    off: int
    length: int
    inner: int = 1

    @property
    def span(self) -> int:
        return self.length * self.inner


DimLayout = Optional[Tuple[Seg, ...]]
TensorLayout = Tuple[DimLayout, ...]


@dataclass
class ExtraMember:
    """A member that is not a whole parameter axis: grouped-conv in-axes, flattened linear in-axes."""

    elem: int
    off: int
    length: int
    key: str
    axis: int
    start: int
    inner: int = 1
    groups: int = 1


@dataclass
class HeadSplit:
    """A channel dim viewed as ``(outer, heads, dim)``: position ``o*heads*dim + h*dim + d`` of ``chan``
    (the channel dim's layout before the view) is channel ``(o, h, d)``. ``head`` is a real element
    (size ``heads``: the head axis is a channel axis of its own, joined like any other); ``within`` and
    ``selector`` are *virtual* elements standing for the per-head dim and the outer index (q, k, v).
    They stand for different channels in each head, so rules that know them (matmul, attention,
    the reshape back, unbind) translate them; any other rule touching them *materializes* them at
    resolve time (``within``: one permutation shared by all heads; ``selector``: frozen)."""

    head: int
    within: int
    chan: Tuple[Seg, ...]
    heads: int
    dim: int
    outer: int = 1
    selector: Optional[int] = None
    role: str = ""  # "qk" or "vo" once an attention rule has seen it
    where: str = ""  # the reshape that made it, for messages
    parent: Optional[HeadSplit] = None  # the split this part was selected (q/k/v) or sliced (head dim) from
    covered: int = 0  # positions of the head dim that slices of it (LeViT's q/k/v per head) took

    @property
    def root(self) -> HeadSplit:
        s = self
        while s.parent is not None:
            s = s.parent
        return s

    @property
    def sliced(self) -> bool:
        """Whether slices of its head dim cover it: its channels are its slices' (not tied itself)."""
        return self.covered == self.dim


@dataclass
class Elements:
    """Records what the rules say about elements: ``join`` (two ranges are the same channels, one to
    one), ``cut`` (a range is used on its own), ``freeze`` (never permute). Nothing is resolved while
    tracing; ``resolve()`` then splits every element into *atoms* at all cut points (propagated across
    joins until nothing changes) and unions atoms, so a join ties exactly the channels it names."""

    size: List[int] = field(default_factory=list)
    label: List[str] = field(default_factory=list)
    reasons: List[List[str]] = field(default_factory=list)
    cuts: List[set] = field(default_factory=list)
    joins: List[Tuple[int, int, int, int, int]] = field(default_factory=list)
    param_of: Dict[Tuple[str, int], int] = field(default_factory=dict)
    extra_members: List[ExtraMember] = field(default_factory=list)
    channel_free: Dict[Tuple[str, int], str] = field(default_factory=dict)
    splits: List[HeadSplit] = field(default_factory=list)
    split_of: Dict[int, int] = field(default_factory=dict)  # virtual element -> its split
    plain_reshapes: set = field(default_factory=set)  # reshapes (``where``) not to view as heads
    broadcast: set = field(default_factory=set)  # elements of dims a constant is expanded along

    def constant_along(self, dim) -> bool:
        """Whether ``dim`` is one dim a constant was expanded along (its values repeat there): it meets
        any other dim without tying or freezing it."""
        return dim is not None and len(dim) == 1 and dim[0].elem in self.broadcast

    def unused_splits(self) -> set:
        """The reshapes whose head view no attention rule used (traced again as plain reshapes)."""
        used = {id(s.root) for s in self.splits if s.role}
        return {s.where for s in self.splits if id(s.root) not in used}

    # ---- recording -----------------------------------------------------------------------
    def new(self, size: int, label: str, frozen: Optional[str] = None) -> int:
        e = len(self.size)
        self.size.append(int(size))
        self.label.append(label)
        self.reasons.append([frozen] if frozen else [])
        self.cuts.append(set())
        return e

    def param(self, key: str, axis: int, size: int) -> int:
        """The element of one parameter/buffer axis (one per (key, axis), so tied weights unify)."""
        k = (key, axis)
        if k not in self.param_of:
            self.param_of[k] = self.new(size, f"{key}:{axis}")
        return self.param_of[k]

    def freeze(self, e: int, reason: str) -> None:
        if reason not in self.reasons[e] and len(self.reasons[e]) < 6:
            self.reasons[e].append(reason)

    def cut(self, e: int, pos: int) -> None:
        if 0 < pos < self.size[e]:
            self.cuts[e].add(pos)

    def join(self, a: int, aoff: int, b: int, boff: int, length: int, why: str = "") -> None:
        """Tie channels ``a[aoff:aoff+length]`` to ``b[boff:boff+length]`` one to one."""
        if length <= 0 or (a == b and aoff == boff):
            return
        self.joins.append((a, aoff, b, boff, length))

    def full(self, e: int) -> Tuple[Seg, ...]:
        return (Seg(e, 0, self.size[e]),)

    def freeze_dim(self, dim: DimLayout, reason: str) -> None:
        if dim:
            for s in dim:
                self.freeze(s.elem, reason)

    def fresh_dim(self, size: int, label: str, reason: str) -> DimLayout:
        return (Seg(self.new(size, label, frozen=reason), 0, size),)

    def head_split(self, chan: Tuple[Seg, ...], heads: int, dim: int, outer: int, label: str,
                   head: Optional[int] = None) -> HeadSplit:
        """Record a view of ``chan`` as ``(outer, heads, dim)`` (``head``: share another split's head axis)."""
        if head is None:
            head = self.new(heads, label)
        within = self.new(dim, label)
        sel = self.new(outer, label) if outer > 1 else None
        s = HeadSplit(head, within, tuple(chan), heads, dim, outer, sel, where=label)
        self.splits.append(s)
        for v in (within, sel):
            if v is not None:
                self.split_of[v] = len(self.splits) - 1
        return s

    def split(self, elem: int) -> Optional[HeadSplit]:
        """The split a virtual element stands for (None for an ordinary element)."""
        k = self.split_of.get(elem)
        return None if k is None else self.splits[k]

    def finish_splits(self) -> set:
        """Before resolving: settle every head split and return the elements that stay virtual.

        A split no attention rule used (no ``role``) is what it was before heads were known: a reshape
        that splits a channel axis, which freezes it. A used split cuts its channels into head blocks
        (channels move within a block unless a heads group moves the blocks as wholes); its head dim,
        if another rule touched it (a norm over the head dim, a rotary embedding), is joined to every
        head's block (one permutation shared by all heads), and its q/k/v axis, if touched, freezes."""
        for s in self.splits:
            if s.role and s.parent is not None:
                s.root.role = s.root.role or "qkv"
        touched = set()
        for a, _, b, _, _ in self.joins:
            touched.update((a, b))
        touched.update(e for e in list(self.split_of) + list(self.broadcast) if self.reasons[e] or self.cuts[e])
        touched.update(xm.elem for xm in self.extra_members)  # a weight reads it (a grouped conv, flattened features)
        virtual = {e for e in self.broadcast if e not in touched}  # touched: ordinary (repeats are permutable)
        for s in self.splits:
            if not s.root.role:
                for seg in s.chan:
                    self.freeze(seg.elem, f"{s.where} reshapes a channel axis (mixes or splits channels)")
                for e in (s.head, s.within, s.selector):
                    if e is not None:
                        self.freeze(e, "output of a channel-mixing reshape")
                continue
            pos = 0
            for seg in s.chan:
                for b in range((pos // s.dim + 1) * s.dim, pos + seg.span, s.dim):
                    self.cut(seg.elem, seg.off + b - pos)
                pos += seg.span
            if s.within in touched:
                for b in range(s.outer * s.heads):
                    pos = 0
                    for seg in slice_dim(s.chan, b * s.dim, (b + 1) * s.dim):
                        self.join(s.within, pos, seg.elem, seg.off, seg.length)
                        pos += seg.length
            else:
                virtual.add(s.within)
            if s.selector is not None:
                if s.selector in touched:
                    why = f"{s.where}: its q/k/v axis is used by an op that does not select from it"
                    for e in [seg.elem for seg in s.chan] + [s.head, s.selector]:
                        self.freeze(e, why)
                else:
                    virtual.add(s.selector)
        return virtual

    # ---- resolution ----------------------------------------------------------------------
    def resolve(self) -> Atoms:
        bounds = [{0, n} | c for n, c in zip(self.size, self.cuts)]
        for a, ao, b, bo, n in self.joins:
            bounds[a] |= {ao, ao + n}
            bounds[b] |= {bo, bo + n}
        changed = True
        while changed:  # a cut inside one side of a join is a cut on the other side
            changed = False
            for a, ao, b, bo, n in self.joins:
                for (x, xo, y, yo) in ((a, ao, b, bo), (b, bo, a, ao)):
                    new = {yo + q - xo for q in bounds[x] if xo < q < xo + n} - bounds[y]
                    if new:
                        bounds[y] |= new
                        changed = True
        return Atoms(self, [sorted(bd) for bd in bounds])


class Atoms:
    """Elements split at their final boundaries; atoms tied by joins are unioned into components."""

    def __init__(self, E: Elements, bounds: List[List[int]]):
        self.E = E
        self.bounds = bounds
        self.first: List[int] = []  # global id of each element's first atom
        self.atom_elem: List[int] = []
        self.atom_start: List[int] = []
        self.atom_len: List[int] = []
        for e, bd in enumerate(bounds):
            self.first.append(len(self.atom_elem))
            for s, t in zip(bd, bd[1:]):
                self.atom_elem.append(e)
                self.atom_start.append(s)
                self.atom_len.append(t - s)
        self.parent = list(range(len(self.atom_elem)))
        for a, ao, b, bo, n in E.joins:
            for (ia, _, _), (ib, _, _) in zip(self.pieces(a, ao, n), self.pieces(b, bo, n)):
                self._union(ia, ib)
        self.reasons: Dict[int, List[str]] = {}
        for e, rs in enumerate(E.reasons):
            if rs:
                for ia, _, _ in self.pieces(e, 0, E.size[e]):
                    lst = self.reasons.setdefault(self.find(ia), [])
                    lst.extend(r for r in rs if r not in lst and len(lst) < 6)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def _union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def pieces(self, e: int, off: int, length: int):
        """(atom id, start inside the atom, length) covering ``e[off:off+length]`` in order."""
        bd = self.bounds[e]
        k = bisect.bisect_right(bd, off) - 1
        pos, end = off, off + length
        while pos < end:
            a_start, a_end = bd[k], bd[k + 1]
            n = min(a_end, end) - pos
            yield self.first[e] + k, pos - a_start, n
            pos += n
            k += 1


# ---- pure helpers on dim layouts ---------------------------------------------------------
def dim_span(dim: Sequence[Seg]) -> int:
    return sum(s.span for s in dim)


def slice_dim(dim: Sequence[Seg], start: int, stop: int) -> Optional[Tuple[Seg, ...]]:
    """Positions ``start:stop`` of a laid-out dim; None when the cut falls inside an inner repeat."""
    out: List[Seg] = []
    pos = 0
    for s in dim:
        a, b = pos, pos + s.span
        lo, hi = max(a, start), min(b, stop)
        if lo < hi:
            if (lo - a) % s.inner or (hi - a) % s.inner:
                return None
            out.append(Seg(s.elem, s.off + (lo - a) // s.inner, (hi - lo) // s.inner, s.inner))
        pos = b
    return tuple(out)


def pieces(da: Sequence[Seg], db: Sequence[Seg]):
    """Walk two layouts of the same dim together, yielding aligned (seg_a, seg_b, span) pieces, or
    ``None`` for a piece whose inner repeats do not line up."""
    ia = ib = 0
    pa = pb = 0  # consumed positions inside current segs
    while ia < len(da) and ib < len(db):
        sa, sb = da[ia], db[ib]
        n = min(sa.span - pa, sb.span - pb)
        if sa.inner != sb.inner or pa % sa.inner or pb % sb.inner or n % sa.inner:
            yield None
        else:
            yield (Seg(sa.elem, sa.off + pa // sa.inner, n // sa.inner, sa.inner),
                   Seg(sb.elem, sb.off + pb // sb.inner, n // sb.inner, sb.inner))
        pa += n
        pb += n
        if pa == sa.span:
            ia, pa = ia + 1, 0
        if pb == sb.span:
            ib, pb = ib + 1, 0
