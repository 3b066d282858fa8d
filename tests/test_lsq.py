"""Least-squares repair (repair="lsq", mergekit_vision/repair/lsq.py): exactness on models it must give
back, the fold, grouped/depthwise/strided/dilated layouts, N models, determinism, pooled statistics,
ill-posed systems and the options' checks. Float64 wherever exactness is claimed."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergekit_vision import merge, merge_many
from mergekit_vision.calibration import LocalCollector
from mergekit_vision.engine import shared_graph
from mergekit_vision.errors import CalibrationWarning, ConfigError, DataError
from mergekit_vision.models import create_model
from mergekit_vision.permute import permute, random_perms
from mergekit_vision.repair.lsq import (LsqRound, LsqStats, dual_solve, find_lsq_sites, layer_map, logit_sites,
                                        lsq_pass, lsq_rounds, memory_budget, patch_rows, patches, prob_target,
                                        relative_residual, ridge_solve, rows_residual)
from mergekit_vision.testing import measure_norm_statistics, randomize_model
from mergekit_vision.trace import trace_permutation_spec

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class Mixed(nn.Module):
    """Every layout the fit handles: strided conv->BN, dilated grouped conv with bias and no norm,
    depthwise conv without bias before a GroupNorm, 1x1 conv->BN, a BatchNorm on a ReLU (per-channel
    fit), a Conv1d, a linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c3, self.gn = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.GroupNorm(2, 8)
        self.c4, self.bn4 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.bn5 = nn.BatchNorm2d(6)
        self.c5 = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.c2(x))
        x = F.relu(self.gn(self.c3(x)))
        x = self.bn5(F.relu(self.bn4(self.c4(x))))
        x = F.relu(self.c5(x.flatten(2)))
        return self.fc(x.mean(-1))


def _mixed(seed, batches):
    return measure_norm_statistics(randomize_model(Mixed().to(f64), seed), batches)


def _batches(n=3, size=24, shape=(3, 12, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=g, dtype=f64) for _ in range(n)]


def _tiny(norm, seed, batches):
    m = randomize_model(create_model("tiny_resnet", width=4, norm=norm, in_chans=3).to(f64), seed)
    return measure_norm_statistics(m, batches)


def test_sites_cover_every_layout():
    gm = shared_graph(Mixed())
    sites, skipped = find_lsq_sites(gm)
    got = {(s.module, s.kind, s.bn, s.bias) for s in sites}
    assert got == {("c1", "conv", "bn1", True), ("c2", "conv", None, True), ("c3", "conv", None, False),
                   ("c4", "conv", "bn4", True), ("bn5", "bn", None, True), ("c5", "conv", None, True),
                   ("fc", "linear", None, True)}
    assert not skipped
    assert [s.module for s in sites] == ["c1", "c2", "c3", "c4", "bn5", "c5", "fc"]  # graph order


def test_refit_to_another_model_gives_its_function():
    """Each layout's fit is exact: a random net C refit to a single target net A (of the same
    architecture, tiny ridge, every position) becomes A's function, on the calibration data and off it.
    (A GroupNorm's affine is no fit's business: C gets A's, so that A's function is reachable.)"""
    calib = _batches()
    a, c = _mixed(1, calib), _mixed(2, calib)
    c.gn.load_state_dict(a.gn.state_dict())
    gm = shared_graph(c)
    res = lsq_pass(c, [a], [1.0], gm, calib, ridge=1e-12, positions=None)
    fresh = _batches(1, seed=5)[0]
    with torch.no_grad():
        assert _rel(c(calib[0]), a(calib[0])) < 1e-7
        assert _rel(c(fresh), a(fresh)) < 1e-7
    for value, fit in res.fits.items():
        assert fit.residual_after < 1e-10, value
        assert fit.residual_before > 1e-3, value  # C started elsewhere


