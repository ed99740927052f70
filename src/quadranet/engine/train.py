"""The one training engine: model, data, recipe, train loop, validation, checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
import yaml
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    Sampler,
    Subset,
)
from tqdm import tqdm

import quadranet  # noqa: F401  (registers the QuadraNet models with timm)
from quadranet.data import DatasetInfo, InMemoryImageDataset, build_dataset, build_transform
from quadranet.data import dataset_info as get_dataset_info
from quadranet.engine import checkpoint as ckpt
from quadranet.engine import distributed as D
from quadranet.engine import report, runfolder
from quadranet.engine.config import ConfigError, TrainConfig, checkpoint_keys
from quadranet.engine.loggers import RunLoggers, check_available, epoch_scalars

EpochCallback = Callable[["Trainer", dict[str, Any]], bool | None]
# a run trained with --arch keeps a copy of the architecture file, which eval and export read
ARCH_COPY = "model_arch.json"


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite."""


class Preempted(TrainingError):
    """SIGTERM or SIGUSR1 arrived: a checkpoint was written at the next step and the run
    stopped (resume it with --resume, or --resume auto)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _SkipSampler(Sampler[int]):
    """The first `skip` indices of a sampler's epoch left out (resuming inside an epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    best_top1: float | None
    best_epoch: int | None
    final: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# --- setup helpers -----------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for `--amp` on this device (None: full precision)."""
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp none on CPU")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate: `lr` if given, else base_lr scaled linearly by the global batch."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * global_batch(cfg, world_size) / cfg.lr_base_size


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Images per optimizer step over all processes."""
    return cfg.batch_size * cfg.accum_steps * world_size


def _dataset_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """Dataset options; for fake data `img_size` sets the generated size."""
    kwargs = dict(cfg.dataset_kwargs)
    if cfg.dataset == "fake" and cfg.img_size is not None:
        kwargs.setdefault("img_size", cfg.img_size)
    return kwargs


def resolve_num_classes(cfg: TrainConfig, info: DatasetInfo) -> int:
    """The head size, checked against the dataset."""
    if cfg.num_classes is not None and cfg.num_classes != info.num_classes:
        raise ConfigError(
            f"--num-classes {cfg.num_classes} differs from the {info.num_classes} classes of "
            f"dataset '{info.name}'; drop --num-classes or use a dataset with that many classes"
        )
    return info.num_classes


# create_model kwargs the engine sets from its own settings (a value in --model-kwargs would
# clash with them)
ENGINE_KWARGS = {
    "num_classes": "--num-classes (the dataset's class count by default)",
    "in_chans": "a dataset with that many channels (the engine takes the dataset's)",
    "pretrained": "--pretrained",
}


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """`timm.create_model(cfg.model, ...)` with errors that say what to change."""
    if not timm.is_model(cfg.model):
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown model '{cfg.model}'{hint} (`quadranet models` lists ours)")
    for key, where in ENGINE_KWARGS.items():
        if key in cfg.model_kwargs:
            raise ConfigError(f"--model-kwargs {key}: the engine sets it; use {where}")
    drop = cfg.model_kwargs.get("drop_path_rate")
    if drop is not None and cfg.drop_path > 0 and drop != cfg.drop_path:
        raise ConfigError(
            f"--model-kwargs drop_path_rate={drop} conflicts with --drop-path {cfg.drop_path}; "
            f"set --drop-path {drop} instead"
        )
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, **cfg.model_kwargs)
    if cfg.arch is not None:
        kwargs["arch"] = cfg.arch
    if cfg.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.drop_path
    try:
        return _create_model(cfg, kwargs)
    except TypeError as err:
        raise ConfigError(
            f"cannot build {cfg.model} with {kwargs}: {err}; check --model-kwargs"
        ) from err
    except ConfigError:
        raise
    except ValueError as err:  # a value the model refuses, e.g. negative dims
        where = "the --arch file" if cfg.arch is not None else "--model-kwargs"
        raise ConfigError(f"cannot build {cfg.model}: {err}; check {where}") from err


def _create_model(cfg: TrainConfig, kwargs: dict[str, Any]) -> nn.Module:
    """`timm.create_model`, with `--pretrained` weights (from `--pretrained-path` when given,
    a file or a saved model folder, classifier re-initialised as timm's train.py does)."""
    if not cfg.pretrained:
        return timm.create_model(cfg.model, pretrained=False, **kwargs)
    source = "its pretrained weights"
    if cfg.pretrained_path:
        path = Path(cfg.pretrained_path).expanduser()
        if not path.exists():
            raise ConfigError(f"--pretrained-path {path} does not exist; pass a weights file")
        overlay: dict[str, Any] = dict(file=str(path), num_classes=-1)
        if path.is_dir():  # a folder written by `quadranet push` / timm's save_for_hf
            overlay["source"] = "local-dir"
        kwargs = dict(kwargs, pretrained_cfg_overlay=overlay)
        source = str(path)
    try:
        return timm.create_model(cfg.model, pretrained=True, **kwargs)
    except TypeError:
        raise
    except Exception as err:  # a file timm cannot read or that does not fit the model
        hint = (
            "the file must hold weights of this model (its layout, sizes and channels)"
            if cfg.pretrained_path
            else "pass a weights file or folder with --pretrained-path"
        )
        raise ConfigError(
            f"cannot load {source} into {cfg.model} ({ckpt.load_problem(err)}); {hint}"
        ) from err


def load_initial_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Load `--initial-checkpoint` weights into `model` (every shape equal); returns the file.

    A run folder gives its best.safetensors. Weights are read without unpickling code
    (safetensors, or `torch.load(weights_only=True)`); training states, timm checkpoints
    ("state_dict", "model", EMA entries) and wrapper prefixes are unwrapped, and the official
    HorNet/QuadraNet layouts are mapped for this family's models.
    """
    from quadranet.models.quadranet import QuadraNet, _unwrap_checkpoint, checkpoint_filter_fn

    path = resolve_eval_checkpoint(path)
    if path.suffix == ".safetensors":
        state: Any = ckpt.load_weights(path)[0]
    else:
        try:  # timm's train.py also stores its argparse.Namespace: plain values only
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ckpt.CheckpointError(
                f"{path} cannot be read as weights ({ckpt.load_problem(err)}); pass a "
                ".safetensors file or a .pt/.pth state dict"
            ) from err
    if not isinstance(state, dict):
        raise ckpt.CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    try:
        if isinstance(model, QuadraNet):
            state = dict(checkpoint_filter_fn(state, model))
        else:
            state = dict(_unwrap_checkpoint(state))
    except ValueError as err:
        raise ckpt.CheckpointError(f"--initial-checkpoint {path}: {err}") from err
    ckpt.check_finite(path, state)
    own = model.state_dict()
    wrong = [  # in the model's order
        f"{key} is {tuple(state[key].shape)} there but {tuple(target.shape)} here"
        for key, target in own.items()
        if isinstance(state.get(key), torch.Tensor) and state[key].shape != target.shape
    ]
    missing = [key for key in own if key not in state]
    extra = [key for key in state if key not in own]
    problem = (
        f"{len(wrong)} shape(s) differ, e.g. {wrong[0]}"
        if wrong
        else f"{len(missing)} weight(s) missing, e.g. {missing[0]}"
        if missing
        else f"{len(extra)} unknown weight(s), e.g. {extra[0]}"
        if extra
        else None
    )
    if problem is not None:
        raise ckpt.CheckpointError(
            f"--initial-checkpoint {path} does not fit {name}: {problem}; it needs the same "
            "model, --model-kwargs and classes (--pretrained-path loads a backbone with a new "
            "classifier)"
        )
    model.load_state_dict(state)
    return path


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """`model.set_grad_checkpointing(True)` (timm's API), or a ConfigError saying it has none."""
    setter = getattr(model, "set_grad_checkpointing", None)
    if not callable(setter):
        raise ConfigError(f"{name} has no set_grad_checkpointing(); drop --grad-checkpointing")
    try:
        setter(True)
    except (NotImplementedError, AssertionError) as err:
        raise ConfigError(
            f"{name} does not support gradient checkpointing ({err}); drop --grad-checkpointing"
        ) from err


def _weights_origin(cfg: TrainConfig, resume: Path | None) -> str:
    """Where a run's starting weights come from, for the report."""
    if resume is not None:
        return f"resumed from {resume}"
    if cfg.pretrained:
        source = cfg.pretrained_path or "the model's default source"
        return f"pretrained ({source})"
    return "random initialisation"


def build_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm optimizer; no weight decay on norms and biases."""
    kwargs: dict[str, Any] = {}
    opt = cfg.opt.lower()
    if opt in ("sgd", "nesterov") and cfg.momentum == 0:
        opt = "momentum"  # timm's "sgd" is Nesterov, which needs momentum; this is plain SGD
    if opt in ("sgd", "momentum", "nesterov", "rmsprop", "rmsproptf"):
        kwargs["momentum"] = cfg.momentum
    try:
        return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=cfg.weight_decay, **kwargs)
    except (ValueError, AssertionError) as err:
        raise ConfigError(f"cannot create optimizer '{cfg.opt}': {err}") from err


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> CosineLRScheduler:
    """Per-step schedule: linear warm-up from warmup_lr, then cosine down to min_lr at the end."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total - warmup, 1),
        lr_min=cfg.min_lr,
        warmup_t=warmup,
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def build_criterion(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """Training loss and mixup: soft-target CE with mixup, else label smoothing, else plain CE."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        if cfg.mixup_prob == 0:
            pass
        elif num_classes < 2:
            raise ConfigError("mixup/cutmix need at least 2 classes; pass --mixup 0 --cutmix 0")
        elif cfg.batch_size % 2:
            raise ConfigError(
                f"mixup/cutmix need an even --batch-size (got {cfg.batch_size}); "
                "change it or pass --mixup 0 --cutmix 0"
            )
        else:
            mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob,
                label_smoothing=cfg.smoothing,
                num_classes=num_classes,
            )
            return SoftTargetCrossEntropy(), mixup
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.smoothing), None
    return nn.CrossEntropyLoss(), None


# --- data --------------------------------------------------------------------------------------


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of a dataset: every image exactly once over all ranks."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, length, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class InMemoryLoader:
    """Batches of an in-memory uint8 image set, decoded and augmented as whole-batch tensor ops.

    Random crop (zero padding), horizontal flip and random erasing match the per-sample
    transforms; the randomness comes from the global torch/python RNGs (saved in checkpoints).
    """

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        sampler: Sampler[int],
        batch_size: int,
        info: DatasetInfo,
        device: torch.device,
        *,
        train: bool,
        img_size: int | None = None,
        crop_padding: int = 0,
        hflip: float = 0.0,
        reprob: float = 0.0,
    ) -> None:
        self.images = dataset.images.to(device)
        self.targets = dataset.targets.to(device)
        self.sampler, self.batch_size, self.device, self.train = sampler, batch_size, device, train
        self.img_size = img_size if img_size not in (None, info.img_size) else None
        self.crop_padding = crop_padding if train else 0
        self.hflip = hflip if train else 0.0
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        self.erase = (
            RandomErasing(reprob, mode="pixel", device=str(device))
            if train and reprob > 0
            else None
        )

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size].to(self.device)
            yield self._decode(self.images[idx]), self.targets[idx]

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> augmented, normalised float batch."""
        if self.crop_padding:
            x = _random_crop(x, self.crop_padding)
        x = x.float().div_(255)
        if self.img_size is not None:
            x = F.interpolate(x, size=(self.img_size,) * 2, mode="bilinear", antialias=True)
        if self.hflip > 0:
            flip = (torch.rand(len(x)) < self.hflip).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = x.sub_(self.mean).div_(self.std)
        if self.erase is not None:
            x = self.erase(x)
        return x


def _random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-image random crop of a zero-padded batch back to its original size."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,)).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,)).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


class StreamEpochs:
    """The sampler role for a streamed (iterable) dataset, which orders and shards its items
    itself (timm's `hfids/`, `wds/`, `tfds/` readers): `set_epoch` reshuffles, `len` is the
    stream's length as far as it is known."""

    def __init__(self, dataset: IterableDataset) -> None:
        self.dataset = dataset

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return 0


def _limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first `max_samples` items (all when None)."""
    if max_samples is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        raise ConfigError(
            "--max-samples needs a dataset with random access, not a stream; use "
            "--limit-train-batches / --limit-val-batches"
        )
    if max_samples >= len(dataset):
        return dataset
    if isinstance(dataset, InMemoryImageDataset):
        return InMemoryImageDataset(
            dataset.images[:max_samples],
            dataset.targets[:max_samples],
            dataset.transform,
        )
    return Subset(dataset, range(max_samples))


def _crop_of(model: nn.Module | None) -> dict[str, Any]:
    """The evaluation crop fraction and interpolation timm resolves for `model`."""
    if model is None:
        return {}
    data_cfg = timm.data.resolve_data_config({}, model=model)
    return dict(crop_pct=data_cfg["crop_pct"], interpolation=data_cfg["interpolation"])


# Settings a resumed run must share with its checkpoint (they change what was trained) and
# settings it applies from the resumed step on (the learning-rate schedule is rebuilt).
RESUME_FIXED = (
    "model", "model_kwargs", "dataset", "num_classes", "img_size", "opt", "batch_size",
    "accum_steps", "seed", "max_samples", "limit_train_batches", "ema",
)  # fmt: skip
RESUME_SCHEDULE = (
    "epochs", "lr", "base_lr", "lr_base_size", "warmup_epochs", "warmup_lr", "min_lr",
    "weight_decay",
)  # fmt: skip


def build_loader(
    cfg: TrainConfig,
    info: DatasetInfo,
    split: str,
    dist_info: D.DistInfo,
    model: nn.Module | None = None,
) -> tuple[Any, Sampler[int] | StreamEpochs]:
    """A loader of one split: the in-memory fast path when no PIL augmentation is asked for.
    ImageFolder trees are evaluated at `model`'s crop_pct and interpolation (its
    pretrained_cfg, as timm resolves it)."""
    train = split == "train"
    kwargs = _dataset_kwargs(cfg)
    fast = not (train and cfg.randaugment)
    common = dict(root=cfg.data_root, download=cfg.download, **kwargs)
    dataset = build_dataset(cfg.dataset, split, **common)
    if not (fast and isinstance(dataset, InMemoryImageDataset)):
        transform = build_transform(
            info,
            train,
            img_size=cfg.img_size,
            randaugment=cfg.randaugment if train else None,
            reprob=cfg.reprob if train else 0.0,
            hflip=cfg.hflip if train else 0.0,
            random_crop_padding=cfg.crop_padding if train else 0,
            **_crop_of(model),
        )
        dataset = build_dataset(cfg.dataset, split, transform=transform, **common)
    dataset = _limit(dataset, cfg.max_samples)
    workers = min(cfg.workers, len(os.sched_getaffinity(0)))  # more only contend for the CPUs
    if isinstance(dataset, IterableDataset):  # a stream: it shuffles and shards itself
        set_loader_cfg = getattr(dataset, "set_loader_cfg", None)
        if callable(set_loader_cfg):
            set_loader_cfg(num_workers=workers)
        stream = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            num_workers=workers,
            pin_memory=dist_info.device.type == "cuda",
            drop_last=train,
            generator=torch.Generator() if train else None,  # see `Trainer.train_one_epoch`
        )
        return stream, StreamEpochs(dataset)
    if train:
        sampler: Sampler[int] = DistributedSampler(
            dataset, dist_info.world_size, dist_info.rank, shuffle=True, seed=cfg.seed
        )
    else:
        sampler = ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)
    if isinstance(dataset, InMemoryImageDataset) and dataset.transform is None:
        loader: Any = InMemoryLoader(
            dataset,
            sampler,
            cfg.batch_size,
            info,
            dist_info.device,
            train=train,
            img_size=cfg.img_size,
            crop_padding=cfg.crop_padding,
            hflip=cfg.hflip,
            reprob=cfg.reprob,
        )
    else:
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=dist_info.device.type == "cuda",
            drop_last=train,
            generator=torch.Generator() if train else None,  # see `Trainer.train_one_epoch`
        )
    return loader, sampler


# --- the engine --------------------------------------------------------------------------------


class Trainer:
    """Builds everything from a TrainConfig and runs the recipe.

    Subclasses (NAS supernets, quadratic adaptation) override `training_step`; a prebuilt
    `model` replaces `timm.create_model(cfg.model)`.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None) -> None:
        self.cfg = cfg
        self.dist = D.init_distributed(cfg.device, cfg.dist_timeout)
        self.device = self.dist.device
        seed_everything(cfg.seed + self.dist.rank, cfg.deterministic)
        self.output_dir = cfg.output_dir
        resume = cfg.resume
        if resume == "auto":  # one command line that is safe to requeue
            last = self.output_dir / ckpt.STATE_NAME
            resume = str(last) if last.is_file() else None
        elif resume:  # a resumed run writes into its own folder
            self.output_dir = Path(resume) if Path(resume).is_dir() else Path(resume).parent
        try:
            self.resume_path = ckpt.resolve_checkpoint(resume) if resume else None
            if self.resume_path is not None and self.resume_path.suffix == ".safetensors":
                raise ckpt.CheckpointError(
                    f"{self.resume_path} holds weights only, not a training state; resume from "
                    f"the run folder or its last.pt, or start a new run from these weights with "
                    f"--initial-checkpoint {self.resume_path}"
                )
        except ckpt.CheckpointError as err:
            raise ckpt.CheckpointError(
                f"--resume: {err}; to start a new run there, drop --resume (or use --resume "
                "auto, which resumes only where a checkpoint exists)"
            ) from None
        runfolder.check_folder(self.output_dir)
        if self.resume_path is None and not cfg.overwrite and runfolder.holds_run(self.output_dir):
            raise runfolder.RunFolderError(
                f"{self.output_dir} holds a run already: continue it with --resume "
                f"{self.output_dir} (or --resume auto, which starts one where there is none), "
                "start over in it with --overwrite, or choose another --output"
            )
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        check_available(cfg)  # a missing logger package is an error before any work
        self.loggers = RunLoggers()  # the run's own ones are opened by fit()

        self.info = get_dataset_info(cfg.dataset, cfg.data_root, **_dataset_kwargs(cfg))
        self.num_classes = resolve_num_classes(cfg, self.info)
        self.img_size = cfg.img_size or self.info.img_size
        self.criterion, self.mixup_fn = build_criterion(cfg, self.num_classes)

        self.model_name = cfg.model if model is None else f"{type(model).__name__} (prebuilt)"
        if model is None:
            model = build_model(cfg, self.num_classes, self.info.in_chans)
        self.model = model
        smallest = getattr(model, "min_input_size", 0)  # the family's smallest input side
        self.resized_note = None
        if cfg.img_size is None and smallest > self.info.img_size:
            # e.g. 28 px MNIST into a stride-4 stem: upsample rather than fail
            self.cfg = cfg = replace(cfg, img_size=smallest)
            self.img_size = smallest
            self.resized_note = (
                f"{self.info.name} images ({self.info.img_size}px) are resized to {smallest}px, "
                f"the smallest input {cfg.model} takes (--img-size sets another size)"
            )
        head = getattr(self.model, "num_classes", self.num_classes)
        if head != self.num_classes:
            raise ConfigError(
                f"the model has {head} outputs but dataset '{self.info.name}' has "
                f"{self.num_classes} classes; call model.reset_classifier({self.num_classes})"
            )
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model, self.model_name)
        self.initial_weights = _weights_origin(cfg, self.resume_path)
        if cfg.initial_checkpoint and self.resume_path is None:  # a resumed run has its own
            path = load_initial_checkpoint(self.model, cfg.initial_checkpoint)
            self.initial_weights = f"--initial-checkpoint {path}"
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)

        self.train_loader, self.train_sampler = build_loader(
            cfg, self.info, "train", self.dist, self.model
        )
        self.val_loader, _ = build_loader(cfg, self.info, "val", self.dist, self.model)
        batches = len(self.train_loader)
        if cfg.limit_train_batches is not None:
            batches = min(batches, cfg.limit_train_batches)
        self.steps_per_epoch = batches // cfg.accum_steps
        if self.steps_per_epoch == 0:
            n = len(self.train_sampler)
            limit = cfg.limit_train_batches
            capped = f", at most {limit} batches (--limit-train-batches)" if limit else ""
            raise ConfigError(
                f"no optimizer step fits in an epoch: {n} train images per process{capped}, "
                f"batch size {cfg.batch_size} x accum_steps {cfg.accum_steps} (x "
                f"{self.dist.world_size} processes); lower --batch-size or --accum-steps, "
                "raise --limit-train-batches, or use more data"
            )
        self.batches_per_epoch = self.steps_per_epoch * cfg.accum_steps

        self.lr = scaled_lr(cfg, self.dist.world_size)
        self.optimizer = build_optimizer(cfg, self.model, self.lr)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.ema = (
            ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
            if cfg.ema
            else None
        )

        self.train_model: nn.Module = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model, dynamic=False)

        self.started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.stop_signal: int | None = None  # set by SIGTERM / SIGUSR1 during fit
        self.batch = 0  # batches of the current epoch done (non-zero only after pre-emption)
        # this process's loss, correct and image sums and seconds over those batches
        self.epoch_sums: dict[str, float] = {}
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps taken
        self.best_top1: float | None = None
        self.best_epoch: int | None = None
        self.best_source: str | None = None  # "model" or "EMA": whose top-1 is best_top1
        self.history: list[dict[str, Any]] = []
        self.unmatched_weights: list[Path] = []  # beside the resumed state, not saved with it
        if self.resume_path is not None:
            self.load_training_state(self.resume_path)

    # -- logging ------------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Print a line on rank 0 (unless quiet)."""
        if self.dist.is_main and not self.cfg.quiet:
            print(message, flush=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the AMP dtype, or nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a batch to the device in the chosen memory format."""
        x = x.to(self.device, non_blocking=True)
        if x.ndim == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return x, y.to(self.device, non_blocking=True)

    # -- training -----------------------------------------------------------------------------

    def training_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward one batch: (loss, logits). Mixup and the recipe's loss are applied here."""
        target = y
        if self.mixup_fn is not None:
            x, target = self.mixup_fn(x, y)
        with self._autocast():
            logits = self.train_model(x)
        loss = self.criterion(logits.float(), target)
        return loss, logits

    def _optimizer_step(self, bad_loss: bool, epoch: int, loss: float) -> float | None:
        """Check the loss, unscale, clip, step, schedule and update the EMA; returns grad norm."""
        if D.any_true(bad_loss, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            last = self.output_dir / ckpt.STATE_NAME
            kept = (
                f"the last good checkpoint is {last}"
                if last.is_file()
                else "no checkpoint was written yet"
            )
            raise NonFiniteLossError(
                f"loss became {loss} at epoch {epoch + 1}, step {self.step + 1} (lr "
                f"{self.optimizer.param_groups[0]['lr']:.3g}); training stopped and {kept}. "
                "Lower --lr/--base-lr, keep --clip-grad on, or try --amp none"
            )
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.cfg.clip_grad is not None:
            norm = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return norm

    def _batches(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The train loader's batches of this epoch, the first `skip` left out (resuming a
        pre-empted epoch: the sampler's order is fixed by the epoch, so the rest is the
        same; a stream is read past them)."""
        loader = self.train_loader
        if isinstance(self.train_sampler, StreamEpochs):
            yield from itertools.islice(loader, skip, None)
            return
        holder = loader.batch_sampler if isinstance(loader, DataLoader) else loader
        original = holder.sampler
        if skip:
            holder.sampler = _SkipSampler(original, skip * self.cfg.batch_size)
        try:
            yield from loader
        finally:
            holder.sampler = original

    def train_one_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the train split; returns loss, top-1 and images/s reduced over ranks."""
        self.train_model.train()
        self.train_sampler.set_epoch(epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            # the loader draws its workers' base seed from this, not from the global RNG: a
            # draw there would shift the random transforms of an epoch resumed mid-way
            generator.manual_seed(self.cfg.seed + 1000 * epoch + self.dist.rank)
        accum = self.cfg.accum_steps
        show = self.dist.is_main and not self.cfg.quiet and sys.stderr.isatty()
        interval = self.cfg.log_interval
        # per-step lines where no one watches the bar: stdout to a file or a job log
        lines = self.dist.is_main and not self.cfg.quiet and not sys.stdout.isatty()
        bar = tqdm(
            total=self.batches_per_epoch,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            unit="batch",
            disable=not show,
            leave=False,
            dynamic_ncols=True,
        )
        sums = self.epoch_sums if self.batch else {}  # a pre-empted epoch's, resumed
        loss_sum, correct, count = (sums.get(k, 0.0) for k in ("loss", "correct", "count"))
        bad = False
        last_loss = 0.0
        start = time.perf_counter() - sums.get("seconds", 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        skip, self.batch = self.batch, 0
        for i, (x, y) in enumerate(self._batches(skip), start=skip):
            if i >= self.batches_per_epoch:
                break
            x, y = self._to_device(x, y)
            sync = (i + 1) % accum == 0
            no_sync = self.dist.distributed and not sync
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                loss, logits = self.training_step(x, y)
                if self.scaler is not None:
                    self.scaler.scale(loss / accum).backward()
                else:
                    (loss / accum).backward()
            last_loss = float(loss.detach())
            bad = bad or not math.isfinite(last_loss)
            n = len(y)
            loss_sum += last_loss * n
            correct += float((logits.detach().argmax(1) == y).sum())
            count += n
            if sync:
                self._optimizer_step(bad, epoch, last_loss)
                done = (i + 1) // accum
                if interval and (done % interval == 0 or done == self.steps_per_epoch):
                    self._log_step(epoch, done, loss_sum / count, count, start, lines)
                if D.any_true(self.stop_signal is not None, self.device):
                    self.batch = i + 1  # the checkpoint resumes after this batch
                    seconds = time.perf_counter() - start
                    self.epoch_sums = dict(
                        loss=loss_sum, correct=correct, count=count, seconds=seconds
                    )
                    break
            bar.update()
            if show and (i % 10 == 0 or i + 1 == self.batches_per_epoch):
                rate = count * self.dist.world_size / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_sum / count:.4f}",
                    acc=f"{100 * correct / count:.2f}",
                    img_s=f"{rate:.0f}",
                )
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        totals = D.all_reduce_sum(
            {"loss": loss_sum, "correct": correct, "count": count}, self.device
        )
        return {
            "train_loss": totals["loss"] / max(totals["count"], 1),
            "train_top1": 100 * totals["correct"] / max(totals["count"], 1),
            "images_per_s": totals["count"] / max(elapsed, 1e-9),
            "epoch_time_s": elapsed,
        }

    def _log_step(
        self, epoch: int, done: int, loss: float, count: float, start: float, line: bool
    ) -> None:
        """The per-step line (`line`) and logger scalars: this process's mean loss over the
        epoch so far, the learning rate of the next step, images/s over all processes."""
        lr = self.optimizer.param_groups[0]["lr"]
        rate = count * self.dist.world_size / max(time.perf_counter() - start, 1e-9)
        if line:
            print(
                f"epoch {epoch + 1}/{self.cfg.epochs}  step {done}/{self.steps_per_epoch}  "
                f"loss {loss:.4f}  lr {lr:.3g}  {rate:.0f} img/s",
                flush=True,
            )
        self.loggers.log(
            {"train/loss": loss, "train/lr": lr, "train/images_per_s": rate}, step=self.step
        )

    @torch.no_grad()
    def validate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Loss, top-1 and top-5 (%) on the val split, reduced over ranks."""
        return validate(
            model if model is not None else self.model,
            self.val_loader,
            self.device,
            memory_format=self.memory_format,
            amp_dtype=self.amp_dtype,
            limit=self.cfg.limit_val_batches,
        )

    def fit(self, on_epoch_end: EpochCallback | None = None) -> TrainResult:
        """Train from the current epoch to cfg.epochs; returns the run's result. The main
        process holds the run folder's lock meanwhile. SIGTERM or SIGUSR1 (pre-emption)
        writes a checkpoint after the current step and raises `Preempted`."""
        with self._stop_signals(), contextlib.ExitStack() as stack:
            if self.dist.is_main:
                stack.enter_context(runfolder.lock(self.output_dir))
                runfolder.remove_stale_temporaries(self.output_dir)
                for path in self.unmatched_weights:  # written again at the next checkpoint
                    path.unlink(missing_ok=True)
            self.loggers = stack.enter_context(
                RunLoggers(self.cfg, self.output_dir, enabled=self.dist.is_main)
            )
            try:
                return self._fit(on_epoch_end)
            except RuntimeError as err:
                if not (self.dist.distributed and D.is_collective_failure(err)):
                    raise
                last = self.output_dir / ckpt.STATE_NAME
                raise TrainingError(
                    f"this process (rank {self.dist.rank}) lost the other processes of the run "
                    f"({D.short_error(err)}); one of them probably died (see its log). The "
                    f"steps since the last checkpoint ({last}) are lost; start all processes "
                    "again with --resume auto (torchrun --max-restarts does)"
                ) from err

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Note SIGTERM / SIGUSR1 instead of dying (main thread only; restored after)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum: int, frame: object) -> None:
            self.stop_signal = signum

        previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fit(self, on_epoch_end: EpochCallback | None) -> TrainResult:
        cfg = self.cfg
        if self.epoch >= cfg.epochs:
            raise ConfigError(
                f"the checkpoint already finished {self.epoch} epochs and --epochs is "
                f"{cfg.epochs}; raise --epochs to train further"
            )
        wall = time.perf_counter()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # --overwrite and --resume are this command's choices, not settings of the run: a
            # later `--config <run>/config.yaml` must neither start this run over nor extend it
            settings = {**cfg.to_dict(), "overwrite": False, "resume": None}
            config_text = yaml.safe_dump(settings, sort_keys=False)
            ckpt.atomic_write(
                self.output_dir / "config.yaml", lambda f: f.write(config_text.encode())
            )
            copy = self.output_dir / ARCH_COPY
            if cfg.arch is not None and Path(cfg.arch).resolve() != copy.resolve():
                arch_text = Path(cfg.arch).read_bytes()  # the run holds what it was built from
                ckpt.atomic_write(copy, lambda f: f.write(arch_text))
            metrics_path = self.output_dir / report.METRICS_NAME
            if self.resume_path is not None:
                self.history = report.truncate_metrics(metrics_path, self.epoch)
            else:  # a new run (over an earlier one only with --overwrite)
                runfolder.remove_run(self.output_dir)
        if self.resized_note:
            self.log(f"note: {self.resized_note}")
        self.log(
            f"training {self.model_name} on {self.info.name}: {self.epoch}/{cfg.epochs} epochs "
            "done, "
            f"{self.steps_per_epoch} steps/epoch, global batch "
            f"{global_batch(cfg, self.dist.world_size)}, lr {self.lr:.3g}, device {self.device} "
            f"x{self.dist.world_size}, output {self.output_dir}"
        )
        record: dict[str, Any] = {}
        for epoch in range(self.epoch, cfg.epochs):
            record = {"epoch": epoch, **self.train_one_epoch(epoch)}
            if self.batch:  # pre-empted inside the epoch
                self.save_checkpoint()
                name = signal.Signals(self.stop_signal or signal.SIGTERM).name
                raise Preempted(
                    f"{name} received: stopped at epoch {epoch + 1}, batch {self.batch}, after "
                    f"writing {self.output_dir / ckpt.STATE_NAME}; continue with --resume "
                    f"{self.output_dir} (or --resume auto)"
                )
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            record["step"] = self.step
            self.epoch = epoch + 1
            last = epoch + 1 == cfg.epochs
            if last or (epoch + 1) % cfg.eval_every == 0:
                val = self.validate()
                record.update({f"val_{k}": v for k, v in val.items() if k != "count"})
                if self.ema is not None:
                    ema_val = self.validate(self.ema.module)
                    record.update({f"val_{k}_ema": v for k, v in ema_val.items() if k != "count"})
                # the better of the model and its EMA ("model" wins a tie)
                score, source = max(
                    (record["val_top1"], "model"), (record.get("val_top1_ema", -1.0), "EMA")
                )
                if self.best_top1 is None or score > self.best_top1:
                    self.best_top1, self.best_epoch, self.best_source = score, epoch + 1, source
                    self._save_weights("best")
            self.history.append(record)
            self.loggers.log(epoch_scalars(record), step=self.step)
            if self.dist.is_main:
                report.append_metrics(self.output_dir / report.METRICS_NAME, record)
            self.log(_epoch_line(record, cfg.epochs))
            if last or self.epoch % cfg.save_every == 0:
                self.save_checkpoint()
            if on_epoch_end is not None and on_epoch_end(self, record):
                self.save_checkpoint()
                break
        return self._finish(record, time.perf_counter() - wall)

    # -- checkpoints --------------------------------------------------------------------------

    def _save_weights(self, tag: str) -> None:
        """Write `<tag>.safetensors` (and `<tag>_ema.safetensors`) on rank 0."""
        if not self.dist.is_main:
            return
        meta = {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "best_top1": self.best_top1,
            "num_classes": self.num_classes,
        }
        ckpt.save_weights(self.output_dir / f"{tag}.safetensors", self.model.state_dict(), meta)
        if self.ema is not None:
            ema_meta = {**meta, "ema": True}
            ckpt.save_weights(
                self.output_dir / f"{tag}_ema.safetensors", self.ema.module.state_dict(), ema_meta
            )

    def training_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything `--resume` needs, as tensors and plain python."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_source": self.best_source,
            "rng": rng,
            "world_size": self.dist.world_size,
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> None:
        """Save last.safetensors and the full training state last.pt (rank 0, atomically).
        The state is written last and records the weights files' digests, so a save cut
        between the files is detected at resume."""
        rng = D.all_gather_objects(ckpt.rng_state())
        sums = D.all_gather_objects(self.epoch_sums) if self.batch else None
        if not self.dist.is_main:
            return
        self._save_weights("last")
        state = self.training_state(rng)
        state["epoch_sums"] = sums  # per process, for the metrics of a pre-empted epoch
        tags = ("last", "last_ema") if self.ema is not None else ("last",)
        state["weights_sha256"] = ckpt.weights_digests(self.output_dir, tags)
        ckpt.save_state(self.output_dir / ckpt.STATE_NAME, state)

    def load_training_state(self, path: Path) -> None:
        """Restore a state saved by `save_checkpoint` (model, optimizer, RNGs, ...)."""
        state = ckpt.load_state(path)
        ckpt.check_resume_state(path, state)
        if self.dist.is_main and path.name == ckpt.STATE_NAME:
            self.unmatched_weights = ckpt.unmatched_weights(path.parent, state)
        if self.unmatched_weights:
            names = " and ".join(str(p) for p in self.unmatched_weights)
            print(
                f"note: {names} {'is' if len(self.unmatched_weights) == 1 else 'are'} not the "
                f"weights saved with {path} (a save was cut between the files); {path} is "
                f"intact and the run resumes from it (epoch {state['epoch']}, step "
                f"{state['step']}); the unmatched weights are deleted and written again at the "
                "next checkpoint",
                file=sys.stderr,
                flush=True,
            )
        saved = state.get("config", {})
        processes = state.get("world_size", self.dist.world_size)
        if processes != self.dist.world_size:  # the global batch, and so the schedule, differ
            raise ckpt.CheckpointError(
                f"{path} was trained by {processes} process(es) but this run has "
                f"{self.dist.world_size}; resume with {processes} (torchrun --nproc_per_node "
                f"{processes}), or start a new run in another --output"
            )
        # the saved config holds only the model kwargs that do not name files
        current = ckpt.safe_metadata({"config": self.cfg.to_dict()})["config"]
        for key in RESUME_FIXED:
            if key in saved and saved[key] != current[key]:
                value = current[key]
                asked = _flag(key, value) if isinstance(value, bool) else repr(value)
                raise ckpt.CheckpointError(
                    f"{path} was trained with {_flag(key, saved[key])} but this run asks for "
                    f"{asked}; resume with {_flag(key, saved[key])}, or start a new run in "
                    "another --output"
                )
        changed = [
            f"--{key.replace('_', '-')} {saved[key]!r} -> {getattr(self.cfg, key)!r}"
            for key in RESUME_SCHEDULE
            if key in saved and saved[key] != getattr(self.cfg, key)
        ]
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.module.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ckpt.CheckpointError(
                f"{path} does not fit this model/optimizer ({ckpt.first_lines(err)}); "
                "resume with the same model and --opt, or start without --resume"
            ) from err
        # the schedule is a function of the step: rebuilt from this run's settings (the same
        # values when nothing changed), and the optimizer takes this run's weight decay
        for group in self.optimizer.param_groups:
            if group.get("weight_decay", 0.0):
                group["weight_decay"] = self.cfg.weight_decay
        if changed:
            self.log(
                f"resume applies {', '.join(changed)} (schedule rebuilt at step {state['step']})"
            )
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.batch = int(state.get("batch", 0))  # inside a pre-empted epoch
        self.best_top1, self.best_epoch = state.get("best_top1"), state.get("best_epoch")
        self.best_source = state.get("best_source")
        rng = state.get("rng") or []
        if self.dist.rank < len(rng):
            ckpt.set_rng_state(rng[self.dist.rank])
        sums = state.get("epoch_sums") or []
        if self.batch and self.dist.rank < len(sums):
            self.epoch_sums = dict(sums[self.dist.rank])
        self.restore_extra_state(state, path)
        inside = f", batch {self.batch} of the next" if self.batch else ""
        self.log(f"resumed from {path} after epoch {self.epoch}{inside} (step {self.step})")

    def restore_extra_state(self, state: dict[str, Any], path: Path) -> None:
        """Hook for subclasses: restore what they added to `training_state`."""

    # -- end of run ---------------------------------------------------------------------------

    def _finish(self, record: dict[str, Any], wall: float) -> TrainResult:
        """Write the plot and report (rank 0) and build the result."""
        peak = D.all_reduce_sum({"peak": report.peak_memory_mb(self.device)}, self.device)["peak"]
        final = {k[4:]: v for k, v in record.items() if k.startswith("val_")}
        rates = [r["images_per_s"] for r in self.history if "images_per_s" in r]
        summary = {
            "model": self.model_name,
            "model_kwargs": self.cfg.model_kwargs if self.model_name == self.cfg.model else {},
            "dataset": self.info.name,
            "params": sum(p.numel() for p in self.model.parameters()),
            "macs": report.count_macs(self.model, self.img_size, self.info.in_chans),
            "in_chans": self.info.in_chans,
            "img_size": self.img_size,
            "num_classes": self.num_classes,
            "epochs": self.epoch,
            "global_batch": global_batch(self.cfg, self.dist.world_size),
            "lr": self.lr,
            "best_top1": self.best_top1,
            "best_epoch": self.best_epoch,
            "best_source": self.best_source,
            "final_top1": final.get("top1"),
            "final_top5": final.get("top5"),
            "final_top1_ema": final.get("top1_ema"),
            "images_per_s": sum(rates) / len(rates) if rates else None,
            "peak_memory_mb": peak / self.dist.world_size,
            "memory_kind": "max_memory_allocated" if self.device.type == "cuda" else "max RSS",
            "wall_time_s": wall,
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "none",
            "channels_last": self.cfg.channels_last,
            "grad_checkpointing": self.cfg.grad_checkpointing,
            "initial_weights": self.initial_weights,
            "started": self.started,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            **report.run_provenance(),
        }
        if self.dist.is_main:
            history = report.read_metrics(self.output_dir / report.METRICS_NAME) or self.history
            title = f"{self.model_name} on {self.info.name} ({self.device})"
            report.plot_curves(history, self.output_dir / report.PLOT_NAME, title)
            report.write_report(self.output_dir / report.REPORT_NAME, summary)
        return TrainResult(
            output_dir=self.output_dir,
            best_top1=self.best_top1,
            best_epoch=self.best_epoch,
            final=final,
            history=self.history,
            summary=summary,
        )


def _flag(key: str, value: Any) -> str:
    """A setting as its command-line flag (`--no-ema` for ema False)."""
    name = key.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {value!r}"


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    """One plain log line per epoch."""
    line = f"epoch {r['epoch'] + 1}/{epochs}  train loss {r['train_loss']:.4f}"
    line += f" top1 {r['train_top1']:.2f}"
    if "val_top1" in r:
        line += f"  val loss {r['val_loss']:.4f} top1 {r['val_top1']:.2f} top5 {r['val_top5']:.2f}"
    if "val_top1_ema" in r:
        line += f" (EMA top1 {r['val_top1_ema']:.2f})"
    return line + f"  lr {r['lr']:.3g}  {r['images_per_s']:.0f} img/s  {r['epoch_time_s']:.1f}s"


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    *,
    memory_format: torch.memory_format = torch.contiguous_format,
    amp_dtype: torch.dtype | None = None,
    limit: int | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of `model` on `loader`, summed over ranks."""
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        ctx = (
            torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        )
        with ctx:
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == y[:, None]
        top1 += float(hits[:, 0].sum())
        top5 += float(hits.any(dim=1).sum())
        count += len(y)
    model.train(was_training)
    t = D.all_reduce_sum({"loss": loss_sum, "top1": top1, "top5": top5, "count": count}, device)
    n = max(t["count"], 1)
    return {
        "loss": t["loss"] / n,
        "top1": 100 * t["top1"] / n,
        "top5": 100 * t["top5"] / n,
        "count": t["count"],
    }


# --- public API --------------------------------------------------------------------------------


def train(
    cfg: TrainConfig, model: nn.Module | None = None, on_epoch_end: EpochCallback | None = None
) -> TrainResult:
    """Train `cfg.model` (or a prebuilt `model`) with the recipe in `cfg`; returns the result.

    `on_epoch_end(trainer, record)` runs after every epoch; returning True stops the run.
    """
    return Trainer(cfg, model).fit(on_epoch_end)


def evaluate(
    cfg: TrainConfig | None = None,
    checkpoint: str | Path | None = None,
    model: nn.Module | None = None,
    use_ema: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 and loss on the val split of a checkpoint (run folder, .pt or .safetensors)."""
    weights = None
    if checkpoint is not None:
        path = resolve_eval_checkpoint(checkpoint, use_ema)
        weights, _ = load_eval_weights(path, use_ema)
        if cfg is None:
            cfg = TrainConfig.from_dict(checkpoint_config(path), source=str(path))
    if cfg is None:
        raise ConfigError("evaluate() needs a config or a checkpoint that stores one")
    dist_info = D.init_distributed(cfg.device)
    info = get_dataset_info(cfg.dataset, cfg.data_root, **_dataset_kwargs(cfg))
    num_classes = resolve_num_classes(cfg, info)
    if model is None:
        no_init = dict(pretrained=False, pretrained_path=None) if weights is not None else {}
        model = build_model(cfg.replace(drop_path=0.0, **no_init), num_classes, info.in_chans)
    if weights is not None:
        saved_classes = _classifier_outputs(model, weights)
        if saved_classes is not None and saved_classes != num_classes:
            raise ConfigError(
                f"the checkpoint has {saved_classes} classes but dataset '{info.name}' has "
                f"{num_classes}; evaluate on the dataset it was trained on"
            )
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ckpt.CheckpointError(
                f"the checkpoint does not fit {cfg.model} ({ckpt.first_lines(err)}); "
                "pass the --model, --model-kwargs and --dataset it was trained with"
            ) from err
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(dist_info.device, memory_format=memory_format)
    if cfg.compile:
        model = torch.compile(model, dynamic=False)
    loader, _ = build_loader(cfg, info, "val", dist_info, model)
    return validate(
        model,
        loader,
        dist_info.device,
        memory_format=memory_format,
        amp_dtype=resolve_amp(cfg.amp, dist_info.device),
        limit=cfg.limit_val_batches,
    )


def _classifier_outputs(model: nn.Module, weights: dict[str, torch.Tensor]) -> int | None:
    """Number of classes of the classifier weights in `weights` (None if unknown)."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if callable(get) else None
    for name, module in model.named_modules():
        if module is classifier and f"{name}.weight" in weights:
            return int(weights[f"{name}.weight"].shape[0])
    return None


def resolve_eval_checkpoint(path: str | Path, use_ema: bool = False) -> Path:
    """The weights file to evaluate: a run folder gives best(_ema).safetensors."""
    path = Path(path)
    if path.is_dir():
        name = "best_ema.safetensors" if use_ema else "best.safetensors"
        return ckpt.resolve_checkpoint(path, name)
    if use_ema and path.suffix == ".safetensors" and not path.stem.endswith("_ema"):
        sibling = path.with_name(f"{path.stem}_ema.safetensors")
        if not sibling.is_file():
            raise ckpt.CheckpointError(
                f"--ema asks for EMA weights but {sibling} does not exist (was the run trained "
                "with --no-ema?); drop --ema or pass an _ema.safetensors file"
            )
        return sibling
    return ckpt.resolve_checkpoint(path)


def load_eval_weights(path: Path, use_ema: bool = False) -> tuple[dict[str, Any], dict | None]:
    """(state_dict, saved config) from a weights file or a training state."""
    state, meta = ckpt.load_any(path)
    if meta is not None:
        adapted = meta.get("adapt")  # quadranet.adapt's metadata
        if adapted and adapted.get("target_model") is None:
            raise ckpt.CheckpointError(
                f"{path} holds a model made quadratic by `quadranet adapt` that no registered "
                "model takes (quadratic channel MLPs, or a ConvNeXt); load it in Python with "
                f"quadranet.adapt.load_adapted('{path}')"
            )
        return state["model"], meta.get("config")
    if use_ema:
        if state.get("ema") is None:
            raise ckpt.CheckpointError(
                f"{path} holds no EMA weights (trained with --no-ema); drop --ema"
            )
        return state["ema"], state.get("config")
    return state["model"], state.get("config")


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The model, data and hardware settings stored in a checkpoint (empty when none)."""
    file = resolve_eval_checkpoint(path)
    _, cfg = load_eval_weights(file)
    keep = checkpoint_keys()
    settings = {k: v for k, v in (cfg or {}).items() if k in keep}
    if settings.get("arch") and (file.parent / ARCH_COPY).is_file():  # wherever eval runs
        settings["arch"] = str(file.parent / ARCH_COPY)
    return settings
