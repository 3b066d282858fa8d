"""Do two models already share one coordinate system? A data-free test before matching.

Models that descend from one set of weights -- fine-tunes of one checkpoint, FedAvg clients after a
round, gossip nodes -- keep their hidden units in the same order: their conv/linear weights, compared
as they are, point the same way. Independently initialized models do not: the cosine of two random
weight tensors of d entries is about 1/sqrt(d) (0.04 for a 3x3 conv of 64 channels), and training from
different seeds keeps it near zero under the arbitrary unit order. Matching such related models on
activations only finds spurious permutations among near-duplicate channels (measured in
docs/recipes/fedavg_align.md), so ``merge``/``merge_many`` keep identity when the median cosine is at
least ``LINEAGE_THRESHOLD``.

The test looks only at the tensors that the free permutation groups reorder (:func:`lineage_keys`):
tensors no group touches (frozen attention, the stem's input channels) are equal in a permuted copy
and would make any model look related to its own permuted copy. And it asks it of every group
(:func:`lineage_groups`: the lowest of the groups' medians), so that a copy with only some groups
reordered -- the attention heads of a ViT, one stage -- is matched, not taken as already aligned.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import torch

# measured: ~0.005 for independent ResNet-20s (init or trained), 0.69 after 2 epochs from one init
LINEAGE_THRESHOLD = 0.2


def lineage_keys(spec) -> List[str]:
    """The state-dict keys the lineage test compares: every tensor a free group permutes."""
    return sorted({m.key for g in spec.free_groups for m in g.members})


def lineage_groups(spec) -> Dict[str, List[str]]:
    """Per free group, the state-dict keys it permutes (what :func:`lineage_cosine` compares group by group)."""
    return {g.name: sorted({m.key for m in g.members}) for g in spec.free_groups}


def weight_cosines(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                   keys: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """Cosine similarity, per conv/linear weight (every floating tensor with 2+ dims; only ``keys`` if
    given), of the two state dicts compared unpermuted."""
    out: Dict[str, float] = {}
    for k in (sd_a if keys is None else keys):
        va, vb = sd_a.get(k), sd_b.get(k)
        if va is None or vb is None or not va.is_floating_point() or va.dim() < 2 or va.shape != vb.shape:
            continue
        a = va.detach().double().flatten()
        b = vb.detach().double().flatten().to(a.device)
        den = float(a.norm() * b.norm())
        if den > 0:
            out[k] = float(a @ b) / den
    return out


def _median(values) -> float:
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else 0.5 * (v[mid - 1] + v[mid])


def lineage_cosine(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                   keys: Optional[Iterable[str]] = None,
                   groups: Optional[Mapping[str, Iterable[str]]] = None) -> float:
    """Median of :func:`weight_cosines` (over ``keys``, e.g. :func:`lineage_keys` of the spec): near 1
    for models of one lineage, near 0 for independent ones (0.0 when no tensor qualifies: match).
    With ``groups`` (:func:`lineage_groups`), the lowest of the groups' medians (groups without a
    conv/linear weight left out): one reordered group is enough to say the models are not aligned."""
    if groups is None:
        cos = weight_cosines(sd_a, sd_b, keys)
        return _median(cos.values()) if cos else 0.0
    cos = weight_cosines(sd_a, sd_b, sorted({k for ks in groups.values() for k in ks}))
    per_group = [_median([cos[k] for k in ks if k in cos]) for ks in groups.values() if any(k in cos for k in ks)]
    return min(per_group) if per_group else 0.0


def shared_lineage(cosines, threshold) -> str | None:
    """Why matching can be skipped -- every model's :func:`lineage_cosine` with the reference is at
    least ``threshold`` -- or None (also when ``threshold`` is None: always match)."""
    if threshold is None or not cosines or min(cosines) < threshold:
        return None
    return (f"shared lineage: median weight cosine >= {min(cosines):.3f} (lineage_threshold={threshold}); "
            "the channels already correspond")