class CachedBias(nn.Module):
    """A per-channel bias computed from a parameter and kept in ``attention_bias_cache`` after the first
    eval forward, as timm's LeViT/EfficientFormer attention do: a traced graph then reads the cached
    tensor as a constant of the model it traced."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 1, bias=False)
        self.table = nn.Parameter(torch.randn(6, 2))
        self.fc = nn.Linear(6, 4)
        self.attention_bias_cache = {}

    def bias(self):
        if self.training:
            return self.table.sum(1)
        if "b" not in self.attention_bias_cache:
            self.attention_bias_cache["b"] = self.table.sum(1)
        return self.attention_bias_cache["b"]

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.c2(x) + self.bias()[None, :, None, None])
        return self.fc(x.mean((2, 3)))


def test_models_evaluated_before_the_merge_merge_with_their_own_cached_tensors():
    """Models whose caches an eval forward filled (a user evaluates them first) trace to the graph of
    their tensors, not of their caches: the merge runs (it used to refuse: "traces to a different
    graph"), and at alpha = 1 least squares gives back B's function (the walk's endpoint is a copy of A's
    module loaded with B's tensors: with A's cache it would fit a hybrid)."""
    calib = _batches(2, size=16, shape=(3, 6, 6))
    a, b = (measure_norm_statistics(randomize_model(CachedBias().to(f64), s), calib) for s in (1, 2))
    with torch.no_grad():  # an eval forward fills each model's cache, as evaluating it before a merge does
        want = b(calib[0])
        a(calib[0])
    cached = a.attention_bias_cache["b"]
    merged = merge(a, b, calib, alpha=1.0, repair="lsq", lsq_ridge=1e-12, lsq_positions=None, progress=False)
    with torch.no_grad():
        assert _rel(merged(calib[0]), want) < 1e-6
    assert a.attention_bias_cache["b"] is cached  # the inputs keep their caches
    # the trace computes the bias from its parameter, so the parameter is permuted with its channels
    spec = trace_permutation_spec(a, calib[0][:1])
    assert any(m.key == "table" for g in spec.free_groups for m in g.members)
    with torch.no_grad():
        assert _rel(permute(a, spec, random_perms(spec, torch.Generator().manual_seed(0)))(calib[0]),
                    a(calib[0])) < 1e-12


def test_fused_model_computes_the_fitted_maps():
    """After a merge-like fit to two different nets, every fitted layer of the fused model outputs exactly
    its fitted affine map of its own input (BatchNorm output for conv->BN), in eval mode."""
    calib = _batches()
    a, b, m = _mixed(1, calib), _mixed(2, calib), _mixed(3, calib)
    gm = shared_graph(m)
    sites, _ = find_lsq_sites(gm)
    res = lsq_pass(m, [a, b], [0.3, 0.7], gm, calib, ridge=1e-3, positions=None)
    mods = dict(m.named_modules())
    seen = {}
    hooks = []
    for s in sites:
        inp = mods[s.module]
        out = mods[s.bn] if s.bn else inp
        hooks.append(inp.register_forward_hook(lambda mod, args, o, s=s: seen.__setitem__((s.value, "x"), args[0])))
        hooks.append(out.register_forward_hook(lambda mod, args, o, s=s: seen.__setitem__((s.value, "y"), o)))
    x = _batches(1, seed=7)[0]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    for s in sites:
        w = res.fits[s.value].w
        xs, ys = patches(seen[(s.value, "x")], seen[(s.value, "y")], mods[s.module], s.kind)
        pred = xs @ w[:, :-1] + w[:, -1:]
        assert _rel(ys, pred) < 1e-10, s.module
        assert res.fits[s.value].residual_after <= res.fits[s.value].residual_before + 1e-12, s.module


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_merge_with_itself_and_with_its_permutation_gives_it_back(norm):
    calib = _batches(2, 16, (3, 16, 16))
    a = _tiny(norm, 1, calib)
    spec = trace_permutation_spec(a, calib[0][:1])
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(3)))
    x = _batches(1, 8, (3, 16, 16), seed=9)[0]
    with torch.no_grad():
        want = a(x)
        for other in (a, b):
            got = merge(a, other, calib, repair="lsq", progress=False, lsq_positions=None)
            assert _rel(got(x), want) < 1e-9
            assert list(got.state_dict()) == list(a.state_dict()) and type(got) is type(a)


def test_a_vit_with_its_heads_permuted_comes_back():
    """Linear sites inside attention and MLP, heads and channels within heads permuted; the traced graph
    has a further input fixed by the trace (timm's ``attn_mask=None``), which the walk must give its
    default, not the batch."""
    import timm

    a = randomize_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                          depth=2, num_classes=10), 0).double().eval()
    calib = [b.double() for b in _batches(2, 16, (3, 32, 32))]
    spec = trace_permutation_spec(a, calib[0][:1])
    assert any(g.heads_of and not g.frozen for g in spec.groups)
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(3)))
    x = _batches(1, 4, (3, 32, 32), seed=9)[0].double()
    with torch.no_grad():
        got, rep = merge(a, b, calib, repair="lsq", progress=False, return_report=True)
        assert _rel(got(x), a(x)) < 1e-9
    fitted = {n for n, site in rep.sites.items() if site.residual_after is not None}
    # the patch embedding, q/k/v, the output projection and both MLP linears of each block, the head
    assert len(fitted) == 10 and {"blocks_1_attn_qkv", "blocks_1_attn_proj", "blocks_1_mlp_fc2"} <= fitted, fitted


def test_merge_many_three_permuted_copies_gives_the_model_back_and_reports_fits():
    calib = _batches(2, 16, (3, 16, 16))
    a = _tiny("bn", 1, calib)
    spec = trace_permutation_spec(a, calib[0][:1])
    others = [permute(a, spec, random_perms(spec, torch.Generator().manual_seed(s))) for s in (3, 4)]
    x = _batches(1, 8, (3, 16, 16), seed=9)[0]
    merged, rep = merge_many([a] + others, calib, weights=[1, 2, 3], repair="lsq", progress=False,
                             return_report=True, lsq_positions=None)
    with torch.no_grad():
        assert _rel(merged(x), a(x)) < 1e-9
    assert rep.repair == "lsq"
    fitted = [s for s in rep.sites.values() if s.residual_after is not None]
    assert len(fitted) == len(find_lsq_sites(shared_graph(a))[0])
    assert all(s.residual_after < 1e-12 for s in fitted)  # the targets are A's own features
    assert "least-squares fits" in rep.summary()


def test_three_different_models_deterministic_inputs_untouched_train_consistent():
    """N = 3 different nets: the merge is bit-for-bit repeatable (positions subsampled), leaves the
    inputs as they were, fits better than the average everywhere, and the BatchNorm fold holds in train
    mode on the calibration batch."""
    calib = [torch.randn(48, 3, 16, 16, dtype=f64, generator=torch.Generator().manual_seed(0))]
    models = [_tiny("bn", s, calib) for s in (1, 2, 3)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    kw = dict(repair="lsq", progress=False, return_report=True, lsq_positions=20)
    m1, rep = merge_many(models, calib, **kw)
    m2, _ = merge_many(models, calib, **kw)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    for m, sd in zip(models, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
        assert not m.training
    fits = [s for s in rep.sites.values() if s.residual_after is not None]
    assert fits and all(s.residual_after < s.residual_before for s in fits)
    with torch.no_grad():
        ev = m1.eval()(calib[0])
        for mod in m1.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.momentum = 0.0
        tr = m1.train()(calib[0])
    assert _rel(tr, ev) < 1e-3


def test_statistics_of_two_shards_pool_to_the_whole():
    m = Mixed().to(f64)
    x = torch.randn(10, 8, 6, 6, dtype=f64)
    y = torch.randn(10, 8, 6, 6, dtype=f64)
    whole = LsqStats().observe(*patches(x, y, m.c2, "conv"))
    parts = LsqStats().observe(*patches(x[:3], y[:3], m.c2, "conv")) + LsqStats().observe(
        *patches(x[3:], y[3:], m.c2, "conv"))
    assert parts.rows == whole.rows == 10 * 36
    for f in ("mx", "my", "cxx", "cxy", "cyy"):
        assert torch.allclose(getattr(parts, f), getattr(whole, f), rtol=1e-13, atol=1e-12), f
    # the grouped conv's patches are its own computation
    xs, _ = patches(x, y, m.c2, "conv")
    w = layer_map(m.c2, "conv")
    with torch.no_grad():
        out = m.c2(x)
    _, ys = patches(x, out, m.c2, "conv")
    assert _rel(xs @ w[:, :-1] + w[:, -1:], ys) < 1e-12


def test_the_fit_is_centred_an_input_offset_changes_only_the_bias():
    """A huge common offset on the inputs (an un-normalized input, a ReLU map far from zero) must not
    cost precision or change the fit: the statistics are centred per batch and pooled without raw
    moments, and the ridge is measured in the inputs' spread. An augmented Gram sum x~x~^T here has a
    condition number of 1e32 and loses the fit entirely in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 400, 5, generator=g, dtype=f64)
    w_true = torch.randn(1, 5, 2, generator=g, dtype=f64)
    y = x @ w_true + 0.3 + 0.01 * torch.randn(1, 400, 2, generator=g, dtype=f64)
    w0 = torch.zeros(1, 6, 2, dtype=f64)
    fits = []
    for offset in (0.0, 1e8):
        st = LsqStats()
        for part in range(4):  # pooled over batches
            rows = slice(100 * part, 100 * part + 100)
            st.observe(x[:, rows] + offset, y[:, rows])
        assert torch.allclose(st.cxx, LsqStats().observe(x, y).cxx, rtol=1e-6), "centred sums lost to the offset"
        w, _, jitter = ridge_solve(st, w0, 1e-6)
        assert jitter == 0.0
        fits.append((w, relative_residual(st, w)))
    (w_plain, res_plain), (w_off, res_off) = fits
    assert _rel(w_off[:, :5], w_plain[:, :5]) < 1e-6 and _rel(w_plain[:, :5], w_true) < 1e-2
    assert torch.allclose(w_off[:, 5], w_plain[:, 5] - 1e8 * w_plain[:, :5].sum(1), rtol=1e-6)
    assert res_plain < 1e-2 and abs(res_off - res_plain) < 1e-6


