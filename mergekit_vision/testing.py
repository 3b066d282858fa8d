"""Checks shared by the test-suite and by users who add their own architectures.

``check_spec(model, x)`` verifies the core invariant: permuting every non-frozen group at random
leaves the model's function unchanged (float64), the input model is untouched, and every
parameter axis is accounted for.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .permute import permute, random_perms
from .spec import PermutationSpec
from .trace import trace_permutation_spec


def randomize_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights *and* random norm statistics/affines in place: default statistics (0/1,
    gamma=1, beta=0) hide wrong permutations of BN buffers and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1:
                # norm scales in [0.5, 1): far from the default 1, yet a 300-layer net stays well
                # conditioned, so float64 rounding does not grow past the 1e-9 the invariant asks
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                        if name.endswith("weight") or "gamma" in name or "scale" in name
                        else 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
            else:
                fan_in = max(1, p[0].numel())
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float64) / fan_in ** 0.5).to(p.dtype))
        for name, b in model.named_buffers():
            if not b.is_floating_point():
                continue
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g, dtype=torch.float64).to(b.dtype))
            elif name.endswith("running_var"):
                b.copy_((0.5 + torch.rand(b.shape, generator=g, dtype=torch.float64)).to(b.dtype))
    return model


def _flatten_outputs(y) -> List[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _flatten_outputs(v)]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _flatten_outputs(v)]
    return []


def uncovered_axes(model: nn.Module, spec: PermutationSpec) -> List[Tuple[str, int]]:
    """(key, axis) of size > 1 that are neither a group member, channel-free, nor unused."""
    covered = {(m.key, m.axis) for g in spec.groups for m in g.members}
    covered |= {(k, a) for k, a, _ in spec.channel_free}
    unused = set(spec.unused)
    out = []
    for k, v in model.state_dict().items():
        if k in unused:
            continue
        for a in range(v.dim()):
            if v.shape[a] > 1 and (k, a) not in covered:
                out.append((k, a))
    return out


@dataclass
class SpecCheck:
    spec: PermutationSpec
    rel_error: float
    uncovered: List[Tuple[str, int]]


def _fingerprint(model: nn.Module) -> Dict[str, str]:
    """Exact content digests of every tensor (cheaper in memory than a cloned state dict)."""
    import hashlib

    out = {}
    for k, v in model.state_dict().items():
        out[k] = hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def check_spec(model: nn.Module, x: torch.Tensor, seed: int = 0, spec: Optional[PermutationSpec] = None,
               copy_model: bool = True) -> SpecCheck:
    """Randomize a float64 copy (or ``model`` itself with ``copy_model=False``, for giant models),
    permute all free groups at random, compare outputs."""
    m = randomize_model((copy.deepcopy(model) if copy_model else model).double().eval(), seed)
    x = x.double()
    before = _fingerprint(m)
    flags = [mod.training for mod in m.modules()]
    # the spec does not depend on the dtype: trace a float32 copy (float64 depthwise convs are slow)
    if spec is None:
        spec = trace_permutation_spec(copy.deepcopy(m).float(), x.float()) if copy_model else trace_permutation_spec(m, x)
    with torch.no_grad():
        y = _flatten_outputs(m(x))
        perms = random_perms(spec, torch.Generator().manual_seed(seed + 1))
        m2 = permute(m, spec, perms)
        y2 = _flatten_outputs(m2(x))
        del m2
    assert before == _fingerprint(m), "input model was mutated"
    assert flags == [mod.training for mod in m.modules()], "train/eval flags of the input model changed"
    num = sum(float((a - b).norm() ** 2) for a, b in zip(y, y2)) ** 0.5
    den = sum(float(a.norm() ** 2) for a in y) ** 0.5
    return SpecCheck(spec, num / max(den, 1e-300), uncovered_axes(m, spec))
