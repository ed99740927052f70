"""The training engine: recipe pieces, accumulation, guards, outputs, config and CLI."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import types

import pytest
import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from quadranet.cli import main as cli_main
from quadranet.engine import ConfigError, NonFiniteLossError, TrainConfig, Trainer, evaluate, train
from quadranet.engine import checkpoint as ckpt
from quadranet.engine.config import add_config_arguments, config_from_args
from quadranet.engine.train import (
    _random_crop,
    build_criterion,
    build_optimizer,
    build_scheduler,
    scaled_lr,
)
from tiny_nets import TinyNet, signal_after_step

FAKE = {"num_classes": 4, "img_size": 8, "in_chans": 1, "length": 64, "val_length": 32}


def tiny_cfg(tmp_path, **overrides) -> TrainConfig:
    """A fast, deterministic config on fake 8x8 data."""
    values = dict(
        model="engine_tiny_net",
        dataset="fake",
        dataset_kwargs=FAKE,
        batch_size=8,
        epochs=2,
        lr=1e-2,
        warmup_epochs=0,
        mixup=0.0,
        cutmix=0.0,
        smoothing=0.0,
        randaugment=None,
        reprob=0.0,
        hflip=0.0,
        drop_path=0.0,
        ema=False,
        workers=0,
        quiet=True,
        output=str(tmp_path / "run"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- recipe pieces -----------------------------------------------------------------------------


def test_lr_scales_linearly_with_global_batch():
    cfg = TrainConfig(batch_size=256, accum_steps=2, base_lr=4e-3)
    assert scaled_lr(cfg, world_size=4) == pytest.approx(4e-3 * 256 * 2 * 4 / 4096)
    assert scaled_lr(cfg, world_size=1) == pytest.approx(4e-3 * 512 / 4096)
    assert scaled_lr(cfg.replace(lr=0.1), world_size=8) == 0.1


def test_schedule_is_linear_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    peak, steps = 1e-3, 5
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(cfg, opt, steps_per_epoch=steps)
    lrs = []
    for step in range(51):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (peak - 1e-6) / 2)
    assert lrs[10] == pytest.approx(peak)
    assert lrs[30] == pytest.approx((peak + 1e-5) / 2)
    assert lrs[50] == pytest.approx(1e-5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:50], lrs[11:51]))


def test_loss_selection_follows_mixup_and_smoothing():
    crit, mix = build_criterion(TrainConfig(), num_classes=10)
    assert isinstance(crit, SoftTargetCrossEntropy) and isinstance(mix, Mixup)
    assert mix.label_smoothing == 0.1 and mix.mixup_alpha == 0.8 and mix.cutmix_alpha == 1.0
    crit, mix = build_criterion(TrainConfig(mixup=0, cutmix=0), num_classes=10)
    assert isinstance(crit, LabelSmoothingCrossEntropy) and mix is None
    crit, mix = build_criterion(TrainConfig(mixup=0, cutmix=0, smoothing=0), num_classes=10)
    assert type(crit) is nn.CrossEntropyLoss and mix is None
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_criterion(TrainConfig(), num_classes=1)
    with pytest.raises(ConfigError, match="even --batch-size"):
        build_criterion(TrainConfig(batch_size=7), num_classes=10)


def test_no_weight_decay_on_biases():
    model = TinyNet()
    opt = build_optimizer(TrainConfig(), model, lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.fc.bias)] == 0.0 and decays[id(model.fc.weight)] == 0.05


def test_ema_follows_its_decay(tmp_path):
    cfg = tiny_cfg(tmp_path, ema=True, ema_decay=0.5, ema_warmup=False, limit_train_batches=1)
    trainer = Trainer(cfg)
    start = params(trainer.model)
    trainer.train_one_epoch(0)  # first update copies the weights (decay 0 at step 1)
    p1 = params(trainer.model)
    assert not torch.equal(p1["fc.weight"], start["fc.weight"])
    assert torch.allclose(trainer.ema.module.fc.weight, p1["fc.weight"])
    trainer.train_one_epoch(1)
    p2 = params(trainer.model)
    expected = 0.5 * p1["fc.weight"] + 0.5 * p2["fc.weight"]
    assert torch.allclose(trainer.ema.module.fc.weight, expected, atol=1e-7)


@pytest.mark.parametrize("clip", [1e-3, None])
def test_gradient_clipping_bounds_the_update(tmp_path, clip):
    cfg = tiny_cfg(
        tmp_path, opt="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, min_lr=1.0, clip_grad=clip
    )
    trainer = Trainer(cfg.replace(limit_train_batches=1))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train_one_epoch(0)
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    step = float((after - before).norm())  # = lr * ||clipped grad||
    if clip is None:
        assert step > 10 * 1e-3
    else:
        assert step == pytest.approx(clip, rel=1e-4)


def test_accumulation_matches_a_larger_batch(tmp_path):
    model = TinyNet()
    cfg = tiny_cfg(tmp_path, epochs=1, clip_grad=1.0)
    accum = Trainer(
        cfg.replace(batch_size=8, accum_steps=2, limit_train_batches=4), copy.deepcopy(model)
    )
    big = Trainer(
        cfg.replace(batch_size=16, accum_steps=1, limit_train_batches=2), copy.deepcopy(model)
    )
    assert accum.lr == big.lr and accum.steps_per_epoch == big.steps_per_epoch == 2
    accum.train_one_epoch(0)
    big.train_one_epoch(0)
    a, b = params(accum.model), params(big.model)
    assert not torch.equal(a["fc.weight"], params(model)["fc.weight"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_random_crop_takes_a_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    torch.manual_seed(0)
    out = _random_crop(x, padding=2)
    torch.manual_seed(0)
    oy, ox = torch.randint(0, 5, (2,)), torch.randint(0, 5, (2,))
    padded = nn.functional.pad(x, (2,) * 4)
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 5])


# --- a whole run: outputs, eval, guards --------------------------------------------------------


def test_train_writes_checkpoints_metrics_plot_and_report(tmp_path):
    cfg = tiny_cfg(tmp_path, ema=True, epochs=3, lr=0.05)
    result = train(cfg)
    run = tmp_path / "run"
    names = {p.name for p in run.iterdir()}
    assert {"last.pt", "last.safetensors", "best.safetensors", "best_ema.safetensors"} <= names
    assert {"metrics.jsonl", "curves.png", "report.md", "config.yaml"} <= names
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    assert {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "val_top1_ema"} <= set(
        lines[0]
    )
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (run / "report.md").read_text()
    assert "engine_tiny_net" in text and "best top-1" in text and "peak memory" in text
    assert "| versions | quadranet " in text and "torch " in text and "Command: `" in text
    # the best top-1 is the better of the model's and the EMA's; the report says whose
    records = [r for r in result.history if "val_top1" in r]
    best = max(max(r["val_top1"], r["val_top1_ema"]) for r in records)
    assert result.best_top1 == best
    ema_best = result.summary["best_source"] == "EMA"
    assert ema_best == all(r["val_top1"] < best for r in records)
    assert ("EMA weights: `eval --ema`" in text) == ema_best
    from quadranet.engine.report import write_report

    write_report(tmp_path / "ema.md", {**result.summary, "best_source": "EMA"})
    assert "EMA weights: `eval --ema`" in (tmp_path / "ema.md").read_text()
    assert "| started / finished | 20" in text
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("last.pt", "last.safetensors", "report.md", "curves.png", "config.yaml"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # as open() gives
    assert result.best_top1 == max(max(r["val_top1"], r["val_top1_ema"]) for r in lines)
    state = ckpt.load_state(run / "last.pt")
    assert state["epoch"] == 3 and state["config"]["model"] == "engine_tiny_net"
    # eval of the saved weights reproduces the last validation
    metrics = evaluate(checkpoint=run / "last.safetensors")
    assert metrics["top1"] == pytest.approx(lines[-1]["val_top1"])
    assert metrics["count"] == FAKE["val_length"]


def test_eval_cli_prints_top1_and_top5(tmp_path, capsys):
    train(tiny_cfg(tmp_path, ema=True, epochs=1))
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "best.safetensors" in out
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--ema"]) == 0
    assert "top-1" in capsys.readouterr().out


class NaNAfter(TinyNet):
    """Returns NaN from the `after`-th training forward on."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return out * float("nan")
        return out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=3, limit_train_batches=2)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2.*last good"):
        train(cfg, model=NaNAfter(after=2))
    state = ckpt.load_state(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    weights, _ = ckpt.load_weights(tmp_path / "run" / "last.safetensors")
    assert torch.equal(weights["fc.weight"], state["model"]["fc.weight"])


def test_huge_lr_exits_non_zero_with_a_message(tmp_path, capsys):
    argv = ["train", "--model", "engine_tiny_net", "--dataset", "fake", "--epochs", "2"]
    argv += ["--dataset-kwargs", json.dumps(FAKE), "--batch-size", "8", "--opt", "sgd"]
    argv += ["--lr", "1e30", "--clip-grad", "none", "--warmup-epochs", "0", "--mixup", "0"]
    argv += ["--cutmix", "0", "--no-ema", "--randaugment", "none", "--quiet"]
    argv += ["--output", str(tmp_path / "run")]
    assert cli_main(argv) == 3
    err = capsys.readouterr().err
    assert "loss became" in err and "Lower --lr" in err


def test_bf16_autocast_on_cpu_trains_and_fp16_on_cpu_is_refused(tmp_path):
    result = train(tiny_cfg(tmp_path, amp="bf16", epochs=1, device="cpu"))
    assert result.summary["amp"] == "bfloat16" and math.isfinite(result.history[0]["train_loss"])
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        Trainer(tiny_cfg(tmp_path / "fp16", amp="fp16", device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu"):
            Trainer(tiny_cfg(tmp_path / "cuda", device="cuda"))


# --- bad inputs --------------------------------------------------------------------------------


def test_num_classes_mismatch_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--num-classes 7 differs from the 4 classes"):
        Trainer(tiny_cfg(tmp_path, num_classes=7))


def test_missing_and_corrupt_checkpoints_are_errors(tmp_path, capsys):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Trainer(tiny_cfg(tmp_path, resume=str(tmp_path / "nowhere.pt")))
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        Trainer(tiny_cfg(tmp_path, resume=str(bad)))
    broken = tmp_path / "best.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert cli_main(["eval", "--checkpoint", str(broken)]) == 2
    err = capsys.readouterr().err  # the advice names another file than the broken one
    assert "corrupt: use another checkpoint (e.g. the last.safetensors beside it)" in err
    config = tmp_path / "config.yaml"
    config.write_text("epochs: 1\n")
    assert cli_main(["eval", "--checkpoint", str(config)]) == 2
    err = capsys.readouterr().err
    assert "pass a run folder, its last.pt or a .safetensors weights file" in err
    assert "delete" not in err and config.is_file()


def test_too_few_images_for_one_step_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="lower --batch-size"):
        Trainer(tiny_cfg(tmp_path, batch_size=16, accum_steps=8))


# --- configuration -----------------------------------------------------------------------------


def test_yaml_keys_match_flags_and_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"batch-size": 32, "lr": "4e-3", "mixup": 0, "model_kwargs": {"a": 1}})
    )
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--batch-size", "64", "--no-ema"])
    cfg = config_from_args(args)
    assert cfg.batch_size == 64 and cfg.lr == 4e-3 and cfg.mixup == 0.0 and cfg.ema is False
    assert cfg.model_kwargs == {"a": 1} and cfg.epochs == 300  # untouched default
    args = parser.parse_args(["--model-kwargs", "stem_stride=2", "depths=[1,2]", "--lr", "none"])
    cfg = config_from_args(args)
    assert cfg.model_kwargs == {"stem_stride": 2, "depths": [1, 2]} and cfg.lr is None