def test_singular_and_underdetermined_systems_are_regularized_never_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 50, 3, generator=g, dtype=f64)
    x = torch.cat([x, x[..., :1], torch.zeros_like(x[..., :1])], -1)  # a duplicate and a dead input
    y = torch.randn(1, 50, 2, generator=g, dtype=f64)
    st = LsqStats().observe(x, y)
    w0 = torch.zeros(1, 6, 2, dtype=f64)
    w, r, jitter = ridge_solve(st, w0, 0.0)
    assert torch.isfinite(w).all() and jitter > 0
    w, r, jitter = ridge_solve(st, w0, 1e-3)
    assert torch.isfinite(w).all() and jitter == 0 and float(r) > 0
    assert relative_residual(st, w) < relative_residual(st, w0)
    few = LsqStats().observe(x[:, :3], y[:, :3])  # 3 rows, 6 unknowns
    w, _, _ = ridge_solve(few, w0, 1e-3)
    assert torch.isfinite(w).all()


def test_too_few_samples_warn_with_the_layer_and_the_count_that_would_do():
    calib = [torch.randn(4, 3, 16, 16, dtype=f64)]
    a, b = _tiny("none", 1, calib), _tiny("none", 2, calib)
    with pytest.warns(CalibrationWarning, match=r"fc \(4 patches for 9 unknowns; about 9 images"):
        merged, rep = merge(a, b, calib, repair="lsq", progress=False, return_report=True)
    assert "under-determined" in rep.sites["fc"].note
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values())


