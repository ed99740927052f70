"""Faults and bad inputs of training runs: each ends in one actionable line and a distinct
exit code, and none loses more than the partial step (docs/faults.md lists them with the tests
that check them, here and in test_engine.py, test_checkpoint.py and test_export.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from quadranet.cli import main as cli_main
from quadranet.engine import ConfigError, TrainConfig, Trainer, runfolder, train
from quadranet.engine import checkpoint as ckpt
from quadranet.engine.commands import EXIT_BAD_INPUT, EXIT_PREEMPTED
from quadranet.engine.report import read_metrics, truncate_metrics
from tiny_nets import driver_script, signal_after_step

FAKE = {"num_classes": 4, "img_size": 8, "in_chans": 1, "length": 32, "val_length": 16}
QNET = "quadranet25_xxs"  # (engine_tiny_net has no pretrained cfg: timm loads nothing for it)


def tiny_cfg(tmp_path, **overrides) -> TrainConfig:
    """A fast, deterministic run on fake 8x8 data (4 steps an epoch)."""
    values = dict(
        model="engine_tiny_net", dataset="fake", dataset_kwargs=FAKE, batch_size=8, epochs=2,
        lr=1e-2, warmup_epochs=0, mixup=0.0, cutmix=0.0, smoothing=0.0, randaugment=None,
        reprob=0.0, hflip=0.0, drop_path=0.0, ema=False, workers=0, quiet=True, device="cpu",
        output=str(tmp_path / "run"),
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def cli_train(output, *extra: str, model: str = "engine_tiny_net") -> list[str]:
    """A `quadranet train` command line for the tiny fake-data run."""
    argv = ["train", "--model", model, "--dataset", "fake", "--dataset-kwargs", json.dumps(FAKE)]
    argv += ["--batch-size", "8", "--epochs", "1", "--warmup-epochs", "0", "--no-ema"]
    argv += ["--workers", "0", "--quiet", "--device", "cpu", "--output", str(output)]
    return argv + list(extra)


def error_line(capsys) -> str:
    """stderr of the last command, checked to be exactly one line without a traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def exit_status(argv: list[str]) -> int:
    """The exit status of a command line, also when argparse ends it (SystemExit)."""
    try:
        return cli_main(argv)
    except SystemExit as stop:
        return int(stop.code)


# --- bad input: one line, exit 2 ---------------------------------------------------------------


@pytest.mark.parametrize("item", ["{a: [1", "depths=[1,"])
def test_bad_yaml_in_model_kwargs_is_one_line(tmp_path, capsys, item):
    assert exit_status(cli_train(tmp_path / "run", "--model-kwargs", item)) == EXIT_BAD_INPUT
    err = error_line(capsys)
    assert f"--model-kwargs: {item!r} is not valid YAML" in err and "line 1, column" in err
    assert "key=value pairs" in err and not (tmp_path / "run").exists()


def test_an_unknown_key_names_its_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epochz: 3\n")
    assert cli_main([*cli_train(tmp_path / "run"), "--config", str(path)]) == EXIT_BAD_INPUT
    assert f"unknown key 'epochz' in {path}; did you mean 'epochs'?" in error_line(capsys)


def test_bad_yaml_in_a_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: [1\n")
    assert exit_status(cli_train(tmp_path / "run", "--config", str(config))) == EXIT_BAD_INPUT
    err = error_line(capsys)
    assert f"config file {config} is not valid YAML: while parsing a flow sequence" in err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ("{dims: [-8, 16, 32, 64]}", "dims (channels per stage) must be integers > 0, got [-8,"),
        ("dims=[0,8,8,8]", "dims (channels per stage) must be integers > 0, got [0, 8"),
        ("depths=[-1,1,1,1]", "depths (blocks per stage) must be integers >= 0, got [-1,"),
        ("kernel_size=99999", "kernel_size 99999 is larger than the 63 a block takes"),
    ],
)
def test_impossible_model_sizes_are_one_line(tmp_path, capsys, kwargs, message):
    argv = cli_train(tmp_path / "run", "--model-kwargs", kwargs, model="quadranet25_xxs")
    assert exit_status(argv) == EXIT_BAD_INPUT
    err = error_line(capsys)
    assert "cannot build quadranet25_xxs: " + message in err and "check --model-kwargs" in err


