"""The README's and docs' generated tables match the result tables under results/, and
docs/kernels.md's route tables match the backend choices."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import torch

from quadranet import ops
from quadranet.ops import cpu, policy

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


def _route_tables() -> list[list[tuple[str, str]]]:
    """(backend, reason pattern) of each row of docs/kernels.md's two route tables."""
    tables, rows = [], None
    for line in (ROOT / "docs" / "kernels.md").read_text().splitlines():
        if line.startswith("| input | backend | `explain` says |"):
            rows = []
            tables.append(rows)
        elif rows is not None and line.startswith("|") and not line.startswith("|---"):
            _, backend, says = (cell.strip() for cell in line.strip("|").split(" | "))
            backend = backend.split(",")[0].strip("`")
            rows.append((backend, ".*".join(re.escape(part) for part in says.split("…"))))
        elif not line.startswith("|"):
            rows = None
    return tables


def test_route_tables_match_explain(monkeypatch):
    """Each route of `policy.choose` / `policy.choose_mlp` (the choices `explain` reports)
    is a row of docs/kernels.md's tables with the same backend and reason, and each row is
    a route."""
    conv_rows, mlp_rows = _route_tables()
    built = (object(), "")
    failed = (None, "the C++ build failed: no compiler")
    x = torch.randn(1, 8, 6, 6)
    cl, w = x.contiguous(memory_format=torch.channels_last), torch.randn(24, 1, 3, 3)
    meta = cl.to("meta")
    triton = types.ModuleType("quadranet.ops.triton_kernels")  # Triton "imports"
    conv_cases = [  # (kernel mode, forced backend, what cpu.load gives, Triton, call)
        ("off", None, built, triton, lambda: policy.choose(cl, w)),
        ("auto", None, built, triton, lambda: policy.choose(x[0], w)),
        ("auto", None, built, triton, lambda: policy.choose(cl, torch.randn(24, 1, 4, 4))),
        ("auto", None, built, triton, lambda: policy.choose(cl, w, stride=(2, 2))),
        ("auto", None, built, triton, lambda: policy.choose(x, w)),
        ("auto", None, built, triton, lambda: policy.choose(cl, w)),
        ("auto", None, failed, triton, lambda: policy.choose(cl, w)),
        ("auto", None, built, triton, lambda: policy.choose(cl.double(), w.double())),
        ("auto", "triton", built, triton, lambda: policy.choose(cl, w)),
        ("auto", "triton", built, triton, lambda: policy.choose(cl.double(), w.double())),
        ("auto", "triton", built, None, lambda: policy.choose(cl, w)),
        ("auto", None, built, triton, lambda: policy.choose(meta, w.to("meta"))),
    ]
    rows = torch.randn(1, 128 * 128, 64)  # 64 channels, 4M values of hidden activation
    w1 = torch.randn(256, 64)
    mlp_cases = [
        ("off", None, built, triton, lambda: policy.choose_mlp(rows, w1)),
        ("auto", "triton", built, triton, lambda: policy.choose_mlp(rows, w1)),
        ("auto", None, built, triton, lambda: policy.choose_mlp(rows.double(), w1.double())),
        ("auto", None, built, triton, lambda: policy.choose_mlp(rows[:, :8], w1)),
        ("auto", None, built, triton, lambda: policy.choose_mlp(rows.view(1, -1, 256), w1.t())),
        ("auto", None, failed, triton, lambda: policy.choose_mlp(rows, w1)),
        ("auto", None, built, triton, lambda: policy.choose_mlp(rows, w1)),
    ]
    for table, cases in ((conv_rows, conv_cases), (mlp_rows, mlp_cases)):
        hit = set()
        for mode, backend, load, module, call in cases:
            monkeypatch.setattr(cpu, "load", lambda load=load: load)
            monkeypatch.setitem(sys.modules, "quadranet.ops.triton_kernels", module)
            if module is None:  # None in sys.modules: the import fails
                monkeypatch.delattr(ops, "triton_kernels", raising=False)
            else:
                monkeypatch.setattr(ops, "triton_kernels", module, raising=False)
            with ops.kernels(mode, backend):
                choice = call()
            matches = [i for i, (b, says) in enumerate(table)
                       if b == choice.backend and re.fullmatch(says, choice.reason)]  # fmt: skip
            assert matches, f"{choice} is not in docs/kernels.md's table"
            hit.add(matches[0])
        assert hit == set(range(len(table))), [table[i] for i in set(range(len(table))) - hit]