def test_options_are_checked():
    calib = [torch.randn(4, 3, 16, 16)]
    a = create_model("tiny_resnet", width=4, in_chans=3)
    for kw, msg in ((dict(lsq_ridge=-1.0), "lsq_ridge"), (dict(lsq_ridge=float("nan")), "lsq_ridge"),
                    (dict(lsq_positions=0), "lsq_positions"), (dict(lsq_positions=2.5), "lsq_positions"),
                    (dict(lsq_memory=-1), "lsq_memory"), (dict(lsq_memory="lots"), "lsq_memory"),
                    (dict(lsq_memory=True), "lsq_memory"), (dict(lsq_memory=1.5e9), "lsq_memory")):
        with pytest.raises(ConfigError, match=msg):
            merge(a, a, calib, repair="lsq", progress=False, **kw)
    with pytest.raises(ConfigError, match="lsq\\(...\\) method"):
        merge(a, a, calib, repair="lsq", progress=False, collect=lambda models, plan, request: None)
    with pytest.raises(ConfigError, match="lsq_reduce"):  # pooled passes, local walk: refused before any pass
        merge(a, a, calib, repair="lsq", progress=False, collect=LocalCollector(calib, reduce=lambda st: 1 / 0))
    with pytest.raises(ConfigError, match="lsq"):
        merge(a, a, calib, repair="lsqq", progress=False)


def test_config_and_curve_accept_lsq(tmp_path):
    from mergekit_vision.config import MergeConfig
    from pydantic import ValidationError
    from mergekit_vision.evaluate import MODES

    data = tmp_path / "calib.npz"
    data.write_bytes(b"")
    base = {"models": [{"model": "resnet20", "pretrained": True}] * 2, "calibration": {"path": str(data)}}
    cfg = MergeConfig.model_validate({**base, "repair": "lsq", "lsq_ridge": 1e-2, "lsq_positions": None,
                                      "lsq_memory": "2GB", "lsq_logits": "probs"})
    assert (cfg.repair, cfg.lsq_ridge, cfg.lsq_positions) == ("lsq", 1e-2, None) and MODES["lsq"] == (True, "lsq")
    assert cfg.lsq_memory == "2GB" and memory_budget(cfg.lsq_memory) == 2 * 10**9 and cfg.lsq_logits == "probs"
    assert MergeConfig.model_validate(base).lsq_positions == 64
    assert MergeConfig.model_validate(base).lsq_memory == "auto"
    for bad in ({"lsq_ridge": -1}, {"lsq_positions": 0}, {"lsq_memory": "lots"}, {"lsq_logits": "softmax"}):
        with pytest.raises(ValidationError, match="lsq_"):
            MergeConfig.model_validate({**base, **bad})


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"),
    nn.Conv2d(4, 6, (2, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2), bias=False),
    nn.Conv2d(4, 4, 5, padding=2, groups=4, padding_mode="circular"),
    nn.Conv1d(4, 6, 4, stride=2, padding=1, groups=2),
    nn.Linear(4, 3),
], ids=["same-reflect", "strided-dilated", "depthwise-circular", "conv1d-grouped", "linear"])
def test_patches_times_the_layer_map_is_the_layer(conv):
    conv = conv.to(f64)
    x = torch.randn(3, 4, 9, 9, dtype=f64) if isinstance(conv, nn.Conv2d) else (
        torch.randn(3, 4, 11, dtype=f64) if isinstance(conv, nn.Conv1d) else torch.randn(3, 5, 4, dtype=f64))
    kind = "linear" if isinstance(conv, nn.Linear) else "conv"
    with torch.no_grad():
        y = conv(x)
    xs, ys = patches(x, y, conv, kind)
    w = layer_map(conv, kind)
    assert _rel(xs @ w[:, :-1] + w[:, -1:], ys) < 1e-12
    sub, _ = patches(x, y, conv, kind, positions=2, gen=torch.Generator().manual_seed(0))
    assert sub.shape[1] == (3 * 2 if kind == "conv" else xs.shape[1])


@pytest.mark.parametrize("case", ["dense-bias", "dense-nobias", "grouped-conv"])
@pytest.mark.parametrize("lam", [1e-3, 0.3])
def test_dual_solve_is_the_ridge_solution(case, lam):
    """Fewer rows than unknowns: the dual solve from the rows equals ridge_solve from the statistics (the
    unshrunk bias included), and so do the residuals computed from rows and from statistics. Inputs
    with a large common offset (as after a ReLU) check that the centring is exact."""
    g = torch.Generator().manual_seed(1)
    bias = case != "dense-nobias"
    if case == "grouped-conv":
        conv = nn.Conv2d(6, 4, 3, padding=1, groups=2).to(f64)
        x = torch.randn(2, 6, 3, 3, generator=g, dtype=f64).relu() + 2.0
        y = torch.randn(2, 4, 3, 3, generator=g, dtype=f64)
        xs, ys = patches(x, y, conv, "conv", positions=4, gen=g)  # 8 rows per group, 27 unknowns + bias
        assert xs.shape == (2, 8, 27) and patch_rows(x.shape, conv, "conv", 4) == 8
        w0 = layer_map(conv, "conv")
    else:
        xs = torch.randn(1, 7, 12, generator=g, dtype=f64) + 3.0
        ys = torch.randn(1, 7, 3, generator=g, dtype=f64) * 2 - 1
        w0 = torch.randn(1, 13, 3, generator=g, dtype=f64)
        if not bias:
            w0[:, -1] = 0
    st = LsqStats().observe(xs, ys)
    want, r_want, jit = ridge_solve(st, w0, lam, bias)
    got, r_got, jit_dual = dual_solve(xs, ys, w0, lam, bias)
    assert jit == jit_dual == 0.0
    assert torch.allclose(r_got, r_want, rtol=1e-12)
    assert _rel(got, want) < 1e-9
    assert abs(rows_residual(xs, ys, got) - relative_residual(st, want)) < 1e-9
    assert abs(rows_residual(xs, ys, w0) - relative_residual(st, w0)) < 1e-9 * max(1.0, relative_residual(st, w0))
    if not bias:
        assert torch.equal(got[:, -1], torch.zeros_like(got[:, -1]))
    w, _, jitter = dual_solve(xs, ys, w0, 0.0, bias)  # no ridge: the fit interpolates the rows
    assert torch.isfinite(w).all() and jitter == 0.0 and rows_residual(xs, ys, w) < 1e-12
    dup = torch.cat([xs, xs[:, :2]], 1), torch.cat([ys, ys[:, :2] + 1.0], 1)  # repeated rows, other targets
    w, _, jitter = dual_solve(*dup, w0, 0.0, bias)
    assert torch.isfinite(w).all() and jitter > 0


