"""The zoo census as tests: one or two of the smallest variants of every timm family and every
torchvision classifier under 60M parameters (``tests/zoo_models.json``, written by
``benchmarks/zoo_census.py``), each checked for

(a) the core invariant: a random permutation of every free group leaves the function unchanged
    (float64, random weights and norm statistics; ``check_spec``);
(b) recovery: ``align(A, permute(A))`` in float32, with A's BatchNorm statistics measured on the
    calibration data so that channels are alive, gives back A's tensors (``check_recovery``);
(c) bounded correlations: no matched correlation of magnitude above 1.

A model that cannot be checked is listed in EXPECTED with its reason and runs as a strict xfail: it
fails the suite the day it starts to pass. ``DEFAULT`` is the slice of the default run; the rest is
``heavy`` (``python -m pytest -m heavy tests/test_zoo_merge.py``).
"""
import copy
import importlib
import json
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from mergekit_vision.errors import CalibrationWarning
from mergekit_vision.testing import check_recovery, check_spec

CENSUS = json.loads((Path(__file__).parent / "zoo_models.json").read_text())
TIMM = sorted({name for chosen in CENSUS["timm"].values() for name, _ in chosen})
TORCHVISION = sorted(name for name, _ in CENSUS["torchvision"])

# the default run: one cheap model per kind of structure the spec must get right
DEFAULT = {
    # timm: basic/bottleneck, RepVGG-style blocks, inverted residuals and SE, ghost modules, hard-swish,
    # ConvNeXt, ViT (attention heads matched), DLA trees, CSP, gated token mixing (gMLP), pooling attention (PiT),
    # MobileViT, split attention, selective kernels, NFNet's scaled weight standardization, RexNet, VoVNet,
    # RegNet. LeViT, EfficientFormerV2 and Hiera merge in tests/test_engine.py; their recovery is heavy here.
    "timm:test_resnet", "timm:test_byobnet", "timm:mobilenetv2_035", "timm:test_efficientnet", "timm:ghostnet_050",
    "timm:mobilenetv3_small_050", "timm:test_convnext", "timm:test_vit", "timm:dla46_c", "timm:cs3darknet_focus_s",
    "timm:gmlp_ti16_224", "timm:pit_ti_224", "timm:mobilevit_xxs", "timm:resnest14d", "timm:skresnet18",
    "timm:test_nfnet", "timm:rexnet_100", "timm:ese_vovnet19b_slim_dw", "timm:regnetx_002",
    "timm:csatv2",  # MLPs fed a constant: no activation evidence, matched on weights
    # torchvision: the cheapest of each family (DenseNet, EfficientNet, MNASNet: float64 in tests/test_zoo.py)
    "tv:resnet18", "tv:mobilenet_v2", "tv:mobilenet_v3_small", "tv:shufflenet_v2_x0_5", "tv:squeezenet1_1",
    "tv:googlenet", "tv:regnet_x_400mf",
}



def _lite_mla_attn_in_input_dtype(self, q, k, v):
    """EfficientViT-MIT's ``LiteMLA._attn`` without its casts to float32 (the same arithmetic)."""
    out = q @ (k.transpose(-1, -2) @ v)
    return out[..., :-1] / (out[..., -1:] + self.eps)


# models that compute part of their forward in float32 whatever the input's dtype (EfficientViT-MIT's
# LiteMLA: ``q.float()``): the float64 check would see float32 rounding (4e-8), so it runs them with that
# part computed in the input's dtype instead, at the same 1e-9
FLOAT32_INSIDE = {key: ("timm.models.efficientvit_mit", "LiteMLA", "_attn", _lite_mla_attn_in_input_dtype)
                  for key in ("timm:efficientvit_b0", "timm:efficientvit_b1")}

# what the census found that is not (yet) checkable, with the reason; strict: a fix must remove it
EXPECTED: dict = {}  # coat_tiny / coat_lite_tiny (aliased position-encoding convs) fixed: heavy, pass



def _build(key):
    lib, name = key.split(":", 1)
    if lib == "tv":
        return torchvision.models.get_model(name, weights=None)
    return timm.create_model(name, pretrained=False)


def _input_size(model):
    """32 px where the model runs there (float64 depthwise convolutions are slow), else its own input
    size (fixed patch grids, windows), else 299 (inception's auxiliary head); in eval and in train mode,
    where the norm statistics are measured."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for size in (32, 64, cfg.get("input_size", (3, 224, 224))[-1], 299):
            try:
                probe.eval()(torch.randn(1, 3, size, size))
                probe.train()(torch.randn(2, 3, size, size))
                return size
            except Exception:
                continue
    return 224


def _recover(model, spec, n, size):
    """check_recovery on ``n`` random images, and the sample count a rank-deficiency warning asked for."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        rec = check_recovery(model, x, spec=spec)
    asked = [int(m.group(1)) for w in caught if issubclass(w.category, CalibrationWarning)
             for m in [re.search(r"at least (\d+) calibration samples", str(w.message))] if m]
    return rec, max(asked, default=0)


def _params(keys):
    out = []
    for key in keys:
        marks = [] if key in DEFAULT else [pytest.mark.heavy]
        if key in EXPECTED:
            marks.append(pytest.mark.xfail(reason=EXPECTED[key], strict=True))
        out.append(pytest.param(key, marks=marks, id=key))
    return out


ALL = [f"timm:{n}" for n in TIMM] + [f"tv:{n}" for n in TORCHVISION]


def test_census_covers_every_family_and_the_default_slice_is_in_it():
    assert set(CENSUS["timm"]) <= set(timm.list_modules())
    missing = {m for m in timm.list_modules() if m not in CENSUS["timm"]}
    # families with no variant under 60M parameters (or none that builds) are the only ones left out
    assert len(missing) <= 10, sorted(missing)
    assert DEFAULT <= set(ALL), sorted(DEFAULT - set(ALL))
    assert set(EXPECTED) <= set(ALL) and set(FLOAT32_INSIDE) <= set(ALL)


@pytest.mark.slow
@pytest.mark.parametrize("key", _params(ALL))
def test_zoo_permutation_invariant_and_recovery(key, monkeypatch):
    torch.manual_seed(0)
    model = _build(key)
    size = _input_size(model)
    if key in FLOAT32_INSIDE:
        module, cls, method, in_input_dtype = FLOAT32_INSIDE[key]
        monkeypatch.setattr(getattr(importlib.import_module(module), cls), method, in_input_dtype)
    # (a) float64, random weights and random norm statistics
    res = check_spec(model, torch.randn(2, 3, size, size))
    assert res.rel_error < 1e-9, (key, res.rel_error)
    assert res.uncovered == [], res.uncovered[:5]
    if not res.spec.free_groups:
        return  # nothing to match (the census table in docs/spec.md lists the permutable fraction)
    # (b) + (c) float32, BatchNorm statistics measured on the calibration batch
    rec, needed = _recover(model, res.spec, 16, size)
    if rec.wrong_groups and needed:
        # 16 images leave the deepest groups rank-deficient (the merge warns, naming the samples needed):
        # wide, spatially small stages (efficientnet_v2_m's 3,072 channels at 1x1) can then tie. Give them
        # what the warning asks for, as a user would
        rec, _ = _recover(model, res.spec, min(needed, 4096), size)
    assert rec.report.matching_skipped is None
    assert rec.max_corr <= 1.0 + 1e-12, (key, rec.max_corr)
    assert rec.wrong_groups == {}, (key, sorted(rec.wrong_groups)[:5])
    assert rec.max_weight_error < 1e-6, (key, rec.max_weight_error)
