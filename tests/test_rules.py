"""The rule tables' extension point and the one op vocabulary they share with the taps and sites.

A module fx cannot trace into, made a leaf, is opaque: its channels freeze. A rule registered for it
(``register_module_rule``) makes it understood: the group it touches becomes free, and permuting that
group leaves the model's function unchanged (the float64 invariant of ``check_spec``).
"""
import operator

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from mergekit_vision import ops, trace_permutation_spec
from mergekit_vision.errors import MergeVisionError, TraceError
from mergekit_vision.testing import check_spec
from mergekit_vision.trace import rules
from mergekit_vision.trace.rules import (join_dim, layout_or_none, param_dim, register_function_rule,
                                         register_method_rule, register_module_rule)


class ChannelGain(nn.Module):
    """``x * gain[c]``, with a check on the data that fx cannot trace through."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        if bool(torch.isnan(x).any()):  # data-dependent: fx raises inside this module
            raise ValueError("NaN input")
        return x * self.gain.view(1, -1, 1, 1)


def scaled(x, s):
    return x * s.view(1, -1, 1, 1)


torch.fx.wrap("scaled")  # the graph keeps ``scaled`` as one call_function node


class Net(nn.Module):
    def __init__(self, gain: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.gain = ChannelGain(8) if gain else None
        self.scale = nn.Parameter(torch.ones(8))
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.gain(x) if self.gain is not None else scaled(x, self.scale)
        x = F.relu(self.conv2(F.relu(x)))
        return self.fc(x.mean((2, 3)))


def channel_gain_rule(call):
    """ChannelGain scales channel c by gain[c]: its output carries the input's channels, and gain's
    axis 0 is those channels."""
    lx = layout_or_none(call.largs[0], call.args[0])
    join_dim(call.E, lx[1], param_dim(call, "gain", 0), call.where)
    return lx


def scaled_rule(call):
    lx = layout_or_none(call.largs[0], call.args[0])
    ls = layout_or_none(call.larg(1, "s"), call.arg(1, "s"))
    join_dim(call.E, lx[1], ls[0], call.where)
    return lx


@pytest.fixture
def clean_registry():
    """Registrations made by a test are undone after it."""
    saved = [dict(t) for t in (rules.registry.USER_MODULE_RULES, rules.registry.USER_FUNCTION_RULES,
                               rules.registry.USER_METHOD_RULES)]
    yield
    for table, before in zip((rules.registry.USER_MODULE_RULES, rules.registry.USER_FUNCTION_RULES,
                              rules.registry.USER_METHOD_RULES), saved):
        table.clear()
        table.update(before)


def x64():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def conv1_group(spec):
    return next(g for g in spec.groups if any(m.key == "conv1.weight" and m.axis == 0 for m in g.members))


def test_a_registered_module_rule_frees_what_an_opaque_leaf_froze(clean_registry):
    net = Net().double().eval()
    with pytest.raises(TraceError, match="ChannelGain"):
        trace_permutation_spec(net, x64())
    opaque = trace_permutation_spec(net, x64(), leaf_modules=[ChannelGain])
    assert conv1_group(opaque).frozen and "(ChannelGain) is not understood" in conv1_group(opaque).reason

    assert register_module_rule(ChannelGain)(channel_gain_rule) is channel_gain_rule  # as a decorator
    spec = trace_permutation_spec(net, x64())  # a registered module is traced as a leaf: no leaf_modules=
    g = conv1_group(spec)
    assert not g.frozen and g.size == 8
    assert {(m.key, m.axis) for m in g.members} >= {("conv1.weight", 0), ("bn1.weight", 0), ("gain.gain", 0),
                                                    ("conv2.weight", 1)}
    assert len(spec.free_groups) == len(opaque.free_groups) + 1
    res = check_spec(net, x64(), spec=spec)  # permuting it leaves the function unchanged (float64)
    assert res.rel_error < 1e-9 and res.uncovered == []


def test_a_registered_rule_wins_over_the_built_in_one(clean_registry):
    net = Net().double().eval()
    register_module_rule(ChannelGain, channel_gain_rule)
    before = trace_permutation_spec(net, x64())
    register_module_rule(nn.BatchNorm2d, rules.mixes_channels)  # pretend BatchNorm mixes channels
    after = trace_permutation_spec(net, x64())
    assert not conv1_group(before).frozen
    assert conv1_group(after).frozen and "mixes channels" in conv1_group(after).reason


def test_a_registered_function_rule(clean_registry):
    net = Net(gain=False).double().eval()
    unknown = trace_permutation_spec(net, x64())
    assert conv1_group(unknown).frozen and "scaled" in conv1_group(unknown).reason
    register_function_rule(scaled, scaled_rule)
    spec = trace_permutation_spec(net, x64())
    assert not conv1_group(spec).frozen and ("scale", 0) in {(m.key, m.axis) for m in conv1_group(spec).members}
    res = check_spec(net, x64(), spec=spec)
    assert res.rel_error < 1e-9 and res.uncovered == []


def test_registering_checks_what_it_is_given(clean_registry):
    with pytest.raises(MergeVisionError, match="nn.Module subclass"):
        register_module_rule(len, channel_gain_rule)
    with pytest.raises(MergeVisionError, match="callable taking a RuleCall"):
        register_module_rule(ChannelGain, "not a rule")
    with pytest.raises(MergeVisionError, match="method name"):
        register_method_rule(operator.add, channel_gain_rule)
    assert rules.registry.USER_MODULE_RULES == {}


# ---- one op vocabulary --------------------------------------------------------------------------------
def test_tap_names_are_the_ones_the_fixtures_were_frozen_with():
    """The names the tap policy reads from a spec (``Tap.op``) per kind: the sets the tap policy held
    as literals before the vocabulary, so every merge picks the taps it picked then."""
    assert ops.TAP_NAMES[ops.ACTIVATION] | ops.TAP_NAMES[ops.NORM_ACT] == {
        "relu", "relu_", "gelu", "silu", "hardswish", "mish", "leaky_relu", "elu", "selu", "celu", "relu6",
        "softplus", "hardtanh", "ReLU", "ReLU6", "GELU", "SiLU", "Hardswish", "Mish", "LeakyReLU", "ELU", "SELU",
        "CELU", "Softplus", "Hardtanh", "BatchNormAct2d", "GroupNormAct", "SyncBatchNormAct", "FrozenBatchNormAct2d"}
    assert ops.TAP_NAMES[ops.ADD] == {"add", "iadd", "add_", "__add__"}
    assert ops.TAP_NAMES[ops.NORM] == {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm",
                                       "batch_norm", "layer_norm", "group_norm", "LayerNorm2d"}
    assert ops.TAP_NAMES[ops.PRODUCER] == {"Conv1d", "Conv2d", "Conv3d", "Linear", "conv1d", "conv2d", "conv3d",
                                           "linear"}
    kinds = list(ops.TAP_NAMES.values())
    assert all(not (a & b) for i, a in enumerate(kinds) for b in kinds[i + 1:]), "a name has one kind"
    assert ops.tap_kind("ReLU") == ops.ACTIVATION and ops.tap_kind("view") is None


def test_the_rules_sites_and_taps_read_one_vocabulary():
    from mergekit_vision.match import activation
    from mergekit_vision.repair import sites

    for t in ops.POINTWISE_MODULES:
        assert rules.module_rule(t.__new__(t)) is rules.passthrough, t
    for f in ops.ACTIVATION_FUNCTIONS + ops.ADD_FUNCTIONS:
        assert rules.function_rule(f) in (rules.passthrough, rules.elementwise), f
    for t in ops.PRODUCER_MODULES:
        assert rules.module_rule(t.__new__(t)) is not None
    assert activation.ADD_OPS == ops.TAP_NAMES[ops.ADD]
    assert sites.is_batchnorm is ops.is_batchnorm


def test_a_traced_add_is_an_add_to_the_sites_and_to_the_taps():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return (self.conv(x) + x).add(x)

    gm = torch.fx.symbolic_trace(Res())
    modules = dict(gm.named_modules())
    adds = [n for n in gm.graph.nodes if ops.is_add(n)]
    assert [n.op for n in adds] == ["call_function", "call_method"]
    assert {ops.tap_kind(ops.op_name(n, modules)) for n in adds} == {ops.ADD}
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert ops.tap_kind(ops.op_name(conv, modules)) == ops.PRODUCER


class _Repeats(nn.Module):
    """A conv whose output is repeated along ``dim`` (GCViT repeats a global query along the batch)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).repeat_interleave(2, dim=self.dim)
        return self.fc(y.mean((2, 3))[:, :8])


@pytest.mark.parametrize("dim,free", [(2, True), (0, True), (1, False)])
def test_repeat_interleave_keeps_channels_unless_it_repeats_them(dim, free):
    res = check_spec(_Repeats(dim), torch.randn(2, 3, 6, 6))
    assert res.rel_error < 1e-9
    conv = res.spec["conv"]
    assert conv.frozen != free, conv.reason
    if not free:
        assert "repeats each channel" in conv.reason
