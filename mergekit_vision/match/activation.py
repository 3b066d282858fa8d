"""Activation matching: correlate A's and B's channels at each group's tap points, then assign.

Tap policy: a group is observed after its nonlinearities, its norms and its residual adds (what the
next layers see), and at its producers' outputs when no norm shows it before the activation. The
pre-activation view keeps channels that a ReLU silences on the calibration data matchable.
Correlations of all chosen taps of a group are averaged. ``taps="lean"`` drops the post-activation
taps of groups that a norm already shows (the norm output carries the same channels before the
nonlinearity): about half the cross-moment work and memory on BatchNorm ResNets. ``taps="blocks"``
also observes a residual stream once per block, at its adds: a tap costs positions x C^2, and a
bottleneck's stream is 4x wider than the 1x1 convolution writing it, so on ResNet-50 the stream taps
of "all" cost more than the network's own forward. Accuracy and cost of each on trained pairs:
docs/results.md ("Tap policies").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from .. import ops
from ..permute import effective_perms
from ..spec import PermutationGroup, PermutationSpec, Tap
from .assignment import solve_assignment, solve_heads
from .stats import CrossMoments, mean_correlations
from .weight import match_weights

# the op names a tap records, by what the tap policy makes of them (from the one op vocabulary, ops.py)
ACT_OPS = ops.TAP_NAMES[ops.ACTIVATION] | ops.TAP_NAMES[ops.NORM_ACT]  # post-activation outputs
ADD_OPS = ops.TAP_NAMES[ops.ADD]
NORM_OPS = ops.TAP_NAMES[ops.NORM]
PRODUCER_OPS = ops.TAP_NAMES[ops.PRODUCER]


TAP_POLICIES = ("all", "lean", "blocks")


@dataclass(frozen=True)
class GatheredTap(Tap):
    """A group's channels at one node assembled from several ranges of the tap dim, where no single
    range holds them all: per-head q and k rows interleaved with v in one projection (MaxViT, LeViT:
    ``view(B, N, heads, 3 * dim).chunk(3)``). ``pieces``: ``(start, offset, length)`` per range,
    covering the group's channels once, in group order. Made by :func:`select_taps`, never stored in
    a spec. The statistics are keyed by group and node, so the tracks at one node (q's rows, k's
    rows) pool into one cross-moment: both are samples of the same channels."""

    pieces: Tuple[Tuple[int, int, int], ...] = ()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The group's channels of ``x`` along the tap dim, in group order."""
        idx = torch.cat([torch.arange(s, s + n) for s, _, n in self.pieces]).to(x.device)
        return x.index_select(self.dim % x.dim(), idx)


def _gathered(group: PermutationGroup) -> List[GatheredTap]:
    """:class:`GatheredTap` s of ``group``: per (node, dim) without a whole tap, the partial taps laid
    in tracks, in position order, each track taking the ranges that continue it (q's rows of every
    head, then k's: one channel shows twice in a fused projection); every track covering the group
    exactly once is a tap. Only taps that cross no other group (a crossed one is aligned across first)."""
    by: Dict[Tuple[str, int], List[Tap]] = {}
    for t in group.taps:
        if not t.crossed:
            by.setdefault((t.node, t.dim), []).append(t)
    out = []
    for (node, dim), ts in by.items():
        if any(t.offset == 0 and t.length == group.size for t in ts):
            continue
        tracks: List[List[Tap]] = []
        for t in sorted(ts, key=lambda t: t.start):
            track = next((tr for tr in tracks if sum(x.length for x in tr) == t.offset), None)
            if track is None and t.offset == 0:
                tracks.append([t])
            elif track is not None:
                track.append(t)
        for tr in tracks:
            if sum(t.length for t in tr) == group.size and len({t.op for t in tr}) == 1:
                out.append(GatheredTap(node, dim, tr[0].op, tr[0].start, 0, group.size,
                                       pieces=tuple((t.start, t.offset, t.length) for t in tr)))
    return out