def _arch(tmp_path, dims, block) -> str:
    path = tmp_path / "arch.json"
    stages = [[block], ["quadra_k3_e2"]]
    path.write_text(json.dumps({"space": "quadra", "dims": dims, "stages": stages}))
    return str(path)


def test_huge_kernel_or_negative_width_in_an_arch_file_is_one_line(tmp_path, capsys):
    """Refused before any weight is allocated (kernel 99999 would exhaust memory)."""
    arch = _arch(tmp_path, [8, 16], "quadra_k99999_e2")
    assert exit_status(cli_train(tmp_path / "run", "--arch", arch, model="quadranet_nas")) == 2
    err = error_line(capsys)
    assert "arch.stages[0][0]: block 'quadra_k99999_e2' has kernel size 99999" in err
    assert "check the --arch file" in err
    pytest.importorskip("onnx")
    argv = ["export", "--arch", arch, "--in-chans", "1", "--img-size", "8"]
    assert exit_status([*argv, "-o", str(tmp_path / "m.onnx")]) == 2
    assert "has kernel size 99999" in error_line(capsys)
    arch = _arch(tmp_path, [-8, 16], "quadra_k3_e2")
    assert exit_status(cli_train(tmp_path / "run", "--arch", arch, model="quadranet_nas")) == 2
    assert "arch.dims must be positive integers, got [-8, 16]" in error_line(capsys)


def test_bad_device_names_are_one_line(tmp_path, capsys, monkeypatch):
    assert exit_status(cli_train(tmp_path / "run", "--device", "cuda:abc")) == EXIT_BAD_INPUT
    assert "device must be auto, cpu, cuda or cuda:N with N a GPU index" in error_line(capsys)
    if not torch.cuda.is_available():
        assert exit_status(cli_train(tmp_path / "run", "--device", "cuda")) == EXIT_BAD_INPUT
        assert "CUDA is not available; use --device cpu" in error_line(capsys)
    from quadranet.engine.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:3")


def test_resume_of_a_fresh_folder_says_what_to_do(tmp_path, capsys):
    (tmp_path / "fresh").mkdir()
    assert exit_status(cli_train(tmp_path / "x", "--resume", str(tmp_path / "fresh"))) == 2
    err = error_line(capsys)
    assert "last.pt does not exist" in err and "--resume auto" in err


def test_unknown_flags_are_one_line(capsys):
    assert exit_status(["train", "--epochz", "3"]) == 2
    assert "unrecognized arguments: --epochz" in error_line(capsys)


# --- --debug and unexpected errors ------------------------------------------------------------


def test_debug_shows_the_traceback_and_unexpected_errors_are_one_line(
    tmp_path, monkeypatch, capsys
):
    argv = cli_train(tmp_path / "run", "--model-kwargs", "dims=[-8,8,8,8]", model="quadranet25_xxs")
    with pytest.raises(ConfigError, match="dims"):
        cli_main(["--debug", *argv])
    with pytest.raises(ConfigError, match="dims"):
        cli_main([*argv, "--debug"])  # after the command too
    from quadranet.commands import models

    def broken(args):
        raise RuntimeError("boom\n  on two lines")

    monkeypatch.setattr(models, "_cmd_info", broken)
    capsys.readouterr()
    assert cli_main(["info", "quadranet25_xxs"]) == 1
    assert error_line(capsys) == (
        "quadranet info: internal error: RuntimeError: boom on two lines "
        "(rerun with --debug for the traceback)\n"
    )
    with pytest.raises(RuntimeError, match="boom"):
        cli_main(["info", "quadranet25_xxs", "--debug"])


# --- training states: broken entries, and weights and state that do not match -----------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run with EMA, to resume from: (its config, its folder)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = tiny_cfg(root, epochs=1, ema=True, limit_train_batches=2, limit_val_batches=1)
    train(cfg)
    return cfg, root / "run"


