"""The command line end to end: YAML config -> `mergekit-vision merge` in a subprocess -> output folder ->
loaded back into mkv/timm/torchvision models -> the same outputs as the in-memory `merge()`; config errors
(load_config and exit code 2); interrupted writes; inspect; curve; demo wiring."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision
import yaml

from mergekit_vision import __version__, merge
from mergekit_vision.cli import build_parser, main
from mergekit_vision.config import MergeConfig, ModelConfig, load_config, load_model
from mergekit_vision.errors import ArchitectureMismatchError, ConfigError, ExportError
from mergekit_vision.export import load_into, load_sharded
from mergekit_vision.merge import REPAIR_MODES
from mergekit_vision.models import create_model
from mergekit_vision.output import write_output_folder
from mergekit_vision.report import MergeReport
from mergekit_vision.testing import randomize_model
from mergekit_vision.training import evaluate

TINY = {"width": 4}  # mkv:tiny_resnet, 1 x 16 x 16 inputs, 10 classes
TIMM_KW = {"num_classes": 10, "channels": [8, 16, 32, 64], "stem_width": 8}  # a narrow timm resnet18, 32 px


def run_cli(*args, cwd=None, module="mergekit_vision.cli") -> subprocess.CompletedProcess:
    # this checkout's package, whatever the cwd and wherever an installed copy points
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two random mkv:tiny_resnet checkpoints (a .pt wrapped in {"state_dict": ...}, a .safetensors),
    a calibration and an evaluation .npz, and a config dict with paths relative to the folder."""
    d = tmp_path_factory.mktemp("tiny")
    a = randomize_model(create_model("tiny_resnet", **TINY), seed=0).eval()
    b = randomize_model(create_model("tiny_resnet", **TINY), seed=1).eval()
    torch.save({"state_dict": a.state_dict(), "epoch": 7}, d / "a.pt")
    safetensors.torch.save_file(b.state_dict(), d / "b.safetensors")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 16, 16, generator=g), torch.randint(0, 10, (48,), generator=g)
    np.savez(d / "calib.npz", x=x.numpy(), y=y.numpy())
    xe, ye = torch.randn(40, 1, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g)
    np.savez(d / "eval.npz", x=xe.numpy(), y=ye.numpy())
    config = {
        "models": [{"model": "mkv:tiny_resnet", "checkpoint": "a.pt", "kwargs": TINY},
                   {"model": "mkv:tiny_resnet", "checkpoint": "b.safetensors", "kwargs": TINY}],
        "method": "activation",
        "alpha": 0.5,
        "repair": "repair",
        "calibration": {"path": "calib.npz", "samples": None, "batch_size": 16},
    }
    return types.SimpleNamespace(dir=d, a=a, b=b, x=x, xe=xe, ye=ye, config=config)


