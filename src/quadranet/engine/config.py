"""Training configuration: one dataclass that is the flags, the YAML keys and the defaults."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

AMP_MODES = ("auto", "none", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
ENGINE_GROUPS = ("model", "weights", "data", "optim", "augment", "hardware", "run")
EVAL_GROUPS = ("model", "data", "hardware")


class ConfigError(ValueError):
    """A configuration value, file or flag combination that cannot be used."""


def _opt(
    default: Any, help: str, group: str, aliases: tuple[str, ...] = (), const: Any = None
) -> Any:
    """A dataclass field carrying its flag help text, flag group, timm's spellings of the
    flag (`aliases`) and the value of the bare flag (`const`, e.g. `--amp`)."""
    meta = {"help": help, "group": group, "aliases": aliases, "const": const}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of `quadranet train`; defaults follow the paper's ImageNet recipe."""

    # model
    model: str = _opt("quadranet36_xxs", "timm model name (any registered model)", "model")
    model_kwargs: dict = _opt(
        {}, "extra create_model kwargs, e.g. stem_stride=2 depths=[2,2,6,2]", "model"
    )
    arch: str | None = _opt(
        None, "architecture JSON from `quadranet search` (builds quadranet_nas)", "model"
    )
    num_classes: int | None = _opt(None, "classes of the head (default: the dataset's)", "model")
    drop_path: float = _opt(0.1, "stochastic depth rate (paper: 0.2/0.4/0.5 for T/S/B)", "model")
    # initial weights (training only: never read back from a checkpoint's config)
    pretrained: bool = _opt(
        False,
        "start from the model's pretrained weights (timm create_model(pretrained=True)); "
        "QuadraNet models need --pretrained-path",
        "weights",
    )
    pretrained_path: str | None = _opt(
        None,
        "weights file (.safetensors/.pth) or saved model folder used as the pretrained weights "
        "(implies --pretrained; classifier and input channels adapted the timm way)",
        "weights",
    )
    initial_checkpoint: str | None = _opt(
        None,
        "start from these weights, every shape equal (a run folder's best, a .safetensors or a "
        ".pt/.pth state dict); optimizer and schedule start fresh",
        "weights",
    )
    # data
    dataset: str = _opt("mnist", "mnist, animal-mnist, cifar10, cifar100, fake or a folder", "data")
    data_root: str | None = _opt(
        None, "where datasets are stored or downloaded", "data", aliases=("--data-dir",)
    )
    download: bool = _opt(False, "download the dataset if it is missing", "data")
    dataset_kwargs: dict = _opt({}, "extra dataset options (e.g. for fake data)", "data")
    img_size: int | None = _opt(None, "input resolution (default: the dataset's)", "data")
    max_samples: int | None = _opt(None, "use at most N images of each split", "data")
    limit_train_batches: int | None = _opt(None, "train batches per epoch at most", "data")
    limit_val_batches: int | None = _opt(None, "validation batches at most", "data")
    batch_size: int = _opt(128, "batch size per process", "data", aliases=("-b",))
    workers: int = _opt(
        4, "data loader worker processes (at most the CPUs available)", "data", aliases=("-j",)
    )
    # optimisation
    epochs: int = _opt(300, "training epochs", "optim")
    accum_steps: int = _opt(
        1, "gradient accumulation steps per optimizer step", "optim",
        aliases=("--grad-accum-steps",),
    )  # fmt: skip
    opt: str = _opt("adamw", "optimizer name for timm.optim.create_optimizer_v2", "optim")
    lr: float | None = _opt(None, "absolute learning rate (default: base_lr scaled)", "optim")
    base_lr: float = _opt(
        4e-3, "learning rate at a global batch of lr_base_size", "optim", aliases=("--lr-base",)
    )
    lr_base_size: int = _opt(4096, "global batch size that base_lr refers to", "optim")
    momentum: float = _opt(0.9, "momentum (SGD-like optimizers)", "optim")
    weight_decay: float = _opt(0.05, "weight decay (not applied to norms and biases)", "optim")
    warmup_epochs: float = _opt(20.0, "linear warm-up length in epochs", "optim")
    warmup_lr: float = _opt(1e-6, "learning rate at the start of warm-up", "optim")
    min_lr: float = _opt(1e-6, "learning rate at the end of the cosine decay", "optim")
    clip_grad: float | None = _opt(5.0, "clip the gradient norm to this (none: off)", "optim")
    grad_checkpointing: bool = _opt(
        False,
        "recompute each block in backward instead of keeping its activations "
        "(model.set_grad_checkpointing: less memory, more compute)",
        "optim",
    )
    # augmentation and regularisation
    smoothing: float = _opt(0.1, "label smoothing", "augment")
    mixup: float = _opt(0.8, "mixup alpha (0: off)", "augment")
    cutmix: float = _opt(1.0, "cutmix alpha (0: off)", "augment")
    mixup_prob: float = _opt(1.0, "probability of applying mixup or cutmix to a batch", "augment")
    mixup_switch_prob: float = _opt(0.5, "probability of cutmix instead of mixup", "augment")
    randaugment: str | None = _opt(
        "rand-m9-mstd0.5", "timm RandAugment spec (none: off)", "augment"
    )
    reprob: float = _opt(0.25, "random erasing probability", "augment")
    hflip: float = _opt(0.5, "horizontal flip probability", "augment")
    crop_padding: int = _opt(0, "random crop with this zero padding (0: off)", "augment")
    ema: bool = _opt(
        True, "keep an exponential moving average of the weights", "augment",
        aliases=("--model-ema",),
    )  # fmt: skip
    ema_decay: float = _opt(0.9999, "EMA decay", "augment", aliases=("--model-ema-decay",))
    ema_warmup: bool = _opt(True, "ramp the EMA decay up over the first steps", "augment")
    # hardware
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N", "hardware")
    amp: str = _opt(
        "auto", "mixed precision: auto (bf16/fp16 on CUDA), none, bf16, fp16 (bare --amp: bf16)",
        "hardware", const="bf16",
    )  # fmt: skip
    channels_last: bool = _opt(True, "use the channels-last memory format", "hardware")
    compile: bool = _opt(False, "compile the model with torch.compile", "hardware")
    deterministic: bool = _opt(False, "deterministic algorithms (reproducible, slower)", "hardware")
    # run
    output: str | None = _opt(None, "output folder (default: runs/<model>-<dataset>)", "run")
    resume: str | None = _opt(
        None,
        "resume from a run folder or a .pt training state (the run continues in that folder); "
        "auto: resume from --output's last checkpoint when there is one, else start there",
        "run",
    )
    dist_timeout: float = _opt(
        30.0, "minutes a process waits for the others in a collective (torchrun)", "run"
    )
    overwrite: bool = _opt(
        False, "start a new run in an --output that holds one (its files are replaced)", "run"
    )
    seed: int = _opt(42, "random seed", "run")
    save_every: int = _opt(1, "save the last checkpoint every N epochs", "run")
    eval_every: int = _opt(1, "validate every N epochs (and always after the last)", "run")
    quiet: bool = _opt(False, "no progress bar and no per-step or per-epoch lines", "run")
    log_interval: int = _opt(
        50, "print a line every N optimizer steps when stdout is not a terminal (0: off)", "run"
    )
    log_tensorboard: bool = _opt(
        False, "write TensorBoard events to <output>/tensorboard (needs tensorboard)", "run"
    )
    log_wandb: bool = _opt(False, "log to Weights & Biases (needs wandb)", "run")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_types()[f.name]))
        if self.pretrained_path:  # timm's pair of flags; the path alone says it all
            self.pretrained = True
        if self.arch is not None and self.model != "quadranet_nas":
            if self.model != TrainConfig.__dataclass_fields__["model"].default:
                raise ConfigError(f"--arch builds quadranet_nas; drop --model {self.model}")
            self.model = "quadranet_nas"
        self.validate()

    @property
    def output_dir(self) -> Path:
        """The run folder."""
        return Path(self.output or f"runs/{self.model}-{Path(self.dataset).name}")

    def validate(self) -> None:
        """Raise ConfigError for values that cannot work, whatever the data or model."""
        problems = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        need(self.epochs >= 1, f"epochs must be >= 1 (got {self.epochs})")
        need(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        need(self.accum_steps >= 1, f"accum_steps must be >= 1 (got {self.accum_steps})")
        need(self.workers >= 0, f"workers must be >= 0 (got {self.workers})")
        need(self.dist_timeout > 0, f"dist_timeout must be > 0 minutes (got {self.dist_timeout})")
        need(self.lr is None or self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(self.base_lr > 0, f"base_lr must be > 0 (got {self.base_lr})")
        need(self.lr_base_size >= 1, f"lr_base_size must be >= 1 (got {self.lr_base_size})")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0 (got {self.warmup_epochs})")
        need(
            self.warmup_epochs == 0 or self.warmup_epochs < self.epochs,
            f"warmup_epochs ({self.warmup_epochs:g}) must be shorter than epochs ({self.epochs}); "
            "lower --warmup-epochs (the default 20 is for 300-epoch runs)",
        )
        need(
            self.clip_grad is None or self.clip_grad > 0,
            f"clip_grad must be > 0 or none (got {self.clip_grad})",
        )
        need(0 <= self.smoothing < 1, f"smoothing must be in [0, 1) (got {self.smoothing})")
        for name in ("mixup", "cutmix", "drop_path", "weight_decay"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("mixup_prob", "mixup_switch_prob", "reprob", "hflip"):
            value = getattr(self, name)
            need(0 <= value <= 1, f"{name} is a probability in [0, 1] (got {value})")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        need(self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)} (got {self.amp})")
        need(
            DEVICE_PATTERN.fullmatch(self.device) is not None,
            f"device must be auto, cpu, cuda or cuda:N with N a GPU index, e.g. cuda:0 "
            f"(got {self.device!r})",
        )
        limits = ("max_samples", "limit_train_batches", "limit_val_batches")
        for name in (*limits, "num_classes", "img_size"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be >= 1 or none (got {value})")
        need(self.save_every >= 1, f"save_every must be >= 1 (got {self.save_every})")
        need(self.eval_every >= 1, f"eval_every must be >= 1 (got {self.eval_every})")
        need(self.crop_padding >= 0, f"crop_padding must be >= 0 (got {self.crop_padding})")
        need(self.log_interval >= 0, f"log_interval must be >= 0 (got {self.log_interval})")
        need(
            not (self.initial_checkpoint and self.pretrained),
            "--initial-checkpoint replaces every weight --pretrained would load; pass one of them",
        )
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain-python copy (JSON/YAML serialisable)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (keys may use dashes)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes}, source="replace()")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a mapping whose keys are flag names (dashes or underscores)."""
        return cls(**_known_keys(values, source))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Load a YAML file whose keys match the flags, then apply overrides."""
        return cls.from_dict({**load_yaml(path), **overrides}, source=str(path))


def _known_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` with keys as field names (dashes to underscores); an unknown key is an error
    that names `source` and the closest field."""
    known = _field_types()
    clean = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"unknown key '{key}' in {source}{hint} (valid keys: {', '.join(known)})"
            )
        clean[name] = value
    return clean


def checkpoint_keys() -> set[str]:
    """The settings a checkpoint passes on to eval, export and adapt: its model, data and
    hardware, but not how much of the data its run used."""
    return group_keys(EVAL_GROUPS) - {"max_samples", "limit_train_batches", "limit_val_batches"}


def group_keys(groups: tuple[str, ...]) -> set[str]:
    """Names of the TrainConfig fields in the given flag groups."""
    return {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] in groups}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; check the --config path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of flag: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what the parser expected and where."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem is None:
        return " ".join(str(err).split())
    where = f" (line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1})"
    context = f"{err.context}: " if err.context else ""
    return context + err.problem + (where if err.problem_mark else "")


@functools.cache
def _field_types() -> dict[str, Any]:
    """Resolved type of every TrainConfig field."""
    return typing.get_type_hints(TrainConfig)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) for `T | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's type or raise ConfigError naming the key."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} cannot be empty (it needs a {inner.__name__})")
    try:
        if inner is bool:
            if isinstance(value, str) and value.lower() in (
                "true",
                "yes",
                "1",
                "on",
                "false",
                "no",
                "0",
                "off",
            ):
                return value.lower() in ("true", "yes", "1", "on")
            if isinstance(value, bool):
                return value
            raise TypeError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise TypeError
            out = float(value)
            if not math.isfinite(out):
                raise TypeError
            return out
        if inner is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if inner is str:
            if isinstance(value, dict | list):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, yaml.YAMLError):
        pass
    else:
        return value
    kind = inner.__name__ + (" or none" if optional else "")
    raise ConfigError(f"{name} must be a {kind} (got {value!r})")


