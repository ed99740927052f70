"""Tests for quadranet.data: bundled sets, safe unpickling, folders, CIFAR errors, transforms."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quadranet.data import (
    DataError,
    DatasetInfo,
    InMemoryImageDataset,
    _animal_arrays,
    _load_numpy_pickle,
    build_dataset,
    build_transform,
    dataset_info,
    list_datasets,
)


def test_list_datasets_names_the_builtins():
    assert set(list_datasets()) == {"mnist", "animal-mnist", "cifar10", "cifar100", "fake"}


@pytest.mark.parametrize("split", ["test", "training", ""])
def test_bad_split_is_refused(split):
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("fake", split)


def test_mnist_shapes_counts_and_labels():
    info = dataset_info("mnist")
    train, val = build_dataset("mnist", "train"), build_dataset("mnist", "val")
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert (len(train), len(val)) == (info.train_size, info.val_size) == (60_000, 10_000)
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.targets.dtype == torch.int64
    assert train.targets.min() == 0 and train.targets.max() == 9
    assert torch.bincount(val.targets).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009,
    ]  # fmt: skip
    x, y = train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
    pixels = train.images[:1000].float() / 255
    assert torch.allclose(x, (pixels[0] - info.mean[0]) / info.std[0])
    assert abs(pixels.mean().item() - info.mean[0]) < 0.02


def test_mnist_is_deterministic_and_cached():
    a, b = build_dataset("mnist", "val"), build_dataset("mnist", "val")
    assert a.images is b.images  # decoded once per process
    assert torch.equal(a[123][0], b[123][0]) and a[123][1] == b[123][1]


def test_mnist_does_not_import_the_mnist_package():
    build_dataset("mnist", "val")
    assert "mnist" not in __import__("sys").modules


def test_animal_mnist_matches_its_info():
    info = dataset_info("animal_mnist")  # "_" and case are accepted
    assert info.name == "animal-mnist"
    train, val = build_dataset("animal-mnist", "train"), build_dataset("Animal-MNIST", "val")
    assert (len(train), len(val)) == (info.train_size, info.val_size) == (8_500, 1_500)
    assert train.images.shape[1:] == (info.in_chans, info.img_size, info.img_size) == (1, 28, 28)
    assert torch.bincount(val.targets, minlength=info.num_classes).tolist() == [150] * 10
    assert len(train.classes) == info.num_classes == 10
    seen = {img.numpy().tobytes() for img in train.images}
    assert not any(img.numpy().tobytes() in seen for img in val.images)  # no leaked copies
    _animal_arrays.cache_clear()
    assert torch.equal(val.images, build_dataset("animal-mnist", "val").images)  # fixed split


def _write_gz_pickle(path: Path, obj: object) -> Path:
    with gzip.open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = _write_gz_pickle(tmp_path / "evil.pkl.gz", (np.zeros(3), _Evil(marker)))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        _load_numpy_pickle(path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_object_arrays(tmp_path):
    path = _write_gz_pickle(tmp_path / "obj.pkl.gz", np.array([1, "x"], dtype=object))
    with pytest.raises(pickle.UnpicklingError, match="numeric arrays were expected"):
        _load_numpy_pickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_numeric_arrays(tmp_path, protocol):
    arrays = (np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3))
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=protocol))
    loaded = _load_numpy_pickle(path)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, loaded))


def _image_tree(root: Path, classes=("cat", "dog"), per_class=2, size=20) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_image_folder_loads_and_resizes(tmp_path):
    root = _image_tree(tmp_path / "tiny")
    info = dataset_info(str(root))
    assert (info.num_classes, info.in_chans) == (2, 3)
    ds = build_dataset(str(root), "val", img_size=16)
    assert len(ds) == 4 and ds.classes == ["cat", "dog"]
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1


def test_image_folder_corrupt_image_names_its_path(tmp_path):
    root = _image_tree(tmp_path / "tiny")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(np.random.default_rng(1).bytes(64))
    ds = build_dataset(str(root), "train", img_size=16)
    index = ds.samples.index((str(bad), 1))
    with pytest.raises(DataError, match="broken.png") as err:
        ds[index]
    assert str(bad) in str(err.value)


def test_image_folder_without_val_explains_layout(tmp_path):
    root = tmp_path / "half"
    (root / "train" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no val/ folder.*train/ and val/"):
        build_dataset(str(root), "train")


def test_image_folder_with_mismatched_classes_is_refused(tmp_path):
    root = _image_tree(tmp_path / "tiny")
    (root / "val" / "cow").mkdir()
    with pytest.raises(DataError, match=r"only in val: \['cow'\]"):
        dataset_info(str(root))


def test_unknown_name_lists_datasets_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset(str(tmp_path / "nowhere"), "train")
    message = str(err.value)
    assert "mnist" in message and "cifar10" in message and "train/ and val/" in message


def test_cifar10_missing_files_says_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset("cifar10", "train", root=str(tmp_path), download=False)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "--download" in message


def test_cifar100_missing_files_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="cifar-100-python"):
        build_dataset("cifar100", "val", root=str(tmp_path))


def test_fake_is_deterministic_and_configurable():
    opts = dict(num_classes=5, in_chans=2, length=64, val_length=16, seed=3)
    a = build_dataset("fake", "train", img_size=12, **opts)
    b = build_dataset("fake", "train", img_size=12, **opts)
    c = build_dataset("fake", "train", img_size=12, **{**opts, "seed": 4})
    assert a.images.shape == (64, 2, 12, 12) and len(build_dataset("fake", "val", **opts)) == 16
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert int(a.targets.max()) < 5
    info = dataset_info("fake", img_size=12, **opts)
    assert (info.num_classes, info.in_chans, info.img_size, info.train_size) == (5, 2, 12, 64)


def test_fake_rejects_unknown_options():
    with pytest.raises(ValueError, match="accepted"):
        dataset_info("fake", colour=1)
    with pytest.raises(ValueError, match="only apply to the 'fake'"):
        dataset_info("mnist", num_classes=3)


def test_mnist_train_transform_with_randaugment():
    torch.manual_seed(0)
    info = dataset_info("mnist")
    tf = build_transform(
        info,
        train=True,
        img_size=32,
        randaugment="rand-m9-mstd0.5",
        reprob=0.5,
        random_crop_padding=2,
    )
    ds = build_dataset("mnist", "val", transform=tf)
    for i in range(40):  # enough draws to exercise most RandAugment ops on mode "L"
        x, y = ds[i]
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= y <= 9
    pil = Image.fromarray(ds.images[0, 0].numpy())
    assert tf(pil).shape == (1, 32, 32)


def test_rgb_train_transform_and_val_resize():
    info = dataset_info("fake")
    ds = build_dataset("fake", "train")
    tf = build_transform(info, True, randaugment="rand-m9-mstd0.5", hflip=0.5, reprob=1.0)
    assert tf(ds.images[0]).shape == (3, 32, 32)
    val = build_transform(info, False, img_size=48)
    assert val(ds.images[0]).shape == (3, 48, 48)
    assert build_dataset("fake", "val", transform=val)[0][0].shape == (3, 48, 48)


def test_in_memory_dataset_checks_inputs():
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    ds = InMemoryImageDataset(torch.full((2, 1, 4, 4), 255, dtype=torch.uint8), torch.ones(2))
    x, y = ds[1]
    assert torch.all(x == 1.0) and y == 1 and isinstance(dataset_info("mnist"), DatasetInfo)


def test_image_folder_uses_timm_imagenet_transforms(tmp_path):
    """Folders (ImageNet) train with RandomResizedCrop and evaluate at the model's crop_pct
    and interpolation, as timm's create_transform builds them."""
    import timm
    from torchvision import transforms as T

    from quadranet.data import build_transform
    from quadranet.engine.train import _crop_of

    info = dataset_info(str(_image_tree(tmp_path / "tiny")))
    train = build_transform(info, True, img_size=32, randaugment="rand-m9-mstd0.5", reprob=0.25)
    kinds = [type(t).__name__ for t in train.transforms]
    assert "RandomResizedCropAndInterpolation" in kinds and "RandomErasing" in kinds
    model = timm.create_model("quadranet25_xxs", num_classes=2)
    crop = _crop_of(model)
    assert crop == {"crop_pct": 0.875, "interpolation": "bicubic"}
    val = build_transform(info, False, img_size=32, **crop)
    resize = next(t for t in val.transforms if isinstance(t, T.Resize))
    assert resize.size in (36, [36]) and resize.interpolation == T.InterpolationMode.BICUBIC
    assert any(isinstance(t, T.CenterCrop) for t in val.transforms)


