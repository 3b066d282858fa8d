"""merge() gives the tensors it gave before the N-way pipeline replaced its own code, bit for bit
(tests/fixtures/make_fixtures.py froze them), for activation/weight x every repair mode on the
reference nets and timm resnet18; merge_many at two models gives merge's tensors bit for bit.
Bit for bit on the machine the files were made on (their metadata names it); on another CPU, whose
kernels sum in another order, to float64 rounding (1e-12 relative)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit_vision import merge, merge_many

_spec = importlib.util.spec_from_file_location("make_fixtures", Path(__file__).parent / "fixtures" / "make_fixtures.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)

pytestmark = pytest.mark.usefixtures("one_thread")
NET_MARKS = {"vgg11": [pytest.mark.slow], "timm_resnet18": [pytest.mark.slow]}


def _frozen(net):
    with safe_open(str(fx.HERE / f"merge_{net}.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def _approx(got, want):
    """The report's numbers: exact for strings and counts, floats to 1e-12 relative."""
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-12, abs=1e-15)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(_approx(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_approx(got[k], want[k]) for k in want)
    return got == want


def _same_tensors(sd, tensors, meta, name) -> None:
    """Bit for bit where the fixture's machine is this one; to float64 rounding elsewhere."""
    got, want = fx.samples(sd), tensors[name]
    if meta.get("machine") == fx.machine():
        assert torch.equal(got, want), name
        assert fx.digest(sd) == meta[name]["sha256"], name
    else:
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= 1e-12, f"{name}: {err:.1e} relative (fixtures made on {meta.get('machine')}, here {fx.machine()})"


@pytest.mark.parametrize("net", [pytest.param(n, marks=NET_MARKS.get(n, [])) for n in fx.NETS])
def test_merge_matches_frozen_outputs(net):
    tensors, meta = _frozen(net)
    models = fx.pair(net)
    for method, repair in fx.cases():
        name = fx.case_name(method, repair)
        merged, rep = fx.run_case(merge, net, method, repair, models)
        sd = merged.state_dict()
        assert len(sd) == meta[name]["num_keys"], name
        _same_tensors(sd, tensors, meta, name)
        got = json.loads(json.dumps(fx.report_numbers(rep)))
        assert _approx(got, meta[name]["report"]), name


@pytest.mark.parametrize("net", ["resnet20_bn", "resnet20_ln"])
def test_merge_many_of_two_is_merge_bit_for_bit(net):
    """(On timm resnet18 both equal the frozen outputs: see the test below.)"""
    a, b, calib = fx.pair(net)
    for method, repair in fx.cases():
        ref = merge(a, b, calib, alpha=fx.ALPHA, method=method, repair=repair, progress=False)
        got = merge_many([a, b], calib, weights=[1 - fx.ALPHA, fx.ALPHA], reference=0, method=method,
                         repair=repair, progress=False)
        sd = got.state_dict()
        assert list(sd) == list(ref.state_dict()), (method, repair)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, sd[k]), f"{method}-{repair}: {k}"


@pytest.mark.slow
def test_merge_many_of_two_gives_the_frozen_outputs_on_timm_resnet18():
    tensors, meta = _frozen("timm_resnet18")
    a, b, calib = fx.pair("timm_resnet18")
    for method, repair in fx.cases():
        name = fx.case_name(method, repair)
        got = merge_many([a, b], calib, weights=[1 - fx.ALPHA, fx.ALPHA], reference=0, method=method,
                         repair=repair, progress=False)
        _same_tensors(got.state_dict(), tensors, meta, name)
