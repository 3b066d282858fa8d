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

from .merge import align
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
        spec = (trace_permutation_spec(copy.deepcopy(m).float(), x.float()) if copy_model
                else trace_permutation_spec(m, x))
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


def measure_norm_statistics(model: nn.Module, batches) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``batches`` (a plain average, in train mode),
    in place, then eval mode: random weights with *measured* statistics keep every channel alive."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, mom in zip(norms, saved):
        m.momentum = mom
    return model.eval()


@dataclass
class RecoveryCheck:
    spec: PermutationSpec
    report: object  # the MergeReport
    max_weight_error: float  # max |merged - A| over every floating tensor, relative to the tensor's scale
    wrong_groups: Dict[str, float]  # group -> fraction of its member tensors that differ from A's
    max_corr: float  # the largest |matched correlation| the report holds


def check_recovery(model: nn.Module, x: torch.Tensor, seed: int = 0, spec: Optional[PermutationSpec] = None,
                   **merge_kwargs) -> RecoveryCheck:
    """``merge(A, permute(A), [x], repair=False)`` in float32, with A a randomized copy of ``model``
    whose BatchNorm statistics are measured on ``x``: matching must find the inverse permutation of
    every free group and so give back A's weights."""
    a = measure_norm_statistics(randomize_model(copy.deepcopy(model).float(), seed), [x])
    if spec is None:
        spec = trace_permutation_spec(a, x[:1])
    perms = random_perms(spec, torch.Generator().manual_seed(seed + 1))
    b = permute(a, spec, perms)
    aligned = align(a, b, [x], progress=False, **merge_kwargs)
    report = aligned.merge_report
    # aligned B = B permuted back: equal to A's tensors where the assignment is the inverse of perms
    sa, sb = a.state_dict(), aligned.state_dict()
    err = 0.0
    for k, v in sa.items():
        if v.is_floating_point() and v.numel():
            scale = float(v.abs().max()) or 1.0
            err = max(err, float((sb[k] - v).abs().max()) / scale)
    wrong, corr = {}, 0.0
    for g in spec.free_groups:
        r = report.groups.get(g.name)
        if r is not None and r.mean_corr is not None:
            corr = max(corr, abs(r.mean_corr), abs(r.identity_corr or 0.0))
        keys = sorted({m.key for m in g.members})
        differ = [k for k in keys if not torch.allclose(sb[k].float(), sa[k].float(), rtol=1e-5,
                                                        atol=1e-5 * (float(sa[k].abs().max()) or 1.0))]
        if differ:  # a member tensor that is not A's: some channel of the group was misassigned
            wrong[g.name] = len(differ) / len(keys)
    return RecoveryCheck(spec, report, err, wrong, corr)
