"""What a new user runs into (issue 11, "tried as a new user would"): silent data loss, inference
tensors, errors that must name the problem and the fix."""
import pytest
import torch
from torch import nn

from mergekit_vision import merge, merge_many
from mergekit_vision.errors import ArchitectureMismatchError, DataError, NumericalError
from mergekit_vision.models import create_model
from mergekit_vision.testing import randomize_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _pair():
    a = randomize_model(create_model("tiny_resnet").eval(), seed=1)
    b = randomize_model(create_model("tiny_resnet").eval(), seed=2)
    return a, b


X = torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(0))


# ---- one-shot iterators ------------------------------------------------------------------------------
def _gen():
    for i in range(4):
        yield X[32 * i:32 * (i + 1)]


@pytest.mark.parametrize("make", [_gen, lambda: iter(list(X.split(32))), lambda: zip(X.split(32))],
                         ids=["generator", "list_iterator", "zip"])
def test_a_one_shot_iterator_is_refused_up_front(make):
    a, b = _pair()
    for kwargs in ({}, {"repair": False}, {"method": "weight", "repair": False}):
        with pytest.raises(DataError, match=r"one-shot iterator.*list\(generator\)"):
            merge(a, b, make(), progress=False, **kwargs)
    with pytest.raises(DataError, match="one-shot iterator"):
        merge_many([a, b], make(), progress=False)


def test_the_suggested_fix_uses_every_sample():
    a, b = _pair()
    for kwargs in ({}, {"repair": False}):
        _, rep = merge(a, b, list(_gen()), progress=False, return_report=True, **kwargs)
        assert rep.calibration_samples == 128
    _, rep = merge_many([a, b], list(_gen()), progress=False, return_report=True)
    assert rep.calibration_samples == 128


# ---- inference mode ----------------------------------------------------------------------------------
def _fine_tune_step(model):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(X[:16]), torch.arange(16) % 10)
    loss.backward()
    opt.step()
    return sum(int(not torch.equal(p0, p)) for p0, p in zip(before, model.parameters()))


@pytest.mark.parametrize("how", ["merge", "merge_many"])
def test_a_model_merged_inside_inference_mode_can_be_fine_tuned(how):
    with torch.inference_mode():
        a, b = _pair()  # built there too: inference-tensor weights
        data = list(X.split(64))  # and inference-tensor data
        merged = merge(a, b, data, progress=False) if how == "merge" else merge_many([a, b], data, progress=False)
    assert not any(t.is_inference() for t in merged.state_dict().values())
    assert _fine_tune_step(merged) == len(list(merged.parameters()))