def _numpy_keys(state):
    state["rng"][0]["numpy"]["keys"] = torch.zeros(3, dtype=torch.int64)


def _pop(key):
    return lambda state: state.pop(key)


def _set(key, value):
    return lambda state: state.__setitem__(key, value)


def _set_rng(key, value):
    return lambda state: state["rng"][0].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (_pop("optimizer"), "lacks the entry 'optimizer' that --resume needs"),
        (_pop("epoch"), "lacks the entry 'epoch' that --resume needs"),
        (_pop("rng"), "lacks the entry 'rng' that --resume needs"),
        (_pop("ema"), r"lacks the entry 'ema' that --resume needs \(the run keeps an EMA\)"),
        (_set("epoch", -1), "entry 'epoch' must be a whole number >= 0, not -1"),
        (_set("optimizer", [1]), "entry 'optimizer' must be a mapping, not list"),
        (_set_rng("torch", torch.zeros(3)), r"'rng' \(process 0\) is malformed: its torch state"),
        (_set_rng("python", "x"), "is malformed: its python state does not restore"),
        (_numpy_keys, "is malformed: its numpy state does not restore"),
        (_set("rng", [{"numpy": 1}]), "is malformed: no python and torch state"),
    ],
)
def test_broken_training_state_names_the_entry(finished_run, tmp_path, edit, message):
    cfg, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    edit(state)
    torch.save(state, tmp_path / "run" / "last.pt")
    resumed = cfg.replace(output=str(tmp_path / "run"), resume="auto", epochs=2)
    with pytest.raises(ckpt.CheckpointError, match=message) as info:
        Trainer(resumed)
    assert "resume from an intact copy, or start over with --overwrite" in str(info.value)


def test_broken_state_through_the_command_line(finished_run, tmp_path, capsys):
    cfg, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    del state["rng"]
    torch.save(state, tmp_path / "run" / "last.pt")
    config = tmp_path / "run" / "config.yaml"
    argv = ["train", "--config", str(config), "--resume", str(tmp_path / "run"), "--epochs", "2"]
    assert cli_main(argv) == EXIT_BAD_INPUT
    assert "last.pt lacks the entry 'rng' that --resume needs" in error_line(capsys)


def test_the_scheduler_is_not_part_of_the_state(finished_run, tmp_path):
    """Older states held the scheduler; it is rebuilt from the step, so a state with or
    without that entry resumes the same."""
    cfg, run = finished_run
    assert "scheduler" not in ckpt.load_state(run / "last.pt")
    shutil.copytree(run, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["scheduler"] = {"last_epoch": 123}
    torch.save(state, tmp_path / "run" / "last.pt")
    trainer = Trainer(cfg.replace(output=str(tmp_path / "run"), resume="auto", epochs=2))
    assert (trainer.epoch, trainer.step) == (1, 2)


def test_crash_between_weights_and_state_is_detected_and_resume_is_exact(
    tmp_path, monkeypatch, capsys
):
    """A save cut after last(_ema).safetensors were replaced but before last.pt: the state,
    written last, records the weights' digests, so resume notices the unmatched files,
    continues from the intact state and ends with the weights of an uninterrupted run."""
    limits = dict(limit_train_batches=2, limit_val_batches=1, epochs=3, ema=True)
    full = tiny_cfg(tmp_path, output=str(tmp_path / "full"), **limits)
    train(full)
    cfg = tiny_cfg(tmp_path, resume="auto", **limits)
    real_save_state = ckpt.save_state
    saves = []

    def die_before_the_second_state(path, state):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt  # as if killed between the two writes
        return real_save_state(path, state)

    monkeypatch.setattr(ckpt, "save_state", die_before_the_second_state)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    run = tmp_path / "run"
    state = ckpt.load_state(run / "last.pt")
    assert state["epoch"] == 1
    weights_epoch = ckpt.load_metadata(run / "last.safetensors")["epoch"]
    assert weights_epoch == 2  # the files are one epoch apart ...
    unmatched = [run / "last.safetensors", run / "last_ema.safetensors"]
    assert ckpt.unmatched_weights(run, state) == unmatched  # ... and that is detected

    capsys.readouterr()
    resumed = Trainer(cfg)
    err = capsys.readouterr().err
    assert f"note: {unmatched[0]} and {unmatched[1]} are not the weights saved with" in err
    assert "is intact and the run resumes from it (epoch 1, step 2)" in err
    resumed.fit()
    for name in ("last.safetensors", "last_ema.safetensors"):
        a, _ = ckpt.load_weights(run / name)
        b, _ = ckpt.load_weights(tmp_path / "full" / name)
        assert all(torch.equal(a[k], b[k]) for k in b), name
    assert ckpt.unmatched_weights(run, ckpt.load_state(run / "last.pt")) == []
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == [0, 1, 2]


# --- killed writes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["last.pt", "last.safetensors", "last_ema.safetensors", "best.safetensors", "config.yaml"],
)
def test_sigkill_in_the_middle_of_a_write_keeps_the_previous_file(tmp_path, name):
    """Every file of a run is written to a temporary and renamed: a process killed halfway
    leaves the previous file whole, and the next run removes the temporary."""
    path = tmp_path / name
    ckpt.atomic_write(path, lambda f: f.write(b"previous, complete"))
    started = tmp_path / "started"
    pid = os.fork()
    if pid == 0:  # the writer, killed while writing
        try:

            def half_then_hang(f) -> None:
                f.write(b"new, but only half")
                f.flush()
                started.touch()
                time.sleep(60)

            ckpt.atomic_write(path, half_then_hang)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == b"previous, complete"
    leftovers = list(tmp_path.glob(f".{name}.*.tmp"))
    assert len(leftovers) == 1
    assert runfolder.remove_stale_temporaries(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "started"])