def test_unknown_or_bad_yaml_values_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_sise: 32\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'.*did you mean 'batch_size'"):
        TrainConfig.from_yaml(path)
    path.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="epochs must be a int"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="amp must be one of"):
        TrainConfig(amp="fp8")


def test_demo_preset_loads_and_builds_a_registered_model():
    from importlib import resources

    preset = resources.files("quadranet.configs") / "demo_mnist.yaml"
    cfg = TrainConfig.from_yaml(str(preset))
    assert cfg.dataset == "mnist" and cfg.mixup == 0 and cfg.randaugment is None
    assert timm.is_model(cfg.model)
    model = timm.create_model(cfg.model, num_classes=10, in_chans=1, **cfg.model_kwargs)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert math.isfinite(cfg.lr or cfg.base_lr)


def test_timm_flag_spellings_and_no_prefix_matching(capsys):
    """timm's spellings are aliases; a prefix of a flag is an error, never another flag."""
    from quadranet.cli import build_parser

    parser = build_parser()
    argv = ["train", "-b", "16", "-j", "2", "--lr-base", "1e-3", "--grad-accum-steps", "2"]
    argv += ["--data-dir", "/data", "--no-model-ema", "--model-ema-decay", "0.99", "--amp"]
    args = parser.parse_args(argv)
    assert (args.batch_size, args.workers, args.base_lr, args.accum_steps) == (16, 2, 1e-3, 2)
    assert (args.data_root, args.ema, args.ema_decay, args.amp) == ("/data", False, 0.99, "bf16")
    assert "lr_base_size" not in vars(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--lr-base-si", "256"])  # no abbreviations
    assert "unrecognized arguments: --lr-base-si" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    assert capsys.readouterr().out.startswith("quadranet ")


def test_images_smaller_than_the_model_takes_are_resized(tmp_path):
    """A 28 px dataset and a stride-4 QuadraNet (quadranet train's defaults): the run
    resizes to the model's smallest input instead of failing, and saves that size."""
    fake = dict(FAKE, img_size=28)
    cfg = tiny_cfg(tmp_path, model="quadranet25_xxs", dataset_kwargs=fake, epochs=1)
    trainer = Trainer(cfg.replace(limit_train_batches=1, limit_val_batches=1))
    assert trainer.img_size == 32 and trainer.cfg.img_size == 32
    assert "resized to 32px" in trainer.resized_note
    trainer.fit()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["img_size"] == 32


def test_resume_applies_a_new_schedule_and_refuses_a_new_optimizer(tmp_path, capsys):
    """--epochs / --lr on resume rebuild the schedule from the resumed step (the lr there is
    the new schedule's); settings that change what was trained are refused, naming both
    values."""
    cfg = tiny_cfg(tmp_path, epochs=2, quiet=False, opt="adamw", warmup_epochs=0)
    train(cfg.replace(limit_train_batches=2, limit_val_batches=1))
    limits = dict(limit_train_batches=2, limit_val_batches=1)
    longer = cfg.replace(epochs=4, lr=5e-3, resume=str(tmp_path / "run"), **limits)
    trainer = Trainer(longer)
    assert "resume applies --epochs 2 -> 4, --lr 0.01 -> 0.005" in capsys.readouterr().out
    fresh = Trainer(longer.replace(resume=None, output=str(tmp_path / "fresh")))
    fresh.scheduler.step_update(trainer.step)
    trainer.scheduler.step_update(trainer.step)
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs == [g["lr"] for g in fresh.optimizer.param_groups] and 0 < lrs[0] < 5e-3
    with pytest.raises(ckpt.CheckpointError, match=r"--opt 'adamw' but this run asks for 'sgd'"):
        Trainer(cfg.replace(opt="sgd", resume=str(tmp_path / "run")))


def test_run_folder_is_protected_and_requeue_is_safe(tmp_path, capsys):
    """A folder holding a run is refused without --resume; --resume auto continues it (or
    starts where there is none), so one command line is safe to requeue; --overwrite starts
    over; a resumed run writes into its own folder."""
    from quadranet.engine import runfolder

    limits = dict(limit_train_batches=1, limit_val_batches=1)
    auto = tiny_cfg(tmp_path, epochs=1, resume="auto", **limits)
    assert Trainer(auto).resume_path is None  # nothing to resume: a fresh start
    train(auto)
    with pytest.raises(runfolder.RunFolderError, match="holds a run already.*--resume auto"):
        Trainer(auto.replace(resume=None))
    again = Trainer(auto.replace(epochs=2))  # the requeued command, with one more epoch
    assert again.resume_path == tmp_path / "run" / "last.pt" and again.epoch == 1
    assert Trainer(auto.replace(resume=None, overwrite=True)).epoch == 0
    elsewhere = auto.replace(resume=str(tmp_path / "run"), output=str(tmp_path / "other"))
    assert Trainer(elsewhere).output_dir == tmp_path / "run"
    assert not (tmp_path / "other").exists()


def test_one_writer_per_run_folder(tmp_path):
    """A live run's lock refuses a second run in the same folder (naming the holder); a
    lock left by a process that is gone is taken over, and killed writes' temporaries are
    removed at start."""
    import socket
    import subprocess
    import sys

    from quadranet.engine import runfolder

    cfg = tiny_cfg(tmp_path, epochs=1, limit_train_batches=1, limit_val_batches=1)
    folder = tmp_path / "run"
    with runfolder.lock(folder):
        with pytest.raises(runfolder.RunFolderError, match=f"in use by another run.*{os.getpid()}"):
            train(cfg)
    assert not (folder / runfolder.LOCK_NAME).exists()  # released
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (folder / runfolder.LOCK_NAME).write_text(f"{socket.gethostname()} {gone}")
    (folder / ".last.pt.abc123.tmp").write_bytes(b"half")
    train(cfg)
    assert not (folder / ".last.pt.abc123.tmp").exists()
    assert (folder / "last.pt").exists() and not (folder / runfolder.LOCK_NAME).exists()


def test_sigterm_writes_a_checkpoint_at_the_next_step_and_resume_continues(tmp_path, monkeypatch):
    """Pre-emption: SIGTERM during a step writes a checkpoint after it and stops with a
    distinct exit code; the requeued command finishes the epoch where it stopped and ends
    with the same weights as a run that was never stopped."""
    import signal

    from quadranet.engine.commands import EXIT_PREEMPTED
    from quadranet.engine.train import Preempted

    limits = dict(limit_train_batches=4, limit_val_batches=1, epochs=2)
    cfg = tiny_cfg(tmp_path, resume="auto", **limits)
    full = train(tiny_cfg(tmp_path, output=str(tmp_path / "full"), **limits))
    before = signal.getsignal(signal.SIGTERM)
    plain_steps = signal_after_step(monkeypatch, 6)
    with pytest.raises(Preempted, match="SIGTERM received: stopped at epoch 2, batch 2"):
        Trainer(cfg).fit()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    state = ckpt.load_state(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 2, 6)
    plain_steps()
    resumed = Trainer(cfg)
    assert (resumed.epoch, resumed.batch) == (1, 2)
    resumed.fit()
    assert resumed.step == 8
    a, _ = ckpt.load_weights(tmp_path / "run" / "last.safetensors")
    b, _ = ckpt.load_weights(tmp_path / "full" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.final["top1"] == resumed.history[-1]["val_top1"]
    for key in ("train_loss", "train_top1"):  # the epoch's batches before the stop count too
        assert resumed.history[-1][key] == full.history[-1][key], key
    # through the command line: the distinct exit code
    signal_after_step(monkeypatch, 6)
    argv = ["train", "--model", "engine_tiny_net", "--dataset", "fake", "--epochs", "2"]
    argv += ["--dataset-kwargs", json.dumps(FAKE), "--batch-size", "8", "--no-ema", "--quiet"]
    argv += ["--limit-train-batches", "4", "--workers", "0", "--warmup-epochs", "0"]
    argv += ["--output", str(tmp_path / "cli")]
    assert cli_main(argv) == EXIT_PREEMPTED


def test_an_epoch_resumed_mid_way_through_random_transforms_is_exact(tmp_path, monkeypatch):
    """RandAugment, flips and random erasing run in the DataLoader path; stopped after step 2
    of 4 and resumed, the run ends with the weights of one never stopped."""
    from quadranet.engine.train import Preempted

    aug = dict(randaugment="rand-m9-mstd0.5", hflip=0.5, reprob=0.5, limit_train_batches=4)
    aug.update(limit_val_batches=1, epochs=1)
    train(tiny_cfg(tmp_path, output=str(tmp_path / "full"), **aug))
    cfg = tiny_cfg(tmp_path, resume="auto", **aug)
    plain_steps = signal_after_step(monkeypatch, 2)
    with pytest.raises(Preempted):
        Trainer(cfg).fit()
    plain_steps()
    Trainer(cfg).fit()
    a, _ = ckpt.load_weights(tmp_path / "run" / "last.safetensors")
    b, _ = ckpt.load_weights(tmp_path / "full" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- timm's starting-weight, memory and logging flags ----------------------------------------

TINY_QUADRANET = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32])  # takes 8x8 inputs


def _cli_train(tmp_path, *extra: str) -> list[str]:
    """A `quadranet train` command line for the tiny fake-data run."""
    argv = ["train", "--model", "engine_tiny_net", "--dataset", "fake", "--epochs", "1"]
    argv += ["--dataset-kwargs", json.dumps(FAKE), "--batch-size", "8", "--no-ema", "--quiet"]
    argv += ["--workers", "0", "--warmup-epochs", "0", "--output", str(tmp_path / "cli")]
    return argv + list(extra)


def test_timm_weight_memory_and_logging_flags_parse():
    from quadranet.cli import build_parser

    argv = ["train", "--pretrained", "--pretrained-path", "w.pth", "--grad-checkpointing"]
    argv += ["--log-interval", "10", "--log-tensorboard", "--log-wandb"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert (cfg.pretrained, cfg.pretrained_path, cfg.initial_checkpoint) == (True, "w.pth", None)
    args = build_parser().parse_args(["train", "--initial-checkpoint", "r"])
    assert config_from_args(args).initial_checkpoint == "r"
    assert (cfg.grad_checkpointing, cfg.log_interval) == (True, 10)
    assert cfg.log_tensorboard and cfg.log_wandb
    assert TrainConfig(pretrained_path="w.pth").pretrained  # the path implies --pretrained
    with pytest.raises(ConfigError, match="pass one of them"):
        TrainConfig(pretrained=True, initial_checkpoint="r")
    with pytest.raises(ConfigError, match="log_interval must be >= 0"):
        TrainConfig(log_interval=-1)
    eval_args = build_parser().parse_args(["eval", "--checkpoint", "r"])
    assert not {"pretrained", "initial_checkpoint"} & set(vars(eval_args))  # training only


def test_initial_checkpoint_loads_the_weights_with_a_fresh_optimizer(tmp_path):
    first = train(tiny_cfg(tmp_path, epochs=1))
    best, _ = ckpt.load_weights(first.output_dir / "best.safetensors")
    state = ckpt.load_state(first.output_dir / "last.pt")
    timm_style = tmp_path / "timm.pth"  # a timm train.py checkpoint: wrapped, DDP prefixes
    wrapped = {f"module.{k}": v for k, v in best.items()}
    torch.save({"state_dict": wrapped, "epoch": 1, "args": argparse.Namespace(lr=0.1)}, timm_style)
    for source, expected in (
        (first.output_dir, best),  # a run folder: its best weights
        (first.output_dir / "last.pt", state["model"]),  # a training state: its model
        (timm_style, best),
    ):
        cfg = tiny_cfg(tmp_path, output=str(tmp_path / "second"), initial_checkpoint=str(source))
        trainer = Trainer(cfg)
        assert all(torch.equal(v, expected[k]) for k, v in trainer.model.state_dict().items())
        assert trainer.step == 0 and not trainer.optimizer.state  # optimizer starts afresh
    second = trainer.fit()
    saved = yaml.safe_load((second.output_dir / "config.yaml").read_text())
    assert saved["initial_checkpoint"] == str(timm_style)
    report = (second.output_dir / "report.md").read_text()
    assert f"| initial weights | --initial-checkpoint {timm_style} |" in report


def test_initial_checkpoint_of_another_shape_is_one_clear_line(tmp_path, capsys):
    first = train(tiny_cfg(tmp_path, epochs=1))
    other = dict(FAKE, num_classes=5)
    cfg = tiny_cfg(tmp_path, output=str(tmp_path / "b"), dataset_kwargs=other)
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit .*fc.weight is \(4, 8\) there"):
        Trainer(cfg.replace(initial_checkpoint=str(first.output_dir)))
    argv = _cli_train(tmp_path, "--initial-checkpoint", str(first.output_dir / "best.safetensors"))
    argv[argv.index("--dataset-kwargs") + 1] = json.dumps(other)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--pretrained-path" in err and len(err.splitlines()) == 1


def test_weights_under_other_names_are_a_short_line(tmp_path, capsys):
    """Every key missing (weights saved from a wrapper): one line, not pages of key names."""
    from quadranet.models import create_model

    tiny = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32])
    model = create_model("quadranet25_xxs", in_chans=1, num_classes=4, **tiny)
    data = dict(FAKE, img_size=28, length=8, val_length=8)
    config = dict(model="quadranet25_xxs", model_kwargs=tiny, dataset="fake", dataset_kwargs=data)
    weights = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = ckpt.save_weights(tmp_path / "best.safetensors", weights, {"config": config})
    assert cli_main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit quadranet25_xxs" in err and len(err) < 800, len(err)


