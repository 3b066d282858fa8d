"""Reference models (build, forward, fx trace), data plumbing (iter_inputs, digits, npz, CIFAR-10 formats)
and the small training helpers."""
from __future__ import annotations

import io
import pickle
import time

import numpy as np
import pytest
import torch
import torch.fx
from torch.utils.data import DataLoader, TensorDataset

from mergekit_vision.data import (CIFAR10_MEAN, CIFAR10_STD, count_samples, digits_dataset, iter_inputs,
                                  load_cifar10, load_dataset, load_image_folder, load_npz)
from mergekit_vision.errors import DataError, MergeVisionError
from mergekit_vision.models import MODELS, create_model, resnet20, tiny_resnet, vgg11
from mergekit_vision.training import crop_flip, evaluate, random_crop, train_classifier


@pytest.fixture(autouse=True)
def _few_threads():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------ models

MODEL_CASES = [
    ("resnet20", dict(norm="bn"), (2, 3, 32, 32)),
    ("resnet20", dict(norm="ln"), (2, 3, 32, 32)),
    ("resnet20", dict(norm="gn", width=2), (2, 3, 32, 32)),
    ("resnet20", dict(norm="none"), (2, 3, 32, 32)),
    ("vgg11", dict(), (2, 3, 32, 32)),
    ("vgg11", dict(norm="bn", width=0.25), (2, 3, 32, 32)),
    ("tiny_resnet", dict(), (2, 1, 16, 16)),
    ("tiny_resnet", dict(norm="ln", width=4, in_chans=3, num_classes=5), (2, 3, 16, 16)),
]


@pytest.mark.parametrize("name,kwargs,shape", MODEL_CASES, ids=lambda v: str(v))
def test_model_forward_and_fx_trace(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        out = model(x)
        gm = torch.fx.symbolic_trace(model)
        out_gm = gm(x)
    assert out.shape == (shape[0], kwargs.get("num_classes", 10))
    torch.testing.assert_close(out_gm, out, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["bn", "ln", "gn", "none"])
def test_resnet20_norm_and_bias_convention(norm):
    model = resnet20(norm=norm)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 + 2  # 19 3x3 convs + 2 projection shortcuts (option B)
    assert all((c.bias is None) == (norm == "bn") for c in convs)
    expected = {"bn": torch.nn.BatchNorm2d, "ln": torch.nn.GroupNorm, "gn": torch.nn.GroupNorm,
                "none": torch.nn.Identity}[norm]
    assert isinstance(model.layer1[0].norm1, expected)
    if norm == "ln":
        assert model.layer3[0].norm1.num_groups == 1
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
            model.layer3[0].conv1.out_channels] == [16, 32, 64]


def test_widths_scale_channels():
    assert resnet20(width=4).fc.in_features == 256
    assert vgg11().classifier.in_features == 512
    assert vgg11(width=2).classifier.in_features == 1024
    assert tiny_resnet(width=8).fc.in_features == 16
    assert not any(isinstance(m, torch.nn.Identity) for m in vgg11(norm="none").features)


def test_registry_errors_list_valid_names():
    assert set(MODELS) == {"resnet20", "vgg11", "tiny_resnet"}
    with pytest.raises(MergeVisionError, match="resnet20.*tiny_resnet.*vgg11"):
        create_model("resnet18")
    with pytest.raises(ValueError, match="'bn', 'gn', 'ln', 'none'"):
        resnet20(norm="batchnorm")
    with pytest.raises(MergeVisionError, match="width"):
        tiny_resnet(width=0)


# ------------------------------------------------------------------------------------------- iter_inputs

def _xy(n=10, c=1, s=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, s, s, generator=g), torch.arange(n) % 3