def observe_tap(mom: CrossMoments, a: torch.Tensor, b: torch.Tensor, t: Tap, moments=None) -> None:
    """``mom.observe`` of A's and B's values at tap ``t`` (a :class:`GatheredTap` gathers its pieces;
    ``moments``, the values' own over every channel, serve only an ordinary tap)."""
    if isinstance(t, GatheredTap):
        mom.observe(t.gather(a), t.gather(b), t.dim)
    else:
        mom.observe(a, b, t.dim, t.start, t.length, moments=moments)


def select_taps(group: PermutationGroup, policy: str = "all", crossed: bool = False) -> List[Tap]:
    """Post-activation, residual-add and norm outputs; without a norm, the producer's own output too
    (the pre-activation view keeps ReLU-silenced channels matchable). ``policy="lean"``: without the
    post-activation outputs where a norm output is tapped. ``policy="blocks"``: as lean, and a residual
    stream is observed once per block, at its adds (the stream as the next block receives it).

    Only taps whose other axes carry no free group's channels (``Tap.crossed``) are chosen: across
    B's permuted axis, positions pair different channels. ``crossed=True`` chooses among the crossed
    taps instead (for a group that has no other, once the axes they cross are aligned)."""
    if policy not in TAP_POLICIES:
        raise ValueError(f"unknown tap policy {policy!r}; valid: {', '.join(TAP_POLICIES)}")
    full = [t for t in group.taps if t.offset == 0 and t.length == group.size and t.crossed == crossed]
    if not crossed:
        full += _gathered(group)
    chosen = [t for t in full if t.op in ACT_OPS or t.op in ADD_OPS or t.op in NORM_OPS]
    has_norm = any(t.op in NORM_OPS for t in chosen)
    if policy == "blocks" and any(t.op in ADD_OPS for t in chosen):
        chosen = [t for t in chosen if t.op in ADD_OPS]
    elif not has_norm:
        chosen += [t for t in full if t.op in PRODUCER_OPS]
    elif policy != "all":
        chosen = [t for t in chosen if t.op not in ACT_OPS]
    return chosen or full


def tap_plan(spec: PermutationSpec, policy: str = "all") -> Dict[str, List[Tuple[str, Tap]]]:
    """node name -> [(group name, tap)] for every free group's chosen taps (never a crossed one)."""
    plan: Dict[str, List[Tuple[str, Tap]]] = {}
    for g in spec.free_groups:
        for t in select_taps(g, policy):
            plan.setdefault(t.node, []).append((g.name, t))
    return plan


def aligned_tap_plan(spec: PermutationSpec, perms: Dict[str, torch.Tensor], policy: str = "all",
                     ) -> Dict[str, List[Tuple[str, Tap]]]:
    """The crossed taps of the free groups that have no other tap and are not matched yet, where every
    group the tap crosses has a permutation in ``perms`` (so B's value can be aligned on those axes)."""
    plan: Dict[str, List[Tuple[str, Tap]]] = {}
    for g in spec.free_groups:
        if g.name in perms or select_taps(g, policy):
            continue
        for t in select_taps(g, policy, crossed=True):
            if all(a[2] in perms and a[2] != g.name and a[5] == 1 for a in t.across):
                plan.setdefault(t.node, []).append((g.name, t))
    return plan


def align_across(value: torch.Tensor, tap: Tap, spec: PermutationSpec, perms: Dict[str, torch.Tensor]) -> torch.Tensor:
    """B's ``value`` with the axes ``tap`` crosses put in A's channel order (``perms`` as for ``permute``:
    aligned channel i is B's channel ``perm[i]``)."""
    perms = effective_perms(spec, perms)
    by_dim: Dict[int, list] = {}
    for a in tap.across:
        by_dim.setdefault(a[0], []).append(a)
    for d, pieces in by_dim.items():
        idx = torch.arange(value.shape[d])
        where: Dict[str, torch.Tensor] = {}  # group -> position of each of its channels on this axis
        for _, start, gname, off, n, _ in pieces:
            w = where.setdefault(gname, torch.full((spec[gname].size,), -1, dtype=torch.long))
            w[off:off + n] = torch.arange(start, start + n)
        for _, start, gname, off, n, _ in pieces:
            src = where[gname][perms[gname][off:off + n]]
            if bool((src < 0).any()):
                raise ValueError(f"tap {tap.node}: axis {d} does not hold every channel group {gname!r} moves")
            idx[start:start + n] = src
        value = value.index_select(d, idx.to(value.device))
    return value


