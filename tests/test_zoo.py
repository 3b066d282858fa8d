"""The core invariant over a zoo of real timm/torchvision models: permuting every free group at random
leaves the function unchanged (float64, random weights and random norm statistics), the input model is
untouched, and every parameter axis is a group member, channel-free, or unused.

Every timm '*resnet*'/'*resnext*' model is parametrized; the ones outside DEFAULT_TIMM are marked
``heavy`` (``python -m pytest -m heavy``) so the default run stays fast.
"""
import re
import warnings

import pytest
import timm
import torch
import torchvision

from mergekit_vision import trace_permutation_spec
from mergekit_vision.testing import check_recovery, check_spec

TIMM_NAMES = sorted(set(timm.list_models("*resnet*")) | set(timm.list_models("*resnext*")))
# one or two cheap members of each family: basic/bottleneck, -D/-T stems, GroupNorm, SE/ECA/GC/SK
# attention, ResNeXt, ResNet-V2 (pre-activation, StdConv), CSP, Res2Net, NF, ResNeSt, lambda/BAT
DEFAULT_TIMM = {
    "resnet10t", "resnet18", "resnet18d", "resnet26t", "resnet50", "resnet50_gn", "resnet50d",
    "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "gcresnext26ts", "skresnet18", "cspresnet50",
    "res2net50_14w_8s", "resnetv2_50", "resnetv2_50x1_bit", "nf_resnet26", "resnest14d", "legacy_seresnet18",
    "resnetblur18", "eca_resnext26ts",
}
TORCHVISION = {
    "resnet18": False, "resnet50": True, "resnext50_32x4d": True, "wide_resnet50_2": True,
    "vgg11_bn": True, "vgg16_bn": True, "mobilenet_v2": False, "mobilenet_v3_small": False,
    "mobilenet_v3_large": False, "densenet121": False, "regnet_x_400mf": False, "regnet_y_400mf": False,
    "efficientnet_b0": False, "convnext_tiny": True, "shufflenet_v2_x0_5": False, "squeezenet1_0": False,
    "mnasnet0_5": False, "googlenet": True,
}


def _input_size(model, name):
    """64 px where the model runs there, else its own input size (attention with fixed feature maps)."""
    with torch.no_grad():
        try:
            model.eval()(torch.randn(1, 3, 64, 64))
            return 64
        except Exception:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            return cfg.get("input_size", (3, 224, 224))[-1]


def _check(model, name, size):
    giant = sum(p.numel() for p in model.parameters()) > 100e6
    x = torch.randn(1 if giant else 2, 3, size, size)
    # the test owns its model: giants are checked in place (float64 copies would not fit in memory);
    # every model here traces (tests/test_zoo_merge.py lists the zoo's expected failures, strictly)
    res = check_spec(model, x, copy_model=not giant)
    assert res.rel_error < 1e-9, (name, res.rel_error)
    assert res.uncovered == [], res.uncovered[:5]
    assert res.spec.free_groups, f"{name}: nothing permutable"
    return res.spec


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in DEFAULT_TIMM else pytest.mark.heavy) for n in TIMM_NAMES])
def test_timm_resnet_zoo(name):
    model = timm.create_model(name, pretrained=False)
    spec = _check(model, name, _input_size(model, name))
    frozen = {g.name: g.reason for g in spec.groups if g.frozen}
    if re.match(r"^(resnet\d+[a-z]?|resnet50_gn|resnext\d+[a-z]?_\d+x\d+d|wide_resnet\d+_\d)$", name):
        # plain ResNets: every hidden channel is permutable; only the input and the logits are fixed
        assert set(frozen.values()) == {"model input channels", "model output"}, frozen


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.heavy if heavy else ()) for n, heavy in TORCHVISION.items()])
def test_torchvision_zoo(name):
    model = torchvision.models.get_model(name, weights=None)
    # depthwise convs have no fast float64 kernel: the mobile nets run at 32 px
    _check(model, name, 32 if name.startswith(("mobilenet", "efficientnet", "mnasnet", "regnet")) else 64)


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002",
                                  "ghostnet_100", "dla34", "densenet121"])
def test_timm_other_families(name):
    model = timm.create_model(name, pretrained=False)
    _check(model, name, 64)


def test_resnet18_exact_groups():
    spec = trace_permutation_spec(timm.create_model("resnet18", pretrained=False).eval(), torch.randn(1, 3, 64, 64))
    free = {g.name: g.size for g in spec.free_groups}
    # 4 residual streams (one per stage) + 8 block-inner groups
    assert free == {
        "conv1": 64, "layer2.0.conv2": 128, "layer3.0.conv2": 256, "layer4.0.conv2": 512,
        "layer1.0.conv1": 64, "layer1.1.conv1": 64, "layer2.0.conv1": 128, "layer2.1.conv1": 128,
        "layer3.0.conv1": 256, "layer3.1.conv1": 256, "layer4.0.conv1": 512, "layer4.1.conv1": 512,
    }
    assert spec.num_permutable_channels == 2880 and all(g.blocks == 1 for g in spec.free_groups)
    stream = {(m.key, m.axis) for m in spec["layer2.0.conv2"].members}
    assert {("layer2.0.downsample.0.weight", 0), ("layer2.0.bn2.running_mean", 0), ("layer2.1.conv2.weight", 0),
            ("layer2.1.conv1.weight", 1), ("layer3.0.conv1.weight", 1), ("layer3.0.downsample.0.weight", 1)} <= stream


