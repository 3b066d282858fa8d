"""merge(): exactness on permuted copies, REPAIR fusion, RESET equivalence, errors, determinism."""
import copy

import pytest
import timm
import torch
from torch import nn

from mergekit_vision import merge, permute, random_perms, trace_permutation_spec
from mergekit_vision.errors import ArchitectureMismatchError, ConfigError, DataError, NumericalError
from mergekit_vision.models import create_model
from mergekit_vision.match.stats import ChannelMoments, channels_last_2d
from mergekit_vision.repair.correct import fuse_affine, fuse_bn_correction
from mergekit_vision.testing import randomize_model


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


def _permuted_pair(model, x, seed=3):
    a = randomize_model(model.eval(), seed=0)
    spec = trace_permutation_spec(a, x[:1])
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(seed)))
    return a, b, spec


ZOO = [
    ("mkv_resnet20_bn", lambda: create_model("resnet20", norm="bn"), 32),
    ("mkv_resnet20_ln", lambda: create_model("resnet20", norm="ln"), 32),
    ("mkv_vgg11_none", lambda: create_model("vgg11", norm="none", width=1), 32),
    ("timm_resnet18", lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), 64),
    ("timm_convnext_atto", lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10), 64),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,build,size", ZOO, ids=[z[0] for z in ZOO])
def test_matching_recovers_a_permutation(name, build, size):
    torch.manual_seed(0)
    x = torch.randn(96, 3, size, size)
    a, b, spec = _permuted_pair(build(), x)
    with torch.no_grad():
        assert _rel(b(x), a(x)) < 1e-5  # same function, different order
        differ = sum(not torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
        assert differ > 0
        merged = merge(a, b, list(x.split(48)), repair=False, progress=False)
        assert _rel(merged(x), a(x)) < 1e-5
        assert all(torch.allclose(v.float(), merged.state_dict()[k].float(), atol=1e-6)
                   for k, v in a.state_dict().items())
        wm = merge(a, b, list(x.split(48)), method="weight", repair=False, progress=False)
        assert _rel(wm(x), a(x)) < 1e-5


@pytest.mark.parametrize("policy", ["lean", "blocks"])
def test_cheaper_tap_policies_recover_a_permutation_with_fewer_taps(policy):
    from mergekit_vision.match.activation import ADD_OPS, tap_plan

    torch.manual_seed(0)
    x = torch.randn(96, 3, 32, 32)
    a, b, spec = _permuted_pair(create_model("resnet20", norm="bn"), x)
    n_all = sum(map(len, tap_plan(spec, "all").values()))
    plan = tap_plan(spec, policy)
    assert sum(map(len, plan.values())) < 0.7 * n_all
    if policy == "blocks":  # each residual stream: one tap per block, at its add
        per_group = {}
        for taps in plan.values():
            for gname, t in taps:
                per_group.setdefault(gname, []).append(t.op)
        streams = [ops for ops in per_group.values() if any(op in ADD_OPS for op in ops)]
        assert len(streams) == 3 and all(set(ops) <= ADD_OPS and len(ops) == 3 for ops in streams)
    with torch.no_grad():
        merged = merge(a, b, list(x.split(48)), repair=False, taps=policy, progress=False)
        assert _rel(merged(x), a(x)) < 1e-5
    with pytest.raises(ConfigError, match="taps"):
        merge(a, b, [x], taps="some", progress=False)


@pytest.mark.parametrize("name", ["mkv_resnet20_bn", "mkv_vgg11_none"])
def test_taps_reuse_repair_channel_moments_without_changing_the_result(name, monkeypatch):
    """Where a tap is also a REPAIR site, the tap takes the site's channel moments: the merge is the same,
    to the bit, as one where every statistic is computed on its own (float64 exposes aliasing too)."""
    from mergekit_vision import calibration
    from mergekit_vision.match import stats

    calls = []
    real_centre = stats.centre  # every batch's channel moments are computed here (sites and taps)
    monkeypatch.setattr(stats, "centre", lambda *a, **k: calls.append(1) or real_centre(*a, **k))
    build = dict((z[0], z[1]) for z in ZOO)[name]
    a = randomize_model(build().double().eval(), seed=0)
    b = randomize_model(build().double().eval(), seed=1)
    x = torch.randn(64, 3, 32, 32, dtype=torch.float64)
    shared, rep = merge(a, b, list(x.split(32)), progress=False, return_report=True)
    n_shared = len(calls)

    made = []

    class Unshared(calibration.SharedMoments):  # a store that keeps nothing: every statistic on its own
        def __init__(self, nodes=()):
            super().__init__(nodes)
            made.append(self)

        def __setitem__(self, key, value):
            pass

    monkeypatch.setattr(calibration, "SharedMoments", Unshared)
    alone, rep2 = merge(a, b, list(x.split(32)), progress=False, return_report=True)
    assert made and len(calls) - n_shared > n_shared  # the patched collector ran, and sharing saved work
    sd = alone.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in shared.state_dict().items())
    assert [g.mean_corr for g in rep.groups.values()] == [g.mean_corr for g in rep2.groups.values()]