def test_underdetermined_fits_take_the_dual_path_with_the_primal_result():
    """A walk whose deep fits have fewer patches than unknowns solves those from the rows and gives the
    same merged network as the primal walk (float64)."""
    calib = _batches(1, 4, (3, 8, 8))  # 4 images: the 4x4 and 2x2 maps give few rows for the 3x3 convs
    a, b, m = (_tiny("bn", s, calib) for s in (1, 2, 3))
    gm = shared_graph(m)
    m_dual, m_primal = copy.deepcopy(m), copy.deepcopy(m)
    rd = lsq_pass(m_dual, [a, b], [0.5, 0.5], gm, calib, positions=4, dual=True)
    rp = lsq_pass(m_primal, [a, b], [0.5, 0.5], gm, calib, positions=4, dual=False)
    duals = [v for v, f in rd.fits.items() if f.solver == "dual"]
    assert duals and all(rd.fits[v].rows < rd.fits[v].dim for v in duals)
    assert all(f.solver == "primal" for f in rp.fits.values())
    for v in rd.fits:
        assert abs(rd.fits[v].residual_after - rp.fits[v].residual_after) < 1e-8, v
    sd = m_primal.state_dict()
    for k, v in m_dual.state_dict().items():
        if v.is_floating_point():
            assert _rel(v, sd[k]) < 1e-7 or (v - sd[k]).abs().max() < 1e-10, k