# ---- end to end ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_merge_mkv_sharded_with_evaluation(tiny, tmp_path):
    cfg = copy.deepcopy(tiny.config)
    cfg.update(evaluation={"path": "eval.npz"}, out_shard_size="3KB")
    config_path = write_yaml(tiny.dir / "sharded.yml", cfg)
    out = tmp_path / "out"
    r = run_cli("merge", config_path, out, cwd=tmp_path)  # paths resolve from the config's folder, not the cwd
    assert r.returncode == 0, r.stderr
    for stage in ("load models:", "trace:", "pass_ab:", "merge:", "evaluate:", "write output:"):
        assert stage in r.stderr

    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert len([n for n in names if n.startswith("model-0")]) >= 2
    assert {"config.json", "mergekit_vision_config.yml", "merge_report.json", "README.md"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary files left

    ref = merge(tiny.a, tiny.b, list(tiny.x.split(16)), alpha=0.5, method="activation", repair="repair",
                progress=False, seed=0)
    state, meta = load_sharded(out)
    assert state.keys() == ref.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
    back = load_into(create_model("tiny_resnet", **TINY), out).eval()
    assert torch.equal(back(tiny.xe), ref(tiny.xe))

    assert meta["merge_method"] == "activation" and meta["alpha"] == 0.5 and meta["repair"] == "repair"
    assert meta["calibration_samples"] == 48 and meta["mergekit_vision_version"] == __version__
    assert [s["sha256"] for s in meta["sources"]] == [sha256(tiny.dir / "a.pt"), sha256(tiny.dir / "b.safetensors")]
    assert [s["checkpoint"] for s in meta["sources"]] == ["a.pt", "b.safetensors"]

    report = json.loads((out / "merge_report.json").read_text())
    assert {"load_models", "load_data", "trace", "pass_ab", "match", "merge", "evaluate"} <= set(report["timings"])
    acc = {k: evaluate(m, (tiny.xe, tiny.ye))["acc"] for k, m in (("model_a", tiny.a), ("model_b", tiny.b),
                                                                  ("merged", ref))}
    assert report["evaluation"] == pytest.approx({**acc, "samples": 40})
    assert json.loads((out / "config.json").read_text()) == {
        "library": "mergekit_vision", "architecture": "tiny_resnet", "model_args": TINY, "num_classes": 10}

    card = (out / "README.md").read_text()
    assert f"mergekit_vision {__version__}" in card and "## Configuration" in card
    assert f"| merged | {100 * acc['merged']:.2f}% |" in card and f"| A | {100 * acc['model_a']:.2f}% |" in card
    assert "variance ratio merged/target" in card
    # the stored config is the validated one: it loads back to the same config
    assert load_config(out / "mergekit_vision_config.yml") == load_config(config_path)


@pytest.mark.slow
def test_merge_timm_loads_back_with_pretrained_cfg_overlay(tmp_path):
    a = randomize_model(timm.create_model("resnet18", **TIMM_KW), seed=0).eval()
    b = randomize_model(timm.create_model("resnet18", **TIMM_KW), seed=1).eval()
    safetensors.torch.save_file(a.state_dict(), tmp_path / "a.safetensors")
    safetensors.torch.save_file(b.state_dict(), tmp_path / "b.safetensors")
    # 64 images: layer4's 64 channels see 64 positions, enough for a correlation matrix (no warning)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "calib.npz", x=x.numpy())  # images only: calibration needs no labels
    cfg = {"models": [{"model": "timm:resnet18", "checkpoint": f"{n}.safetensors", "kwargs": TIMM_KW} for n in "ab"],
           "alpha": 0.3, "repair": "reset", "calibration": {"path": "calib.npz", "batch_size": 16}}
    out = tmp_path / "out"
    r = run_cli("--quiet", "merge", write_yaml(tmp_path / "merge.yml", cfg), out)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet: no progress bars, no stage lines

    ref = merge(a, b, list(x.split(16)), alpha=0.3, method="activation", repair="reset", progress=False)
    kw = {**TIMM_KW, "channels": tuple(TIMM_KW["channels"])}
    loaded = timm.create_model("resnet18", pretrained=True, **kw,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10)).eval()
    x_test = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x_test), ref(x_test))
        # config.json carries the architecture and its kwargs: timm rebuilds the model from the folder alone
        if hasattr(timm.models._hub, "load_model_config_from_path"):  # timm's local-dir: source
            assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x_test), ref(x_test))
    assert json.loads((out / "config.json").read_text())["architecture"] == "resnet18"


def test_three_model_config_merges_into_a_folder_timm_loads(tmp_path):
    from mergekit_vision import merge_many

    ms = [randomize_model(timm.create_model("resnet18", **TIMM_KW), seed=s).eval() for s in range(3)]
    for n, m in zip("abc", ms):
        safetensors.torch.save_file(m.state_dict(), tmp_path / f"{n}.safetensors")
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    cfg = {"models": [{"model": "timm:resnet18", "checkpoint": f"{n}.safetensors", "kwargs": TIMM_KW, "weight": w}
                      for n, w in zip("abc", (1, 2, 1))],
           "repair": "repair", "calibration": {"path": "calib.npz", "batch_size": 32}}
    out = tmp_path / "out"
    r = run_cli("--quiet", "merge", write_yaml(tmp_path / "merge.yml", cfg), out)
    assert r.returncode == 0, r.stderr

    ref = merge_many(ms, list(x.split(32)), weights=[1, 2, 1], progress=False)
    kw = {**TIMM_KW, "channels": tuple(TIMM_KW["channels"])}
    loaded = timm.create_model("resnet18", pretrained=True, **kw,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10)).eval()
    x_test = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x_test), ref(x_test))
    report = json.loads((out / "merge_report.json").read_text())
    assert report["weights"] == [0.25, 0.5, 0.25] and len(report["sources"]) == 3
    assert "a merge of 3 models" in (out / "README.md").read_text()
    again = load_config(out / "mergekit_vision_config.yml")  # the written config reads back
    assert [m.weight for m in again.models] == [1, 2, 1]