def test_weight_matching_tolerance_stops_early_and_keeps_exact_recovery():
    from mergekit_vision.match.weight import match_weights

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    a = randomize_model(create_model("resnet20", norm="bn", width=2).eval(), seed=0)
    b = randomize_model(create_model("resnet20", norm="bn", width=2).eval(), seed=1)
    spec = trace_permutation_spec(a, x[:1])
    runs = {}
    for tol in (0.0, 1e-2):
        history = []
        match_weights(spec, a.state_dict(), b.state_dict(), tol=tol, history=history)
        runs[tol] = history
        assert all(y >= x_ for x_, y in zip(history, history[1:]))  # coordinate ascent never loses
    full, early = runs[0.0], runs[1e-2]
    assert len(early) < len(full) and early == full[:len(early)]  # the same path, cut short
    assert early[-1] > 0.95 * full[-1]
    gains = [y - x_ for x_, y in zip(early, early[1:])]
    assert gains[-1] <= 1e-2 * early[-1] < min(gains[:-1])
    pa, pb, _ = _permuted_pair(create_model("resnet20", norm="bn", width=2), x)
    with torch.no_grad():
        merged = merge(pa, pb, [x], method="weight", weight_tol=0.5, repair=False, progress=False)
        assert _rel(merged(x), pa(x)) < 1e-5  # a loose tolerance still recovers a permuted copy
    with pytest.raises(ConfigError, match="weight_tol"):
        merge(pa, pb, [x], method="weight", weight_tol=-1, progress=False)


def test_weight_matching_skips_groups_whose_neighbours_did_not_move(monkeypatch):
    from mergekit_vision.match import weight

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    a, b, spec = _permuted_pair(create_model("resnet20", norm="bn"), x)
    calls = []
    real = weight.solve_assignment
    monkeypatch.setattr(weight, "solve_assignment", lambda *args: calls.append(1) or real(*args))
    history = []
    perms = weight.match_weights(spec, a.state_dict(), b.state_dict(), tol=0.0, history=history)
    groups = len(spec.free_groups)
    # the last sweep confirms the fixed point: only groups whose neighbours moved after their own
    # assignment in the sweep before are solved again
    assert history[-1] == history[-2] and len(calls) < len(history) * groups
    back = permute(b, spec, perms).state_dict()
    assert all(torch.equal(v, back[k]) for k, v in a.state_dict().items())


def test_merge_with_itself_is_identity_with_and_without_repair():
    torch.manual_seed(0)
    a = randomize_model(create_model("resnet20", norm="bn").eval())
    x = torch.randn(64, 3, 32, 32)
    reset_ref = copy.deepcopy(a)
    with torch.no_grad():
        for mod in reset_ref.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None
        reset_ref.train()(x)
        reset_ref.eval()
        ref = a(x)
        # one calibration batch: batch statistics are the pooled statistics, so REPAIR is exact
        assert _rel(merge(a, a, [x], repair=False, progress=False)(x), ref) < 1e-6
        assert _rel(merge(a, a, [x], repair=True, progress=False)(x), ref) < 1e-3
        # RESET re-estimates BN statistics on the data, exactly as torch's train-mode pass does
        assert _rel(merge(a, a, [x], repair="reset", progress=False)(x), reset_ref(x)) < 1e-4