def test_a_small_memory_budget_spills_and_gives_the_same_merge_bit_for_bit(tmp_path, monkeypatch):
    """Values beyond ``memory`` go to a temporary directory and come back bit for bit: the merged
    network and every fit equal the unlimited walk's exactly; the directory is gone afterwards."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calib = _batches(3, 16, (3, 16, 16))
    a, b, m = (_tiny("bn", s, calib) for s in (1, 2, 3))
    gm = shared_graph(m)
    runs = {}
    for budget in (None, 64 * 1024):
        mm = copy.deepcopy(m)
        runs[budget] = (mm, lsq_pass(mm, [a, b], [0.4, 0.6], gm, calib, positions=20, memory=budget))
    (m_all, r_all), (m_small, r_small) = runs[None], runs[64 * 1024]
    assert r_all.spilled_bytes == 0 and r_small.spilled_bytes > 0
    assert r_small.peak_held_bytes < r_all.peak_held_bytes
    sd = m_all.state_dict()
    for k, v in m_small.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for v, f in r_all.fits.items():
        assert torch.equal(f.w, r_small.fits[v].w) and f.residual_after == r_small.fits[v].residual_after, v
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("mergekit_lsq_")]


@pytest.mark.parametrize("conv,hw", [
    (nn.Conv2d(4, 6, 3, padding=1), (2, 2)),
    (nn.Conv2d(4, 6, 3, padding=1), (1, 1)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4)),
    (nn.Conv2d(4, 6, (3, 5), padding=(2, 1), dilation=(2, 1)), (5, 5)),
    (nn.Conv1d(4, 6, 3, padding=2), (1, 3)),
], ids=["2x2", "1x1", "strided-grouped", "dilated", "conv1d"])
def test_border_classes_give_the_dense_statistics_and_dead_taps_decouple(conv, hw, monkeypatch):
    """Patches split by the taps that read padding (each part without them) give the dense im2col's
    statistics; the ridge solve without the entries that only ever read padding is the full solve; the
    unknowns counted are the entries that read the input somewhere."""
    from mergekit_vision.repair import lsq
    from mergekit_vision.repair.lsq import conv_classes, conv_cols, conv_live_dim, conv_positions, conv_targets

    monkeypatch.setattr(lsq, "SPLIT_PADDING", 0.0)  # split wherever any tap reads padding
    conv = conv.to(f64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, *hw, generator=g, dtype=f64).relu() + 1.0
    x = x.squeeze(2) if isinstance(conv, nn.Conv1d) else x
    with torch.no_grad():
        y = conv(x) + 0.1 * torch.randn(conv(x).shape, generator=g, dtype=f64)
    for positions in (2, None):  # the solve below uses every position
        idx, out_hw = conv_positions(x.shape, conv, positions, torch.Generator().manual_seed(1))
        y_at = y.reshape(5, 6, -1)[:, :, idx] if idx is not None else y.reshape(5, 6, -1)
        dense = LsqStats().observe(conv_cols(x, conv, idx, out_hw), conv_targets(y_at, conv))
        split = [(e, LsqStats().observe(xs, ys)) for e, xs, ys in conv_classes(x, y_at, conv, idx, out_hw)]
        dim = dense.mx.shape[-1]
        assert all(e is None or p.mx.shape[-1] == e.numel() < dim for e, p in split)
        assert any(e is not None for e, _ in split)  # every case here has patches that read padding
        parts = LsqStats.embedded(split, dim)
        assert parts.rows == dense.rows
        for f in ("mx", "my", "cxx", "cxy", "cyy"):
            assert torch.allclose(getattr(parts, f), getattr(dense, f), rtol=1e-12, atol=1e-10), f
    w0 = layer_map(conv, "conv")
    full_g, full_h = dense.augmented()
    w, _, _ = ridge_solve(dense, w0, 1e-2)
    d = full_g.shape[-1] - 1
    dead = full_g[:, :d, :d].diagonal(dim1=1, dim2=2).eq(0).all(0)
    reg = 1e-2 * dense.cxx.diagonal(dim1=1, dim2=2).mean(-1)  # the ridge is relative to the centred spread
    a = full_g + torch.diag_embed(torch.cat([reg[:, None].expand(-1, d), torch.zeros_like(reg[:, None])], 1))
    rhs = full_h + torch.cat([reg[:, None, None] * w0[:, :d], torch.zeros_like(w0[:, d:])], 1)
    want = torch.linalg.solve(a, rhs)  # the full augmented system (positive definite for lam > 0)
    assert _rel(w, want) < 1e-9
    assert torch.equal(w[:, :d][:, dead], w0[:, :d][:, dead])  # entries that never read the input keep W0
    # only the 1x1 map has taps that never read the input (all but the centre); elsewhere every tap
    # reads it at some output position
    assert conv_live_dim(x.shape, conv) == (4 if hw == (1, 1) else d)
    assert int((~dead).sum()) == (4 if hw == (1, 1) else d)


class _TwoShards:
    """Two walks in two threads, each on its own shard, whose ``reduce`` swaps their rounds: what two
    data-parallel workers do, without a process group."""

    def __init__(self):
        import threading

        self.barrier = threading.Barrier(2, timeout=60)
        self.slots = [None, None]
        self.pooled = []

    def reduce(self, rank):
        def pool(rnd):
            self.slots[rank] = rnd
            self.barrier.wait()
            out = self.slots[0] + self.slots[1]  # rank order: both workers add the same way
            self.barrier.wait()
            if rank == 0:
                self.pooled.append(out)
            return out
        return pool


def test_walk_on_two_shards_with_reduce_equals_the_walk_on_the_whole():
    """The per-round reduce hook: two shards' walks, pooling each round's statistics, give the merged net of
    one walk on all the batches, and each round's pooled statistics equal the whole's (float64). The
    residual block's shortcut conv shares a round with the block's first conv."""
    import threading

    calib = _batches(4, size=12, shape=(3, 16, 16))
    a, b = _tiny("bn", 1, calib), _tiny("bn", 2, calib)
    start = _tiny("bn", 3, calib)
    gm = shared_graph(start)
    sites, _ = find_lsq_sites(gm)
    rounds = lsq_rounds(gm.graph, sites)
    assert [[s.module for s in r] for r in rounds] == [
        ["conv1"], ["layer1.0.conv1"], ["layer1.0.conv2"], ["layer2.0.conv1", "layer2.0.downsample.0"],
        ["layer2.0.conv2"], ["fc"]]
    whole_rounds = []
    whole = copy.deepcopy(start)
    res = lsq_pass(whole, [a, b], [0.4, 0.6], gm, calib, positions=20,
                   reduce=lambda rnd: whole_rounds.append(rnd) or rnd)
    assert len(whole_rounds) == len(rounds) + 1 and whole_rounds[-1].moments  # the last: BatchNorm moments
    assert res.round_bytes == [r.nbytes for r in whole_rounds] and res.samples == 48

    shards, outs = _TwoShards(), [copy.deepcopy(start), copy.deepcopy(start)]
    got = [None, None]

    def work(rank):
        got[rank] = lsq_pass(outs[rank], [copy.deepcopy(a), copy.deepcopy(b)], [0.4, 0.6], gm, calib[rank::2],
                             positions=20, reduce=shards.reduce(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] is not None and got[1] is not None
    assert got[0].samples == got[1].samples == 48
    for mine, theirs in zip(shards.pooled, whole_rounds):
        assert mine.index == theirs.index and mine.samples == theirs.samples
        for name, st in theirs.fits.items():
            assert mine.fits[name].rows == st.rows
            for f in ("mx", "my", "cxx", "cxy", "cyy"):
                assert torch.allclose(getattr(mine.fits[name], f), getattr(st, f), rtol=1e-11, atol=1e-11), (name, f)
        for name, m in theirs.moments.items():
            assert torch.allclose(mine.moments[name].m2, m.m2, rtol=1e-11)
    ref = whole.state_dict()
    for out in outs:
        for k, v in out.state_dict().items():
            assert torch.allclose(v, ref[k], rtol=1e-9, atol=1e-10), k
    for k, v in outs[0].state_dict().items():  # the workers agree exactly
        assert torch.equal(v, outs[1].state_dict()[k]), k


def test_round_statistics_travel_as_flat_float64_tensors():
    calib = _batches(2, size=6, shape=(3, 12, 12))
    a, m = _tiny("bn", 1, calib), _tiny("bn", 2, calib)
    gm = shared_graph(m)
    seen = []
    lsq_pass(copy.deepcopy(m), [a], [1.0], gm, calib, reduce=lambda rnd: seen.append(rnd) or rnd)
    for rnd in (seen[0], seen[-1]):
        flat = rnd.as_tensors()
        assert all(t.dtype == f64 for t in flat.values())
        back = LsqRound.from_tensors(flat)
        assert back.index == rnd.index and back.samples == rnd.samples == 12
        assert set(back.fits) == set(rnd.fits) and set(back.moments) == set(rnd.moments)
        assert rnd.nbytes == 8 * sum(t.numel() for t in flat.values())
        for k, st in rnd.fits.items():
            assert torch.equal(back.fits[k].cxx, st.cxx) and back.fits[k].rows == st.rows
    with pytest.raises(DataError, match="round 0 and round 1"):
        seen[0] + seen[1]


def test_a_sharded_walk_solves_the_thin_fits_from_pooled_statistics_and_still_spills(tmp_path, monkeypatch):
    """``reduce`` turns the dual solve off: the fits with fewer patches than unknowns, solved from their
    rows without it, come from the pooled statistics instead, to the same merged net (float64); a
    small memory budget spills and changes nothing, bit for bit; the rounds' bytes count a fit kept as
    rows as the statistics it would send."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calib = _batches(3, 4, (3, 8, 8))
    a, b, m = (_tiny("bn", s, calib) for s in (1, 2, 3))
    gm = shared_graph(m)
    m_dual = copy.deepcopy(m)
    rd = lsq_pass(m_dual, [a, b], [0.5, 0.5], gm, calib, positions=4)  # no reduce: the dual where it pays
    duals = [v for v, f in rd.fits.items() if f.solver == "dual"]
    assert duals
    runs = {}
    for budget in (None, 4 * 1024):
        mm, seen = copy.deepcopy(m), []
        res = lsq_pass(mm, [a, b], [0.5, 0.5], gm, calib, positions=4, memory=budget,
                       reduce=lambda rnd, seen=seen: seen.append(rnd) or rnd)
        runs[budget] = (mm, res, seen)
    (m_all, r_all, seen), (m_small, r_small, _) = runs[None], runs[4 * 1024]
    assert all(f.solver == "primal" for f in r_all.fits.values())
    assert all(isinstance(st, LsqStats) and not st.empty for rnd in seen for st in rnd.fits.values())
    assert r_all.round_bytes == rd.round_bytes == [rnd.nbytes for rnd in seen]
    for v, f in rd.fits.items():
        assert (r_all.fits[v].rows, r_all.fits[v].dim) == (f.rows, f.dim), v
        assert abs(r_all.fits[v].residual_after - f.residual_after) < 1e-8, v
    sd = m_dual.state_dict()
    for k, v in m_all.state_dict().items():
        if v.is_floating_point():
            assert _rel(v, sd[k]) < 1e-7 or (v - sd[k]).abs().max() < 1e-10, k
    assert r_all.spilled_bytes == 0 < r_small.spilled_bytes
    sd = m_all.state_dict()
    for k, v in m_small.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for v, f in r_all.fits.items():
        assert torch.equal(f.w, r_small.fits[v].w), v
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("mergekit_lsq_")]