def test_iter_inputs_dataloader_of_pairs_is_reiterable():
    x, y = _xy(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for _ in range(2):
        batches = list(iter_inputs(loader))
        assert [b.shape[0] for b in batches] == [4, 4, 2]
        torch.testing.assert_close(torch.cat(batches), x)
    assert count_samples(loader) == 10


def test_iter_inputs_list_dict_and_dtype():
    x, _ = _xy(6)
    assert [b.shape[0] for b in iter_inputs([x[:2], x[2:]])] == [2, 4]
    batches = list(iter_inputs([{"image": x, "label": torch.zeros(6)}], dtype=torch.float64))
    assert batches[0].dtype == torch.float64
    ints = list(iter_inputs([torch.ones(3, 5, dtype=torch.long)], dtype=torch.float16))
    assert ints[0].dtype == torch.long  # dtype applies to floating inputs only


def test_iter_inputs_bare_tensor_and_dataset_are_chunked():
    x = torch.zeros(600, 1, 2, 2)
    assert [b.shape[0] for b in iter_inputs(x)] == [256, 256, 88]
    assert [b.shape[0] for b in iter_inputs(TensorDataset(x, torch.zeros(600)))] == [256, 256, 88]
    assert count_samples(x) == 600 and count_samples(x, max_samples=100) == 100


def test_iter_inputs_truncates_at_max_samples_and_batches():
    x, y = _xy(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert [b.shape[0] for b in iter_inputs(loader, max_samples=6)] == [4, 2]
    assert [b.shape[0] for b in iter_inputs(loader, max_samples=8)] == [4, 4]
    assert [b.shape[0] for b in iter_inputs(loader, max_batches=1)] == [4]
    assert count_samples(loader, max_samples=7) == 7


def test_iter_inputs_empty_loader():
    with pytest.raises(DataError, match="calibration loader is empty"):
        list(iter_inputs([]))
    with pytest.raises(DataError, match="calibration loader is empty"):
        list(iter_inputs(DataLoader(TensorDataset(torch.zeros(3, 2)), batch_size=4, drop_last=True)))


def test_iter_inputs_exhausted_generator_second_pass():
    gen = (b for b in [torch.zeros(2, 3)])
    assert len(list(iter_inputs(gen))) == 1
    with pytest.raises(DataError, match="one-shot iterator"):
        list(iter_inputs(gen))


@pytest.mark.parametrize("bad,match", [
    ([np.zeros((2, 3))], "has type ndarray"),
    ([{"foo": torch.zeros(2)}], "dict with keys \\['foo'\\]"),
    ([("not a tensor", 1)], "input item has type str"),
    ([torch.zeros(0, 3, 4, 4)], "has no samples"),
    (42, "not iterable"),
    ("data/cifar", "is a path"),
])
def test_iter_inputs_bad_batches(bad, match):
    with pytest.raises(DataError, match=match):
        list(iter_inputs(bad))


# ----------------------------------------------------------------------------------------------- digits

def test_digits_dataset_shapes_and_determinism():
    train, test = digits_dataset(16, "train"), digits_dataset(16, "test")
    assert train.tensors[0].shape == (1347, 1, 16, 16) and test.tensors[0].shape == (450, 1, 16, 16)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert abs(float(train.tensors[0].mean())) < 1e-4 and abs(float(train.tensors[0].std()) - 1) < 1e-3
    assert set(test.tensors[1].bincount().tolist()) <= {43, 44, 45, 46}  # stratified
    again = digits_dataset(16, "train")
    assert torch.equal(again.tensors[0], train.tensors[0]) and torch.equal(again.tensors[1], train.tensors[1])
    again.tensors[0].zero_()  # callers get copies: the cache stays intact
    assert torch.equal(digits_dataset(16, "train").tensors[0], train.tensors[0])
    other = digits_dataset(16, "train", seed=1)
    assert not torch.equal(other.tensors[1], train.tensors[1])
    assert digits_dataset(8, "test").tensors[0].shape == (450, 1, 8, 8)
    with pytest.raises(DataError, match="split"):
        digits_dataset(16, "val")


# ------------------------------------------------------------------------------------------------- files

def test_load_npz_round_trip_nhwc_uint8(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 6, 6, 3), dtype=np.uint8)
    y = np.arange(5)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_npz(tmp_path / "d.npz")
    assert ds.tensors[0].shape == (5, 3, 6, 6)
    torch.testing.assert_close(ds.tensors[0], torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    assert ds.tensors[1].tolist() == y.tolist()
    norm = load_npz(tmp_path / "d.npz", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_samples=2)
    torch.testing.assert_close(norm.tensors[0], (ds.tensors[0][:2] - 0.5) / 0.25)


def test_load_npz_nchw_float_images_only_and_errors(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 1, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", images=x)
    ds = load_npz(tmp_path / "f.npz", x_key="images")
    assert len(ds.tensors) == 1
    torch.testing.assert_close(ds.tensors[0], torch.from_numpy(x))
    with pytest.raises(DataError, match="has no array 'x'.*images"):
        load_npz(tmp_path / "f.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(tmp_path / "junk.npz")


def _write_fake_cifar_pickles(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    everything = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(folder / name, "wb") as fh:  # the layout of the official python pickles
            pickle.dump({"batch_label": name, "data": data, "labels": labels,
                         "filenames": [f"{i}.png" for i in range(n_per_batch)]}, fh, protocol=2)
        everything[name] = (data, labels)
    return everything


def test_load_cifar10_torchvision_folder(tmp_path):
    batches = _write_fake_cifar_pickles(tmp_path)
    train = load_cifar10(tmp_path, "train")
    test = load_cifar10(tmp_path / "cifar-10-batches-py", "test", normalize=False)
    assert train.tensors[0].shape == (20, 3, 32, 32) and test.tensors[0].shape == (4, 3, 32, 32)
    data, labels = batches["test_batch"]
    torch.testing.assert_close(test.tensors[0], torch.from_numpy(data).float().view(4, 3, 32, 32) / 255)
    assert test.tensors[1].tolist() == labels and test.tensors[1].dtype == torch.int64
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    first = torch.from_numpy(batches["data_batch_1"][0]).float().view(-1, 3, 32, 32) / 255
    torch.testing.assert_close(train.tensors[0][:4], (first - mean) / std)
    assert load_dataset(tmp_path, split="test").tensors[0].shape == (4, 3, 32, 32)


def _write_fake_cifar_jpeg_npz(path, n_train=6, n_test=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        # flat colours survive JPEG almost exactly, so the decoded pixels can be checked
        colours = rng.integers(0, 256, size=(n, 1, 1, 3), dtype=np.uint8)
        images = np.broadcast_to(colours, (n, 32, 32, 3)).copy()
        blobs = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=95)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
        arrays[f"{split}_jpeg_blob"] = np.concatenate(blobs)
        arrays[f"{split}_jpeg_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"y_{split}"] = rng.integers(0, 10, size=n).astype(np.int64)
        arrays[f"_images_{split}"] = images
    np.savez(path, label_names=np.array([f"c{i}" for i in range(10)]),
             **{k: v for k, v in arrays.items() if not k.startswith("_")})
    return arrays


def test_load_cifar10_jpeg_npz_decodes_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEKIT_VISION_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cifar10_jpeg.npz"
    arrays = _write_fake_cifar_jpeg_npz(path)
    ds = load_cifar10(path, "train", normalize=False)
    assert ds.tensors[0].shape == (6, 3, 32, 32)
    expected = torch.from_numpy(arrays["_images_train"]).permute(0, 3, 1, 2).float() / 255
    assert (ds.tensors[0] - expected).abs().max() < 3 / 255
    assert ds.tensors[1].tolist() == arrays["y_train"].tolist()
    assert len(list((tmp_path / "cache").glob("cifar10_train_*.npy"))) == 1
    again = load_cifar10(path, "train", normalize=False)  # from the cache
    torch.testing.assert_close(again.tensors[0], ds.tensors[0])
    assert load_dataset(path, split="test", max_samples=2).tensors[0].shape == (2, 3, 32, 32)
    assert load_dataset(tmp_path, split="test").tensors[0].shape == (3, 3, 32, 32)  # folder holding the npz


def test_load_dataset_guesses_kind_and_reports_bad_paths(tmp_path):
    from PIL import Image

    np.savez(tmp_path / "plain.npz", x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.array([0, 1]))
    assert load_dataset(tmp_path / "plain.npz").tensors[0].shape == (2, 1, 4, 4)
    folder = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        Image.fromarray(np.full((10, 12, 3), 100, dtype=np.uint8)).save(folder / cls / "a.png")
    ds = load_dataset(folder, image_size=8)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and len(ds) == 2 and ds.classes == ["cat", "dog"]
    assert load_image_folder(folder, 8, (0.5,) * 3, (0.5,) * 3)[1][1] == 1
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="kind="):
        load_dataset(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="unknown kind 'imagenet'"):
        load_dataset(folder, kind="imagenet")


# ---------------------------------------------------------------------------------------------- training

def test_augmentations_keep_shape_and_are_seeded():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = crop_flip(x, torch.Generator().manual_seed(0))
    b = crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    shifted = random_crop(x, torch.Generator().manual_seed(3), padding=2)
    # every crop is a translation of the zero-padded image: its non-zero values are a subset of the image's
    assert set(shifted[0].unique().tolist()) - {0.0} <= set(x[0].unique().tolist())


def test_evaluate_restores_module_modes():
    model = tiny_resnet(width=2)
    model.train()
    model.layer1.eval()
    result = evaluate(model, digits_dataset(16, "test"))
    assert set(result) == {"acc", "loss"} and 0.0 <= result["acc"] <= 1.0 and result["loss"] > 0
    assert model.training and not model.layer1.training and not model.layer1[0].norm1.training
    assert model.layer2[0].norm1.training


@pytest.mark.slow
def test_train_tiny_resnet_on_digits_reaches_90_percent():
    train, test = digits_dataset(16, "train"), digits_dataset(16, "test")
    torch.manual_seed(0)
    model = tiny_resnet(width=8)
    start = time.perf_counter()
    train_classifier(model, train, epochs=10, batch_size=128, lr=0.1, seed=0)
    elapsed = time.perf_counter() - start
    metrics = evaluate(model, DataLoader(test, batch_size=100))
    assert metrics["acc"] > 0.90, (metrics, elapsed)
    assert evaluate(model, test)["acc"] == metrics["acc"]  # loader and dataset agree


def test_train_classifier_is_deterministic():
    train = TensorDataset(*[t[:256] for t in digits_dataset(16, "train").tensors])
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = tiny_resnet(width=2)
        train_classifier(model, train, epochs=1, batch_size=64, seed=5, augment="flip")
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    with pytest.raises(MergeVisionError, match="unknown augment"):
        train_classifier(tiny_resnet(width=2), train, epochs=1, augment="mixup")
    with pytest.raises(MergeVisionError, match="optimizer must be 'sgd' or 'adamw'"):
        train_classifier(tiny_resnet(width=2), train, epochs=1, optimizer="adam")


def test_train_classifier_with_adamw_learns():
    train, test = digits_dataset(16, "train"), digits_dataset(16, "test")
    torch.manual_seed(0)
    model = tiny_resnet(width=8)
    before = evaluate(model, test)["acc"]
    train_classifier(model, train, epochs=4, batch_size=64, lr=1e-2, weight_decay=0.05, seed=0, optimizer="adamw")
    after = evaluate(model, test)["acc"]
    assert after > 0.8 and after > before + 0.5, (before, after)