# ---- errors that name the problem and the fix ----------------------------------------------------------
def test_models_of_different_dtypes_or_devices_are_named_with_the_fix():
    a, b = _pair()
    with pytest.raises(ArchitectureMismatchError,
                       match=r"model_b is float32 and model_a bfloat16 .*model_b\.to\(torch\.bfloat16\)"):
        merge(a.to(torch.bfloat16), b, [X.bfloat16()], progress=False)
    with pytest.raises(ArchitectureMismatchError, match=r"models\[2\] is float64 and models\[0\] float32"):
        merge_many([a.float(), b, _pair()[0].double()], [X], progress=False)
    with pytest.raises(ArchitectureMismatchError, match=r"model_b is on meta and model_a on cpu.*model_b\.to\('cpu'\)"):
        merge(a.float(), _pair()[1].to("meta"), [X], progress=False)
    # the fix the message gives works
    merged = merge(a.to(torch.bfloat16), b.to(torch.bfloat16), [X], progress=False)
    assert next(merged.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("how", ["merge", "merge_many"])
def test_a_later_batch_with_other_channels_names_its_index_and_shapes(how):
    a, b = _pair()
    data = [X[:32], X[32:64], torch.randn(32, 3, 16, 16), X[64:]]
    with pytest.raises(DataError, match=r"batch 2 has shape \(32, 3, 16, 16\) but batch 0 had \(32, 1, 16, 16\)"):
        merge(a, b, data, progress=False) if how == "merge" else merge_many([a, b], data, progress=False)


def test_other_spatial_sizes_are_still_accepted():
    a, b = _pair()  # global pooling: any size works, and per-channel statistics do not care
    _, rep = merge(a, b, [X[:32], torch.randn(16, 1, 20, 20)], progress=False, return_report=True)
    assert rep.calibration_samples == 48


def test_uint8_images_are_named_with_the_conversion():
    a, b = _pair()
    raw = (X * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(DataError, match=r"batch 0 holds uint8 values .*float32 inputs.*ToTensor\(\).*Normalize"):
        merge(a, b, [raw], progress=False)
    with pytest.raises(DataError, match="uint8"):  # with a given spec too (no trace forward to fail first)
        merge(a, b, [(X[:32], torch.zeros(32)), (raw[:32], torch.zeros(32))], progress=False)


@pytest.mark.parametrize("batches", [[torch.arange(16) % 10], [(torch.arange(16) % 10, X[:16])]],
                         ids=["labels_only", "labels_first"])
def test_a_labels_only_batch_is_reported_as_labels_with_its_shape(batches):
    a, b = _pair()
    with pytest.raises(DataError, match=r"batch 0 is a 1-D tensor of shape \(16,\) holding int64 .*labels"):
        merge(a, b, batches, progress=False)


def test_a_first_batch_the_model_cannot_take_is_reported_with_its_own_shape():
    a, b = _pair()
    with pytest.raises(DataError, match=r"first calibration batch \(shape \(8, 3, 16, 16\), float32\)"):
        merge(a, b, [torch.randn(8, 3, 16, 16)], progress=False)


def test_nan_inputs_are_named_with_the_batch():
    a, b = _pair()
    bad = X[32:64].clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="batch 1 has NaN or inf values"):
        merge(a, b, [X[:32], bad], progress=False)


@pytest.mark.parametrize("how", ["merge", "merge_many"])
@pytest.mark.parametrize("scale", [1e18, 1e30, 1e37])
def test_overflowing_inputs_point_at_the_inputs_not_the_checkpoint(how, scale):
    """x1e18: REPAIR's statistics overflow (merge) or the corrected net's activations do (merge_many);
    x1e30: the float32 moments overflow (the calibration-evidence check refuses the data); x1e37: the
    models' own activations overflow. The weights are fine throughout, and the message says so."""
    a, b = _pair()
    data = [X * scale]
    with pytest.raises((NumericalError, DataError)) as info:
        merge(a, b, data, progress=False) if how == "merge" else merge_many([a, b], data, progress=False)
    msg = str(info.value)
    assert "re-train" not in msg and "normalized as in training" in msg
    if isinstance(info.value, NumericalError):
        assert "the merged model has NaN or inf" in msg or "non-finite activations" in msg
        assert "weights are finite" in msg and f"{float((X * scale).abs().max()):.3g}" in msg


# ---- wrapped models ------------------------------------------------------------------------------------
def test_data_parallel_and_compiled_models_merge_as_the_models_inside():
    a, b = _pair()
    sa = {k: v.clone() for k, v in a.state_dict().items()}
    wa, wb = nn.DataParallel(a), torch.compile(b)
    merged = merge(wa, wb, [X], progress=False)
    plain = merge(a, b, [X], progress=False)
    assert type(merged) is type(a)  # the inner architecture, neither wrapped nor compiled
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged.state_dict().items())
    assert wa.module is a and wb._orig_mod is b  # the wrappers hold the same, untouched models
    assert all(torch.equal(v, sa[k]) for k, v in a.state_dict().items())
    nested = merge_many([nn.DataParallel(torch.compile(a)), b], [X], progress=False)
    assert type(nested) is type(a)
    assert all(torch.equal(v, merge_many([a, b], [X], progress=False).state_dict()[k])
               for k, v in nested.state_dict().items())


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
@pytest.mark.parametrize("wrap", ["_orig_mod.", "module.", "module._orig_mod."])
def test_a_config_unwraps_checkpoints_saved_from_wrapped_models(tmp_path, fmt, wrap):
    import safetensors.torch

    from mergekit_vision.config import ModelConfig, load_model

    a, _ = _pair()
    sd = {wrap + k: v for k, v in a.state_dict().items()}
    path = tmp_path / f"a{fmt}"
    torch.save(sd, path) if fmt == ".pt" else safetensors.torch.save_file(sd, path)
    mc = ModelConfig.model_validate({"model": "mkv:tiny_resnet", "checkpoint": path.name},
                                    context={"base_dir": tmp_path})
    model, _ = load_model(mc)
    assert model.state_dict().keys() == a.state_dict().keys()
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in model.state_dict().items())


def test_merge_many_reports_the_example_it_traced_with():
    a, b = _pair()
    with pytest.raises(DataError, match=r"cannot take the example input \(shape \(1, 3, 16, 16\), float32; the first "
                                        r"sample of the calibration data"):
        merge_many([a, b], [torch.randn(8, 3, 16, 16)], progress=False)
