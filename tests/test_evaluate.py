"""interpolation_curve / Curve / plot_curve: shape, endpoints, barrier math, the plot, errors; align()."""
import copy
import json
import logging
import sys

import pytest
import torch
from torch import nn

from mergekit_vision import permute, random_perms, trace_permutation_spec
from mergekit_vision.data import digits_dataset
from mergekit_vision.errors import ConfigError, DataError, MergeVisionError
from mergekit_vision.evaluate import Curve, interpolation_curve, plot_curve
from mergekit_vision.merge import align
from mergekit_vision.models import tiny_resnet
from mergekit_vision.testing import randomize_model
from mergekit_vision.training import evaluate, train_classifier

ALPHAS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(16, "train"), digits_dataset(16, "test")


@pytest.fixture(scope="module")
def pair(digits):
    """Two tiny BN ResNets from different seeds (init and data order), ~95% test accuracy each. Width 16:
    at width 8 the REPAIRed midpoint swings with the CPU and thread count (its barrier 0.34-0.38 of 0.68-0.78)."""
    train, _ = digits
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = tiny_resnet(width=16)
        train_classifier(m, train, epochs=6, lr=0.1, batch_size=64, seed=seed)
        models.append(m.eval())
    return models


@pytest.fixture(scope="module")
def curve(pair, digits):
    train, test = digits
    # one calibration batch: pooled statistics are the batch statistics, so REPAIR at an endpoint is exact
    calib = [train.tensors[0][:256]]
    return interpolation_curve(*pair, test, calib_loader=calib, alphas=ALPHAS, progress=False)


