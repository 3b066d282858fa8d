"""Stage 3: interpolate aligned state dicts, ``(1 - alpha) * a + alpha * b``."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Sequence

import torch


def interpolate_state_dicts(sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor],
                            alpha: float) -> Dict[str, torch.Tensor]:
    return weighted_average([sd_a, sd_b], [1.0 - alpha, alpha])


def weighted_average(state_dicts: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float]) -> Dict[str, torch.Tensor]:
    """Weighted sum of floating tensors (weights need not sum to 1: extrapolation is allowed).
    Integer buffers (``num_batches_tracked``) get the rounded weighted sum; bools the first's."""
    out: Dict[str, torch.Tensor] = OrderedDict()
    if hasattr(state_dicts[0], "_metadata"):
        out._metadata = state_dicts[0]._metadata  # type: ignore[attr-defined]
    for key, t0 in state_dicts[0].items():
        if t0.is_floating_point() or t0.is_complex():
            acc = torch.zeros_like(t0, dtype=torch.float64 if t0.dtype != torch.float64 else t0.dtype)
            for sd, w in zip(state_dicts, weights):
                acc += float(w) * sd[key].to(acc.dtype)
            out[key] = acc.to(t0.dtype)
        elif t0.dtype == torch.bool:
            out[key] = t0.clone()
        else:
            acc = sum(float(w) * sd[key].to(torch.float64) for sd, w in zip(state_dicts, weights))
            out[key] = torch.round(acc).to(t0.dtype)
    return out
