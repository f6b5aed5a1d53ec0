"""The tables of ``docs/results.md``, rendered from the result files they quote.

    python -m sparkformer.bench.results_doc --check     # exit 1 and list every cell that differs from its JSON
    python -m sparkformer.bench.results_doc --write     # re-render every marked table in place

Each table in the document sits between two markers that name it and its source::

    <!-- table: decode_main  source: benchmarks/results/decode_gemma2-2b.json -->
    | dtype | context | ... |
    <!-- /table -->

``TABLES`` (in ``sparkformer.bench.results_tables``) maps the name to its sources and a function that builds the
table's rows from them, rounded as printed. ``--check`` renders every table and compares it with the document cell
by cell (the marker's ``source:`` must also name exactly the spec's files), so a figure edited by hand, or a result
file re-measured without re-rendering, fails ``tests/test_results_doc.py``. A table whose data is not committed is
marked ``untied:`` with the reason and listed in ``UNTIED``; a table outside any marker is an error. Figures quoted
in prose are tied the same way where they are few and fixed (``CLAIMS``: a sentence rendered from the JSON must
appear in the document, whitespace-insensitively); other prose names its result file next to the figure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from sparkformer.bench.results_tables import CLAIMS, DOC, FLOPS_SOURCE, TABLES, UNTIED, Loader, Rows, Table

__all__ = ["CLAIMS", "DOC", "END", "FLOPS_SOURCE", "ROOT", "TABLES", "UNTIED", "check_claims", "check_text", "cells",
           "file_loader", "find_blocks", "format_rows", "main", "render_text", "row_line", "source_text"]

ROOT = Path(__file__).resolve().parents[2]

# ---- document parsing, rendering and checking ----------------------------------------------------------------

MARK = re.compile(r"^<!-- table: (?P<name>[\w-]+)\s+(?P<kind>source|untied): (?P<what>.*?) -->$")
END = "<!-- /table -->"


def file_loader(root: Path = ROOT) -> Loader:
    cache: dict[str, dict] = {}

    def load(path: str) -> dict:
        if path not in cache:
            cache[path] = json.loads((root / path).read_text())
        return cache[path]

    return load


def cells(line: str) -> list[str]:
    s = line.strip()
    if not (s.startswith("|") and s.endswith("|")):
        raise ValueError(f"not a table row: {line!r}")
    return [c.strip() for c in re.split(r"(?<!\\)\|", s[1:-1])]


def format_rows(rows: Rows, align: str) -> list[str]:
    if len(align) != len(rows[0]):
        raise ValueError(f"align {align!r} has {len(align)} columns, the header {len(rows[0])}")
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [row_line(rows[0]), sep] + [row_line(r) for r in rows[1:]]


def row_line(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


@dataclass
class Block:
    name: str
    kind: str  # "source" or "untied"
    what: str
    start: int  # index of the first table line
    end: int  # index of the END marker


def find_blocks(lines: list[str]) -> tuple[list[Block], list[str]]:
    """Every marked table, and the problems found while reading the markers (unclosed, nested, unmarked tables)."""
    blocks, problems, cur = [], [], None
    in_code = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        m = MARK.match(line.strip())
        if m:
            if cur:
                problems.append(f"line {i + 1}: table {m['name']} opens inside table {cur.name}")
            cur = Block(m["name"], m["kind"], m["what"].strip(), i + 1, -1)
        elif line.strip() == END:
            if not cur:
                problems.append(f"line {i + 1}: {END} without an opening marker")
            else:
                cur.end = i
                blocks.append(cur)
                cur = None
        elif line.lstrip().startswith("|") and cur is None:
            if not (i and lines[i - 1].lstrip().startswith("|")):  # once per table
                problems.append(f"line {i + 1}: a table outside any <!-- table: ... --> marker: {line.strip()[:60]}")
    if cur:
        problems.append(f"table {cur.name} (line {cur.start}) is never closed by {END}")
    return blocks, problems


def source_text(t: Table) -> str:
    return ", ".join(t.sources)


def check_claims(text: str, load: Loader, doc: Path) -> list[str]:
    """The tied prose figures of ``doc`` (a path relative to the repository) that ``text`` does not say."""
    problems = []
    flat = " ".join(text.split())
    for name, c in CLAIMS.items():
        if c.doc != doc:
            continue
        try:
            wanted = c.render(load)
        except (KeyError, OSError, ValueError, IndexError) as e:
            problems.append(f"prose {name}: cannot render from {', '.join(c.sources)}: {e!r}")
            continue
        problems += [f"prose {name} ({doc}): the document does not say {s!r}" for s in wanted
                     if " ".join(s.split()) not in flat]
    return problems


def check_text(text: str, load: Loader) -> list[str]:
    """Every difference between ``docs/results.md`` (given as text) and its result files; empty when they agree."""
    lines = text.splitlines()
    blocks, problems = find_blocks(lines)
    seen = set()
    for b in blocks:
        where = f"table {b.name} (line {b.start})"
        if b.name in seen:
            problems.append(f"{where}: the name is used twice")
        seen.add(b.name)
        body = [ln for ln in lines[b.start:b.end] if ln.strip()]
        if b.kind == "untied":
            if b.name not in UNTIED:
                problems.append(f"{where}: marked untied but not listed in results_doc.UNTIED")
            continue
        spec = TABLES.get(b.name)
        if spec is None:
            problems.append(f"{where}: no renderer in results_doc.TABLES")
            continue
        if b.what != source_text(spec):
            problems.append(f"{where}: the marker names source {b.what!r}, the renderer reads {source_text(spec)!r}")
        try:
            want = format_rows(spec.render(load), spec.align)
        except (KeyError, OSError, ValueError, IndexError) as e:
            problems.append(f"{where}: cannot render from {source_text(spec)}: {e!r}")
            continue
        if len(body) != len(want):
            problems.append(f"{where}: {len(body)} rows in the document, {len(want)} rendered from the JSON")
        for r, (have, exp) in enumerate(zip(body, want)):
            if r == 1:  # the |---| line: compare alignment only
                if [c.endswith(":") for c in cells(have)] != [c.endswith(":") for c in cells(exp)]:
                    problems.append(f"{where}: column alignment {have!r}, rendered {exp!r}")
                continue
            hc, ec = cells(have), cells(exp)
            if len(hc) != len(ec):
                problems.append(f"{where} row {r}: {len(hc)} cells, rendered {len(ec)}: {have!r}")
                continue
            for c, (h, e) in enumerate(zip(hc, ec)):
                if h != e:
                    problems.append(f"{where} row {r} column {c} ({ec[0] if r else 'header'}): document {h!r}, "
                                    f"rendered {e!r}")
    for name in set(TABLES) - seen:
        problems.append(f"table {name} is rendered by results_doc.TABLES but has no marker in the document")
    return problems + check_claims(text, load, DOC)


def render_text(text: str, load: Loader) -> str:
    """The document with every ``source:`` table re-rendered (markers and everything else unchanged)."""
    lines = text.splitlines()
    blocks, problems = find_blocks(lines)
    if problems:
        raise ValueError("; ".join(problems))
    for b in reversed(blocks):
        if b.kind != "source":
            continue
        spec = TABLES[b.name]
        lines[b.start - 1] = f"<!-- table: {b.name}  source: {source_text(spec)} -->"
        lines[b.start:b.end] = format_rows(spec.render(load), spec.align)
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check (or re-render) the tables of docs/results.md from their JSON.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="report every cell that differs (the default)")
    g.add_argument("--write", action="store_true", help="re-render every marked table in place")
    p.add_argument("--doc", default=str(ROOT / DOC))
    args = p.parse_args(argv)
    path = Path(args.doc)
    text = path.read_text()
    load = file_loader()
    if args.write:
        new = render_text(text, load)
        if new != text:
            path.write_text(new)
            print(f"rewrote the tables of {path}")
    problems = check_text(path.read_text(), load)
    for other in sorted({c.doc for c in CLAIMS.values()} - {DOC}):
        problems += check_claims((ROOT / other).read_text(), load, other)
    for line in problems:
        print(line)
    print(f"{len(problems)} difference(s) between the docs and their result files" if problems else
          f"{path} and the tied prose elsewhere match their result files")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