def test_repair_fused_equals_corrected_and_hits_targets():
    """With one calibration batch the fused model's site statistics equal the REPAIR targets exactly
    (the correction pass uses batch statistics, the fused model pooled ones: the same here)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    for norm in ("none", "ln", "bn"):
        a = randomize_model(create_model("resnet20", norm=norm).eval(), seed=1)
        b = randomize_model(create_model("resnet20", norm=norm).eval(), seed=2)
        merged, rep = merge(a, b, [x], repair=True, return_report=True, progress=False)
        after = [s.var_ratio_after for s in rep.sites.values()]
        assert len(after) > 10
        assert max(abs(r - 1) for r in after) < 1e-3, (norm, after)
        before = [s.var_ratio_before for s in rep.sites.values()]
        assert min(before) < 0.9  # random endpoints: the interpolated net collapses somewhere
        assert set(merged.state_dict()) == set(a.state_dict())


def test_fuse_affine_matches_explicit_affine():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    bn = randomize_model(nn.BatchNorm2d(5)).eval()
    a, c = torch.rand(5) + 0.5, torch.randn(5)
    with torch.no_grad():
        for mod, inp in ((conv, x), (bn, torch.randn(4, 5, 8, 8))):
            ref = mod(inp) * a[None, :, None, None] + c[None, :, None, None]
            fused = copy.deepcopy(mod)
            assert fuse_affine(fused, a, c, "conv") is None
            assert torch.allclose(fused(inp), ref, atol=1e-5)
        nobias = nn.Conv2d(3, 5, 1, bias=False)
        assert "shift" in fuse_affine(nobias, a, c, "conv")


def test_bn_correction_holds_in_eval_and_in_train_mode():
    """The BatchNorm fold keeps the eval function a*BN(x)+c and moves the running statistics to the
    input's, so train mode (batch statistics) computes the same thing on data like the calibration data."""
    torch.manual_seed(0)
    bn = randomize_model(nn.BatchNorm2d(5)).eval()
    x = torch.randn(32, 5, 8, 8) * torch.rand(5)[None, :, None, None] * 3 + torch.randn(5)[None, :, None, None]
    a, c = torch.rand(5) + 0.5, torch.randn(5)
    stats = ChannelMoments()  # what the correction pass measures: the BatchNorm's output
    with torch.no_grad():
        stats.update(channels_last_2d(bn(x), 1))
        ref = bn(x) * a[None, :, None, None] + c[None, :, None, None]
        fused = copy.deepcopy(bn)
        fuse_bn_correction(fused, a, c, stats)
        assert _rel(fused(x), ref) < 1e-5
        assert torch.allclose(fused.running_mean, x.mean((0, 2, 3)), atol=1e-5)
        # train mode: equal up to the unbiased (n/(n-1)) running variance; the old fold is off by O(1)
        assert _rel(fused.train()(x), ref) < 1e-3
        old = copy.deepcopy(bn)
        fuse_affine(old, a, c, "bn")
        assert _rel(old.train()(x), ref) > 0.1


def test_repaired_model_keeps_its_function_in_train_mode():
    """A REPAIRed merge that trains again (fine-tuning, the next federated round) normalizes with batch
    statistics: on the calibration batch it must compute what it computes in eval mode."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    a = randomize_model(create_model("resnet20", norm="bn").eval(), seed=1)
    b = randomize_model(create_model("resnet20", norm="bn").eval(), seed=2)
    merged = merge(a, b, [x], repair=True, progress=False)
    with torch.no_grad():
        ev = merged.eval()(x)
        for mod in merged.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = 0.0  # train-mode forward without touching the running statistics
        tr = merged.train()(x)
    assert _rel(tr, ev) < 1e-3


def test_repair_equals_reset_for_batchnorm_nets():
    """For BN nets whose endpoints' BN statistics are those of the calibration data and whose BN scales
    agree in sign, REPAIR's targets are the interpolated BN affines: REPAIR == RESET."""
    torch.manual_seed(0)
    x = torch.randn(128, 3, 16, 16)

    def endpoint(seed):
        m = randomize_model(create_model("resnet20", norm="bn"), seed=seed)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.weight.abs_()
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            m(x)
        return m.eval()

    a, b = endpoint(1), endpoint(2)
    with torch.no_grad():
        rep = merge(a, b, [x], repair=True, progress=False)
        res = merge(a, b, [x], repair="reset", progress=False)
        assert _rel(rep(x), res(x)) < 2e-3