# --- timm datasets (folder/, hfds/, wds/, ...) through timm.data.create_dataset -------------


def test_timm_folder_spelling_reads_through_create_dataset(tmp_path):
    from timm.data import ImageDataset

    root = _image_tree(tmp_path / "tiny", classes=("cat", "dog", "eel"))
    for path in (root / "val" / "dog").iterdir():  # val lacks a class: indices must still agree
        path.unlink()
    (root / "val" / "dog").rmdir()
    info = dataset_info(f"folder/{root}")
    assert (info.num_classes, info.in_chans, info.train_size, info.folder) == (3, 3, 6, True)
    same = (dataset_info("folder/", str(root)), dataset_info("folder/tiny", str(tmp_path)))
    assert all(i.num_classes == 3 and i.train_size == 6 for i in same)
    train = build_dataset(f"folder/{root}", "train", img_size=16)
    val = build_dataset("folder/tiny", "val", root=str(tmp_path), img_size=16)
    assert isinstance(train, ImageDataset) and isinstance(val, ImageDataset)
    assert sorted(train[i][1] for i in range(len(train))) == [0, 0, 1, 1, 2, 2]
    assert sorted(val[i][1] for i in range(len(val))) == [0, 0, 2, 2]  # cat and eel
    x, _ = val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    gray = dataset_info(f"folder/{root}", input_img_mode="L")
    assert gray.in_chans == 1 and len(gray.mean) == 1
    with pytest.raises(DataError, match="is not a folder"):
        dataset_info(f"folder/{tmp_path / 'nowhere'}")
    with pytest.raises(DataError, match="names no folder"):
        dataset_info("folder/")


@pytest.mark.parametrize(
    "name, module, install",
    [("hfds/mnist", "datasets", "pip install datasets"),
     ("hfids/mnist", "datasets", "pip install datasets"),
     ("wds/shards", "webdataset", "pip install webdataset"),
     ("tfds/mnist", "tensorflow_datasets", "pip install tensorflow-datasets")],
)  # fmt: skip
def test_timm_dataset_without_its_package_names_the_pip_install(monkeypatch, name, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    needs = rf"--dataset {name} needs the '{module}' package: {install}"
    with pytest.raises(DataError, match=needs):
        dataset_info(name)
    with pytest.raises(DataError, match=install):
        build_dataset(name, "train")