def test_a_walk_without_data_takes_every_fit_and_its_unknowns_from_the_pooled_rounds():
    """What the Flower server does: a walk with no batches of its own, whose ``reduce`` returns the
    rounds (sent as flat tensors) of a walk on the data, computes the same merged net bit for bit. The
    fits' unknowns come with the rounds: on 1x1 maps a 3x3 conv reads the input with few of its taps."""
    calib = _batches(2, 6, (3, 2, 2))
    a, b, m = (_tiny("bn", s, calib) for s in (1, 2, 3))
    gm = shared_graph(m)
    sent = []
    data = copy.deepcopy(m)
    rd = lsq_pass(data, [a, b], [0.5, 0.5], gm, calib,
                  reduce=lambda rnd: sent.append(LsqRound.from_tensors(rnd.as_tensors())) or rnd)
    server = copy.deepcopy(m)
    rs = lsq_pass(server, [a, b], [0.5, 0.5], gm, [], reduce=lambda rnd: sent[rnd.index])
    assert rs.samples == rd.samples == 12 and rs.round_bytes == rd.round_bytes
    sd = data.state_dict()
    for k, v in server.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for v, f in rd.fits.items():
        assert (rs.fits[v].rows, rs.fits[v].dim) == (f.rows, f.dim) and torch.equal(rs.fits[v].w, f.w), v
    by_module = {s.module: s.value for s in find_lsq_sites(gm)[0]}
    # layer2's convs (8 channels out) on a 1x1 output map: its first (stride 2, 4 input channels) reads
    # 4 of 9 taps, its second (8 input channels) only the centre
    assert rd.fits[by_module["layer2.0.conv1"]].dim == 4 * 4 + 1
    assert rd.fits[by_module["layer2.0.conv2"]].dim == 8 + 1


def test_merge_threads_lsq_memory_through_and_gives_the_same_model(caplog):
    """``merge(..., lsq_memory=0)`` spills every value (the log says how much) and returns the model
    the unlimited merge returns, bit for bit."""
    import logging

    calib = _batches(2, 8, (3, 16, 16))
    a, b = _tiny("bn", 1, calib), _tiny("bn", 2, calib)
    kw = dict(repair="lsq", progress=False, lsq_positions=8)
    want = merge(a, b, calib, lsq_memory=None, **kw).state_dict()
    with caplog.at_level(logging.INFO, logger="mergekit_vision"):
        got = merge(a, b, calib, lsq_memory=0, **kw).state_dict()
    assert any("spilled to disk" in r.getMessage() for r in caplog.records)
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


