"""Permutation specs of small hand-written models: exact groups, frozen reasons, the invariant."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergekit_vision import PermutationSpec, permute, random_perms, trace_permutation_spec
from mergekit_vision.errors import SpecError, TraceError
from mergekit_vision.testing import check_spec


def _spec_ok(model, x):
    res = check_spec(model, x)
    assert res.rel_error < 1e-9, res.spec
    assert res.uncovered == [], res.uncovered
    return res.spec


def _free(spec):
    return {g.name: (g.size, g.blocks) for g in spec.free_groups}


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.c = nn.Conv2d(14, 5, 3, padding=1)

    def forward(self, x):
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))).mean((2, 3))


def test_cat_composes_groups():
    spec = _spec_ok(CatNet(), torch.randn(2, 3, 8, 8))
    # the BN over the concat and c's in-axis hold both groups side by side, each permuted on its own
    assert _free(spec) == {"a": (8, 1), "b": (6, 1)}
    a_members = {(m.key, m.axis, m.start, m.length) for m in spec["a"].members}
    b_members = {(m.key, m.axis, m.start, m.length) for m in spec["b"].members}
    assert {("a.weight", 0, 0, 8), ("bn.weight", 0, 0, 8), ("c.weight", 1, 0, 8)} <= a_members
    assert {("b.weight", 0, 0, 6), ("bn.running_var", 0, 8, 6), ("c.weight", 1, 8, 6)} <= b_members


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.l = nn.Conv2d(8, 8, 3, padding=1)
        self.r = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a, b = torch.chunk(F.relu(self.stem(x)), 2, dim=1)
        return self.out(torch.cat([self.l(a), self.r(b)], 1))


def test_chunk_splits_group_into_blocks():
    spec = _spec_ok(SplitNet(), torch.randn(2, 3, 8, 8))
    # the two halves are used apart: stem permutes within halves; the branches' outputs are their own
    assert _free(spec) == {"stem": (16, 2), "l": (8, 1), "r": (8, 1)}


class GLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, 1)
        return self.out(a * torch.sigmoid(b))


def test_gating_between_halves_ties_them():
    # a * b ties channel i of the first half to channel i of the second: one group of 8, two placements
    spec = _spec_ok(GLUNet(), torch.randn(2, 3, 8, 8))
    assert _free(spec) == {"stem": (8, 1)}
    starts = sorted(m.start for m in spec["stem"].members if m.key == "stem.weight")
    assert starts == [0, 8]


class SEBlock(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return F.relu(x + y * s)


class SENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = SEBlock()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_squeeze_excite():
    spec = _spec_ok(SENet(), torch.randn(2, 3, 8, 8))
    # the gated branch is added to the stream, so conv/bn/fc2 join the stem's group; SE hidden apart
    assert _free(spec) == {"stem": (16, 1), "block.fc1": (4, 1)}
    inner = {m.key for m in spec["stem"].members}
    assert {"block.fc2.weight", "block.fc2.bias", "block.bn.running_var"} <= inner


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 12)
        self.out = nn.Linear(12, 10)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))))


def test_flatten_linear_blocks_of_in_features():
    spec = _spec_ok(FlattenHead(), torch.randn(2, 3, 8, 8))
    assert _free(spec) == {"conv": (8, 1), "fc": (12, 1)}
    (m,) = [m for m in spec["conv"].members if m.key == "fc.weight"]
    assert (m.axis, m.inner, m.length) == (1, 16, 8)


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.gn = nn.GroupNorm(3, 24)
        self.out = nn.Conv2d(24, 5, 1)

    def forward(self, x):
        return self.out(self.gn(F.relu(self.dw(F.relu(self.g(F.relu(self.a(x))))))))


def test_grouped_depthwise_groupnorm():
    spec = _spec_ok(GroupedNet(), torch.randn(2, 3, 8, 8))
    # grouped conv: 4 blocks on its input side; on its output side its 4 blocks of 6 and GroupNorm(3)'s
    # 3 groups of 8 cut the channels into independent runs 6|2|4|4|2|6 (depthwise passes through)
    assert spec["a"].size == 16 and spec["a"].blocks == 4 and not spec["a"].frozen
    g = [spec[n] for n in ("g", "g#2", "g#3", "g#4", "g#5", "g#6")]
    assert [x.size for x in g] == [6, 2, 4, 4, 2, 6] and len(spec.free_groups) == 7
    (m,) = [m for m in spec["a"].members if m.key == "g.weight"]
    assert m.groups == 4


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


class ECANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x)
        s = self.eca(y.mean((2, 3)).unsqueeze(1)).squeeze(1)
        return self.b(y * torch.sigmoid(s)[:, :, None, None])


@pytest.mark.parametrize("model,why", [(ShuffleNet(), "reshape"), (ECANet(), "convolves across a channel axis")])
def test_channel_mixing_freezes_with_reason(model, why):
    spec = _spec_ok(model, torch.randn(2, 3, 8, 8))
    assert spec["a"].frozen and why in spec["a"].reason


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.ones(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


def test_channels_last_layernorm_and_layer_scale():
    spec = _spec_ok(ConvNeXtBlock(), torch.randn(2, 3, 8, 8))
    assert _free(spec) == {"stem": (8, 1), "fc1": (32, 1)}
    keys = {m.key for m in spec["stem"].members}
    assert {"gamma", "norm.weight", "dw.weight", "fc2.bias", "head.weight"} <= keys


def test_input_and_output_are_frozen_and_spec_is_data():
    spec = trace_permutation_spec(SENet(), torch.randn(1, 3, 8, 8))
    assert spec["input"].frozen and spec["head"].frozen and spec["head"].reason == "model output"
    again = PermutationSpec.from_dict(spec.to_dict())
    assert again.to_dict() == spec.to_dict()
    text = str(spec)
    assert "block.fc1" in text and "model output" in text and "blocks" in text


def test_permute_validates_and_never_mutates():
    model = SENet().eval()
    spec = trace_permutation_spec(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(SpecError, match="frozen"):
        permute(model, spec, {"head": torch.arange(10)})
    with pytest.raises(SpecError, match="permutation of range"):
        permute(model, spec, {"stem": torch.arange(15)})
    gspec = trace_permutation_spec(GroupedNet(), torch.randn(1, 3, 8, 8))
    with pytest.raises(SpecError, match="blocks"):
        permute(GroupedNet(), gspec, {"a": torch.arange(16).flip(0)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = permute(model, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    assert type(new) is SENet and new is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in new.state_dict().items())


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Gate()

    def forward(self, x):
        return self.inner(x)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


def test_untraceable_names_module_and_fix():
    with pytest.raises(TraceError) as e:
        trace_permutation_spec(Untraceable(), torch.randn(1, 3, 4, 4))
    msg = str(e.value)
    assert "inner (Gate)" in msg and "leaf_modules=" in msg
    spec = trace_permutation_spec(Untraceable(), torch.randn(1, 3, 4, 4), leaf_modules=["inner"])
    assert spec.free_groups == []


def test_library_rules_register_when_the_library_is_imported_after_mergekit_vision():
    """``import mergekit_vision`` imports neither timm nor torchvision; their rules (timm's
    BatchNormAct2d, torchvision's stochastic depth) apply as soon as a model of theirs is traced."""
    import subprocess
    import sys

    import timm

    code = (
        "import sys, torch, mergekit_vision\n"
        "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules, 'eager import'\n"
        "import timm\n"
        "m = timm.create_model('mobilenetv3_small_050', pretrained=False).eval()\n"
        "spec = mergekit_vision.trace_permutation_spec(m, torch.randn(1, 3, 32, 32))\n"
        "from timm.layers import BatchNormAct2d\n"
        "from mergekit_vision.trace.rules import module_rule\n"
        "assert module_rule(BatchNormAct2d(8)) is not None, 'timm rules not registered'\n"
        "print(len(spec.free_groups), sum(g.size for g in spec.free_groups))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    here = trace_permutation_spec(timm.create_model("mobilenetv3_small_050", pretrained=False).eval(),
                                  torch.randn(1, 3, 32, 32))
    assert [int(v) for v in out] == [len(here.free_groups), sum(g.size for g in here.free_groups)]
    assert len(here.free_groups) > 10


class PadToEven(nn.Module):
    """Branches on its input's size (as TinyViT's block does): fx cannot trace it symbolically."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 2, stride=2)

    def forward(self, x):
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, W % 2, 0, H % 2))
        y = self.conv(x)
        return y.reshape(B, C, -1).mean(-1)  # the batch stays a variable


class SizeBranching(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 8, 3, padding=1), PadToEven(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.block(torch.relu(self.stem(x)))))


@pytest.mark.parametrize("size", [6, 7])
def test_a_module_that_branches_on_sizes_is_traced_at_the_examples_size(size):
    from mergekit_vision import merge
    from mergekit_vision.trace.tracer import trace_model

    model = SizeBranching()
    res = check_spec(model, torch.randn(2, 3, size, size))
    assert res.rel_error < 1e-9 and {g.name for g in res.spec.free_groups} == {"stem", "block.conv"}
    gm = trace_model(model, input_shape=(3, size, size))
    assert gm.meta["specialized"] == ("PadToEven",) and gm.meta["input_shape"] == (3, size, size)
    x = torch.randn(5, 3, size, size)  # another batch size than the trace's examples
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    with pytest.raises(TraceError):  # without a size it is untraceable, as before
        trace_model(model)
    # calibration data of another size than the first batch's: refused with the reason
    with pytest.raises(TraceError, match=rf"runs inputs of shape \(batch, 3, {size}, {size}\) only: PadToEven"):
        merge(model, model, [torch.randn(4, 3, size, size), torch.randn(4, 3, 8, 8)], progress=False)
