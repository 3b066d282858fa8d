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
and would make any model look related to its own permuted copy.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import torch

# measured: ~0.005 for independent ResNet-20s (init or trained), 0.69 after 2 epochs from one init
LINEAGE_THRESHOLD = 0.2


def lineage_keys(spec) -> List[str]:
    """The state-dict keys the lineage test compares: every tensor a free group permutes."""
    return sorted({m.key for g in spec.free_groups for m in g.members})


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


def lineage_cosine(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                   keys: Optional[Iterable[str]] = None) -> float:
    """Median of :func:`weight_cosines` (over ``keys``, e.g. :func:`lineage_keys` of the spec): near 1
    for models of one lineage, near 0 for independent ones (0.0 when no tensor qualifies: match)."""
    cos = sorted(weight_cosines(sd_a, sd_b, keys).values())
    if not cos:
        return 0.0
    mid = len(cos) // 2
    return cos[mid] if len(cos) % 2 else 0.5 * (cos[mid - 1] + cos[mid])


def shared_lineage(cosines, threshold) -> str | None:
    """Why matching can be skipped -- every model's :func:`lineage_cosine` with the reference is at
    least ``threshold`` -- or None (also when ``threshold`` is None: always match)."""
    if threshold is None or not cosines or min(cosines) < threshold:
        return None
    return (f"shared lineage: median weight cosine >= {min(cosines):.3f} (lineage_threshold={threshold}); "
            "the channels already correspond")