def test_config_takes_two_or_more_models_with_optional_weights(tiny):
    base = {**tiny.config}
    base.pop("alpha")
    three = MergeConfig.from_dict({**base, "models": tiny.config["models"] + tiny.config["models"][:1]},
                                  base_dir=tiny.dir)
    assert len(three.models) == 3 and three.weights is None
    weighted = MergeConfig.from_dict({**base, "models": [{**m, "weight": w} for m, w in
                                                         zip(tiny.config["models"], (3, 1))]}, base_dir=tiny.dir)
    assert weighted.alpha == 0.25 and weighted.weights == [3, 1]
    two = MergeConfig.from_dict(tiny.config, base_dir=tiny.dir)  # two models, alpha: as before
    assert two.alpha == 0.5 and two.weights is None
    assert all("weight" not in m for m in yaml.safe_load(two.to_yaml())["models"])  # the YAML as before
    with pytest.raises(ConfigError, match="give each model a weight"):
        MergeConfig.from_dict({**tiny.config, "models": tiny.config["models"] * 2}, base_dir=tiny.dir)
    with pytest.raises(ConfigError, match="for every model or for none"):
        MergeConfig.from_dict({**base, "models": [{**tiny.config["models"][0], "weight": 1}, tiny.config["models"][1]]},
                              base_dir=tiny.dir)