# ---- lsq_logits="probs": the classifier fitted to the endpoints' averaged probabilities ---------------
def test_prob_target_is_the_log_of_the_averaged_probabilities_shifted_to_the_mean_logit():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(7, 5, generator=g, dtype=f64) * s for s in (1.0, 4.0, 30.0)]
    w = [0.2, 0.3, 0.5]
    t = prob_target(z, [2.0, 3.0, 5.0])  # weights normalized
    avg = sum(wk * zk.softmax(-1) for wk, zk in zip(w, z))
    assert torch.allclose(t.softmax(-1), avg, rtol=1e-12, atol=1e-15)  # its softmax: the averaged probabilities
    assert torch.allclose(t.mean(-1), sum(wk * zk for wk, zk in zip(w, z)).mean(-1), rtol=1e-12, atol=1e-12)
    big = [z[0] * 1e3, z[1]]  # probabilities that underflow in float64 stay finite in the log-sum-exp
    assert torch.isfinite(prob_target(big, [0.5, 0.5])).all()
    assert torch.allclose(prob_target([z[1]], [1.0]), z[1], rtol=1e-13, atol=1e-12)  # one endpoint: its logits
    with pytest.raises(ValueError, match="positive weights"):
        prob_target(z[:2], [1.0, -0.5])


def test_logit_sites_are_the_linear_fits_the_model_returns_through_identity_heads():
    import timm

    cases = [(create_model("tiny_resnet", width=4, norm="bn", in_chans=3), {"fc"}),
             (Mixed(), {"fc"}),
             (timm.create_model("resnet18", pretrained=False, num_classes=10), {"fc"}),  # fc -> output
             (timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                                num_classes=10), {"head"}),
             (timm.create_model("convnext_atto", pretrained=False, num_classes=10), {"head.fc"})]  # -> Identity
    for model, want in cases:
        gm = shared_graph(model.eval())
        sites, _ = find_lsq_sites(gm)
        got = {s.module for s in logit_sites(sites, gm, "probs") if s.target == "probs"}
        assert got == want, (type(model).__name__, got)
        assert all(s.target == "mean" for s in logit_sites(sites, gm, "mean"))
    with pytest.raises(ValueError, match="valid: mean, probs"):
        logit_sites(sites, gm, "prob")


def test_lsq_probs_gives_a_model_and_its_permutation_back_and_fits_the_ensemble_better():
    """At the endpoints the target is the endpoint's own logits, so a merge with itself or with a permuted
    copy gives the model back; between two different nets the head reproduces the averaged probabilities
    on the calibration data more closely than the head fitted to the averaged logits (the quantity the
    probs target is fitted to, in logit space: the KL divergence from the ensemble)."""
    calib = _batches(2, 32, (3, 16, 16))
    a = _tiny("bn", 1, calib)
    spec = trace_permutation_spec(a, calib[0][:1])
    perm = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(3)))
    x = _batches(1, 8, (3, 16, 16), seed=9)[0]
    with torch.no_grad():
        for other in (a, perm):
            got = merge(a, other, calib, repair="lsq", lsq_logits="probs", progress=False, lsq_positions=None)
            assert _rel(got(x), a(x)) < 1e-9
        b = _tiny("bn", 2, calib)
        xs = torch.cat(calib)
        ens = 0.5 * a(xs).softmax(-1) + 0.5 * b(xs).softmax(-1)
        kl = {}
        for mode in ("mean", "probs"):
            m = merge(a, b, calib, repair="lsq", lsq_logits=mode, progress=False, lsq_positions=None)
            kl[mode] = float((ens * (ens.log() - m(xs).log_softmax(-1))).sum(-1).mean())
    assert kl["probs"] < kl["mean"], kl


def test_lsq_probs_on_two_shards_equals_the_whole_and_is_checked():
    calib = _batches(4, size=12, shape=(3, 16, 16))
    a, b = _tiny("bn", 1, calib), _tiny("bn", 2, calib)
    start = _tiny("bn", 3, calib)
    gm = shared_graph(start)
    sites = logit_sites(find_lsq_sites(gm)[0], gm, "probs")
    whole = copy.deepcopy(start)
    lsq_pass(whole, [a, b], [0.4, 0.6], gm, calib, positions=20, sites=sites)
    mean = copy.deepcopy(start)
    lsq_pass(mean, [a, b], [0.4, 0.6], gm, calib, positions=20)
    assert not torch.allclose(mean.fc.weight, whole.fc.weight)  # the head's target changed ...
    assert torch.equal(mean.layer2[0].conv2.weight, whole.layer2[0].conv2.weight)  # ... and nothing before it
    import threading

    shards, outs = _TwoShards(), [copy.deepcopy(start), copy.deepcopy(start)]

    def work(rank):
        lsq_pass(outs[rank], [copy.deepcopy(a), copy.deepcopy(b)], [0.4, 0.6], gm, calib[rank::2], positions=20,
                 sites=sites, reduce=shards.reduce(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        for k, v in out.state_dict().items():
            assert torch.allclose(v, whole.state_dict()[k], rtol=1e-9, atol=1e-10), k
    with pytest.raises(ConfigError, match="lsq_logits"):
        merge(a, b, calib, repair="lsq", lsq_logits="softmax", progress=False)
