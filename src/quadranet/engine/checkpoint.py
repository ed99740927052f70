"""Checkpoints: safetensors weights, a pickle-free training state, atomic writes."""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors.torch
import torch

STATE_NAME = "last.pt"
STATE_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model."""


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, writer: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through `writer` so that `path` is either the old or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would give (mkstemp makes it 0600)
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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
    """Load (state_dict, metadata) from a safetensors file written by `save_weights`."""
    path = _existing(path)
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
        with safetensors.safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("quadranet", "{}")
        return tensors, json.loads(raw)
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}); "
            "it may be truncated or corrupt: use another checkpoint (e.g. best.safetensors)"
        ) from err


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Save a full training state (tensors and plain python only) atomically."""
    state = {"format_version": STATE_FORMAT, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state with `weights_only=True` (never runs pickled code)."""
    path = _existing(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} cannot be loaded as a training state ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); it is corrupt or not a quadranet "
            "checkpoint: delete it, resume from another file, or start without --resume"
        ) from err
    if not isinstance(state, dict) or "model" not in state or "format_version" not in state:
        raise CheckpointError(f"{path} is not a quadranet training state (no 'model' entry)")
    return state


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


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states saved by `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
