"""Tables of the docs taken from the result tables under `results/`, kept in step with them.

A table in a markdown document is generated when the line before it is a marker comment
(invisible when rendered) naming its source, a markdown table that a benchmark wrote:

    <!-- table {"from": "results/bench_memory/memory.md", "columns": ["block", ["/ HorBlock",
         "saved / HorBlock"]], "where": {"channels": ["64"]}} -->

- `columns`: the source columns to show, in order; `[name, shown as]` renames one. A name
  that appears more than once in the source matches its next occurrence to the right of
  the previous column taken, so `["saved (MiB)", "/ HorBlock", "peak (MiB)", "/ HorBlock"]`
  takes each ratio after its own quantity. Without `columns`, all of them.
- `where`: keep only the rows whose column has one of the listed values, ordered as listed
  (by the first such column, then the next).

    python benchmarks/docs_tables.py            # rewrite the marked tables of README and docs
    python benchmarks/docs_tables.py --check    # exit 1 and show what differs (a test runs it)
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "docs/benchmarks.md")
MARKER = re.compile(r"^<!-- table (\{.*\}) -->$")


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def read_table(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(header, alignment row, rows) of the first markdown table in `path`."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        raise ValueError(f"{path}: no markdown table")
    return _cells(lines[0]), _cells(lines[1]), [_cells(line) for line in lines[2:]]


def _column_indices(header: list[str], columns: list, source: Path) -> list[tuple[int, str]]:
    taken, last = [], -1
    for column in columns:
        name, shown = (column, column) if isinstance(column, str) else column
        later = [i for i, h in enumerate(header) if h == name and i > last]
        if not later:
            later = [i for i, h in enumerate(header) if h == name]
        if not later:
            raise ValueError(f"{source}: no column {name!r} (columns: {header})")
        last = later[0]
        taken.append((last, shown))
    return taken


def render(spec: dict, root: Path = ROOT) -> list[str]:
    """The markdown lines of the table that `spec` (a marker's JSON) describes."""
    source = root / spec["from"]
    header, align, rows = read_table(source)
    picked = _column_indices(header, spec.get("columns", header), source)
    where = [
        (_column_indices(header, [name], source)[0][0], {v: i for i, v in enumerate(values)})
        for name, values in spec.get("where", {}).items()
    ]
    rows = [r for r in rows if all(r[i] in order for i, order in where)]
    rows.sort(key=lambda r: [order[r[i]] for i, order in where])  # the first column first
    lines = ["| " + " | ".join(shown for _, shown in picked) + " |"]
    lines.append("|" + "|".join(align[i] for i, _ in picked) + "|")
    lines += ["| " + " | ".join(row[i] for i, _ in picked) + " |" for row in rows]
    return lines


def regenerate(text: str, root: Path = ROOT) -> str:
    """`text` with every marked table replaced by its rendering."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.match(lines[i])
        i += 1
        if match:
            out += render(json.loads(match.group(1)), root)
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("documents", nargs="*", default=list(DOCUMENTS), help="markdown files")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 on a difference")
    args = p.parse_args(argv)
    stale = 0
    for name in args.documents:
        path = ROOT / name
        text = path.read_text()
        new = regenerate(text)
        if new == text:
            continue
        stale += 1
        if args.check:
            diff = difflib.unified_diff(text.splitlines(), new.splitlines(), name, "generated")
            print("\n".join(diff))
        else:
            path.write_text(new)
            print(f"rewrote the tables of {name}")
    if args.check and stale:
        print(f"{stale} document(s) differ from results/: run python benchmarks/docs_tables.py")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