class PairCollector:
    """Lockstep hooks accumulating A/B cross-moments at every planned tap.

    ``known_moments[(node, k)] = (dim, channel_moments)``, filled by another hook on the same node just
    before this one (REPAIR's endpoint statistics), saves recomputing model ``k``'s channel moments."""

    def __init__(self, spec: PermutationSpec, policy: str = "all", aligned: Dict[str, torch.Tensor] = None):
        """``aligned``: permutations already found; the collector then observes, instead, the crossed
        taps that they make usable (``aligned_tap_plan``), with B's values aligned across."""
        self.spec, self.aligned = spec, aligned
        self.plan = tap_plan(spec, policy) if aligned is None else aligned_tap_plan(spec, aligned, policy)
        self.moments: Dict[Tuple[str, str], CrossMoments] = {}
        self.known_moments: Dict[Tuple[str, int], tuple] = {}

    def hooks(self):
        return {node: self._hook for node in self.plan}

    def _hook(self, node, values):
        a, b = values[0], values[1]
        known = [self.known_moments.pop((node.name, k), None) for k in (0, 1)]
        for gname, t in self.plan[node.name]:
            key = (gname, t.node)
            mom = self.moments.setdefault(key, CrossMoments())
            if t.crossed:
                mom.observe(a, align_across(b, t, self.spec, self.aligned), t.dim, t.start, t.length)
                continue
            moments = None
            if all(kn is not None and kn[0] % a.dim() == t.dim % a.dim() for kn in known) and t.start == 0 \
                    and t.length in (0, a.shape[t.dim]):
                moments = (known[0][1], known[1][1])
            observe_tap(mom, a, b, t, moments)
        return None

    def correlations(self) -> Dict[str, torch.Tensor]:
        """group -> mean correlation matrix over its taps."""
        return mean_correlations((gname, mom) for (gname, _), mom in self.moments.items())


BLIND_NOTE = "matched on weights: no channel varies on the calibration data at any of its taps"


def blind_groups(corrs: Dict[str, torch.Tensor], spec: PermutationSpec = None) -> List[str]:
    """Groups whose correlation matrix is all zero: the calibration data shows none of their channels
    varying (e.g. an MLP fed a constant), so activations carry no evidence for their assignment; with
    ``spec``, also the free groups no activation shows at all (the heads inside a leaf
    ``nn.MultiheadAttention``)."""
    out = [g for g, c in corrs.items() if not bool((c != 0).any())]
    if spec is not None:
        out += [g.name for g in spec.free_groups if not g.taps and g.name not in corrs]
    return out


def match_blind_by_weights(spec: PermutationSpec, corrs: Dict[str, torch.Tensor], perms: Dict[str, torch.Tensor],
                           sd_a, sd_b, **weight_kwargs) -> Dict[str, str]:
    """Assign the :func:`blind_groups` by weight matching, every other group held at its activation
    assignment (``perms`` is updated); returns a note per group so handled."""
    blind = blind_groups(corrs, spec)
    if not blind:
        return {}
    found = match_weights(spec, sd_a, sd_b, init=perms, only=blind, **weight_kwargs)
    blind += [t for g in blind for t in spec[g].heads_of if t not in blind]  # a heads group moves with its blocks
    perms.update({g: found[g] for g in blind})
    return {g: BLIND_NOTE for g in blind}


def match_from_correlations(spec: PermutationSpec, corrs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    perms = {}
    for g in spec.free_groups:
        if g.name in corrs and not g.heads_of:
            perms[g.name] = solve_assignment(corrs[g.name], g.blocks)
    for g in spec.free_groups:  # heads: on their head-block groups' correlations (q/k outputs, v outputs)
        if g.heads_of and all(t in corrs for t in g.heads_of):
            perms[g.name], within = solve_heads([corrs[t] for t in g.heads_of], g.size)
            perms.update(zip(g.heads_of, within))
    return perms
