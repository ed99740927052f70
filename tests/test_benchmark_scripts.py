"""The A/B scripts under benchmarks/ keep earlier results and record their command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "script, args",
    [("compare_trees.py", ["--tree", "a=."]), ("ab_options.py", ["--variant", "a={}"])],
)
def test_an_existing_result_is_not_replaced(tmp_path, script, args):
    """Refused before anything is timed (the run would take minutes), unless --overwrite."""
    earlier = tmp_path / "result.json"
    earlier.write_text("{}\n")
    cmd = [sys.executable, str(BENCHMARKS / script), *args, "--output", str(earlier)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"{earlier} exists" in done.stderr and "--overwrite" in done.stderr
    assert earlier.read_text() == "{}\n"
    earlier.unlink()
    (tmp_path / "result.txt").write_text("earlier summary\n")  # the summary beside it too
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "result.txt exists" in done.stderr


def test_results_are_written_with_the_command_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compare_trees

    output = tmp_path / "r.json"
    argv = ["benchmarks/ab_options.py", "--variant", 'on={"compile": true}', "--output", "r.json"]
    monkeypatch.setattr(sys, "argv", argv)
    args = compare_trees.argparse.Namespace(output=str(output), overwrite=False)
    compare_trees.write_output(args, {"train": 1.5}, ["machine", "train on: 1.5 s"])
    assert json.loads(output.read_text()) == {"train": 1.5}
    assert output.with_suffix(".txt").read_text().splitlines() == [
        """$ python benchmarks/ab_options.py --variant 'on={"compile": true}' --output r.json""",
        "machine",
        "train on: 1.5 s",
    ]
    compare_trees.check_output(args.__class__(output=str(output), overwrite=True))  # allowed


def _write_run(folder: Path, rows: dict[str, tuple[float, float, float]]) -> Path:
    folder.mkdir()
    lines = ["model,infer_ips,train_ips,peak_train_mib"]
    lines += [f"{name},{i},{t},{m}" for name, (i, t, m) in rows.items()]
    (folder / "throughput.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_throughput_runs_tables_come_from_every_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import throughput_runs

    a = _write_run(tmp_path / "a", {"q": (30.0, 6.0, 1500.0), "h": (20.0, 5.0, 2000.0)})
    b = _write_run(tmp_path / "b", {"q": (24.0, 6.0, 1600.0), "h": (20.0, 4.0, 2000.0)})
    out = tmp_path / "out"
    argv = [str(a), str(b), "--model", "q", "--against", "h", "--output", str(out)]
    assert throughput_runs.main(argv) == 0
    ratios = out.joinpath("ratios.md").read_text().splitlines()
    assert "| h, inference | 1.50x | 1.20x |" in ratios
    assert "| h, training | 1.20x | 1.50x |" in ratios
    assert "| peak training RSS / h | 0.75x | 0.80x |" in ratios
    summary = out.joinpath("summary.md").read_text().splitlines()
    assert "| q | 30.0 | 6.0 | 1,500 | 1.00x | 1.00x | 1.00x |" in summary  # first run's img/s
    assert "| h | 20.0 | 5.0 | 2,000 | 1.20-1.50x | 1.20-1.50x | 0.75-0.80x |" in summary
    assert f"--output {out}" in summary[2]  # the command that made it
    with pytest.raises(SystemExit, match=r"run a has no row for \['x'\]"):
        throughput_runs.main([str(a), "--model", "q", "--against", "x", "--output", str(out)])
    twin = _write_run(tmp_path / "b" / "a", {"q": (1.0, 1.0, 1.0), "h": (1.0, 1.0, 1.0)})
    with pytest.raises(SystemExit, match="share a folder name"):
        throughput_runs.main([str(a), str(twin), "--output", str(out)])
