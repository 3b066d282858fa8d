"""Tests for mergekit_vision.export: safetensors round trips, timm/torchvision loading, sharding, atomic writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from mergekit_vision.errors import ArchitectureMismatchError, ConfigError, ExportError, MergeVisionError
from mergekit_vision.export import (
    atomic_write,
    load_into,
    load_safetensors,
    load_sharded,
    parse_size,
    save_model_folder,
    save_safetensors,
    save_sharded,
    timm_config,
    write_json_atomic,
    write_text_atomic,
)

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-default running stats and counters, so a round trip that drops buffers is caught."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
    return model.eval()


def _timm_resnet18(num_classes: int = 1000) -> nn.Module:
    return _randomize_bn(timm.create_model("resnet18", pretrained=False, num_classes=num_classes), seed=1)


def _tv_resnet18() -> nn.Module:
    return _randomize_bn(torchvision.models.resnet18(weights=None), seed=2)


@pytest.fixture(scope="module")
def timm_model() -> nn.Module:
    return _timm_resnet18()


@pytest.fixture(scope="module")
def tv_model() -> nn.Module:
    return _tv_resnet18()


def _assert_same_state(expected: dict, actual: dict) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# ----------------------------------------------------------------------------- single file

@pytest.mark.parametrize("which", ["timm", "torchvision"])
def test_round_trip_is_bit_exact(which, timm_model, tv_model, tmp_path):
    model = timm_model if which == "timm" else tv_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_safetensors(model, tmp_path / "model.safetensors")

    state_dict, metadata = load_safetensors(path)
    _assert_same_state(model.state_dict(), state_dict)
    assert state_dict["bn1.num_batches_tracked"].dtype == torch.int64
    assert state_dict["bn1.num_batches_tracked"].item() == model.bn1.num_batches_tracked.item() > 0
    assert metadata == {}
    _assert_same_state(before, model.state_dict())  # the model is not mutated
    assert _leftovers(tmp_path) == []


def test_metadata_round_trip(tmp_path):
    metadata = {
        "recipe": {"alpha": 0.5, "models": ["a", "b"], "repair": {"mode": "repair", "n": 3}},
        "alpha": 0.25,
        "name": "merged-resnet",
        "looks_like_json": "1.5",  # a str stays a str
        "np_scalar": np.float32(0.5),
        "torch_scalar": torch.tensor(3),
    }
    path = save_safetensors({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata=metadata)

    _, loaded = load_safetensors(path)
    assert loaded == {**metadata, "np_scalar": 0.5, "torch_scalar": 3}
    assert loaded["looks_like_json"] == "1.5"
    with safetensors.safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert header["format"] == "pt"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.items())
    assert json.loads(header["recipe"]) == metadata["recipe"]


_SAVE = r"""
import sys, torch
from mergekit_vision.export import save_safetensors, save_sharded
g = torch.Generator().manual_seed(0)
sd = {"conv.weight": torch.randn(4, 3, 3, 3, generator=g), "fc.bias": torch.randn(4, generator=g),
      "bn.num_batches_tracked": torch.tensor(7)}
meta = {"merge_method": "activation", "alpha": 0.5, "repair": "repair", "calibration_samples": 128,
        "sources": [{"model": "timm:resnet18", "checkpoint": "a.safetensors", "sha256": "ab"}],
        "zeta": "z", "beta": "b", "caf\u00e9": "cr\u00e8me"}
if sys.argv[2] == "reversed":
    meta = dict(reversed(list(meta.items())))
