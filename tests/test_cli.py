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
     ("adapt", "(default: the checkpoint's run, else 300)"), ("train", "(default: 300)")],
)  # fmt: skip
def test_each_command_help_shows_its_own_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert shown in " ".join(capsys.readouterr().out.split())