def test_resnet50_exact_groups():
    spec = trace_permutation_spec(timm.create_model("resnet50", pretrained=False).eval(), torch.randn(1, 3, 64, 64))
    free = {g.name: g.size for g in spec.free_groups}
    expected = {"conv1": 64}
    for stage, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], start=1):
        expected[f"layer{stage}.0.conv3"] = 4 * width  # the stage's residual stream
        for b in range(blocks):
            expected[f"layer{stage}.{b}.conv1"] = width
            expected[f"layer{stage}.{b}.conv2"] = width
    assert free == expected
    assert spec.num_permutable_channels == 11456


def _small_vit_b16():
    m = torchvision.models.vit_b_16(weights=None, image_size=32)
    m.encoder.layers = m.encoder.layers[:2]
    return m


def _small_tv_swin(v2: bool):
    """torchvision's SwinTransformer (V1, or V2's blocks and patch merging), two small stages."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    kw = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           stochastic_depth_prob=0.0, num_classes=10, **kw)


# attention: heads, q/k and v/o within heads are permutable (docs/spec.md, "Attention heads"); small
# configurations of the real classes keep the float64 check fast
ATTENTION = {
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "vit_small": (lambda: timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2), 32),
    "deit_tiny": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2),
                  32),
    "swin_tiny": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=56, window_size=7,
                                            depths=(2, 2), num_heads=(3, 6), embed_dim=48), 56),
    "swinv2_tiny": (lambda: timm.create_model("swinv2_tiny_window8_256", img_size=64, window_size=4,
                                              depths=(2, 2), num_heads=(3, 6), embed_dim=48), 64),
    "tv_vit_b_16": (_small_vit_b16, 32),
    # a leaf ShiftedWindowAttention (V2: cosine attention, logit scales, the position-bias MLP); 36 px makes
    # 9 × 9 maps that _patch_merging_pad pads
    "tv_swin_t": (lambda: _small_tv_swin(False), 36),
    "tv_swin_v2_t": (lambda: _small_tv_swin(True), 32),
    # its block branches on its input's size (traced with sizes known); 72 px: windows padded
    "tiny_vit": (lambda: timm.models.tiny_vit.TinyVit(num_classes=10, embed_dims=(16, 24, 32, 48), depths=(1, 2, 1, 1),
                                                      num_heads=(1, 2, 2, 3), window_sizes=(2, 4, 2, 2),
                                                      drop_path_rate=0.0), 72),
    # q, k and v of each head side by side in one head dim (strided heads members); cached attention biases
    "levit_128s": (lambda: timm.create_model("levit_128s"), 224),
    "efficientformer_l1": (lambda: timm.create_model("efficientformer_l1"), 224),
}


# models whose attention has one form only (no timm ``fused_attn`` switch): checked once, as they are
ONE_FORM = {"efficientformer_l1", "levit_128s", "swinv2_tiny", "tv_vit_b_16", "tv_swin_t", "tv_swin_v2_t"}


@pytest.mark.parametrize("name,fused", [(n, f) for n in sorted(ATTENTION)
                                        for f in ((None,) if n in ONE_FORM else (True, False))])
def test_attention_zoo(name, fused):
    build, size = ATTENTION[name]
    model = build()
    switch = any(hasattr(m, "fused_attn") for m in model.modules())
    assert switch == (fused is not None), f"{name}: update ONE_FORM (fused_attn switch present: {switch})"
    for m in model.modules():
        if fused is not None and hasattr(m, "fused_attn"):
            m.fused_attn = fused
    spec = _check(model, name, size)
    heads = [g for g in spec.groups if g.heads_of]
    assert heads and not any(g.frozen for g in heads), [(g.name, g.reason) for g in heads if g.frozen]
    assert all(spec[t].blocks == g.size for g in heads for t in g.heads_of)
    assert spec.permutable_fraction >= 0.95, (name, spec.permutable_fraction)


def test_tiny_vit_recovers_a_permuted_copy():
    build, size = ATTENTION["tiny_vit"]
    rec = check_recovery(build(), torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert rec.spec.permutable_fraction == 1.0 and rec.wrong_groups == {} and rec.max_weight_error < 1e-6


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin_recovers_a_permuted_copy(v2):
    # the heads inside the leaf attention show no activation: matched on weights, and still recovered
    rec = check_recovery(_small_tv_swin(v2), torch.randn(16, 3, 36, 36, generator=torch.Generator().manual_seed(0)))
    heads = [g for g in rec.spec.free_groups if g.heads_of]
    assert len(heads) == 4 and rec.wrong_groups == {} and rec.max_weight_error < 1e-6, rec.wrong_groups
    table = "relative_position_bias_table" if not v2 else "logit_scale"
    assert all(any(m.key.endswith(table) for m in g.members) for g in heads)


@pytest.mark.parametrize("v2", [False, True])
def test_torchvision_swin_merged_with_a_permuted_copy_of_itself_is_itself(v2):
    # through the leaf attention: REPAIR (one batch: its statistics are the pooled ones) and least squares
    # (every linear layer outside the leaf refit) give the model back, float64
    from mergekit_vision import merge
    from mergekit_vision.permute import permute, random_perms
    from mergekit_vision.testing import randomize_model

    a = randomize_model(_small_tv_swin(v2).double(), 0).eval()
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = trace_permutation_spec(a, x[:1])
    b = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        ref = a(x)
        for repair, tol in ((True, 1e-8), ("lsq", 1e-10)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 32 images: fewer patches than the head's unknowns
                out = merge(a, b, [x], repair=repair, progress=False)(x)
            assert float((out - ref).abs().max() / ref.abs().max()) < tol, repair


# attention ResNets (timm byoanet): relative-position tables (BotNet, HaloNet), HaloNet's unfolded key/value
# windows with the batch folded into the heads, LambdaNet's lambdas shared by every head. name -> the tensors
# allowed to stay frozen: relative-position tables' position axes (positions, never channels) and ECA's
# conv across channels
ATTENTION_RESNETS = {
    "botnet26t_256": (), "halonet26t": (), "lambda_resnet26t": (), "halonet_h1": (),
    "eca_botnext26ts_256": ("conv2_kxk.conv", "conv2_kxk.bn", "attn.conv", "conv3_1x1.conv"),
}


@pytest.mark.parametrize("name", sorted(ATTENTION_RESNETS))
def test_attention_resnets(name):
    model = timm.create_model(name, pretrained=False)
    spec = _check(model, name, 256)
    allowed = ATTENTION_RESNETS[name]
    for g in spec.groups:
        if g.frozen and g.members and g.reason not in ("model input channels", "model output"):
            # only what cannot move: a table's relative-position axis (axis 0 of *_rel), ECA's channel conv
            assert all(m.key.endswith(("height_rel", "width_rel")) and m.axis == 0 for m in g.members) or any(
                a in m.key for m in g.members for a in allowed), (g.name, g.reason, g.members[:3])
    if not allowed:
        # halonet_h1's tables are a larger share of its narrow stages
        assert spec.permutable_fraction >= (0.9 if name == "halonet_h1" else 0.95), spec.permutable_fraction
    # the head dim is shared by all heads (relative logits, a shared lambda): one permutation within
    # every head, heads fixed, and the reason says why
    shared = [g for g in spec.groups if g.frozen and "shared by all heads" in (g.reason or "")]
    assert shared and all(not g.members for g in shared)


def test_the_spec_does_not_depend_on_the_trace_batch():
    # HaloNet folds the batch into the heads (reshape(B * heads, ...)): traced on one sample either way
    model = timm.create_model("halonet26t", pretrained=False).eval()
    one = trace_permutation_spec(model, torch.randn(1, 3, 256, 256))
    four = trace_permutation_spec(model, torch.randn(4, 3, 256, 256))
    assert one.to_dict() == four.to_dict()
    assert one.permutable_fraction > 0.95


@pytest.mark.parametrize("name,size", [
    ("lambda_resnet26t", 128),
    pytest.param("halonet26t", 256, marks=pytest.mark.heavy),
    pytest.param("botnet26t_256", 256, marks=pytest.mark.heavy),
])
def test_attention_resnets_recover_a_permuted_copy(name, size):
    # float32 matching through the shared-lambda / relative-logit / unfolded-window layouts
    rec = check_recovery(timm.create_model(name, pretrained=False),
                         torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0)))
    assert rec.wrong_groups == {} and rec.max_weight_error < 1e-6, (rec.wrong_groups, rec.max_weight_error)


def test_nest_a_weight_reading_a_head_dim_makes_it_a_channel():
    # NesT: a weight reads features laid out along an attention head dim (a member on a virtual element):
    # the head dim is then one permutation shared by the heads (resolve used to fail with a KeyError)
    from timm.models.nest import Nest

    model = Nest(img_size=64, patch_size=4, num_levels=3, embed_dims=(32, 64, 128), num_heads=(1, 2, 4),
                 depths=(1, 1, 1), num_classes=10)
    spec = _check(model, "nest", 64)
    assert spec.permutable_fraction > 0.7
    rec = check_recovery(model, torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert rec.wrong_groups == {} and rec.max_weight_error < 1e-6