@pytest.mark.slow
def test_merge_torchvision_loads_back_into_torchvision(tmp_path):
    def build(seed):
        return randomize_model(torchvision.models.squeezenet1_1(num_classes=10), seed=seed).eval()
    a, b = build(0), build(1)
    torch.save(a.state_dict(), tmp_path / "a.pth")
    torch.save(b.state_dict(), tmp_path / "b.pth")
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    cfg = {"models": [{"model": "torchvision:squeezenet1_1", "checkpoint": f"{n}.pth", "kwargs": {"num_classes": 10}}
                      for n in "ab"],
           "repair": False, "calibration": {"path": "calib.npz", "batch_size": 8}}
    out = tmp_path / "out"
    # python -m mergekit_vision; global flags also work after the subcommand
    r = run_cli("merge", write_yaml(tmp_path / "merge.yml", cfg), out, "--device", "cpu", "--dtype", "float32", "-q",
                module="mergekit_vision")
    assert r.returncode == 0, r.stderr

    ref = merge(a, b, [x], repair=False, progress=False)
    loaded = torchvision.models.squeezenet1_1(num_classes=10)
    loaded.load_state_dict(safetensors.torch.load_file(out / "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), ref(x))
    assert json.loads((out / "config.json").read_text()) == {
        "library": "torchvision", "architecture": "squeezenet1_1", "num_classes": 10}
    assert "load_into(model, '.')" in (out / "README.md").read_text()


# ---- config errors ---------------------------------------------------------------------------------
def _edit(cfg: dict, case: str) -> dict:
    cfg = copy.deepcopy(cfg)
    if case == "unknown_key":
        cfg["aplha"] = cfg.pop("alpha")
    elif case == "unknown_nested_key":
        cfg["calibration"]["smaples"] = 10
    elif case == "one_model":
        cfg["models"] = cfg["models"][:1]
    elif case == "model_without_name":
        del cfg["models"][1]["model"]
    elif case == "alpha_out_of_range":
        cfg["alpha"] = 1.5
    elif case == "data_path":
        cfg["calibration"]["path"] = "nope/cifar"
    elif case == "checkpoint_path":
        cfg["models"][0]["checkpoint"] = "missing.pt"
    elif case == "no_weights":
        del cfg["models"][0]["checkpoint"]
    elif case == "method":
        cfg["method"] = "activations"
    elif case == "repair":
        cfg["repair"] = "maybe"
    elif case == "shard_size":
        cfg["out_shard_size"] = "5 gigs"
    elif case == "no_calibration":
        del cfg["calibration"]
    elif case == "mergekit_key":
        cfg["out_dtype"] = "bfloat16"
    elif case == "taps":
        cfg["taps"] = "few"
    elif case == "weight_tol":
        cfg["weight_tol"] = -0.1
    return cfg


CONFIG_ERRORS = {
    "unknown_key": "aplha: unknown key — did you mean 'alpha'?",
    "unknown_nested_key": "calibration.smaples: unknown key — did you mean 'samples'?",
    "one_model": "models: need at least 2 models for merge, got 1",
    "model_without_name": "models[1].model: missing — name the architecture",
    "alpha_out_of_range": "alpha: must be in [0, 1], got 1.5",
    "data_path": "calibration.path: 'nope/cifar' does not exist",
    "checkpoint_path": "models[0].checkpoint: 'missing.pt' does not exist",
    "no_weights": "models[0]: 'mkv:tiny_resnet' has no weights: give checkpoint: PATH",
    "method": "method: must be one of activation, weight, none, got 'activations'",
    "repair": f"repair: must be one of {', '.join(REPAIR_MODES)} (or true/false), got 'maybe'",
    "shard_size": "out_shard_size: Shard size '5 gigs' is not understood",
    "no_calibration": "calibration: missing — every merge traces the model",
    "mergekit_key": "out_dtype: unknown key — mergekit's 'out_dtype' is 'dtype' here",
    "taps": "taps: must be one of all, lean, blocks, got 'few'",
    "weight_tol": "weight_tol: input should be greater than or equal to 0, got -0.1",
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_the_key_and_the_fix(tiny, case):
    path = write_yaml(tiny.dir / f"bad_{case}.yml", _edit(tiny.config, case))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ")
    assert CONFIG_ERRORS[case] in str(err.value)


def test_config_data_path_message_gives_the_fix(tiny):
    with pytest.raises(ConfigError, match="— give an ImageFolder root, a CIFAR-10 root or a .npz"):
        load_config(write_yaml(tiny.dir / "bad_data.yml", _edit(tiny.config, "data_path")))


def test_config_reports_every_error_at_once(tiny):
    cfg = _edit(_edit(tiny.config, "alpha_out_of_range"), "unknown_key")
    cfg["alpha"] = 2
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tiny.dir / "two_errors.yml", cfg))
    assert "alpha: must be in [0, 1], got 2" in str(err.value) and "aplha: unknown key" in str(err.value)


def test_config_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text("models:\n  - model: timm:resnet18\n alpha: [0.5\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(path)


@pytest.mark.parametrize("case", ["unknown_key", "model_without_name", "alpha_out_of_range", "data_path"])
def test_cli_config_errors_exit_2_with_one_line(tiny, tmp_path, capsys, case):
    path = write_yaml(tiny.dir / f"cli_{case}.yml", _edit(tiny.config, case))
    assert main(["merge", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and CONFIG_ERRORS[case] in err
    assert not (tmp_path / "out").exists()  # validation comes before any work
    # the process exit code is main()'s: `sys.exit(main())` in cli.py and __main__.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_unavailable_device(tiny, tmp_path, capsys):
    path = write_yaml(tiny.dir / "ok.yml", tiny.config)
    assert main(["merge", str(path), str(tmp_path / "out"), "--device", "cuda"]) == 2
    assert "device: 'cuda' is not available on this machine" in capsys.readouterr().err


def test_cli_refuses_a_result_that_does_not_fit_the_architecture(tiny, tmp_path, capsys):
    # repair: stream keeps identity-shortcut corrections as extra modules: not loadable into A's class
    path = write_yaml(tiny.dir / "stream.yml", {**tiny.config, "repair": "stream"})
    assert main(["-q", "merge", str(path), str(tmp_path / "out")]) == 2
    assert "repair: 'stream' left" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_rotate_stream_reaches_the_merge_and_its_report(tiny, tmp_path):
    """`rotate_stream: true` in the config: a BatchNorm ResNet's streams are not rotated, and the report
    in the output folder says why; the weights are the permutation-only merge's."""
    path = write_yaml(tiny.dir / "rot.yml", {**tiny.config, "rotate_stream": True})
    out = tmp_path / "out"
    assert main(["-q", "merge", str(path), str(out)]) == 0
    rotations = json.loads((out / "merge_report.json").read_text())["rotations"]
    assert rotations and all(v.startswith("not rotated:") and "BatchNorm" in v for v in rotations.values())
    plain = tmp_path / "plain"
    assert main(["-q", "merge", str(write_yaml(tiny.dir / "ok.yml", tiny.config)), str(plain)]) == 0
    got, want = (safetensors.torch.load_file(d / "model.safetensors") for d in (out, plain))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_two_runs_of_one_config_write_the_same_weights_file(tiny, tmp_path):
    path = write_yaml(tiny.dir / "ok.yml", tiny.config)
    for out in ("out1", "out2"):
        assert main(["-q", "merge", str(path), str(tmp_path / out)]) == 0
    first, second = (tmp_path / out / "model.safetensors" for out in ("out1", "out2"))
    assert first.read_bytes() == second.read_bytes()


def _no_work(*args, **kwargs):
    raise AssertionError("models were loaded although the output could not be written")


def test_an_output_under_a_file_exits_2_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    import mergekit_vision.cli as cli

    monkeypatch.setattr(cli, "_load_inputs", _no_work)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    path = write_yaml(tiny.dir / "ok.yml", tiny.config)
    for out, msg in ((blocker / "out", f"cannot be created: '{blocker}' is a file"),
                     (blocker / "a" / "b", f"cannot be created: '{blocker}' is a file"),
                     (blocker, "is a file; give a folder path")):
        assert main(["-q", "merge", str(path), str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: OUT_DIR ") and err.count("\n") == 1 and msg in err
    cfg = write_yaml(tiny.dir / "curve_out.yml", {**tiny.config, "evaluation": {"path": "eval.npz"}})
    assert main(["-q", "curve", str(cfg), "--out", str(blocker / "curve.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{blocker}' is a file" in err
    assert blocker.read_text() == "a file, not a folder"


# Root writes into any folder: without CAP_DAC_OVERRIDE it meets file modes as any user does.
_AS_A_USER = r"""
import ctypes, os, sys
if os.geteuid() == 0:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    data[0].effective &= ~(1 << 1)  # CAP_DAC_OVERRIDE
    data[0].permitted &= ~(1 << 1)
    assert libc.capset(ctypes.byref(header), data) == 0, os.strerror(ctypes.get_errno())
from mergekit_vision.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_read_only_output_folder_exits_2_before_any_work(tiny, tmp_path):
    import os

    path = write_yaml(tiny.dir / "ok.yml", tiny.config)
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    try:
        for out, msg in ((ro / "out", f"OUT_DIR '{ro / 'out'}' cannot be created: '{ro}' is not writable"),
                         (ro, f"OUT_DIR '{ro}' is not writable")):
            r = subprocess.run([sys.executable, "-c", _AS_A_USER, "-q", "merge", str(path), str(out)],
                               capture_output=True, text=True, timeout=300, env=env)
            assert r.returncode == 2, r.stderr
            assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and msg in r.stderr
            assert "Permission denied" in r.stderr
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_checkpoint_that_does_not_fit_names_the_key(tiny):
    ctx = {"base_dir": tiny.dir}
    for ckpt in ("a.pt", "b.safetensors"):
        mc = ModelConfig.model_validate({"model": "mkv:tiny_resnet", "checkpoint": ckpt,
                                         "kwargs": {**TINY, "num_classes": 7}}, context=ctx)
        with pytest.raises(ArchitectureMismatchError, match=r"models\[1\]\.checkpoint: .*fc\.weight.*"
                                                            r"Set models\[1\]\.kwargs"):
            load_model(mc, where="models[1]")
    torch.save({"epoch": 3, "lr": torch.tensor(0.1), "note": [1, 2]}, tiny.dir / "not_a_state_dict.pt")
    mc = ModelConfig.model_validate({"model": "mkv:tiny_resnet", "checkpoint": "not_a_state_dict.pt",
                                     "kwargs": TINY}, context=ctx)
    with pytest.raises(ConfigError, match=r"models\[0\]\.checkpoint: .* holds no state dict"):
        load_model(mc)
    model, source = load_model(ModelConfig.model_validate(tiny.config["models"][0], context=ctx))
    assert all(torch.equal(v, tiny.a.state_dict()[k]) for k, v in model.state_dict().items())
    assert source["sha256"] == sha256(tiny.dir / "a.pt")


def test_global_flags_before_or_after_the_subcommand():
    p = build_parser()
    before = p.parse_args(["--quiet", "--device", "cuda", "merge", "c.yml", "out"])
    after = p.parse_args(["merge", "c.yml", "out", "-q", "--dtype", "bfloat16", "-v"])
    assert (before.quiet, before.device, before.dtype) == (True, "cuda", None)
    assert (after.quiet, after.verbose, after.device, after.dtype) == (True, True, None, "bfloat16")


# ---- interrupted writes ------------------------------------------------------------------------------
def _crash_midway(monkeypatch, fail_on_call: int = 1):
    """safetensors' writer writes half a file, then the process is interrupted (Ctrl-C)."""
    real, calls = safetensors.torch.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) >= fail_on_call:
            real(tensors, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


def test_cli_interrupted_while_saving_leaves_no_complete_folder(tiny, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _crash_midway(monkeypatch)
    assert main(["-q", "merge", str(write_yaml(tiny.dir / "ok.yml", tiny.config)), str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # no weights, no card, no temporary file


def test_the_interrupt_message_says_what_is_in_the_folder(tiny, tmp_path, monkeypatch, capsys):
    path = write_yaml(tiny.dir / "ok.yml", tiny.config)

    def interrupted_merge(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    # the module: the package's own `merge` attribute is the function
    monkeypatch.setattr(sys.modules["mergekit_vision.merge"], "merge", interrupted_merge)
    assert main(["-q", "merge", str(path), str(out)]) == 130
    assert capsys.readouterr().err == f"error: interrupted; nothing was written ({out} was not created)\n"
    assert not out.exists()

    # a complete earlier result, then a run interrupted before it writes: the folder is as it was
    config = MergeConfig.from_dict(tiny.config, base_dir=tiny.dir)
    report = MergeReport(method="activation", alpha=0.5, repair="repair", calibration_samples=48)
    write_output_folder(out, tiny.a, config, report, model_name="tiny_resnet", library="mkv")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["-q", "merge", str(path), str(out)]) == 130
    err = capsys.readouterr().err
    assert err == f"error: interrupted; nothing was written to {out}, its earlier complete result is untouched\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # interrupted while writing: now it is incomplete, and the message says so
    monkeypatch.undo()
    _crash_midway(monkeypatch)
    assert main(["-q", "merge", str(path), str(out)]) == 130
    assert capsys.readouterr().err == f"error: interrupted; {out} is incomplete (no README.md): run the merge again\n"
    assert not (out / "README.md").exists()


def test_interrupted_rerun_and_interrupted_shards(tiny, tmp_path, monkeypatch):
    config = MergeConfig.from_dict(tiny.config, base_dir=tiny.dir)
    report = MergeReport(method="activation", alpha=0.5, repair="repair", calibration_samples=48)
    out = tmp_path / "out"
    write_output_folder(out, tiny.a, config, report, model_name="tiny_resnet", library="mkv")
    assert (out / "README.md").is_file()
    old = (out / "model.safetensors").read_bytes()

    # a re-run into the same folder, interrupted: the old card goes, the old weights stay whole
    _crash_midway(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_output_folder(out, tiny.b, config, report, model_name="tiny_resnet", library="mkv")
    assert not (out / "README.md").exists()
    assert (out / "model.safetensors").read_bytes() == old
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    # sharded, interrupted at the second shard: no index, no card, and loading says why
    monkeypatch.undo()
    calls = _crash_midway(monkeypatch, fail_on_call=2)
    sharded = MergeConfig.from_dict({**tiny.config, "out_shard_size": "3KB"}, base_dir=tiny.dir)
    out2 = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        write_output_folder(out2, tiny.a, sharded, report, model_name="tiny_resnet", library="mkv")
    assert len(calls) == 2
    names = [p.name for p in out2.iterdir()]
    assert len(names) == 1 and names[0].startswith("model-00001-of-")  # the first shard only: no index, no card
    with pytest.raises(ExportError, match="interrupted save"):
        load_sharded(out2)


# ---- inspect, curve, demo ----------------------------------------------------------------------------
def test_inspect_prints_the_group_table(capsys):
    assert main(["inspect", "mkv:tiny_resnet", "--size", "16", "--in-chans", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == ["group", "size", "blocks", "members", "taps", "frozen", "reason"]
    assert "layer1.0.conv1" in out and "model output" in out


def test_curve_prints_the_table_and_saves_the_plot(tiny, tmp_path, capsys):
    cfg = {**copy.deepcopy(tiny.config), "evaluation": {"path": "eval.npz"}}
    out = tmp_path / "curve.png"
    assert main(["-q", "curve", str(write_yaml(tiny.dir / "curve.yml", cfg)), "--out", str(out),
                 "--alphas", "0,0.5,1", "--modes", "naive,repair"]) == 0
    printed = capsys.readouterr().out
    assert "barrier mid" in printed and "accuracy barrier at alpha=0.5" in printed
    curve = json.loads(out.with_suffix(".json").read_text())
    assert curve["alphas"] == [0, 0.5, 1] and set(curve["acc"]) == {"naive", "repair"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_refuses_a_config_of_three_models(tiny, tmp_path, capsys):
    cfg = {**copy.deepcopy(tiny.config), "evaluation": {"path": "eval.npz"}}
    cfg.pop("alpha")
    cfg["models"] = cfg["models"] + cfg["models"][:1]
    assert main(["curve", str(write_yaml(tiny.dir / "three.yml", cfg)), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "curve interpolates between two models" in err and "the config has 3" in err


def test_curve_needs_an_evaluation_set(tiny, tmp_path, capsys):
    path = write_yaml(tiny.dir / "ok.yml", tiny.config)
    assert main(["curve", str(path), "--out", str(tmp_path / "c.png")]) == 2
    assert "evaluation: missing" in capsys.readouterr().err


def test_demo_refuses_device_and_dtype_it_does_not_use(tmp_path, capsys):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
    assert "demo runs on the CPU in float32" in capsys.readouterr().err
    assert main(["demo", "--dtype", "bfloat16", "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()


def test_demo_calls_run_demo(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("mergekit_vision.demo")

    def run_demo(out_dir, *, quiet=False):
        calls.append((out_dir, quiet))
        return {"table": "naive 10% | aligned 50% | repair 90%"}

    fake.run_demo = run_demo
    monkeypatch.setitem(sys.modules, "mergekit_vision.demo", fake)
    assert main(["--quiet", "demo", "--out", str(tmp_path / "d")]) == 0
    assert calls == [(tmp_path / "d", True)]
    assert capsys.readouterr().out == "naive 10% | aligned 50% | repair 90%\n"


def test_inspect_names_the_input_size_a_model_was_built_for(capsys):
    """timm's ViTs take the input size they were built for: at the default 64 px, inspect says which."""
    assert main(["inspect", "timm:vit_tiny_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "timm:vit_tiny_patch16_224 does not run on an input of shape (1, 3, 64, 64)" in err
    assert "it was built for 224-px inputs: pass --size 224" in err


def test_demo_trains_with_a_progress_bar_unless_quiet(monkeypatch, tmp_path):
    import mergekit_vision.demo as demo

    seen = []

    def fake_train(model, data, **kw):
        seen.append(kw["progress"])
        return model

    monkeypatch.setattr(demo, "train_classifier", fake_train)
    for quiet in (False, True):
        demo.digits_pair((0, 1), cache_dir=str(tmp_path / str(quiet)), progress=not quiet)
    assert seen == [True, True, False, False]
