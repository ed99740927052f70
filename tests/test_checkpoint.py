"""Checkpoints: atomic writes, pickle-free loading, RNG state, and exact resume after SIGKILL."""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from quadranet.cli import main as cli_main
from quadranet.engine import checkpoint as ckpt
from quadranet.engine.report import read_metrics
from tiny_nets import driver_script

# mixup/cutmix (numpy), random erasing (python), crop and dropout (torch) all draw random numbers
RUN_ARGS = [
    "train", "--model", "engine_slow_net", "--dataset", "fake", "--batch-size", "8",
    "--dataset-kwargs", "num_classes=4", "img_size=8", "in_chans=1", "length=64", "val_length=16",
    "--epochs", "4", "--warmup-epochs", "1", "--base-lr", "0.5", "--mixup", "0.8", "--cutmix", "1",
    "--reprob", "0.5", "--crop-padding", "1", "--hflip", "0.5", "--randaugment", "none",
    "--deterministic", "--workers", "0",
]  # fmt: skip


def _run(driver, output, *extra) -> subprocess.Popen:
    """Start the training driver as a subprocess."""
    cmd = [sys.executable, str(driver), *RUN_ARGS, "--output", str(output), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_after_first_checkpoint(proc: subprocess.Popen, state: Path, timeout: float) -> None:
    """SIGKILL `proc` as soon as `state` exists."""
    deadline = time.monotonic() + timeout
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture
def restore_determinism():
    """Undo the global deterministic-algorithms switch of an in-process deterministic run."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, restore_determinism):
    driver = tmp_path / "driver.py"
    driver.write_text(driver_script())
    killed = _run(driver, tmp_path / "killed")
    killer = threading.Thread(
        target=_kill_after_first_checkpoint, args=(killed, tmp_path / "killed" / "last.pt", 120)
    )
    killer.start()
    # meanwhile, the uninterrupted reference run in this process
    assert cli_main([*RUN_ARGS, "--output", str(tmp_path / "full")]) == 0
    killer.join()
    assert killed.returncode == -signal.SIGKILL, killed.communicate()[0]
    assert not (tmp_path / "killed" / "report.md").exists(), "the run ended before the kill"
    done_epochs = ckpt.load_state(tmp_path / "killed" / "last.pt")["epoch"]
    assert 1 <= done_epochs < 4

    resumed = _run(driver, tmp_path / "killed", "--resume", str(tmp_path / "killed"))
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    assert f"resumed from {tmp_path / 'killed' / 'last.pt'} after epoch {done_epochs}" in out

    for name in ("last.safetensors", "last_ema.safetensors"):
        a, _ = ckpt.load_weights(tmp_path / "full" / name)
        b, _ = ckpt.load_weights(tmp_path / "killed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    timing = ("images_per_s", "epoch_time_s")
    records = [
        [
            {k: v for k, v in r.items() if k not in timing}
            for r in read_metrics(run / "metrics.jsonl")
        ]
        for run in (tmp_path / "full", tmp_path / "killed")
    ]
    assert len(records[1]) == 4 and records[0] == records[1]


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "epoch": int(value), "config": {"a": [1]}}


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_state(path, _state(1.0))

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_state(path, _state(2.0))
    monkeypatch.undo()
    state = ckpt.load_state(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_crash_before_rename_keeps_the_previous_weights(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    ckpt.save_weights(path, {"w": torch.ones(2)}, {"epoch": 1})

    def no_replace(src, dst):
        raise KeyboardInterrupt  # as if the process died between fsync and rename

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_weights(path, {"w": torch.zeros(2)}, {"epoch": 2})
    monkeypatch.undo()
    weights, meta = ckpt.load_weights(path)
    assert torch.equal(weights["w"], torch.ones(2)) and meta == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_state_round_trip_and_weights_metadata(tmp_path):
    ckpt.save_state(tmp_path / "s.pt", _state(3.0))
    state = ckpt.load_state(tmp_path / "s.pt")
    assert state["format_version"] == ckpt.STATE_FORMAT and state["config"] == {"a": [1]}
    shared = torch.arange(4.0)
    ckpt.save_weights(tmp_path / "w.safetensors", {"a": shared, "b": shared}, {"top1": 99.5})
    weights, meta = ckpt.load_weights(tmp_path / "w.safetensors")
    assert torch.equal(weights["b"], shared) and meta == {"top1": 99.5}


class Payload:
    """Pickling this object would run code on load."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_loading_never_runs_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "format_version": 1, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded"):
        ckpt.load_state(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned.txt").exists()


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_state(tmp_path / "none.pt")
    ckpt.save_state(tmp_path / "s.pt", _state(1.0))
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_state(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ckpt.CheckpointError, match="not a quadranet training state"):
        ckpt.load_state(tmp_path / "other.pt")
    (tmp_path / "w.safetensors").write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.load_weights(tmp_path / "w.safetensors")
    with pytest.raises(ckpt.CheckpointError, match=r"last.pt does not exist \(files there: cut.pt"):
        ckpt.resolve_checkpoint(tmp_path)


def test_rng_state_round_trips_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    ckpt.save_state(tmp_path / "s.pt", {"model": {}, "rng": ckpt.rng_state()})
    first = (random.random(), np.random.randn(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(ckpt.load_state(tmp_path / "s.pt")["rng"])
    second = (random.random(), np.random.randn(), np.random.rand(), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


# --- failed writes, non-finite weights, metadata that names files --------------------------------

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class _FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: later writes fail with ENOSPC."""

    def __init__(self, fd: int, room: int) -> None:
        super().__init__()
        self.raw, self.room = io.FileIO(fd, "wb"), room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.raw.write(data)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()
        super().close()


def test_disk_full_at_fsync_is_one_clear_error_and_keeps_the_old_files(tmp_path, monkeypatch):
    ckpt.save_state(tmp_path / "last.pt", _state(1.0))
    ckpt.save_weights(tmp_path / "last.safetensors", {"w": torch.ones(2)}, {"epoch": 1})

    def no_space(fd):
        raise ENOSPC

    monkeypatch.setattr(os, "fsync", no_space)
    for name, save in [
        ("last.pt", lambda p: ckpt.save_state(p, _state(2.0))),
        ("last.safetensors", lambda p: ckpt.save_weights(p, {"w": torch.zeros(2)}, {"epoch": 2})),
    ]:
        with pytest.raises(ckpt.CheckpointError) as info:
            save(tmp_path / name)
        message = str(info.value)
        assert f"cannot write {tmp_path / name}: No space left on device" in message
        assert f"the previous {name} is intact" in message and "\n" not in message
        assert isinstance(info.value, OSError) and info.value.__cause__ is ENOSPC
    monkeypatch.undo()
    assert ckpt.load_state(tmp_path / "last.pt")["epoch"] == 1
    assert ckpt.load_weights(tmp_path / "last.safetensors")[1] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.safetensors"]


def test_disk_full_inside_torch_save_is_not_a_pytorch_internal_error(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="rb": _FullDisk(fd, room=100))
    with pytest.raises(ckpt.CheckpointError, match="No space left on device; nothing was written"):
        ckpt.save_state(path, {"model": {"w": torch.zeros(10_000)}})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_writing_below_a_file_names_the_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ckpt.CheckpointError, match=r"run is a file, not a folder; nothing was"):
        ckpt.save_weights(tmp_path / "run" / "best.safetensors", {"w": torch.ones(1)})


def test_non_finite_weights_are_refused_with_the_tensor_name(tmp_path):
    weights = {"stem.weight": torch.ones(3), "head.bias": torch.tensor([0.0, float("nan")])}
    ckpt.save_weights(tmp_path / "w.safetensors", weights)
    with pytest.raises(ckpt.CheckpointError, match=r"safetensors: tensor 'head.bias' has NaN/Inf"):
        ckpt.load_weights(tmp_path / "w.safetensors")
    state = _state(1.0)
    state["ema"] = {"w": torch.tensor([1.0, float("inf")])}
    ckpt.save_state(tmp_path / "s.pt", state)
    with pytest.raises(ckpt.CheckpointError, match=r"s.pt: EMA tensor 'w' has NaN/Inf.*best"):
        ckpt.load_state(tmp_path / "s.pt")
    ckpt.save_state(tmp_path / "ok.pt", {"model": {"steps": torch.tensor(3)}, "epoch": 1})
    assert ckpt.load_state(tmp_path / "ok.pt")["epoch"] == 1  # integer tensors are fine


def test_metadata_never_names_files_for_create_model(tmp_path, monkeypatch, capsys):
    from quadranet.models import create_model

    bait = tmp_path / "other.pth"
    bait.write_bytes(b"not a checkpoint: opening it fails")
    tiny = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32])
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=4, **tiny)
    sources = dict(
        checkpoint_path=str(bait),
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(bait)),
        cache_dir=str(tmp_path),
    )
    fake = dict(num_classes=4, img_size=28, in_chans=1, length=8, val_length=8)
    config = dict(
        model="quadranet25_xxs",
        model_kwargs={**tiny, **sources},
        dataset="fake",
        dataset_kwargs=fake,
        batch_size=8,
        workers=0,
        device="cpu",
    )
    path = ckpt.save_weights(tmp_path / "best.safetensors", model.state_dict(), {"config": config})
    _, meta = ckpt.load_weights(path)
    assert meta["config"]["model_kwargs"] == tiny
    assert ckpt.load_metadata(path)["config"]["model_kwargs"] == tiny
    ckpt.save_state(tmp_path / "last.pt", {"model": model.state_dict(), "config": config})
    assert ckpt.load_state(tmp_path / "last.pt")["config"]["model_kwargs"] == tiny

    opened = []
    real_open = open

    def watch(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", watch)
    assert cli_main(["eval", "--checkpoint", str(path)]) == 0, capsys.readouterr().err
    assert "top-1" in capsys.readouterr().out
    assert str(bait) not in opened