def _reset_reference(model, x):
    """The model with its BatchNorm statistics re-estimated on ``x`` by torch itself."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.reset_running_stats()
                mod.momentum = None  # a plain average over the calibration set
        ref.train()(x)
    return ref.eval()


def test_curve_shape(curve):
    assert curve.alphas == list(ALPHAS)
    assert curve.modes == ["naive", "aligned", "reset", "repair"]
    for table in (curve.acc, curve.loss):
        assert all(len(v) == len(ALPHAS) for v in table.values())
    assert curve.meta["eval_samples"] == 450 and curve.meta["calib_samples"] == 256
    assert curve.notes == {}
    json.dumps(curve.to_dict())  # plain data


def test_endpoints_agree_with_the_endpoint_models(curve, pair, digits):
    a, b = pair
    train, test = digits
    ea, eb = evaluate(a, test), evaluate(b, test)
    assert curve.endpoints == {"a": ea, "b": eb}
    assert ea["acc"] > 0.9 and eb["acc"] > 0.9
    # naive and aligned at alpha 0 are A bit for bit; naive at 1 is B, aligned at 1 is B permuted
    for mode in ("naive", "aligned"):
        assert curve.acc[mode][0] == ea["acc"] and curve.loss[mode][0] == pytest.approx(ea["loss"], abs=1e-7)
    assert curve.acc["naive"][-1] == eb["acc"] and curve.loss["naive"][-1] == pytest.approx(eb["loss"], abs=1e-7)
    assert curve.acc["aligned"][-1] == eb["acc"] and curve.loss["aligned"][-1] == pytest.approx(eb["loss"], rel=1e-5)
    # REPAIR at an endpoint: the targets are that endpoint's own statistics, the correction is ~identity
    assert curve.acc["repair"][0] == ea["acc"] and curve.loss["repair"][0] == pytest.approx(ea["loss"], rel=1e-3)
    assert curve.acc["repair"][-1] == eb["acc"] and curve.loss["repair"][-1] == pytest.approx(eb["loss"], rel=1e-3)
    # RESET at an endpoint is that endpoint with BN statistics re-estimated on the calibration data:
    # not the endpoint model itself (its running statistics came from augmented training batches)
    x = train.tensors[0][:256]
    for i, ref in ((0, _reset_reference(a, x)), (-1, _reset_reference(b, x))):
        r = evaluate(ref, test)
        assert curve.acc["reset"][i] == r["acc"] and curve.loss["reset"][i] == pytest.approx(r["loss"], rel=1e-4)


def test_correction_removes_most_of_the_barrier(curve):
    naive, aligned = curve.barrier("naive")["mid"], curve.barrier("aligned")["mid"]
    assert naive > 0.3 and aligned > 0.3  # independently trained tiny nets: a large barrier
    for mode in ("reset", "repair"):
        assert curve.barrier(mode)["mid"] < 0.5 * aligned
        assert curve.reduction(mode) > 0.5
    assert curve.meta["var_ratio"]["repair"]["0.5"][0] < 0.8  # variance collapse at the midpoint ...
    assert curve.meta["var_ratio"]["repair"]["0.5"][1] == pytest.approx(1.0, abs=1e-3)  # ... undone
    text = curve.table()
    for mode in curve.modes:
        assert mode in text


def test_stream_mode_on_request(pair, digits):
    train, test = digits
    c = interpolation_curve(*pair, test, calib_loader=[train.tensors[0][:256]], alphas=(0.0, 0.5),
                            modes=("aligned", "stream"), max_samples=200, progress=False)
    assert c.modes == ["aligned", "stream"]
    assert c.acc["stream"][0] == c.endpoints["a"]["acc"]
    assert c.barrier("stream")["mid"] < 0.5 * c.barrier("aligned")["mid"]


def test_lsq_mode_on_request(pair, digits):
    """The curve's least-squares mode (every label and mode table knows it): an endpoint refit to itself
    is that endpoint, and the midpoint's barrier is below the aligned one's."""
    train, test = digits
    c = interpolation_curve(*pair, test, calib_loader=[train.tensors[0][:256]], alphas=(0.0, 0.5),
                            modes=("aligned", "lsq"), max_samples=200, progress=False)
    assert c.modes == ["aligned", "lsq"]
    assert c.acc["lsq"][0] == pytest.approx(c.endpoints["a"]["acc"], abs=1 / len(test))
    assert c.barrier("lsq")["mid"] < 0.5 * c.barrier("aligned")["mid"]
    assert "lsq" in c.table()


def test_curve_numbers_are_those_of_one_merge_per_point(curve, pair, digits):
    """The curve measures each mode's endpoint statistics once and corrects per alpha: every point is
    still, to the bit, the merge() of that mode at that alpha (the curve's definition, as it was computed)."""
    from mergekit_vision import merge
    from mergekit_vision.evaluate import MODES

    train, test = digits
    calib = [train.tensors[0][:256]]
    a, b = pair
    spec = trace_permutation_spec(copy.deepcopy(a).eval(), calib[0][:1])
    aligned = align(a, b, calib, spec=spec, progress=False)
    for mode in curve.modes:
        matched, repair = MODES[mode]
        for i, alpha in enumerate(ALPHAS):
            m = merge(a, aligned if matched else b, calib, alpha=alpha, method="none", repair=repair, spec=spec,
                      progress=False)
            r = evaluate(m, test)
            assert (curve.acc[mode][i], curve.loss[mode][i]) == (r["acc"], r["loss"]), (mode, alpha)


def test_barrier_math_on_a_hand_made_curve():
    c = Curve(alphas=[0.0, 0.25, 0.5, 0.75, 1.0],
              acc={"aligned": [0.9, 0.5, 0.2, 0.6, 0.8], "repair": [0.9, 0.8, 0.7, 0.75, 0.8]},
              loss={"aligned": [0.3, 1.0, 2.0, 0.9, 0.5], "repair": [0.3, 0.4, 0.6, 0.5, 0.5]},
              endpoints={"a": {"acc": 0.9, "loss": 0.3}, "b": {"acc": 0.8, "loss": 0.5}})
    # mean endpoint: acc 0.85, loss 0.4
    assert c.barrier("aligned") == pytest.approx({"max": 0.65, "mid": 0.65})
    assert c.barrier("repair") == pytest.approx({"max": 0.15, "mid": 0.15})
    assert c.barrier("aligned", "loss") == pytest.approx({"max": 1.6, "mid": 1.6})
    assert c.barrier("repair", "loss") == pytest.approx({"max": 0.2, "mid": 0.2})
    assert c.reduction("repair") == pytest.approx(1 - 0.15 / 0.65)
    # the maximum need not be at the midpoint; without a sampled midpoint there is no "mid"
    off = Curve([0.0, 0.3, 1.0], {"x": [0.9, 0.4, 0.8]}, {"x": [0.3, 0.3, 0.5]}, c.endpoints)
    assert off.barrier("x") == pytest.approx({"max": 0.45, "mid": None})
    assert off.barrier("x", "loss")["max"] == pytest.approx(0.1)  # at alpha = 1: 0.5 - mean 0.4
    back = Curve.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.barrier("repair") == c.barrier("repair") and back.acc == c.acc
    assert "65.00" in c.table() and "76.9%" in c.table()
    with pytest.raises(ConfigError, match="aligned, repair"):
        c.barrier("reset")
    with pytest.raises(ConfigError, match="acc, loss"):
        c.barrier("repair", "top5")


def test_plot_writes_a_png(curve, tmp_path, monkeypatch):
    path = plot_curve(curve, tmp_path / "img" / "curve.png", title="tiny resnet, digits")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    plot_curve(curve, tmp_path / "loss.png", metric="loss")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "loss.png"]  # no temporary files left
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(MergeVisionError, match=r"\[plot\]"):
        plot_curve(curve, tmp_path / "none.png")


