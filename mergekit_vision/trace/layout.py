"""Channel layouts of traced tensors and the one union-find that joins them.

An *element* is a run of channels with one identity: a conv's output channels, a parameter axis,
the model input. A tensor dim that carries channels is laid out as a tuple of ``Seg``s, each a range
of one element; a dim that carries no channels (batch, spatial, tokens) is ``None``. Rules link
ranges of elements; ``Elements`` resolves links into groups, with offsets (an element may sit inside
a larger one after ``cat``), cut points (ranges that must stay invariant) and frozen reasons.
"""
from __future__ import annotations

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
class Elements:
    """Union-find over channel ranges with offsets: ``parent[e]`` holds ``e`` at ``offset[e]``."""

    size: List[int] = field(default_factory=list)
    label: List[str] = field(default_factory=list)
    parent: List[int] = field(default_factory=list)
    offset: List[int] = field(default_factory=list)
    cuts: List[set] = field(default_factory=list)
    reasons: List[List[str]] = field(default_factory=list)
    param_of: Dict[Tuple[str, int], int] = field(default_factory=dict)
    extra_members: List[ExtraMember] = field(default_factory=list)
    channel_free: Dict[Tuple[str, int], str] = field(default_factory=dict)

    # ---- elements ------------------------------------------------------------------------
    def new(self, size: int, label: str, frozen: Optional[str] = None) -> int:
        e = len(self.size)
        self.size.append(int(size))
        self.label.append(label)
        self.parent.append(e)
        self.offset.append(0)
        self.cuts.append(set())
        self.reasons.append([])
        if frozen:
            self.reasons[e].append(frozen)
        return e

    def param(self, key: str, axis: int, size: int) -> int:
        """The element of one parameter/buffer axis (one per (key, axis), so tied weights unify)."""
        k = (key, axis)
        if k not in self.param_of:
            self.param_of[k] = self.new(size, f"{key}:{axis}")
        return self.param_of[k]

    def find(self, e: int) -> Tuple[int, int]:
        off = 0
        path = []
        while self.parent[e] != e:
            path.append(e)
            off += self.offset[e]
            e = self.parent[e]
        # path compression, keeping offsets relative to the root
        acc = off
        for p in path:
            o = self.offset[p]
            self.parent[p] = e
            self.offset[p] = acc
            acc -= o
        return e, off

    def root_size(self, e: int) -> int:
        return self.size[self.find(e)[0]]

    def frozen(self, e: int) -> bool:
        return bool(self.reasons[self.find(e)[0]])

    def freeze(self, e: int, reason: str) -> None:
        r, _ = self.find(e)
        if reason not in self.reasons[r] and len(self.reasons[r]) < 8:
            self.reasons[r].append(reason)
        elif not self.reasons[r]:
            self.reasons[r].append(reason)

    def cut(self, e: int, pos: int) -> None:
        r, o = self.find(e)
        p = o + pos
        if 0 < p < self.size[r]:
            self.cuts[r].add(p)

    def _attach(self, child: int, parent: int, at: int) -> None:
        self.parent[child] = parent
        self.offset[child] = at
        for c in self.cuts[child]:
            self.cut(parent, at + c)
        self.cut(parent, at)
        self.cut(parent, at + self.size[child])
        for reason in self.reasons[child]:
            self.freeze(parent, reason)

    def join(self, a: int, aoff: int, b: int, boff: int, length: int, why: str) -> None:
        """Tie channels ``a[aoff:aoff+length]`` to ``b[boff:boff+length]`` one to one."""
        ra, oa = self.find(a)
        rb, ob = self.find(b)
        pa, pb = oa + aoff, ob + boff
        if ra == rb:
            if pa != pb:
                self.freeze(ra, f"{why}: ties channels {pa}.. to {pb}.. of the same group (shifted coupling)")
            return
        full_a = pa == 0 and length == self.size[ra]
        full_b = pb == 0 and length == self.size[rb]
        if full_a and full_b:
            lo, hi = min(ra, rb), max(ra, rb)
            self._attach(hi, lo, 0)
        elif full_b:
            self._attach(rb, ra, pa)
        elif full_a:
            self._attach(ra, rb, pb)
        elif 0 <= pb - pa and pb - pa + self.size[ra] <= self.size[rb]:
            # ra fits inside rb: tie all of it. Tying more channels than the op asks is safe, since the
            # cut points keep each range invariant; the rest of ra is usually tied by the next piece.
            self._attach(ra, rb, pb - pa)
        elif 0 <= pa - pb and pa - pb + self.size[rb] <= self.size[ra]:
            self._attach(rb, ra, pa - pb)
        else:
            reason = f"{why}: partially overlapping channel ranges"
            self.freeze(ra, reason)
            self.freeze(rb, reason)

    # ---- segments ------------------------------------------------------------------------
    def full(self, e: int) -> Tuple[Seg, ...]:
        return (Seg(e, 0, self.size[e]),)

    def freeze_dim(self, dim: DimLayout, reason: str) -> None:
        if dim:
            for s in dim:
                self.freeze(s.elem, reason)

    def fresh_dim(self, size: int, label: str, reason: str) -> DimLayout:
        return (Seg(self.new(size, label, frozen=reason), 0, size),)


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
