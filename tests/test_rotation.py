"""Residual-stream rotation (merge(rotate_stream=True), docs/merge.md): which streams fold a rotation, the
float64 invariant with random rotations over real timm/torchvision transformers, Procrustes, a rotated copy
coming back through merge, the float64 check refusing a rotation that is not exact, and the options."""
import copy
import importlib
import re

import pytest
import timm
import torch
from torchvision.models.vision_transformer import VisionTransformer

from mergekit_vision import merge, merge_many
from mergekit_vision.calibration import plan_calibration
from mergekit_vision.errors import ConfigError
from mergekit_vision.match import rotation
from mergekit_vision.match.rotation import (function_error, procrustes_rotation, rotate_state_dict, stream_cross,
                                            stream_plans)
from mergekit_vision.testing import randomize_model

GEN = torch.Generator().manual_seed(0)
X = torch.randn(4, 3, 32, 32, generator=GEN)


def _vit(**kw):
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 10, **kw}
    return timm.create_model(kw.pop("name", "vit_tiny_patch16_224"), pretrained=False, **kw).eval()


def _tv_vit():
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10).eval()


def _random_rotation(d: int, seed: int = 1) -> torch.Tensor:
    return procrustes_rotation(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def _plans(model, x=X):
    plan = plan_calibration(model, x[:1], repair="repair")
    return plan, *stream_plans(plan.spec, model, plan.gm, x[:1], [model.state_dict()])


BUILDERS = {
    "vit": lambda: _vit(),
    "vit_layerscale": lambda: _vit(init_values=0.1),
    "vit_avgpool_fcnorm": lambda: _vit(global_pool="avg", fc_norm=True),
    "vit_reg_tokens": lambda: _vit(class_token=False, global_pool="avg", reg_tokens=2, no_embed_class=True),
    "deit_distilled": lambda: _vit(name="deit_tiny_distilled_patch16_224"),
    "cait": lambda: _vit(name="cait_xxs24_224", embed_dim=48, num_heads=3),
    "torchvision_vit": _tv_vit,
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_rotated_stream_keeps_the_function_float64(name):
    """Random weights, norm affines and layer scales; every foldable stream rotated by a random R with
    R 1 = 1 after folding: the same function to rounding, in float64."""
    model = randomize_model(BUILDERS[name]().double(), seed=3)
    x = X.double()
    _, plans, refused = _plans(model, x)
    assert list(plans) and not refused, refused
    sd = model.state_dict()
    before = copy.deepcopy(sd)
    rots = {g: _random_rotation(p.size, seed=i) for i, (g, p) in enumerate(plans.items())}
    rotated = rotate_state_dict(sd, plans, rots)
    assert function_error(model, rotated, x) < 1e-12
    assert function_error(model, rotate_state_dict(sd, plans, {}), x) < 1e-12  # the folds alone
    # something really moved: the writers' rows, and every norm now has a unit affine
    (g, p), = plans.items()
    w = next(k for k, a in p.members if a == 0 and k.endswith("weight"))
    assert not torch.allclose(rotated[w], sd[w])
    for fold in p.norms:
        assert torch.equal(rotated[fold.weight], torch.ones_like(sd[fold.weight]))
        assert torch.equal(rotated[fold.bias], torch.zeros_like(sd[fold.bias]))
    assert all(torch.equal(sd[k], before[k]) for k in sd)  # the input state dict is not touched


def test_layer_scales_fold_into_their_writers():
    _, plans, _ = _plans(_vit(init_values=0.1))
    scales = plans["patch_embed.proj"].scales
    assert ("blocks.0.ls1.gamma", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias") in scales
    assert len(scales) == 4 and len(plans["patch_embed.proj"].norms) == 5


@pytest.mark.parametrize("name, kw, why", [
    ("resnet18", {}, "BatchNorm2d"),  # per-channel affine + statistics on the stream
    ("convnext_atto", {}, "grouped convolution"),  # depthwise convs read the stream
    ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1)),
     "pad"),  # a padded window after the norm: its shift does not fold
    ("vit_relpos_small_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=3),
     "no bias to fold into"),
])
def test_streams_that_do_not_fold_are_refused_with_their_reason(name, kw, why):
    model = randomize_model(timm.create_model(name, pretrained=False, num_classes=10, **kw).eval())
    x = torch.randn(1, 3, kw.get("img_size", 32), kw.get("img_size", 32), generator=GEN)
    _, plans, refused = _plans(model, x)
    assert not plans
    assert refused and any(why in r for r in refused.values()), refused