def test_reset_is_skipped_without_batchnorm(digits):
    train, test = digits
    torch.manual_seed(0)
    a, b = tiny_resnet(width=4, norm="ln").eval(), tiny_resnet(width=4, norm="ln").eval()
    c = interpolation_curve(a, b, test, calib_loader=[train.tensors[0][:64]], alphas=(0.0, 1.0), max_samples=100,
                            progress=False)
    assert c.modes == ["naive", "aligned", "repair"] and "BatchNorm" in c.notes["reset"]
    assert c.meta["eval_samples"] == 100
    assert c.acc["naive"] == [c.endpoints["a"]["acc"], c.endpoints["b"]["acc"]]
    with pytest.raises(ConfigError, match="no BatchNorm"):
        c.barrier("reset")


def test_align_keeps_b_function_and_undoes_a_permutation(pair, digits):
    train, test = digits
    a, b = pair
    x = test.tensors[0][:128]
    calib = [train.tensors[0][:256]]
    with torch.no_grad():
        aligned = align(a, b, calib, progress=False)
        assert torch.allclose(aligned(x), b(x), atol=1e-5)
        assert any(not torch.equal(v, aligned.state_dict()[k]) for k, v in b.state_dict().items())
        ra = randomize_model(copy.deepcopy(a))
        spec = trace_permutation_spec(ra, x[:1])
        shuffled = permute(ra, spec, random_perms(spec, torch.Generator().manual_seed(0)))
        for method in ("activation", "weight"):
            back = align(ra, shuffled, calib, method=method, progress=False)
            assert all(torch.allclose(v, back.state_dict()[k]) for k, v in ra.state_dict().items())


def test_errors_are_clear(pair, digits):
    _, test = digits
    with pytest.raises(ConfigError, match="naive, aligned, reset, repair"):
        interpolation_curve(*pair, test, modes=("aligned", "magic"), progress=False)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        interpolation_curve(*pair, test, alphas=(0.0, 1.5), progress=False)
    with pytest.raises(ConfigError, match="activation, weight"):
        interpolation_curve(*pair, test, method="none", progress=False)
    with pytest.raises(ConfigError, match="activation, weight"):
        align(*pair, [test.tensors[0][:8]], method="none")


def test_the_curve_runs_its_merges_quietly(pair, digits, caplog):
    """One line per mode, labelled by what it is; no merge summary per point (``method=none``)."""
    train, test = digits
    with caplog.at_level(logging.INFO, logger="mergekit_vision"):
        interpolation_curve(*pair, test, calib_loader=[train.tensors[0][:128]], alphas=(0.0, 0.5, 1.0),
                            modes=("naive", "repair"), progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert "curve: naive average at 3 alphas" in messages and "curve: aligned + REPAIR at 3 alphas" in messages
    assert not [m for m in messages if "method=" in m or m.startswith("merge:")], messages


def test_curve_takes_wrapped_models_and_refuses_one_shot_iterators(pair, digits):
    train, test = digits
    calib = [train.tensors[0][:256]]
    with pytest.raises(DataError, match="one-shot iterator"):  # it would lose the trace's batch, silently
        interpolation_curve(*pair, test, calib_loader=(x for x in calib), alphas=(0.5,), modes=("aligned",),
                            progress=False)
    with pytest.raises(DataError, match="eval_loader is a one-shot iterator"):
        interpolation_curve(*pair, iter([test.tensors]), calib_loader=calib, alphas=(0.5,), modes=("aligned",),
                            progress=False)
    plain = interpolation_curve(*pair, test, calib_loader=calib, alphas=(0.5,), modes=("repair",), progress=False)
    wrapped = interpolation_curve(torch.nn.DataParallel(pair[0]), pair[1], test, calib_loader=calib, alphas=(0.5,),
                                  modes=("repair",), progress=False)
    assert wrapped.acc == plain.acc and wrapped.loss == plain.loss


def test_curve_logs_one_line_per_mode_not_one_per_inner_merge(pair, digits, caplog):
    import logging

    train, test = digits
    with caplog.at_level(logging.INFO, logger="mergekit_vision"):
        interpolation_curve(*pair, test, calib_loader=[train.tensors[0][:256]], alphas=(0.0, 0.5, 1.0),
                            modes=("aligned", "repair"), progress=False)
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in messages if m.startswith("merge:")], messages  # no "merge: method=none ..." per point
    assert [m for m in messages if m.startswith("curve: aligned + REPAIR")] == ["curve: aligned + REPAIR at 3 alphas"]
