"""The fx-traced spec against Torch-Pruning's DependencyGraph (autograd-traced, an independent oracle):
each Conv/Linear's pruning group, as (key, axis, position) slices with their root channel, must be one of
our groups with the same channel identity. What differs by design, and why: docs/spec_oracle.md."""
from __future__ import annotations

import warnings
from typing import Dict, Set, Tuple

import pytest
import timm
import torch
import torchvision
from torch import nn

from mergekit_vision import trace_permutation_spec
from mergekit_vision.spec import PermutationSpec
from mergekit_vision.testing import check_spec

tp = pytest.importorskip("torch_pruning")

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

Position = Tuple[str, int, int]  # (state-dict key, axis, index along the axis)

# models, with their classifier: the one layer whose out-channels are the model output
MODELS = {
    "timm:resnet18": (lambda: timm.create_model("resnet18"), "fc"),
    "timm:resnet26": (lambda: timm.create_model("resnet26"), "fc"),
    "tv:resnet18": (lambda: torchvision.models.resnet18(), "fc"),
    "tv:vgg11_bn": (lambda: torchvision.models.vgg11_bn(), "classifier.6"),
    "tv:mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), "classifier.1"),
    "timm:convnext_atto": (lambda: timm.create_model("convnext_atto"), "head.fc"),
    "timm:resnext26ts": (lambda: timm.create_model("resnext26ts"), "head.fc"),
}


# ---- Torch-Pruning side ------------------------------------------------------------------
def _handler_axes(dg, node, handler) -> Dict[str, int]:
    """Which axis of which tensor a Torch-Pruning handler cuts (see torch_pruning/pruner/function.py)."""
    m = node.module
    if handler in (tp.prune_depthwise_conv_out_channels, tp.prune_depthwise_conv_in_channels):
        return {"weight": 0, "bias": 0}  # a depthwise conv's in- and out-channels are one axis
    if isinstance(m, nn.modules.conv._ConvNd):
        out = dg.is_out_channel_pruning_fn(handler)
        if m.transposed:
            return {"weight": 1, "bias": 0} if out else {"weight": 0}
        return {"weight": 0, "bias": 0} if out else {"weight": 1}
    if isinstance(m, nn.Linear):
        return {"weight": 0, "bias": 0} if dg.is_out_channel_pruning_fn(handler) else {"weight": 1}
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}
    if isinstance(m, nn.LayerNorm):  # timm's LayerNorm2d too: normalized over channels only
        return {"weight": node.pruning_dim, "bias": node.pruning_dim}
    if isinstance(m, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)):
        return {"weight": 0, "bias": 0}
    raise AssertionError(f"no translation for Torch-Pruning's {handler.__name__} on {type(m).__name__}")


def tp_links(dg, group, names: Dict[nn.Module, str]) -> Set[Tuple[Position, int]]:
    """(position, root index) for every parameter/buffer slice a pruning group touches."""
    links = set()
    for item in group:
        node, handler = item.dep.target, item.dep.handler
        m = node.module
        if isinstance(m, nn.Parameter):  # an unwrapped parameter, e.g. ConvNeXt's gamma
            tensors = [(dg._param_to_name[m], m, node.pruning_dim % m.dim())]
        elif m in names:
            tensors = []
            for pname, axis in _handler_axes(dg, node, handler).items():
                t = getattr(m, pname, None)
                if isinstance(t, torch.Tensor):
                    tensors.append((f"{names[m]}.{pname}", t, axis % t.dim()))
        else:
            continue  # add, cat, view, output: no tensors of their own
        for key, t, axis in tensors:
            if t.shape[axis] > 1:
                links.update(((key, axis, i), r) for i, r in zip(item.idxs, item.root_idxs))
    return links


def build_dependency_graph(model: nn.Module, x: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters detected" for ConvNeXt's gamma
        return tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)


# ---- our side ----------------------------------------------------------------------------
def channel_of(spec: PermutationSpec) -> Dict[Position, Tuple[str, int]]:
    """position -> (group name, group channel), each position claimed by one member only."""
    out: Dict[Position, Tuple[str, int]] = {}
    for g in spec.groups:
        for m in g.members:
            for j in range(m.length):
                for r in range(m.inner):
                    pos = (m.key, m.axis, m.start + j * m.inner + r)
                    assert pos not in out, f"{pos} is in {out[pos][0]!r} and in {g.name!r}"
                    out[pos] = (g.name, m.offset + j)
    return out