def test_a_torn_metrics_line_is_skipped_and_dropped_at_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "val_top1": 50.0}\n{"epoch": 1, "val_to')  # killed mid-line
    assert read_metrics(path) == [{"epoch": 0, "val_top1": 50.0}]
    assert truncate_metrics(path, before_epoch=1) == [{"epoch": 0, "val_top1": 50.0}]
    assert path.read_text() == '{"epoch": 0, "val_top1": 50.0}\n'


# --- settings on resume, the run's own config.yaml, pre-emption --------------------------------


def test_resume_refuses_another_model_and_applies_a_new_warmup(finished_run, tmp_path, capsys):
    cfg, run = finished_run
    shutil.copytree(run, tmp_path / "run")
    again = cfg.replace(output=str(tmp_path / "run"), resume="auto", epochs=3)
    with pytest.raises(ckpt.CheckpointError, match="--model 'engine_tiny_net' but this run asks"):
        Trainer(again.replace(model="engine_other_net"))
    with pytest.raises(ckpt.CheckpointError, match=r"--model-kwargs \{\} but this run asks for"):
        Trainer(again.replace(model_kwargs={"width": 16}))
    Trainer(again.replace(warmup_epochs=1.5, quiet=False))
    assert "--warmup-epochs 0.0 -> 1.5" in capsys.readouterr().out
    # the data an epoch sees, and EMA on or off, are fixed too (the schedule counts the
    # steps of an epoch; an EMA started at resume would begin from the initial weights)
    with pytest.raises(ckpt.CheckpointError, match="--limit-train-batches 2 but this run asks"):
        Trainer(again.replace(limit_train_batches=1))
    with pytest.raises(ckpt.CheckpointError, match="with --ema but this run asks for --no-ema"):
        Trainer(again.replace(ema=False))
    with pytest.raises(ckpt.CheckpointError, match="weights only.*--initial-checkpoint"):
        Trainer(again.replace(resume=str(tmp_path / "run" / "best.safetensors")))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    state["world_size"] = 2  # as if trained under torchrun --nproc_per_node 2
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="trained by 2 process.*but this run has 1"):
        Trainer(again)


