"""The permutation spec: which (state-dict key, axis) slices move together, as plain printable data.

Convention, stated once: a permutation ``perm`` of a group of size n reorders its channels so that
``new[i] = old[perm[i]]`` on every member axis. ``spec.py`` knows nothing of torch.fx.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from .errors import SpecError


@dataclass(frozen=True)
class Member:
    """A slice of one parameter/buffer axis that a group's permutation moves.

    Positions ``start + j*inner + r`` (``0 <= j < length``, ``0 <= r < inner``) of axis ``axis`` of
    tensor ``key`` carry the group's channel ``offset + j``. ``inner > 1`` comes from flatten->linear
    (each channel owns a block of ``inner`` in-features). ``groups > 1`` marks the in-axis of a grouped
    conv, whose weight axis holds ``in_channels // groups`` positions: the member is then described in
    the *input-channel* coordinates and each block of rows sees its own slice of the permutation.
    ``stride`` (heads groups only; 0 = ``inner``): channel ``offset + j`` starts at ``start + j*stride``
    (LeViT keeps each head's q, k and v together, so one head's q rows are a stride apart).
    """

    key: str
    axis: int
    start: int = 0
    offset: int = 0
    length: int = 0
    inner: int = 1
    groups: int = 1
    stride: int = 0

    @property
    def step(self) -> int:
        """Positions from one channel's start to the next's."""
        return self.stride or self.inner

    def __str__(self) -> str:
        extra = ""
        if self.inner > 1:
            extra += f", inner={self.inner}"
        if self.groups > 1:
            extra += f", groups={self.groups}"
        if self.stride:
            extra += f", stride={self.stride}"
        end = self.start + (self.length - 1) * self.step + self.inner if self.length else self.start
        return f"{self.key}[axis {self.axis}, {self.start}:{end}{extra}]"


@dataclass(frozen=True)
class Tap:
    """A place in the traced graph where the group's channels can be observed.

    ``node`` is the fx node name, ``dim`` the tensor dim carrying the channels (1 for NCHW, -1 for
    tokens/channels-last), ``op`` a short description of what produced the value (``relu``, ``add``,
    ``conv``, ``bn`` ...), used by matchers to pick the tap points they prefer.

    ``across`` lists the free groups' channels on the value's *other* axes, as ``(dim, start, group,
    offset, length, inner)`` pieces (positions ``start..`` of axis ``dim`` hold that group's channels
    ``offset..offset+length``, each repeated ``inner`` times). Statistics over positions pair A's and
    B's values position by position, so such a tap sees B's channels only once those axes are aligned
    (a token-mixing MLP's hidden units, laid out (batch, residual channels, hidden)).
    """

    node: str
    dim: int
    op: str
    start: int = 0
    offset: int = 0
    length: int = 0
    across: Tuple[Tuple[int, int, str, int, int, int], ...] = ()

    @property
    def crossed(self) -> bool:
        """Whether another axis carries a free group's channels (see ``across``)."""
        return bool(self.across)


@dataclass
class PermutationGroup:
    """Channels that must be permuted together. ``blocks`` equal contiguous blocks, each permuted
    only within itself (grouped convs, GroupNorm, attention heads); ``frozen`` groups are never permuted.

    ``heads_of`` makes this a *heads group* (multi-head attention): its channels are heads, and its
    permutation moves whole heads. It names the head-block groups (``<proj>:qk``: q's and k's channels,
    ``<proj>:vo``: v's and the output projection's), each ``size`` blocks of one head; its members hold
    their positions in blocks (``inner`` = head dim) beside the per-head tensors (relative-position
    tables' head axis). A permutation is applied in two steps: every other group's first (within heads),
    then the heads groups' (``permute.py``). Empty for every other group (and then not written out).
    """

    name: str
    size: int
    members: List[Member] = field(default_factory=list)
    blocks: int = 1
    frozen: bool = False
    reason: Optional[str] = None
    taps: List[Tap] = field(default_factory=list)
    heads_of: List[str] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    @property
    def is_heads(self) -> bool:
        return bool(self.heads_of)

    @property
    def keys(self) -> List[str]:
        return sorted({m.key for m in self.members})

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.heads_of:  # specs without attention heads read as they always did
            del d["heads_of"]
        for m in d["members"]:
            if not m["stride"]:
                del m["stride"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PermutationGroup:
        d = dict(d)
        d["heads_of"] = list(d.get("heads_of", []))
        d["members"] = [Member(**m) for m in d.get("members", [])]
        d["taps"] = [Tap(**{**t, "across": tuple(tuple(a) for a in t.get("across", ()))}) for t in d.get("taps", [])]
        return cls(**d)


# frozen because they are the model's interface, not because the trace could not follow them
BOUNDARY_REASONS = ("model input channels", "model output")


@dataclass
class PermutationSpec:
    """All permutation groups of one model, plus what the trace learned about its tensors.

    ``channel_free`` lists (key, axis, why) for parameter axes that no permutation touches
    (kernel spatial axes, positional axes); ``unused`` lists state-dict keys the traced forward
    never reads.
    """

    groups: List[PermutationGroup] = field(default_factory=list)
    input_shape: Tuple[int, ...] = ()
    channel_free: List[Tuple[str, int, str]] = field(default_factory=list)
    unused: List[str] = field(default_factory=list)
    model_name: str = ""

    # ---- lookups -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> PermutationGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no permutation group named {name!r}; groups: {[g.name for g in self.groups][:10]}...")

    def __iter__(self):
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def free_groups(self) -> List[PermutationGroup]:
        """The groups a matcher may permute."""
        return [g for g in self.groups if not g.frozen]

    @property
    def num_permutable_channels(self) -> int:
        return sum(g.size for g in self.free_groups)

    @property
    def permutable_fraction(self) -> float:
        """Permutable channels over all hidden channels (1.0 when every hidden channel can be aligned).

        Hidden channels are those of the groups that hold a tensor axis, but the model's input channels
        and outputs, which no merge may permute. A group with no member is an axis of an intermediate
        value only (relative-position logits, an opaque op's output that no weight reads): nothing there
        could be permuted. A heads group moves blocks of channels its head-block groups already count,
        so it adds none; whether heads move is in its own ``frozen`` / ``reason``."""
        def counted(g: PermutationGroup) -> bool:
            return bool(g.members) and not g.heads_of and not (g.frozen and g.reason in BOUNDARY_REASONS)

        hidden = sum(g.size for g in self.groups if counted(g))
        free = sum(g.size for g in self.free_groups if counted(g))
        return free / hidden if hidden else 1.0

    def members_by_key(self) -> Dict[str, List[Tuple[str, Member]]]:
        """key -> [(group name, member)]: derived index, never stored."""
        out: Dict[str, List[Tuple[str, Member]]] = {}
        for g in self.groups:
            for m in g.members:
                out.setdefault(m.key, []).append((g.name, m))
        return out

    # ---- variants --------------------------------------------------------------------------
    def freeze(self, names: Iterable[str], reason: str) -> PermutationSpec:
        """A copy with the groups ``names`` frozen (``reason`` says why), for ablations and for keeping
        part of a model in place. A heads group freezes with its head-block groups and a head-block
        group with its heads group (they move together); frozen groups keep their members and ties."""
        names = set(names)
        unknown = sorted(names - {g.name for g in self.groups})
        if unknown:
            raise SpecError(f"freeze: no group named {unknown[:5]}; the spec's groups are listed by print(spec)")
        for g in self.groups:
            if g.heads_of and (g.name in names or names & set(g.heads_of)):
                names |= {g.name, *g.heads_of}
        out = PermutationSpec.from_dict(self.to_dict())
        for g in out.groups:
            if g.name in names and not g.frozen:
                g.frozen, g.reason = True, reason
        return out

    def without_heads(self) -> PermutationSpec:
        """A copy with every heads group and its head-block groups frozen: residual streams, MLPs and
        convs are aligned, attention is averaged as it stands (the spec before attention heads)."""
        return self.freeze([g.name for g in self.groups if g.heads_of], "attention heads left unaligned (on request)")

    # ---- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "model_name": self.model_name,
            "input_shape": list(self.input_shape),
            "groups": [g.to_dict() for g in self.groups],
            "channel_free": [list(c) for c in self.channel_free],
            "unused": list(self.unused),
        }

    @classmethod
    def from_dict(cls, d: dict) -> PermutationSpec:
        return cls(
            groups=[PermutationGroup.from_dict(g) for g in d["groups"]],
            input_shape=tuple(d.get("input_shape", ())),
            channel_free=[tuple(c) for c in d.get("channel_free", [])],
            unused=list(d.get("unused", [])),
            model_name=d.get("model_name", ""),
        )

    # ---- printing ------------------------------------------------------------------------
    def summary(self) -> str:
        n_free = len(self.free_groups)
        return (
            f"PermutationSpec({self.model_name or 'model'}: {len(self.groups)} groups, {n_free} permutable, "
            f"{self.num_permutable_channels} permutable channels)"
        )

    def table(self, show_frozen: bool = True) -> str:
        rows = [("group", "size", "blocks", "members", "taps", "frozen reason")]
        for g in self.groups:
            if g.frozen and not show_frozen:
                continue
            note = g.reason if g.frozen else (f"moves the heads of {', '.join(g.heads_of)}" if g.heads_of else "")
            rows.append((g.name, str(g.size), str(g.blocks), str(len(g.members)), str(len(g.taps)), note))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = []
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:5], widths)))
                         + ("  " + r[5] if r[5] else ""))
            if k == 0:
                lines.append("-" * (sum(widths) + 2 * 4 + 14))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()

    def __repr__(self) -> str:
        return self.summary()


def iter_members(groups: Iterable[PermutationGroup]):
    for g in groups:
        for m in g.members:
            yield g, m
