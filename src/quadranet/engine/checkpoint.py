"""Checkpoints: safetensors weights, a pickle-free training state, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import safetensors.torch
import torch

STATE_NAME = "last.pt"
STATE_FORMAT = 1
# Entries `--resume` cannot do without (older states may also hold a 'scheduler', unused now:
# the schedule is rebuilt from the step).
RESUME_ENTRIES = ("model", "optimizer", "epoch", "step", "rng", "config")
# Weights files written with each training state, named `<tag>.safetensors` beside it; the
# state, written last, records their digests so that a save cut between them is detected.
PAIRED_WEIGHTS = ("last", "last_ema")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full, no permission); the old file is kept."""


# Words in create_model kwargs that make timm read weights or settings from a file, a URL
# or the Hugging Face Hub (checkpoint_path, pretrained_cfg_overlay=dict(file=...), cache_dir):
# anywhere in the name, or (words that also name settings, as in drop_path_rate) at its end.
_SOURCE_WORDS = frozenset({"pretrained", "checkpoint", "filename", "url", "hub", "cache"})
_SOURCE_ENDINGS = frozenset({"path", "file", "dir"})


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through `writer` so that `path` is either the old or the complete new file.

    An OSError (disk full, no permission) becomes a `CheckpointWriteError` naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise CheckpointWriteError(write_error_message(path, err)) from err
    recorder: _RecordingFile | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # what open() gives (mkstemp makes 0600)
            recorder = _RecordingFile(f)
            writer(cast(IO[bytes], recorder))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else recorder.error if recorder else None
        if cause is None or not isinstance(err, Exception) or isinstance(err, CheckpointError):
            raise
        # torch.save reports a failed write as an internal RuntimeError: name the OS error
        raise CheckpointWriteError(write_error_message(path, cause)) from cause
    _fsync_dir(path.parent)
    return path


