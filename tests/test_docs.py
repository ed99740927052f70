"""The README's and docs' generated tables match the result tables under results/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "docs_tables.py"


def _check(*documents: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--check", *documents]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_marked_tables_match_results():
    done = _check()
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_table_that_differs_from_its_result_is_caught(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "t.md").write_text(
        "# title\n\n| model | a | / base | b | / base |\n|---|---:|---:|---:|---:|\n"
        "| base | 1 | 1.00x | 4 | 1.00x |\n| new | 2 | 2.00x | 2 | 0.50x |\n"
    )
    spec = {"from": str(tmp_path / "results" / "t.md"), "columns": ["model", "b", "/ base"]}
    spec["where"] = {"model": ["new"]}
    doc = tmp_path / "doc.md"
    marker = f"<!-- table {json.dumps(spec)} -->"
    good = f"{marker}\n| model | b | / base |\n|---|---:|---:|\n| new | 2 | 0.50x |\n"
    doc.write_text(good)
    assert _check(str(doc)).returncode == 0  # "/ base" after "b" is b's ratio, not a's
    doc.write_text(good.replace("0.50x", "0.55x"))
    done = _check(str(doc))
    assert done.returncode == 1 and "-| new | 2 | 0.55x |" in done.stdout
