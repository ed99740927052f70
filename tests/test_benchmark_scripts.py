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