def test_model_kwargs_that_name_no_file_are_kept_and_resume(tmp_path):
    """drop_path_rate (with 'path' in its name) is an architecture setting: it is saved with
    the run, and the run resumes with it; kwargs that name files are still dropped."""
    assert not ckpt.is_source_kwarg("drop_path_rate")
    for key in ("checkpoint_path", "pretrained_cfg_overlay", "cache_dir", "file", "hub_id"):
        assert ckpt.is_source_kwarg(key), key
    tiny = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32], drop_path_rate=0.1)
    data = dict(FAKE, img_size=28, length=16, val_length=8)
    cfg = tiny_cfg(tmp_path, model="quadranet25_xxs", model_kwargs=tiny, dataset_kwargs=data)
    cfg = cfg.replace(epochs=1, limit_train_batches=1, limit_val_batches=1)
    train(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model_kwargs"] == tiny
    resumed = train(cfg.replace(resume=str(tmp_path / "run"), epochs=2))
    assert [r["epoch"] for r in resumed.history] == [0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": 5}, "--model-kwargs num_classes: the engine sets it; use --num-classes"),
        ({"in_chans": 3}, "--model-kwargs in_chans: the engine sets it"),
        ({"pretrained": True}, "--model-kwargs pretrained: the engine sets it; use --pretrained"),
        ({"drop_path_rate": 0.3}, "conflicts with --drop-path 0.1; set --drop-path 0.3"),
    ],
)
def test_model_kwargs_the_engine_sets_are_one_line(tmp_path, capsys, kwargs, message):
    argv = cli_train(tmp_path / "run", "--drop-path", "0.1", "--model-kwargs", json.dumps(kwargs))
    assert cli_main(argv) == EXIT_BAD_INPUT
    assert message in error_line(capsys)


def test_files_that_are_not_weights_are_one_short_line(tmp_path, capsys):
    """Not torch's advice to load them with weights_only=False (which would run their code)."""
    import datetime

    torch.save({"saved": datetime.date(2026, 1, 1)}, tmp_path / "notes.pt")  # not a tensor
    tiny = ["--model-kwargs", "stem_stride=2", "depths=[1,1,1]", "dims=[8,16,32]"]
    for flag in ("--initial-checkpoint", "--pretrained-path"):
        argv = cli_train(tmp_path / "run", flag, str(tmp_path / "notes.pt"), *tiny, model=QNET)
        assert cli_main(argv) == EXIT_BAD_INPUT
        line = error_line(capsys)
        assert "not a torch file" in line and "weights_only" not in line, line
    argv = cli_train(tmp_path / "run", "--limit-train-batches", "1", "--accum-steps", "2")
    assert cli_main(argv) == EXIT_BAD_INPUT  # the limit is what leaves no step: say so
    assert "at most 1 batches (--limit-train-batches)" in error_line(capsys)