def test_inputs_untouched_and_deterministic():
    torch.manual_seed(0)
    a = randomize_model(create_model("resnet20", norm="bn"), seed=1).train()
    b = randomize_model(create_model("resnet20", norm="bn"), seed=2).train()
    x = torch.randn(64, 3, 32, 32)
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    m1 = merge(a, b, list(x.split(32)), progress=False)
    m2 = merge(a, b, list(x.split(32)), progress=False)
    assert a.training and b.training  # flags untouched
    assert all(torch.equal(sa[k], v) for k, v in a.state_dict().items())
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in m1.state_dict().items())
    assert not m1.training and type(m1) is type(a)
    assert m1.merge_report.calibration_samples == 64


def test_working_copies_read_the_inputs_weights_in_place():
    """The merge's working models are their own modules (eval mode, the inputs' flags untouched) over the
    inputs' own parameter and buffer tensors (no copy of every input's weights in the merge's peak memory);
    the merged model owns its tensors."""
    from mergekit_vision.merge import prepare_merge
    from mergekit_vision.options import MergeOptions

    a = randomize_model(create_model("resnet20", norm="bn"), seed=1).train()
    b = randomize_model(create_model("resnet20", norm="bn"), seed=2).train()
    x = list(torch.randn(64, 3, 32, 32).split(32))
    prepared = prepare_merge([a, b], x, MergeOptions())
    for src, work in zip((a, b), prepared.models):
        assert work is not src and not work.training and src.training
        for (k, t), (k2, w) in zip(src.state_dict().items(), work.state_dict().items()):
            assert k == k2 and w.data_ptr() == t.data_ptr(), k
    merged = merge(a, b, x, progress=False)
    ptrs = {t.data_ptr() for m in (a, b) for t in m.state_dict().values()}
    assert not ptrs & {t.data_ptr() for t in merged.state_dict().values()}


def test_errors_are_clear():
    a = create_model("resnet20", norm="bn")
    x = torch.randn(8, 3, 32, 32)
    with pytest.raises(ArchitectureMismatchError, match="conv|weight|layer"):
        merge(a, create_model("resnet20", norm="bn", width=2), [x])
    with pytest.raises(ArchitectureMismatchError, match="fc"):
        merge(a, create_model("resnet20", norm="bn", num_classes=7), [x])
    with pytest.raises(DataError, match="empty"):
        merge(a, copy.deepcopy(a), [])
    with pytest.raises(ConfigError, match="alpha"):
        merge(a, copy.deepcopy(a), [x], alpha=1.5)
    with pytest.raises(ConfigError, match="valid"):
        merge(a, copy.deepcopy(a), [x], method="magic")
    with pytest.raises(ConfigError, match="valid"):
        merge(a, copy.deepcopy(a), [x], repair="maybe")
    bad = copy.deepcopy(a)
    with torch.no_grad():
        next(bad.parameters())[0].fill_(float("nan"))
    with pytest.raises(NumericalError, match="model_b"):
        merge(a, bad, [x])
    with pytest.raises(DataError, match="cannot take"):
        merge(a, copy.deepcopy(a), [torch.randn(8, 1, 32, 32)])
    with pytest.raises(DataError, match="calibration data"):
        merge(a, copy.deepcopy(a), None)