def test_procrustes_recovers_a_rotation_that_fixes_ones():
    d = 12
    r0 = _random_rotation(d, seed=5)
    eye = torch.eye(d, dtype=torch.float64)
    assert torch.allclose(r0 @ r0.T, eye, atol=1e-12) and torch.allclose(r0.sum(1), torch.ones(d, dtype=eye.dtype))
    b = torch.randn(500, d, generator=GEN, dtype=torch.float64)
    a = b @ r0.T  # a = R0 b, row by row
    r = procrustes_rotation(a.T @ b)
    assert torch.allclose(r, r0, atol=1e-10)
    # among rotations fixing 1 it is the best: better than the identity and than any other such rotation
    m = a.T @ b
    assert (r * m).sum() >= m.trace() and (r * m).sum() >= (_random_rotation(d, seed=9) * m).sum()


def test_merge_with_a_rotated_copy_gives_back_the_model():
    """B = A with its stream rotated (a function-preserving copy no permutation can align): the
    Procrustes rotation at the stream's adds undoes it, and the midpoint is A's function again."""
    a = randomize_model(_vit(init_values=0.5), seed=1)
    _, plans, _ = _plans(a)
    b = copy.deepcopy(a)
    b.load_state_dict(rotate_state_dict(a.state_dict(), plans, {"patch_embed.proj": _random_rotation(48, seed=2)}))
    data = [torch.randn(32, 3, 32, 32, generator=GEN) for _ in range(4)]
    ref = a(X)
    assert (b(X) - ref).norm() / ref.norm() < 1e-5  # the same function ...
    plain = merge(a, b, data, repair=False, progress=False)
    assert (plain(X) - ref).norm() / ref.norm() > 0.05  # ... that permutations alone cannot align
    merged, report = merge(a, b, data, repair=False, rotate_stream=True, progress=False, return_report=True)
    assert (merged(X) - ref).norm() / ref.norm() < 1e-4
    note = report.rotations["patch_embed.proj"]
    assert note.startswith("rotated (5 norms, 4 layer scales folded)") and note.endswith("-> 1.000")
    assert set(merged.state_dict()) == set(a.state_dict())  # exactly A's architecture and keys
    assert "residual stream patch_embed.proj: rotated" in report.summary()


@pytest.mark.parametrize("repair", ["repair", "lsq"])
def test_rotation_with_repair_keeps_the_endpoints(repair):
    """At alpha = 0 and 1 a rotated merge is A and B (their norms folded), REPAIR and lsq included:
    the targets follow the rotated models (REPAIR measures them on the rotated endpoints). Neither
    correction is the identity at an endpoint (REPAIR renormalizes on the calibration batches, lsq's ridge
    shrinks each fit: 0.2-0.3% of the output here, rotated or not), so at alpha = 0, where the rotation
    only folds A's norms, the rotated merge is compared with the plain one too."""
    a, b = randomize_model(_vit(), seed=1), randomize_model(_vit(), seed=2)
    data = [torch.randn(32, 3, 32, 32, generator=GEN) for _ in range(3)]
    for alpha, end in ((0.0, a), (1.0, b)):
        merged, report = merge(a, b, data, alpha=alpha, repair=repair, rotate_stream=True, progress=False,
                               return_report=True)
        ref = end(X)
        assert report.rotations["patch_embed.proj"].startswith("rotated")
        assert (merged(X) - ref).norm() / ref.norm() < 1e-2
    plain = merge(a, b, data, alpha=0.0, repair=repair, progress=False)
    rotated = merge(a, b, data, alpha=0.0, repair=repair, rotate_stream=True, progress=False)
    assert (rotated(X) - plain(X)).norm() / plain(X).norm() < 1e-4


def test_rotation_n_models_and_inputs_untouched():
    models = [randomize_model(_vit(), seed=s) for s in range(3)]
    before = [copy.deepcopy(m.state_dict()) for m in models]
    data = [torch.randn(32, 3, 32, 32, generator=GEN) for _ in range(3)]
    merged, report = merge_many(models, data, repair="repair", rotate_stream=True, progress=False,
                                return_report=True)
    note = report.rotations["patch_embed.proj"]
    assert note.startswith("rotated") and len(re.findall(r"\d\.\d{3} -> \d\.\d{3}", note)) == 2  # one per other model
    assert torch.isfinite(merged(X)).all()
    again = merge_many(models, data, repair="repair", rotate_stream=True, progress=False)
    assert all(torch.equal(u, v) for u, v in zip(merged.state_dict().values(), again.state_dict().values()))
    for m, sd in zip(models, before):
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