def test_the_report_command_line_can_be_run(monkeypatch):
    from quadranet.engine.report import run_provenance

    monkeypatch.setattr(sys, "argv", ["/x/quadranet/cli.py", "train", "--epochs", "2"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    command = run_provenance()["command"]
    assert command == "torchrun --nproc_per_node 2 -m quadranet train --epochs 2"
    monkeypatch.setattr(sys, "argv", ["/x/my_run.py", "--fast"])  # the engine from a script
    assert run_provenance()["command"] == "torchrun --nproc_per_node 2 my_run.py --fast"


def test_an_output_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine\n")
    for output in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert cli_main(cli_train(output)) == EXIT_BAD_INPUT
        assert f"{tmp_path / 'afile'} is a file, not a folder" in error_line(capsys)
    assert (tmp_path / "afile").read_text() == "mine\n"
    with pytest.raises(ConfigError, match="img_size must be >= 1"):
        tiny_cfg(tmp_path, img_size=0)


def test_the_demo_starts_over_only_a_demo_run(tmp_path, capsys):
    """The demo preset starts its own folder over each time, but not one holding another run
    (unless --overwrite is given)."""
    train(tiny_cfg(tmp_path, epochs=1, limit_train_batches=1, limit_val_batches=1))
    state = (tmp_path / "run" / "last.pt").read_bytes()
    quick = ["--epochs", "1", "--max-samples", "64", "--batch-size", "32", "--quiet"]
    assert cli_main(["demo", "--output", str(tmp_path / "run"), *quick]) == EXIT_BAD_INPUT
    assert "holds a run already" in error_line(capsys)
    assert (tmp_path / "run" / "last.pt").read_bytes() == state
    for _ in range(2):
        assert cli_main(["demo", "--output", str(tmp_path / "demo"), *quick]) == 0
    capsys.readouterr()


def test_overwrite_starts_over_without_the_earlier_runs_files(tmp_path, capsys):
    """A run with EMA, then one without over it: none of the first run's weights stay, so
    nothing (eval --ema) can take them for the new run's."""
    train(tiny_cfg(tmp_path, epochs=1, ema=True, limit_train_batches=1, limit_val_batches=1))
    run = tmp_path / "run"
    assert (run / "best_ema.safetensors").is_file() and (run / "last_ema.safetensors").is_file()
    (run / "notes.txt").write_text("the user's own file\n")
    train(tiny_cfg(tmp_path, epochs=1, overwrite=True, limit_train_batches=1, limit_val_batches=1))
    assert not (run / "best_ema.safetensors").exists()
    assert not (run / "last_ema.safetensors").exists()
    assert (run / "notes.txt").read_text() == "the user's own file\n"
    assert cli_main(["eval", "--checkpoint", str(run), "--ema"]) == EXIT_BAD_INPUT
    capsys.readouterr()


def test_the_run_config_yaml_resumes_and_never_starts_the_run_over(tmp_path, capsys):
    """A run started with --overwrite saves `overwrite: false`: `--config <run>/config.yaml`
    alone is refused (the run is not lost), with --resume it continues."""
    cfg = tiny_cfg(tmp_path, epochs=1, overwrite=True, limit_train_batches=2, limit_val_batches=1)
    train(cfg)
    config = tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(config.read_text())["overwrite"] is False
    assert cli_main(["train", "--config", str(config)]) == EXIT_BAD_INPUT
    assert "holds a run already" in error_line(capsys)
    argv = ["train", "--config", str(config), "--resume", str(tmp_path / "run"), "--epochs", "2"]
    assert cli_main(argv) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1]
    # nor does it keep --resume: as a template for a new run it starts that run
    assert yaml.safe_load(config.read_text())["resume"] is None
    state = (tmp_path / "run" / "last.pt").read_bytes()
    argv = ["train", "--config", str(config), "--output", str(tmp_path / "new"), "--epochs", "1"]
    assert cli_main(argv) == 0
    assert (tmp_path / "new" / "last.pt").is_file()
    assert (tmp_path / "run" / "last.pt").read_bytes() == state


def test_sigusr1_preempts_like_sigterm(tmp_path, monkeypatch, capsys):
    plain_steps = signal_after_step(monkeypatch, 3, signal.SIGUSR1)
    argv = cli_train(tmp_path / "run", "--resume", "auto", "--epochs", "2")
    assert cli_main(argv) == EXIT_PREEMPTED
    assert "SIGUSR1 received: stopped at epoch 1, batch 3" in error_line(capsys)
    plain_steps()
    assert cli_main(argv) == 0  # the requeued command finishes the run
    state = ckpt.load_state(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (2, 8)


# --- a killed process of a distributed run ----------------------------------------------------


@pytest.mark.slow
def test_a_killed_process_stops_the_others_with_one_line(tmp_path):
    """Rank 1 is SIGKILLed after the first checkpoint: rank 0 ends at its next collective
    with one line saying what happened and how to continue; the checkpoint is intact."""
    driver = tmp_path / "driver.py"
    driver.write_text(driver_script())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    argv = cli_train(tmp_path / "run", "--epochs", "20", model="engine_slow_net")[1:]
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), "train", *argv],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    deadline = time.monotonic() + 120
    state = tmp_path / "run" / "last.pt"
    while not state.exists() and procs[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    procs[1].kill()
    out = procs[0].communicate(timeout=120)[0]
    procs[1].wait()
    assert procs[0].returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("quadranet train: error: this process (rank 0) lost the other"), out
    assert "--resume auto" in last and "Traceback" not in out
    assert ckpt.load_state(state)["epoch"] >= 1