# ---- the shared checker ------------------------------------------------------------------
def roots(model: nn.Module, dg):
    """(module name, module, pruning fn, axis): the out-channels of every traced Conv/Linear, then the
    in-channels of each; ``check_against_torch_pruning`` skips in-channels an earlier group covered."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and m in dg.module2node]
    for name, m in layers:
        yield name, m, tp.prune_conv_out_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_out_channels, 0
    for name, m in layers:
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1:
            continue  # depthwise: the weight has no in-axis; its channels are the out-channels
        yield name, m, tp.prune_conv_in_channels if isinstance(m, nn.Conv2d) else tp.prune_linear_in_channels, 1


def compare_root(name, module, fn, axis, dg, names, chan):
    """Our slices of the root's channels, and Torch-Pruning's, as two sets, plus broken links."""
    n = module.weight.shape[0] if axis == 0 else (module.in_channels if isinstance(module, nn.Conv2d)
                                                  else module.in_features)
    links = tp_links(dg, dg.get_pruning_group(module, fn, idxs=list(range(n))), names)
    key = f"{name}.weight"
    root_channels = {chan.get((key, axis, i)) for i in range(n)}
    assert None not in root_channels, f"{key} axis {axis} is in no group of ours"
    assert len({g for g, _ in root_channels}) == 1, f"{key} axis {axis} is split over groups {root_channels}"
    ours = {p for p, c in chan.items() if c in root_channels}
    theirs = {p for p, _ in links}
    # the channel identity: a position Torch-Pruning derives from root index r carries r's channel for us
    broken = sorted((p, r) for p, r in links if chan.get(p) != chan[(key, axis, r)])
    return ours, theirs, broken, next(iter(root_channels))[0]


def check_against_torch_pruning(model: nn.Module, head: str, x: torch.Tensor = X) -> None:
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    dg = build_dependency_graph(model, x)
    spec = trace_permutation_spec(model, x)
    chan = channel_of(spec)
    by_name = {g.name: g for g in spec.groups}
    seen_by_tp: Set[Tuple[str, int]] = set()
    failures = []
    for name, module, fn, axis in roots(model, dg):
        if axis == 1 and (f"{name}.weight", 1) in seen_by_tp:
            # in-channels fed by a layer already checked: the same group again. Rooting it here would
            # only cost time (VGG's flattened classifier.0 in-axis: 25088 roots, quadratic in Torch-Pruning)
            continue
        ours, theirs, broken, gname = compare_root(name, module, fn, axis, dg, names, chan)
        seen_by_tp |= {(k, a) for k, a, _ in theirs}
        g = by_name[gname]
        if ours != theirs or broken:
            only_ours = sorted({(k, a) for k, a, _ in ours - theirs})
            only_tp = sorted({(k, a) for k, a, _ in theirs - ours})
            failures.append(f"{name} axis {axis} (our group {gname!r}): only ours {only_ours}, only Torch-Pruning "
                            f"{only_tp}, positions with another channel {broken[:3]}")
        # frozen only where the channels are the model's own input or output
        if name == head and axis == 0:
            assert g.frozen and g.reason == "model output", (gname, g.reason)
        elif g.frozen:
            assert g.reason == "model input channels", f"{gname!r} frozen: {g.reason}"
    assert not failures, "\n".join(failures)
    # a grouped conv: the same sets as Torch-Pruning, plus the conv's blocks on both of its sides
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.out_channels:
            for axis in (0, 1):
                g = by_name[chan[(f"{name}.weight", axis, 0)][0]]
                assert g.blocks == m.groups, f"{name} axis {axis}: {g.name!r} has {g.blocks} blocks, conv {m.groups}"
    # both sides cover the same parameter axes: nothing Torch-Pruning couples is missing from our groups
    ours_axes = {(m.key, m.axis) for g in spec.groups for m in g.members}
    assert seen_by_tp == ours_axes, (sorted(seen_by_tp - ours_axes), sorted(ours_axes - seen_by_tp))


@pytest.mark.slow
@pytest.mark.parametrize("model_id", list(MODELS))
def test_spec_matches_torch_pruning(model_id):
    make, head = MODELS[model_id]
    torch.manual_seed(0)
    check_against_torch_pruning(make(), head)


def test_grouped_conv_keeps_in_and_out_apart():
    """Torch-Pruning 1.6's graph does not link a grouped conv's in- and out-channels (only a depthwise
    conv's); neither do we: the two sides are two groups, each permuted only within its blocks."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1))
    check_against_torch_pruning(model, "6", torch.randn(1, 3, 8, 8))
    spec = trace_permutation_spec(model, torch.randn(1, 3, 8, 8))
    into = next(g for g in spec.groups if any(m.key == "3.weight" and m.axis == 1 for m in g.members))
    out = next(g for g in spec.groups if any(m.key == "3.weight" and m.axis == 0 for m in g.members))
    assert into is not out and into.blocks == out.blocks == 4


class SplitCat(nn.Module):
    """timm's CrossStage (cspresnet50, cspdarknet53) in miniature: split, convolve one half, cat."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.c = c
        self.exp = nn.Conv2d(3, 2 * c, 1)
        self.tb = nn.Conv2d(c, c, 1)
        self.out = nn.Conv2d(2 * c, 5, 1)

    def forward(self, x):
        xs, xb = self.exp(x).split(self.c, dim=1)
        return self.out(torch.cat([xs, self.tb(xb)], dim=1))


def test_split_then_cat_keeps_branch_output_free():
    x = torch.randn(1, 3, 8, 8)
    chan = channel_of(trace_permutation_spec(SplitCat(), x))
    assert chan[("tb.weight", 0, 0)] != chan[("tb.weight", 1, 0)]  # tb's out-channels need not follow its in-channels
    # Torch-Pruning's index mapping through split -> branch -> cat is positional (it maps exp's channel 4 to
    # out's in-position 4, which holds tb's output), so it is no oracle here; the invariant is.
    res = check_spec(SplitCat(), x)
    assert res.rel_error < 1e-9 and res.uncovered == []