def test_stream_cross_reads_both_orientations():
    a = randomize_model(_vit(), seed=1)
    plan, plans, _ = _plans(a)
    from mergekit_vision.calibration import collect_statistics

    stats = collect_statistics([a, randomize_model(_vit(), seed=2)], [X], plan, pairs=[(0, 1)])
    p = plans["patch_embed.proj"]
    m01 = stream_cross(stats, p, 0, 1, None)
    m10 = stream_cross(stats, p, 1, 0, None)
    assert m01 is not None and torch.allclose(m10, m01.T)
    perm = torch.randperm(48, generator=GEN)
    assert torch.equal(stream_cross(stats, p, 0, 1, perm), m01[:, perm])


@pytest.mark.filterwarnings("ignore::mergekit_vision.errors.CalibrationWarning")  # 16 images for resnet18's 512
def test_a_rotation_that_is_not_exact_is_refused(monkeypatch):
    """The float64 check is the last word: a plan that claims a BatchNorm ResNet's stream (it is not
    linear there) is caught on data, nothing is rotated and the report says why."""
    real = rotation.stream_plans

    def claims_everything(spec, model, gm, example, sds):
        plans, refused = real(spec, model, gm, example, sds)
        g = next(g for g in spec.free_groups if g.name in refused)
        plans[g.name] = rotation.StreamPlan(g.name, g.size, [(m.key, m.axis) for m in g.members], taps=[
            t.node for t in g.taps if t.op == "add"])
        return plans, {}

    monkeypatch.setattr(importlib.import_module("mergekit_vision.merge"), "stream_plans", claims_everything)
    a = randomize_model(timm.create_model("resnet18", pretrained=False, num_classes=10).eval(), seed=1)
    b = randomize_model(timm.create_model("resnet18", pretrained=False, num_classes=10).eval(), seed=2)
    data = [torch.randn(8, 3, 32, 32, generator=GEN) for _ in range(2)]
    merged, report = merge(a, b, data, repair=False, rotate_stream=True, progress=False, return_report=True)
    notes = set(report.rotations.values())
    assert len(notes) == 1 and "differs from it by" in notes.pop()
    plain = merge(a, b, data, repair=False, progress=False)  # the permutation-only merge, as if not asked
    assert all(torch.equal(u, v) for u, v in zip(merged.state_dict().values(), plain.state_dict().values()))


def test_rotate_stream_options():
    a, b = _vit(), _vit()
    with pytest.raises(ConfigError, match="method='activation'"):
        merge(a, b, [X], method="weight", rotate_stream=True, progress=False)
    with pytest.raises(ConfigError, match="True or False"):
        merge(a, b, [X], rotate_stream="yes", progress=False)


def test_curve_rotates_the_matched_modes():
    """interpolation_curve(rotate_stream=True): the matched modes start from A with its norms folded and
    end at B rotated, so their endpoints score exactly as A and B do."""
    from torch.utils.data import TensorDataset

    from mergekit_vision.evaluate import interpolation_curve

    a, b = randomize_model(_vit(), seed=1), randomize_model(_vit(), seed=2)
    test = TensorDataset(torch.randn(64, 3, 32, 32, generator=GEN), torch.randint(0, 10, (64,), generator=GEN))
    calib = [torch.randn(32, 3, 32, 32, generator=GEN) for _ in range(2)]
    curve = interpolation_curve(a, b, test, calib_loader=calib, alphas=(0.0, 0.5, 1.0), modes=("naive", "aligned"),
                                progress=False, rotate_stream=True)
    assert curve.meta["rotate_stream"] and curve.meta["rotations"]["patch_embed.proj"].startswith("rotated")
    for mode in ("naive", "aligned"):
        assert curve.loss[mode][0] == pytest.approx(curve.endpoints["a"]["loss"], rel=1e-5), mode
        assert curve.loss[mode][2] == pytest.approx(curve.endpoints["b"]["loss"], rel=1e-5), mode
    assert curve.loss["aligned"][1] != curve.loss["naive"][1]