def test_pretrained_path_loads_a_backbone_with_a_new_classifier(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("quadranet25_xxs", in_chans=1, num_classes=10, **TINY_QUADRANET)
    path = tmp_path / "backbone.safetensors"
    save_file(source.state_dict(), str(path))
    cfg = tiny_cfg(tmp_path, model="quadranet25_xxs", model_kwargs=TINY_QUADRANET)
    trainer = Trainer(cfg.replace(pretrained_path=str(path)))
    weights = trainer.model.state_dict()
    assert torch.equal(weights["stem.0.weight"], source.state_dict()["stem.0.weight"])
    assert weights["head.fc.weight"].shape == (4, 32)  # fake data's 4 classes, new classifier
    assert trainer.initial_weights == f"pretrained ({path})"
    with pytest.raises(ConfigError, match="--pretrained-path"):
        Trainer(cfg.replace(pretrained=True))  # no weights are published: say how to give some
    wider = dict(TINY_QUADRANET, dims=[8, 16, 64])
    with pytest.raises(ConfigError, match=r"cannot load .*backbone.safetensors into quadranet25"):
        Trainer(cfg.replace(pretrained_path=str(path), model_kwargs=wider))


def test_grad_checkpointing_flag_reaches_the_model(tmp_path):
    cfg = tiny_cfg(tmp_path, model="quadranet25_xxs", model_kwargs=TINY_QUADRANET, epochs=1)
    result = train(cfg.replace(grad_checkpointing=True, limit_train_batches=2))
    assert "grad checkpointing" in (result.output_dir / "report.md").read_text()
    trainer = Trainer(cfg.replace(grad_checkpointing=True, output=str(tmp_path / "b")))
    assert all(stage.grad_checkpointing for stage in trainer.model.stages)
    with pytest.raises(ConfigError, match="has no set_grad_checkpointing"):
        Trainer(tiny_cfg(tmp_path / "c", grad_checkpointing=True))  # TinyNet has no such method


def test_per_step_lines_every_log_interval(tmp_path, capsys):
    train(tiny_cfg(tmp_path, quiet=False, log_interval=3, epochs=2))
    out = capsys.readouterr().out  # not a terminal: lines, not a progress bar
    steps = [line for line in out.splitlines() if "  step " in line]
    pattern = r"epoch [12]/2  step (3|6|8)/8  loss \d+\.\d{4}  lr \S+  \d+ img/s"
    assert len(steps) == 6 and all(re.fullmatch(pattern, line) for line in steps), steps
    assert [line.split()[3] for line in steps[:3]] == ["3/8", "6/8", "8/8"]
    train(tiny_cfg(tmp_path, quiet=False, log_interval=0, output=str(tmp_path / "b")))
    assert "  step " not in capsys.readouterr().out


@pytest.mark.parametrize(
    "flag, modules, package",
    [
        ("log_tensorboard", ("tensorboard", "torch.utils.tensorboard"), "pip install tensorboard"),
        ("log_wandb", ("wandb",), "pip install wandb"),
    ],
)
def test_a_missing_logger_package_is_one_clear_line(
    tmp_path, monkeypatch, capsys, flag, modules, package
):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` fails
    with pytest.raises(ConfigError, match=package):
        Trainer(tiny_cfg(tmp_path, **{flag: True}))
    assert cli_main(_cli_train(tmp_path, "--" + flag.replace("_", "-"))) == 2
    err = capsys.readouterr().err
    assert package in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cli").exists()  # refused before any work


def test_wandb_gets_step_and_epoch_scalars(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    def init(**kwargs):
        calls.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train(tiny_cfg(tmp_path, log_wandb=True, log_interval=4, epochs=2))
    assert calls[0]["project"] == "quadranet" and calls[0]["config"]["model"] == "engine_tiny_net"
    logged = calls[1:-1]
    assert [step for step, _ in logged] == [4, 8, 8, 12, 16, 16]
    assert set(logged[0][1]) == {"train/loss", "train/lr", "train/images_per_s"}
    assert {"epoch", "train/loss", "val/top1", "train/lr"} <= set(logged[2][1])
    assert calls[-1] == "finish"


def test_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    result = train(tiny_cfg(tmp_path, log_tensorboard=True, epochs=1))
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))


def _png_tree(root, classes=("a", "b", "c", "d"), per_class=4, size=12):
    """An ImageNet-layout folder of random PNGs: root/{train,val}/<class>/<i>.png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


def test_train_on_a_timm_folder_dataset(tmp_path):
    root = _png_tree(tmp_path / "pngs")
    cfg = tiny_cfg(tmp_path, dataset="folder/", data_root=str(root), dataset_kwargs={})
    result = train(cfg.replace(img_size=8, epochs=1, batch_size=4))
    assert result.summary["num_classes"] == 4 and result.summary["in_chans"] == 3
    assert result.history[0]["val_top1"] >= 0 and result.final["top1"] is not None


class _Stream(torch.utils.data.IterableDataset):
    """A streamed dataset the way timm's readers make them: it shuffles per `set_epoch`,
    knows its length, and applies `transform` to PIL images."""

    def __init__(self, length: int = 32) -> None:
        self.length, self.epochs, self.transform = length, [], None
        self.reader = types.SimpleNamespace(class_to_idx={c: i for i, c in enumerate("abcd")})

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        from PIL import Image

        gen = torch.Generator().manual_seed(len(self.epochs))
        for _ in range(self.length):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8)
            image = Image.fromarray(pixels.numpy())
            yield self.transform(image), int(torch.randint(4, (), generator=gen))


def test_train_on_a_stream(tmp_path, monkeypatch):
    """hfids/, wds/, tfds/ sets are streams: no sampler, set_epoch each epoch, --max-samples
    refused (the reader is stubbed: webdataset need not be installed)."""
    import quadranet.data as data

    stream = _Stream()
    monkeypatch.setitem(data.TIMM_PREFIXES, "wds", None)
    monkeypatch.setattr(data, "_timm_dataset", lambda *args: stream)
    cfg = tiny_cfg(tmp_path, dataset="wds/shards", dataset_kwargs={}, img_size=8, batch_size=8)
    result = train(cfg)
    assert len(result.history) == 2 and stream.epochs[-2:] == [0, 1]
    assert result.summary["num_classes"] == 4
    with pytest.raises(ConfigError, match="--max-samples needs a dataset with random access"):
        Trainer(cfg.replace(max_samples=8, output=str(tmp_path / "b")))


def test_loader_workers_are_at_most_the_cpus(tmp_path):
    """`--workers` above the CPUs this process may use starts no more processes than CPUs
    (torch would warn on every epoch); 0 stays in-process."""
    from quadranet.data import dataset_info
    from quadranet.engine.distributed import DistInfo
    from quadranet.engine.train import build_loader

    cpus = len(os.sched_getaffinity(0))
    cfg = tiny_cfg(tmp_path, workers=cpus + 8, randaugment="rand-m9-mstd0.5")
    info = dataset_info("fake", **FAKE)
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    loader, _ = build_loader(cfg, info, "train", dist)
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.num_workers == cpus
    loader, _ = build_loader(cfg.replace(workers=0), info, "train", dist)
    assert loader.num_workers == 0
