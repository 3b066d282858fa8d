"""The lockstep engine and the tracer under it: tracing leaves a model as it was, every model runs with
its own traced constants, and real models whose forward caches or folds tensors merge without crashing.
"""

import pytest
import timm
import torch
from torch import nn

from mergekit_vision import merge
from mergekit_vision.engine import Lockstep, shared_graph
from mergekit_vision.errors import MergeVisionError
from mergekit_vision.permute import permute, random_perms
from mergekit_vision.trace import trace_model, trace_permutation_spec


class CachingBias(nn.Module):
    """A bias computed from a parameter and cached in eval mode, as timm's LeViT attention does."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.table = nn.Parameter(torch.randn(c, 3))
        self.register_buffer("idx", torch.tensor([2, 0, 1]), persistent=False)
        self.cache = {}

    def bias(self, key="any"):
        if self.training:
            return self.table[:, self.idx]
        if key not in self.cache:
            self.cache[key] = self.table[:, self.idx]
        return self.cache[key]

    def forward(self, x):
        return self.conv(x) + self.bias().sum(1)[None, :, None, None]


class FoldedBuffer(nn.Module):
    """A buffer that fx does not proxy: ``scale.view(-1)`` becomes a ``_tensor_constant`` of the trace."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.register_buffer("scale", torch.randn(c, 1))

    def forward(self, x):
        return self.conv(x) * self.scale.view(-1)[None, :, None, None]


def _all_attrs(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def test_tracing_leaves_the_model_as_it_was_and_traces_again():
    m = CachingBias().eval()
    before = _all_attrs(m)
    gm1, gm2 = trace_model(m), trace_model(m)  # the second trace used to reuse the first's Proxy
    assert m.cache == {} and _all_attrs(m).keys() == before.keys()
    for name, attrs in _all_attrs(m).items():
        assert attrs.keys() == before[name].keys(), name
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        for gm in (gm1, gm2):
            gm.graph.lint()
            torch.testing.assert_close(gm(x), m(x))


def test_fx_constants_stay_on_the_graph_module_not_the_model():
    m = FoldedBuffer().eval()
    gm = trace_model(m)
    consts = [n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("_tensor_constant")]
    assert consts, "the test needs a folded constant"
    assert not any(k.startswith("_tensor_constant") for k in vars(m))


def test_lockstep_runs_every_model_with_its_own_constants():
    """Swin's ``relative_position_index.view(-1)`` is such a constant: each model's own value must be used."""
    a, b = FoldedBuffer().eval(), FoldedBuffer().eval()
    gm = shared_graph(a)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ya, yb = Lockstep([a, b], gm).run(x)
        torch.testing.assert_close(ya, a(x))
        torch.testing.assert_close(yb, b(x))
        with pytest.raises(MergeVisionError, match="GraphModule"):
            Lockstep([b], gm.graph)  # a bare graph cannot say how to make b's constants


def test_lockstep_refuses_a_model_whose_state_changes_its_graph():
    a, b = CachingBias().eval(), CachingBias().eval()
    with torch.no_grad():
        a(torch.randn(1, 3, 2, 2))  # a's cache is warm: its trace reads a constant, b's reads the table
    with pytest.raises(MergeVisionError, match="different graph"):
        Lockstep([a, b], shared_graph(a))


def _merge_permuted(model, size, n=2, modes=(False, True)):
    model = model.eval()
    x = torch.randn(n, 3, size, size)
    spec = trace_permutation_spec(model, x[:1])
    b = permute(model, spec, random_perms(spec, torch.Generator().manual_seed(1)))
    outs = []
    for repair in modes:
        merged = merge(model, b, [x], repair=repair, progress=False, lineage_threshold=None)
        with torch.no_grad():
            y = merged(x)
        assert torch.isfinite(y).all()
        outs.append(y)
    return outs


def _small_swin():
    # the same modules as swin_tiny_patch4_window7_224 (folded relative-position constants), at 64 px
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=64,
                             window_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))