save_safetensors(sd, sys.argv[1] + "/single.safetensors", metadata=meta)
save_sharded(sd, sys.argv[1] + "/sharded", max_shard_size=200, metadata=meta)
"""


def test_same_inputs_give_the_same_bytes(tmp_path):
    """Two processes (other hash seeds, metadata given in another order) write byte-identical files:
    safetensors keeps metadata in a per-process randomly ordered map, the header is rewritten sorted."""
    import os
    import subprocess
    import sys

    runs = []
    for seed, order in (("1", "given"), ("2", "reversed")):
        out = tmp_path / order
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _SAVE, str(out), order], check=True, env=env)
        runs.append({p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert len(runs[0]) == 4  # single file, two shards, the index
    assert runs[0] == runs[1]
    tensors, meta = load_safetensors(tmp_path / "given" / "single.safetensors")
    assert meta["alpha"] == 0.5 and meta["caf\u00e9"] == "cr\u00e8me" and int(tensors["bn.num_batches_tracked"]) == 7
    raw = (tmp_path / "given" / "single.safetensors").read_bytes()
    keys = list(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"])
    assert keys == sorted(keys) and len(keys) == 10  # format and the JSON-keys list too


def test_sorting_a_header_of_another_length_keeps_the_data(tmp_path, monkeypatch):
    """A writer that pads its header differently: the sorted header has another length, so the data moves."""
    real = safetensors.torch.save_file

    def padded(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "rb") as f:
            raw = f.read()
        n = int.from_bytes(raw[:8], "little")
        header = raw[8:8 + n] + b" " * 16
        with open(filename, "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header + raw[8 + n:])

    sd = {"a": torch.arange(5.0), "b": torch.ones(2, 3, dtype=torch.bfloat16)}
    plain = save_safetensors(sd, tmp_path / "plain.safetensors", metadata={"z": 1, "a": "x"}).read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", padded)
    path = save_safetensors(sd, tmp_path / "padded.safetensors", metadata={"z": 1, "a": "x"})
    assert path.read_bytes() == plain
    tensors, meta = load_safetensors(path)
    _assert_same_state(sd, tensors)
    assert meta == {"z": 1, "a": "x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["padded.safetensors", "plain.safetensors"]


def test_reserved_or_unserializable_metadata_is_rejected(tmp_path):
    with pytest.raises(ExportError, match="reserved"):
        save_safetensors({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"format": "np"})
    with pytest.raises(ExportError, match="not JSON serializable"):
        save_safetensors({"w": torch.ones(1)}, tmp_path / "m.safetensors", metadata={"x": object()})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("num_classes", [1000, 10])
def test_loads_into_timm_via_pretrained_cfg_overlay(num_classes, tmp_path):
    model = _timm_resnet18(num_classes)
    path = save_safetensors(model, tmp_path / "model.safetensors")

    # `file` outranks the default cfg's hf_hub_id/url, so this never touches the network. num_classes
    # must be in the overlay too when it differs from the default cfg, else timm drops the classifier.
    overlay = dict(file=str(path), num_classes=num_classes)
    loaded = timm.create_model(
        "resnet18", pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay
    ).eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    _assert_same_state(model.state_dict(), loaded.state_dict())


def test_loads_into_torchvision_via_load_state_dict(tv_model, tmp_path):
    path = save_safetensors(tv_model, tmp_path / "model.safetensors")

    fresh = torchvision.models.resnet18(weights=None).eval()
    fresh.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    other = load_into(torchvision.models.resnet18(weights=None), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(X), tv_model(X))
        assert torch.equal(other(X), tv_model(X))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights(tmp_path):
    model = _Tied()
    assert set(model.state_dict()) == {"embed.weight", "head.weight"}
    path = save_safetensors(model, tmp_path / "tied.safetensors")

    state_dict, _ = load_safetensors(path)
    assert torch.equal(state_dict["embed.weight"], model.embed.weight)
    assert torch.equal(state_dict["head.weight"], model.embed.weight)
    assert model.head.weight is model.embed.weight  # still tied: the input was not touched
    fresh = load_into(_Tied(), path)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.head.weight is fresh.embed.weight


def test_non_contiguous_and_shared_slices(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    tensors = {"t": base.t(), "top": base[:2], "bottom": base[2:]}
    save_safetensors(tensors, tmp_path / "m.safetensors")
    loaded, _ = load_safetensors(tmp_path / "m.safetensors")
    _assert_same_state(tensors, loaded)


# ----------------------------------------------------------------------------- errors

def test_missing_and_corrupt_files_raise(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        load_safetensors(tmp_path / "nope.safetensors")
    assert issubclass(ExportError, MergeVisionError)

    torch.save({"w": torch.ones(3)}, tmp_path / "ckpt.safetensors")
    with pytest.raises(ExportError, match="not a readable safetensors"):
        load_safetensors(tmp_path / "ckpt.safetensors")

    save_safetensors({"w": torch.ones(1000)}, tmp_path / "cut.safetensors")
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="not a readable safetensors"):
        load_safetensors(tmp_path / "cut.safetensors")

    with pytest.raises(ExportError, match="not found"):
        load_sharded(tmp_path / "no_dir")


def test_load_into_mismatching_model(timm_model, tmp_path):
    path = save_safetensors(timm_model, tmp_path / "model.safetensors")

    with pytest.raises(ArchitectureMismatchError, match=r"'fc.weight': \(1000, 512\) in file vs \(10, 512\)"):
        load_into(timm.create_model("resnet18", pretrained=False, num_classes=10), path)

    bigger = timm.create_model("resnet26", pretrained=False)
    with pytest.raises(ArchitectureMismatchError, match="missing from the file: 'layer1.0.conv3.weight'"):
        load_into(bigger, path)

    smaller = nn.Sequential()
    smaller.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    with pytest.raises(ArchitectureMismatchError, match=r"not in the model: .* and \d+ more"):
        load_into(smaller, path)
    load_into(smaller, path, strict=False)
    assert torch.equal(smaller.conv1.weight, timm_model.conv1.weight)


# ----------------------------------------------------------------------------- atomic writes

def _crashing_save_file(tensors, filename, metadata=None):
    """Stands in for a run killed mid-write: some bytes land in the file, then it fails."""
    with open(filename, "wb") as f:
        f.write(b"\x08\x00\x00\x00partial")
    raise OSError("disk full (simulated)")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _crashing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_safetensors({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_safetensors({"w": torch.ones(4)}, tmp_path / "model.safetensors")
    good = path.read_bytes()

    monkeypatch.setattr(safetensors.torch, "save_file", _crashing_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_safetensors({"w": torch.zeros(4)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_write_context_manager(tmp_path):
    target = tmp_path / "sub" / "notes.txt"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".notes.txt.tmp-")
        tmp.write_text("done")
        assert not target.exists()  # invisible until the block succeeds
    assert target.read_text() == "done"

    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "done"
    assert _leftovers(target.parent) == []


def test_write_text_and_json_atomic(tmp_path):
    write_text_atomic(tmp_path / "README.md", "# merged\n")
    assert (tmp_path / "README.md").read_text() == "# merged\n"

    obj = {"b": np.int64(2), "a": torch.tensor(0.5), "c": [np.float32(1.5), tmp_path / "x"], "d": {3, 1}}
    path = write_json_atomic(tmp_path / "report.json", obj)
    text = path.read_text()
    assert json.loads(text) == {"a": 0.5, "b": 2, "c": [1.5, str(tmp_path / "x")], "d": [1, 3]}
    assert text.index('"a"') < text.index('"b"') and '\n  "a": 0.5' in text

    with pytest.raises(ExportError, match="JSON"):
        write_json_atomic(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize(
    "size, expected",
    [(1234, 1234), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", int(1.5 * 2**30)),
     ("10kb", 10_000), (" 2 MiB ", 2 * 2**20), ("4096", 4096)],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "", "-1MB", 0, -5, 1.5, True])
def test_parse_size_rejects(size):
    with pytest.raises(ConfigError):
        parse_size(size)


def test_sharded_round_trip(timm_model, tmp_path):
    state = timm_model.state_dict()
    written = save_sharded(timm_model, tmp_path, max_shard_size="8MB", metadata={"alpha": 0.5})

    index_path = tmp_path / "model.safetensors.index.json"
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and written == shards + [index_path]
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads(index_path.read_text())
    assert set(index["weight_map"]) == set(state)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:  # within the limit, unless one tensor alone is larger (layer4 convs: 9.4 MB)
        keys = [k for k, name in index["weight_map"].items() if name == shard.name]
        nbytes = sum(state[k].numel() * state[k].element_size() for k in keys)
        assert nbytes <= 8 * 10**6 or len(keys) == 1

    loaded, metadata = load_sharded(tmp_path)
    _assert_same_state(state, loaded)
    assert metadata == {"alpha": 0.5}
    fresh = load_into(_timm_resnet18().train(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(X), timm_model(X))


def test_sharded_single_file_when_it_fits_and_stale_files_go(tmp_path):
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(8)}  # 1 KiB each

    save_sharded(tensors, tmp_path, max_shard_size=2048)  # 4 shards
    assert len(list(tmp_path.glob("model-*-of-00004.safetensors"))) == 4

    save_sharded(tensors, tmp_path, max_shard_size=3072)  # 3 shards: the 4-shard files must go
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json",
    ]
    _assert_same_state(tensors, load_sharded(tmp_path)[0])

    written = save_sharded(tensors, tmp_path)  # fits in one file: index and shards must go
    assert written == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    _assert_same_state(tensors, load_sharded(tmp_path)[0])

    save_sharded(tensors, tmp_path, max_shard_size=4096)  # back to shards: the single file must go
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_state(tensors, load_sharded(tmp_path)[0])


def test_interrupted_sharded_save_never_looks_complete(tmp_path, monkeypatch):
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(8)}
    save_sharded(tensors, tmp_path, max_shard_size=2048)

    real_save_file = safetensors.torch.save_file
    calls = []

    def crash_on_third(t, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            _crashing_save_file(t, filename, metadata)
        real_save_file(t, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_third)
    with pytest.raises(OSError, match="simulated"):
        save_sharded({k: v + 100 for k, v in tensors.items()}, tmp_path, max_shard_size=2048)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert _leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="interrupted save"):
        load_sharded(tmp_path)


def test_load_sharded_detects_a_missing_shard(tmp_path):
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(4)}
    save_sharded(tensors, tmp_path, max_shard_size=2048)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ExportError, match="model-00002-of-00002.safetensors', which is missing"):
        load_sharded(tmp_path)


# ----------------------------------------------------------------------------- config.json

def test_timm_config_matches_timm_hub_format(tmp_path):
    model = _timm_resnet18(num_classes=10)
    config = timm_config("resnet18", model, merged_by="mergekit_vision")
    assert config["architecture"] == "resnet18"
    assert config["num_classes"] == 10 and config["num_features"] == 512
    assert config["pretrained_cfg"]["num_classes"] == 10
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    assert config["merged_by"] == "mergekit_vision"
    assert not {"url", "file", "hf_hub_id", "source"} & set(config["pretrained_cfg"])  # no source pointers

    # the whole folder rebuilds the model offline through timm's local-dir loader
    save_model_folder(model, tmp_path, "resnet18", metadata={"alpha": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == {k: v for k, v in config.items() if k != "merged_by"}
    if "local-dir" not in getattr(timm.models._factory, "_MODEL_SOURCES", ()):
        pytest.skip("this timm has no local-dir: loader")
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert loaded.num_classes == 10
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_timm_config_without_model_and_minimal_fallback(monkeypatch):
    full = timm_config("resnet18")  # built on the meta device
    assert full["architecture"] == "resnet18" and full["num_classes"] == 1000

    monkeypatch.delattr(timm.models._hub, "save_config_for_hf")  # an older timm
    minimal = timm_config("resnet18")
    for key in ("architecture", "num_classes", "num_features", "global_pool"):
        assert minimal[key] == full[key]
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "classifier"):
        assert minimal["pretrained_cfg"][key] == full["pretrained_cfg"][key]


def test_torchvision_config(tv_model):
    assert timm_config("resnet18", tv_model) == {
        "library": "torchvision", "architecture": "resnet18", "num_classes": 1000, "num_features": 512,
    }
    assert timm_config("vit_b_16")["num_classes"] == 1000  # torchvision-only name, no model given
    assert timm_config("resnet18", library="torchvision")["library"] == "torchvision"
    with pytest.raises(ExportError, match="neither"):
        timm_config("not_a_model_at_all")