def test_stream_repair_folds_exactly_where_it_can():
    """repair="stream" corrects every residual add; projection-shortcut adds fold into both addends'
    BatchNorms, identity-shortcut adds stay explicit ChannelAffine modules. Folded == explicit."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    a = randomize_model(create_model("resnet20", norm="bn").eval(), seed=1)
    b = randomize_model(create_model("resnet20", norm="bn").eval(), seed=2)
    with torch.no_grad():
        same = merge(a, a, [x], repair="stream", progress=False)
        assert _rel(same(x), a(x)) < 1e-4
        folded, rep = merge(a, b, [x], repair="stream", progress=False, return_report=True)
        explicit = merge(a, b, [x], repair="stream", fold_stream=False, progress=False)
        assert _rel(folded(x), explicit(x)) < 1e-5
        adds = {k: s for k, s in rep.sites.items() if s.kind == "add"}
        assert len(adds) == 9 and all(abs(s.var_ratio_after - 1) < 1e-3 for s in adds.values())
        n_affine = sum(1 for n in folded.graph.nodes if str(n.target).startswith("repair_affine."))
        assert n_affine == 7  # 9 blocks, 2 with projection shortcuts
        assert sum(1 for n in explicit.graph.nodes if str(n.target).startswith("repair_affine.")) == 9
        # the default keeps the architecture exactly
        assert type(merge(a, b, [x], progress=False)) is type(a)


def test_merged_model_saves_with_provenance_and_round_trips(tmp_path):
    from mergekit_vision import load_safetensors, save_safetensors
    from mergekit_vision.export import load_into

    torch.manual_seed(0)
    a = randomize_model(create_model("tiny_resnet").eval(), seed=1)
    b = randomize_model(create_model("tiny_resnet").eval(), seed=2)
    x = torch.randn(32, 1, 16, 16)
    merged = merge(a, b, [x], progress=False)
    path = save_safetensors(merged, tmp_path / "m.safetensors")
    sd, meta = load_safetensors(path)
    assert meta["merge_method"] == "activation" and meta["repair"] == "repair" and meta["alpha"] == 0.5
    assert meta["calibration_samples"] == 32 and len(meta["sources"]) == 2
    assert meta["sources"][0]["sha256"] != meta["sources"][1]["sha256"]
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in sd.items())
    fresh = load_into(create_model("tiny_resnet").eval(), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), merged(x))


@pytest.mark.slow
def test_lineage_test_looks_only_at_permuted_tensors():
    """With pit_ti's attention frozen (as it was before heads were matched), most of its tensors are
    equal in a permuted copy (median cosine of all conv/linear weights 1.0), so a lineage test over every
    tensor would skip matching and average A with a scrambled A. Over the tensors the free groups
    permute it sees an unrelated model."""
    from mergekit_vision.match import lineage_cosine

    torch.manual_seed(0)
    a = timm.create_model("pit_ti_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    spec = trace_permutation_spec(a, x[:1])
    for g in spec.groups:
        if g.name.endswith((":qk", ":vo", ":heads")):
            g.frozen, g.reason = True, "frozen by the test"
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(1)))
    assert lineage_cosine(a.state_dict(), b.state_dict()) > 0.99  # what fooled the test over all tensors
    merged, rep = merge(a, b, [x], repair=False, progress=False, return_report=True, spec=spec)
    assert rep.matching_skipped is None and rep.lineage_cosine < 0.2
    assert rep.lineage_keys == sorted({m.key for g in spec.free_groups for m in g.members})
    with torch.no_grad():
        assert torch.allclose(merged(x), a(x), atol=1e-5, rtol=1e-4)


def test_lineage_test_asks_every_group():
    """A copy with one stage's inner groups reordered and the rest as it was: the median over all permuted
    tensors still says 'related' (most are equal), the lowest per-group median does not, so it is matched
    and A comes back."""
    from mergekit_vision.match import lineage_cosine, lineage_groups, lineage_keys

    a = randomize_model(create_model("resnet20", width=1), 0).eval()
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    spec = trace_permutation_spec(a, x[:1])
    one = [g.name for g in spec.free_groups if g.name.startswith("layer3.2.")]
    assert one
    b = permute(a, spec, {n: p for n, p in random_perms(spec, torch.Generator().manual_seed(1)).items() if n in one})
    sa, sb = a.state_dict(), b.state_dict()
    assert lineage_cosine(sa, sb, lineage_keys(spec)) > 0.99  # the median over every permuted tensor
    assert lineage_cosine(sa, sb, groups=lineage_groups(spec)) < 0.2
    merged, rep = merge(a, b, [x], repair=False, progress=False, return_report=True, spec=spec)
    assert rep.matching_skipped is None
    for k, v in sa.items():
        if v.is_floating_point():
            torch.testing.assert_close(merged.state_dict()[k], v, rtol=1e-5, atol=1e-5)


def test_degenerate_calibration_data_is_refused_or_warned_about():
    """One image leaves resnet18's 512-channel groups at one position (no variance); constant images
    carry no information; four images leave the deep groups rank-deficient. Each is said, with the
    group and the number of samples that would do."""
    from mergekit_vision.errors import CalibrationWarning

    torch.manual_seed(0)
    a = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    b = timm.create_model("resnet18", num_classes=10, pretrained=False).eval()
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(DataError, match=r"'layer4\.0\.conv1' \(512 channels\).*at least 512 calibration samples"):
        merge(a, b, [x], max_samples=1, progress=False)
    with pytest.raises(DataError, match="constant"):
        merge(a, b, [torch.zeros(32, 3, 32, 32)], progress=False)
    with pytest.warns(CalibrationWarning, match=r"'layer4\.0\.conv1' \(512 channels, 4 positions\).*at least 512"):
        merge(a, b, [x], progress=False, repair=False)


def test_constant_channels_are_reported():
    from mergekit_vision.errors import CalibrationWarning

    torch.manual_seed(0)
    a = create_model("vgg11", norm="none", width=1).eval()
    with torch.no_grad():
        a.features[0].weight[3] = 0  # channel 3 of the first conv: its bias only, whatever the input
    x = torch.randn(64, 3, 32, 32)
    with pytest.warns(CalibrationWarning, match=r"constant on the calibration data.*\(1 of \d+ in model_a\)"):
        merge(a, copy.deepcopy(a), [x], progress=False, repair=False, lineage_threshold=None)


def test_calibration_samples_count_every_pass_that_read_data():
    """A naive average + RESET reads the data only in its correction pass: the report still says how much."""
    from mergekit_vision import merge_many

    torch.manual_seed(0)
    a, b = create_model("resnet20", norm="bn").eval(), create_model("resnet20", norm="bn").eval()
    x = torch.randn(24, 3, 32, 32)
    _, rep = merge(a, b, list(x.split(8)), method="none", repair="reset", progress=False, return_report=True)
    assert rep.calibration_samples == 24
    _, rep = merge_many([a, b], list(x.split(8)), method="none", repair="reset", progress=False, return_report=True)
    assert rep.calibration_samples == 24


class _SharedConv(nn.Module):
    """One depthwise conv registered under two names and called twice (as coat's position encodings)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.pos = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        for blk in self.blocks:
            blk.pos = self.pos  # the same module, a second name in the state dict
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.blocks[0].pos(x)
        x = torch.relu(self.mid(x))
        x = x + self.blocks[1].pos(x)
        return self.head(x.mean((2, 3)))


def test_a_module_under_two_names_is_permuted_under_both_and_not_corrected_twice():
    from mergekit_vision.permute import permute_state_dict
    from mergekit_vision.testing import check_recovery

    torch.manual_seed(0)
    a = randomize_model(_SharedConv().eval(), 0)
    x = torch.randn(64, 3, 8, 8)
    spec = trace_permutation_spec(a, x[:1])
    perms = random_perms(spec, torch.Generator().manual_seed(1))
    sd = permute_state_dict(a.state_dict(), spec, perms)
    assert torch.equal(sd["pos.weight"], sd["blocks.0.pos.weight"])
    assert torch.equal(sd["pos.weight"], sd["blocks.1.pos.weight"])
    assert not torch.equal(sd["pos.weight"], a.state_dict()["pos.weight"])  # the group did move
    rec = check_recovery(a, x, spec=spec)  # merge(A, permute(A)): A back, every name of the shared conv
    assert rec.wrong_groups == {} and rec.max_weight_error < 1e-6
    b = randomize_model(_SharedConv().eval(), 1)
    out, rep = merge(a, b, list(x.split(16)), progress=False, return_report=True)
    assert not any(s.module == "pos" for s in rep.sites.values())  # one fused correction cannot serve two calls
    assert {s.module for s in rep.sites.values()} >= {"stem", "mid"}
    assert out.pos is out.blocks[0].pos  # the merged model keeps the sharing


def test_batchnorm_without_running_statistics_is_left_to_itself():
    """A BatchNorm built with track_running_stats=False normalizes every batch by itself, in eval mode
    too: no REPAIR site (nothing to fold its correction into; it used to fail in the A/B pass), the
    BatchNorm with running statistics after it still is one, and every repair mode runs."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 3))

    a, b = randomize_model(net().eval(), seed=0), randomize_model(net().eval(), seed=1)
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for repair in (True, "reset", "stream", "lsq"):
        merged, rep = merge(a, b, [x], repair=repair, progress=False, return_report=True)
        assert "_1" not in rep.sites and (repair == "lsq" or "_4" in rep.sites), (repair, sorted(rep.sites))
        assert torch.isfinite(merged(x)).all()