@pytest.mark.slow
def test_merge_runs_on_a_model_with_traced_constants(one_thread):
    # "stream" keeps explicit ChannelAffine modules: the returned GraphModule needs the constants too
    _merge_permuted(_small_swin(), 64, modes=(False, True, "stream"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levit_128s", "efficientformerv2_s0"])
def test_merge_runs_on_models_that_cache_attention_biases(name, one_thread):
    _merge_permuted(timm.create_model(name, pretrained=False, num_classes=10), 224)


class OptionalArgs(nn.Module):
    """``forward(x, mask=None)`` as timm's Hiera, and a flag with a default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, mask=None, *, pre_logits: bool = False):
        x = self.conv(x)
        if mask is not None:
            x = x * mask
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)


def test_forward_arguments_with_defaults_are_traced_at_their_defaults():
    m = OptionalArgs().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = trace_model(m)
    tensors_in = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    assert [n.name for n in tensors_in] == ["x"]  # the others are placeholders with their default
    spec = trace_permutation_spec(m, x[:1])
    assert [g.size for g in spec.free_groups] == [4]
    with torch.no_grad():
        (y,) = Lockstep([m], shared_graph(m)).run(x)
        torch.testing.assert_close(y, m(x))


@pytest.mark.slow
def test_hiera_traces_keeps_its_function_under_permutation_and_merges(one_thread):
    from mergekit_vision.testing import check_spec

    m = timm.create_model("hiera_tiny_224", pretrained=False, num_classes=10).eval()
    res = check_spec(m, torch.randn(1, 3, 224, 224))
    assert res.rel_error < 1e-9 and res.uncovered == [] and res.spec.free_groups
    b = permute(m, res.spec, random_perms(res.spec, torch.Generator().manual_seed(1)))
    x = torch.randn(2, 3, 224, 224)
    merged = merge(m, b, [x], repair=False, progress=False, lineage_threshold=None, spec=res.spec)
    with torch.no_grad():
        assert torch.isfinite(merged(x)).all()


def _small_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=64, patch_size=16, embed_dim=32, num_blocks=2)


def test_token_mixing_taps_record_the_axis_they_cross():
    from mergekit_vision.match import select_taps
    from mergekit_vision.spec import PermutationSpec

    m = _small_mixer().eval()
    spec = trace_permutation_spec(m, torch.randn(1, 3, 64, 64))
    tokens = [g for g in spec.free_groups if "mlp_tokens" in g.name]
    assert len(tokens) == 2
    stream = spec["stem.proj"]
    assert not stream.frozen and not any(t.crossed for t in stream.taps if t.dim == 2)
    for g in tokens:  # (batch, residual channels, hidden): the positions are B's permuted channels
        assert g.taps and all(t.crossed for t in g.taps)
        assert all({a[2] for a in t.across} == {"stem.proj"} for t in g.taps)
        assert select_taps(g) == [] and select_taps(g, crossed=True)
    assert PermutationSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()
    assert [t.across for g in PermutationSpec.from_dict(spec.to_dict()).groups for t in g.taps] == \
        [t.across for g in spec.groups for t in g.taps]


def test_merge_recovers_a_permuted_token_mixing_mlp():
    from mergekit_vision.testing import randomize_model

    m = randomize_model(_small_mixer()).eval()
    x = torch.randn(4, 3, 64, 64)
    spec = trace_permutation_spec(m, x[:1])
    b = permute(m, spec, random_perms(spec, torch.Generator().manual_seed(1)))
    merged, report = merge(m, b, [x[:2], x[2:]], repair=False, progress=False, return_report=True,
                           lineage_threshold=None)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, msg=k)
    tokens = {n: g for n, g in report.groups.items() if "mlp_tokens" in n}
    assert tokens and all(abs(g.mean_corr - 1) < 1e-4 for g in tokens.values()), tokens
    assert all("aligned by stem.proj" in g.note for g in tokens.values())
    assert all(g.note is None for n, g in report.groups.items() if n not in tokens)


def test_merge_many_recovers_permuted_token_mixing_mlps():
    """The crossed-tap pass serves N models: every copy's token-mixing units are matched to the reference."""
    from mergekit_vision import merge_many
    from mergekit_vision.testing import randomize_model

    m = randomize_model(_small_mixer()).eval()
    x = torch.randn(4, 3, 64, 64)
    spec = trace_permutation_spec(m, x[:1])
    copies = [permute(m, spec, random_perms(spec, torch.Generator().manual_seed(s))) for s in (1, 2)]
    merged, report = merge_many([m] + copies, [x[:2], x[2:]], iterations=0, repair=False, progress=False,
                                return_report=True, lineage_threshold=None)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, msg=k)
    tokens = {n: rs for n, rs in report.rows.items() if "mlp_tokens" in n}
    assert tokens and all(abs(r.mean_corr - 1) < 1e-4 for rs in tokens.values() for r in rs[1:]), tokens
    assert all("aligned by stem.proj" in r.note for rs in tokens.values() for r in rs[1:])