class _KeyValueAction(argparse.Action):
    """Collect `key=value` pairs (values parsed as YAML) or one YAML mapping into a dict."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        out: dict[str, Any] = {}
        for item in values:
            key, sep, raw = item.partition("=")
            try:
                parsed = yaml.safe_load(raw if sep else item)
            except yaml.YAMLError as err:
                parser.error(
                    f"{option_string}: {item!r} is not valid YAML ({yaml_problem(err)}); give "
                    "key=value pairs, e.g. depths=[2,2,6,2], or one mapping, e.g. "
                    "'{depths: [2, 2, 6, 2]}'"
                )
            if sep:
                out[key.strip()] = parsed
            elif isinstance(parsed, dict):
                out.update(parsed)
            else:
                parser.error(f"{option_string} takes key=value pairs (got {item!r})")
        setattr(namespace, self.dest, out)


def add_config_arguments(
    parser: argparse.ArgumentParser,
    groups: tuple[str, ...] = ENGINE_GROUPS,
    defaults: dict[str, Any] | None = None,
    default_source: str | None = None,
    sourced: Collection[str] = (),
):
    """Add one flag per TrainConfig field in `groups`; unset flags stay out of the namespace.

    The help shows the command's own defaults: `defaults` (a preset) over TrainConfig's,
    and for the `sourced` fields where they come from first (`default_source`, e.g. the
    checkpoint's run)."""
    defaults = defaults or {}
    parser.add_argument(
        "--config", metavar="YAML", default=argparse.SUPPRESS, help="YAML file of flag: value"
    )
    hints = _field_types()
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        group = f.metadata["group"]
        if group not in groups:
            continue
        if group not in sections:
            sections[group] = parser.add_argument_group(f"{group} options")
        inner, optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = "{}" if f.default is dataclasses.MISSING else f.default
        default = defaults.get(f.name, default)
        if default_source and f.name in sourced:
            default = f"{default_source}, else {default}"
        help_text = f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif inner is dict:
            kwargs.update(nargs="+", action=_KeyValueAction, metavar="KEY=VALUE")
        else:
            kwargs["type"] = _cli_type(f.name, hints[f.name])
            kwargs["metavar"] = inner.__name__.upper()
        if f.metadata["const"] is not None:
            kwargs.update(nargs="?", const=f.metadata["const"])
        sections[group].add_argument(flag, *f.metadata["aliases"], **kwargs)


def _cli_type(name: str, tp: Any):
    """An argparse `type=` callable that applies the field's coercion."""

    def convert(text: str) -> Any:
        try:
            return _coerce(name, text, tp)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    convert.__name__ = name
    return convert


def config_from_args(
    args: argparse.Namespace, base: str | Path | dict[str, Any] | None = None
) -> TrainConfig:
    """Merge defaults < base preset < --config YAML < explicit flags into a TrainConfig."""
    values: dict[str, Any] = {}
    if isinstance(base, dict):
        values.update(base)
    for path in (base if not isinstance(base, dict) else None, getattr(args, "config", None)):
        if path:  # each file's keys checked on their own, so an error names the file
            values.update(_known_keys(load_yaml(path), str(path)))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_dict(values)