class _RecordingFile:
    """A binary file that keeps the first OSError of its writes (`error`)."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def write_error_message(path: str | Path, err: OSError) -> str:
    """One line for a failed write: the file, the OS error, that the old file is kept."""
    path = Path(path)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = err.strerror or str(err) or type(err).__name__
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some disk space (or write elsewhere) and retry"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the folder writable (or write elsewhere) and retry"
    else:
        hint = "check the folder (or write elsewhere) and retry"
    kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
    return f"cannot write {path}: {reason}; {kept}; {hint}"


def _fsync_dir(folder: Path) -> None:
    """Persist a rename in `folder` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_weights(
    path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> Path:
    """Save model weights as safetensors; `metadata` is stored as JSON under 'quadranet'."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": "pt", "quadranet": json.dumps(metadata or {})}
    blob = safetensors.torch.save(tensors, metadata=meta)
    return atomic_write(path, lambda f: f.write(blob))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (state_dict, metadata) from a safetensors file written by `save_weights`.

    NaN/Inf tensors are refused; the metadata is `safe_metadata`'s (nothing names files).
    """
    path = _existing(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
        meta = _read_metadata(path)
    except Exception as err:
        raise _unreadable(path, err) from err
    check_finite(path, tensors)
    return tensors, meta


def load_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a safetensors file written by `save_weights`, without its tensors."""
    path = _existing(path)
    try:
        return _read_metadata(path)
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    other = "last.safetensors" if path.name.startswith("best") else "best.safetensors"
    return CheckpointError(
        f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
        f"use another checkpoint (e.g. the {other} beside it)"
    )


def _read_metadata(path: Path) -> dict[str, Any]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("quadranet", "{}")
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("its 'quadranet' metadata is not a JSON object")
    return safe_metadata(meta)


def safe_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of checkpoint metadata (or a training state) whose saved config cannot make
    `create_model` open files: model_kwargs that name weights, files, URLs or the Hub
    (checkpoint_path, pretrained, pretrained_cfg(_overlay), cache_dir, ...) are dropped."""
    out = dict(meta)
    config = out.get("config")
    if isinstance(config, Mapping):
        config = dict(config)
        kwargs = config.get("model_kwargs")
        if isinstance(kwargs, Mapping):
            config["model_kwargs"] = safe_model_kwargs(kwargs)
        out["config"] = config
    return out


def safe_model_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model kwargs that describe the architecture (none that load weights or files)."""
    return {k: v for k, v in kwargs.items() if not is_source_kwarg(str(k))}


def is_source_kwarg(key: str) -> bool:
    """Whether a create_model kwarg makes timm read a file, a URL or the Hub."""
    words = key.lower().replace("-", "_").split("_")
    return words[-1] in _SOURCE_ENDINGS or any(word in _SOURCE_WORDS for word in words)


def check_finite(path: str | Path, tensors: Mapping[str, Any], what: str = "tensor") -> None:
    """A CheckpointError naming the first floating-point tensor with NaN/Inf values."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            continue
        if (value.is_floating_point() or value.is_complex()) and not bool(
            torch.isfinite(value).all()
        ):
            raise CheckpointError(
                f"{path}: {what} '{name}' has NaN/Inf values; the checkpoint is unusable "
                "(a diverged run?): use an earlier one, e.g. best.safetensors"
            )


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Save a full training state (tensors and plain python only) atomically."""
    state = {"format_version": STATE_FORMAT, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state with `weights_only=True` (never runs pickled code).

    NaN/Inf model or EMA tensors are refused; the config is `safe_metadata`'s.
    """
    path = _existing(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} cannot be loaded as a training state ({load_problem(err)}); it is corrupt "
            "or not a quadranet checkpoint: pass a run folder, its last.pt or a .safetensors "
            "weights file"
        ) from err
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise CheckpointError(f"{path} is not a quadranet training state (no 'model' entry)")
    for key, what in (("model", "tensor"), ("ema", "EMA tensor")):
        if isinstance(state.get(key), Mapping):
            check_finite(path, state[key], what)
    return safe_metadata(state)


def first_lines(err: Exception, n: int = 2, limit: int = 400) -> str:
    """The first lines of an error message, joined, cut to about `limit` characters (a
    state dict's list of missing keys can fill pages)."""
    text = " ".join(line.strip() for line in str(err).splitlines()[:n])
    return text if len(text) <= limit else text[:limit].rstrip(", ") + " ..."


def load_problem(err: Exception) -> str:
    """Why loading a file failed, in short; not torch's own text for a pickle that
    `weights_only=True` refuses, which advises loading it unsafely (running its code)."""
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return "it is not a torch file, or holds objects other than tensors and plain values"
    return f"{type(err).__name__}: {first_lines(err)}"


def load_any(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(weights-or-state, metadata) from a .safetensors weight file or a .pt training state."""
    path = _existing(path)
    if path.suffix == ".safetensors":
        weights, meta = load_weights(path)
        return {"model": weights}, meta
    return load_state(path), None


def resolve_checkpoint(path: str | Path, default_name: str = STATE_NAME) -> Path:
    """A checkpoint file: `path` itself, or `path/default_name` for a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / default_name
    return _existing(path)


def _existing(path: str | Path) -> Path:
    """`path` if it is a file, else a CheckpointError saying what to do."""
    path = Path(path)
    if not path.is_file():
        where = path.parent if path.parent.is_dir() else None
        found = (
            sorted(p.name for p in where.iterdir() if p.suffix in (".pt", ".safetensors"))
            if where
            else []
        )
        hint = f" (files there: {', '.join(found)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} does not exist{hint}; pass a run folder or an existing "
            ".pt/.safetensors file"
        )
    return path


def check_resume_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """A CheckpointError naming the entry of a training state that `--resume` cannot use
    (missing, of the wrong kind, or an RNG state that does not restore)."""
    fix = (
        "the file was edited or damaged: resume from an intact copy, or start over with --overwrite"
    )
    missing = [key for key in RESUME_ENTRIES if key not in state]
    if missing:
        names = ", ".join(f"'{key}'" for key in missing)
        entries = "entry" if len(missing) == 1 else "entries"
        raise CheckpointError(f"{path} lacks the {entries} {names} that --resume needs; {fix}")
    for key in ("model", "optimizer", "config"):
        if not isinstance(state[key], Mapping):
            raise CheckpointError(
                f"{path}: entry '{key}' must be a mapping, not {type(state[key]).__name__}; {fix}"
            )
    if state["config"].get("ema") and not isinstance(state.get("ema"), Mapping):
        raise CheckpointError(
            f"{path} lacks the entry 'ema' that --resume needs (the run keeps an EMA); {fix}"
        )
    for key in ("epoch", "step", "batch"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"{path}: entry '{key}' must be a whole number >= 0, not {value!r}; {fix}"
            )
    rng = state["rng"]
    if not isinstance(rng, list | tuple) or not rng:
        raise CheckpointError(f"{path}: entry 'rng' must list one RNG state per process; {fix}")
    for rank, entry in enumerate(rng):
        problem = rng_state_problem(entry)
        if problem is not None:
            raise CheckpointError(
                f"{path}: entry 'rng' (process {rank}) is malformed: {problem}; {fix}"
            )


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digests(folder: str | Path, tags: tuple[str, ...]) -> dict[str, str]:
    """{tag: SHA-256} of the `<tag>.safetensors` files in `folder` (tags of PAIRED_WEIGHTS)."""
    folder = Path(folder)
    paths = {tag: folder / f"{tag}.safetensors" for tag in tags if tag in PAIRED_WEIGHTS}
    return {tag: file_sha256(path) for tag, path in paths.items() if path.is_file()}


def unmatched_weights(folder: str | Path, state: Mapping[str, Any]) -> list[Path]:
    """The weights files beside a training state that are not the ones saved with it (a save
    cut between the weights and the state, or a file copied in). Only the fixed names of
    PAIRED_WEIGHTS are looked at, never a name read from the state."""
    recorded = state.get("weights_sha256")
    if not isinstance(recorded, Mapping):
        return []
    unmatched = []
    for tag in PAIRED_WEIGHTS:
        path = Path(folder) / f"{tag}.safetensors"
        if tag in recorded and path.is_file() and file_sha256(path) != recorded[tag]:
            unmatched.append(path)
    return unmatched


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch and CUDA as tensors and plain python."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state(saved: Any) -> tuple:
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)


def _numpy_state(saved: Mapping[str, Any]) -> tuple:
    keys = saved["keys"].numpy().astype(np.uint32)
    return (saved["name"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"])


def rng_state_problem(state: Any) -> str | None:
    """What keeps an RNG state saved by `rng_state` from being restored (None: nothing).
    It is tried on throwaway generators; the global ones are untouched."""
    if not isinstance(state, Mapping):
        return f"a {type(state).__name__}, not a mapping"
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        return f"no {' and '.join(missing)} state"
    trials = (
        ("python", lambda: random.Random().setstate(_python_state(state["python"]))),
        ("numpy", lambda: np.random.RandomState().set_state(_numpy_state(state["numpy"]))),
        ("torch", lambda: torch.Generator().set_state(state["torch"])),
    )
    for name, trial in trials:
        try:
            trial()
        except Exception as err:  # whatever the generator rejects makes the state unusable
            detail = " ".join(str(err).split()) or type(err).__name__
            return f"its {name} state does not restore ({detail})"
    cuda = state.get("cuda")
    if cuda is not None and not (
        isinstance(cuda, list | tuple)
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda)
    ):
        return "its cuda state is not a list of byte tensors"
    return None


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    random.setstate(_python_state(state["python"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
