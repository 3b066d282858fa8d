"""Apply group permutations to a state dict (pure) or a model (returns a new model).

Convention: ``new[i] = old[perm[i]]`` on every member axis of the group.
"""
from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .errors import SpecError
from .spec import PermutationSpec
from .trace.tracer import TENSOR_CACHES


def check_perm(name: str, perm: torch.Tensor, size: int, blocks: int = 1) -> torch.Tensor:
    """A LongTensor permutation of range(size) that keeps each of ``blocks`` blocks in place."""
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (size,) or not torch.equal(torch.sort(perm).values, torch.arange(size)):
        raise SpecError(f"permutation for group {name!r} must be a permutation of range({size}), got shape "
                        f"{tuple(perm.shape)}")
    if blocks > 1:
        bs = size // blocks
        if not torch.equal(perm // bs, torch.arange(size) // bs):
            raise SpecError(f"permutation for group {name!r} moves channels across its {blocks} blocks of {bs}; "
                            "permute only within blocks")
    return perm


def _position_perm(length: int, members) -> torch.Tensor:
    """Position permutation of one tensor axis from every (member, group perm) that touches it."""
    pp = torch.arange(length)
    for m, perm in members:
        local = perm[m.offset:m.offset + m.length] - m.offset
        if local.numel() and (local.min() < 0 or local.max() >= m.length):
            raise SpecError(f"group permutation moves channels out of the range {m.offset}:{m.offset + m.length} "
                            f"that {m.key!r} axis {m.axis} holds; the spec needs a block constraint here")
        r = torch.arange(m.inner)
        src = (m.start + local[:, None] * m.step + r[None, :]).reshape(-1)
        if m.stride:
            pp[(m.start + torch.arange(m.length)[:, None] * m.step + r[None, :]).reshape(-1)] = src
        else:
            pp[m.start:m.start + m.length * m.inner] = src
    return pp


def permute_tensor(t: torch.Tensor, axis: int, groups: int, members) -> torch.Tensor:
    """Apply ``[(member, group perm)]`` (all on the same axis of ``t``) and return a new tensor."""
    if groups == 1:
        pp = _position_perm(t.shape[axis], members).to(t.device)
        return t.index_select(axis, pp)
    # grouped conv in-axis: each block of output rows sees its own slice of the input permutation
    ipg = t.shape[axis]
    pp = _position_perm(ipg * groups, members)
    opg = t.shape[0] // groups
    blocks = []
    for b in range(groups):
        local = (pp[b * ipg:(b + 1) * ipg] - b * ipg).to(t.device)
        blocks.append(t[b * opg:(b + 1) * opg].index_select(axis, local))
    return torch.cat(blocks, 0)


def checked_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, perm in perms.items():
        g = spec[name]
        if g.frozen:
            raise SpecError(f"group {name!r} is frozen ({g.reason}); it cannot be permuted")
        out[name] = check_perm(name, perm, g.size, g.blocks)
    return out


def stage(spec: PermutationSpec, name: str) -> int:
    """When a group's permutation is applied: 0 for every group, then 1 for heads groups, whose members
    share positions with their head-block groups (whole heads move after channels moved within them)."""
    return 1 if spec[name].heads_of else 0


def _by_axis(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]):
    """(stage, key, axis, conv groups) -> [(member, group perm)] for every non-identity permutation, in
    stage order."""
    by_axis = defaultdict(list)
    for name, perm in checked_perms(spec, perms).items():
        if torch.equal(perm, torch.arange(perm.numel())):
            continue
        for m in spec[name].members:
            by_axis[(stage(spec, name), m.key, m.axis, m.groups)].append((m, perm))
    return dict(sorted(by_axis.items(), key=lambda kv: kv[0][0]))


def permute_staged(t: torch.Tensor, axis: int, groups: int, staged) -> torch.Tensor:
    """``permute_tensor`` for ``[(stage, member, perm)]``: each stage's members applied in turn."""
    for st in sorted({s for s, _, _ in staged}):
        t = permute_tensor(t, axis, groups, [(m, p) for s, m, p in staged if s == st])
    return t


def _missing(key: str) -> SpecError:
    return SpecError(f"the spec names {key!r}, which the state dict does not have; trace the spec from "
                     "the same architecture")


def permute_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """A new state dict with every member of every group in ``perms`` permuted; others shared."""
    out = OrderedDict(state_dict)
    if hasattr(state_dict, "_metadata"):  # module versions (torchvision's MNASNet checks them on load)
        out._metadata = state_dict._metadata
    done = {}
    for (_, key, axis, groups), members in _by_axis(spec, perms).items():
        if key not in out:
            raise _missing(key)
        out[key] = done[key] = permute_tensor(out[key], axis, groups, members)
    # a module registered under two names (coat's position encodings, tied weights) appears in the state
    # dict under every name but in the spec under one: its other names take the same permuted tensor, or
    # load_state_dict would write the unpermuted alias over it
    by_storage = {sid: k for k in done if (sid := _storage_id(state_dict[k])) is not None}
    for key, t in state_dict.items():
        source = by_storage.get(_storage_id(t))
        if source is not None and key not in done:
            out[key] = done[source]
    return out


def _storage_id(t):
    """What makes two state-dict entries one tensor (None for empty or non-tensor entries)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return None
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def clear_tensor_caches(model: nn.Module) -> nn.Module:
    """Empty every ``TENSOR_CACHES`` dict of ``model`` (after its tensors were rewritten), in place."""
    for m in model.modules():
        for attr in TENSOR_CACHES:
            if isinstance(getattr(m, attr, None), dict):
                setattr(m, attr, {})
    return model


def permute(model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """A new model of the same class with the permutations applied; ``model`` is not touched.

    Tensors are permuted one at a time into the copy: peak memory is two models and the largest
    tensor, not three or four models (it matters for billion-parameter checks in float64)."""
    by_key = defaultdict(list)
    for (_, key, axis, groups), members in _by_axis(spec, perms).items():
        by_key[key].append((axis, groups, members))
    source = model.state_dict()
    missing = [k for k in by_key if k not in source]
    if missing:
        raise _missing(missing[0])
    new = copy.deepcopy(model)
    target = new.state_dict()  # detached tensors sharing the copy's storage
    with torch.no_grad():
        for key, axes in by_key.items():
            t = source[key]
            for axis, groups, members in axes:
                t = permute_tensor(t, axis, groups, members)
            target[key].copy_(t)
            del t
    return clear_tensor_caches(new)


def effective_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``perms`` with each head-block group's permutation composed with its heads group's: what the two
    steps do to the group's channels (aligned channel k is B's channel ``out[group][k]``), for code that
    reorders per-channel values of one group (REPAIR's statistics, aligned taps)."""
    out = dict(perms)
    for g in spec.groups:
        if not g.heads_of or g.name not in perms and not any(t in perms for t in g.heads_of):
            continue
        hp = torch.as_tensor(perms.get(g.name, torch.arange(g.size)), dtype=torch.long)
        for t in g.heads_of:
            n = spec[t].size
            w = torch.as_tensor(perms.get(t, torch.arange(n)), dtype=torch.long)
            out[t] = w.view(g.size, n // g.size)[hp].reshape(-1)
    return out


def random_perms(spec: PermutationSpec, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """A random permutation, respecting blocks, for every non-frozen group (for tests and demos)."""
    perms = {}
    for g in spec.free_groups:
        bs = g.block_size
        parts = [torch.randperm(bs, generator=generator) + b * bs for b in range(g.blocks)]
        perms[g.name] = torch.cat(parts)
    return perms
