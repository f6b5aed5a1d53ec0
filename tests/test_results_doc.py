"""docs/results.md agrees with the result files it quotes (offline, no benchmark is run).

The tables are rendered from their JSON by ``python -m sparkformer.bench.results_doc --write``; these tests fail when
a table or a tied prose figure differs from its JSON, and show that the check does notice an edited cell.
"""

import copy
import re

import pytest

from sparkformer.bench import results_doc as R


@pytest.fixture(scope="module")
def doc() -> str:
    return (R.ROOT / R.DOC).read_text()


@pytest.fixture(scope="module")
def load():
    return R.file_loader()


def _block(text: str, name: str) -> tuple[int, int]:
    lines = text.splitlines()
    blocks, problems = R.find_blocks(lines)
    assert not problems
    b = next(b for b in blocks if b.name == name)
    return b.start, b.end


def test_results_doc_matches_its_json(doc, load):
    problems = R.check_text(doc, load)
    assert not problems, "docs/results.md differs from its result files " \
        "(re-render with `python -m sparkformer.bench.results_doc --write`):\n" + "\n".join(problems)


def test_every_table_is_marked_and_every_source_exists(doc):
    blocks, problems = R.find_blocks(doc.splitlines())
    assert not problems
    names = {b.name for b in blocks}
    assert set(R.TABLES) <= names and names - set(R.TABLES) <= set(R.UNTIED)
    for t in R.TABLES.values():
        for s in t.sources:
            assert s == R.FLOPS_SOURCE or (R.ROOT / s).is_file(), s


def test_a_cell_edited_by_hand_is_reported(doc, load):
    lines = doc.splitlines()
    start, _ = _block(doc, "decode_main")
    row = lines[start + 2]  # first body row (bf16, 512)
    cells = R.cells(row)
    speed = cells[4]
    assert re.fullmatch(r"\*\*\d+\.\d\d\*\*", speed)
    cells[4] = f"**{float(speed.strip('*')) + 0.01:.2f}**"
    lines[start + 2] = R.row_line(cells)
    edited = "\n".join(lines) + "\n"
    problems = R.check_text(edited, load)
    assert len(problems) == 1 and "decode_main" in problems[0] and "column 4" in problems[0], problems
    # --write puts the JSON's value back
    assert R.render_text(edited, load) == doc


def test_a_changed_json_value_is_reported(doc, load):
    def perturbed(path: str) -> dict:
        d = load(path)
        if path.endswith("batch_ffn_gemma2-2b.json"):
            d = copy.deepcopy(d)
            d["runs"][0]["spark_ms"] *= 1.01
        return d

    problems = R.check_text(doc, perturbed)
    assert problems and all("table batch" in p for p in problems), problems


def test_prose_figure_and_unmarked_table_are_reported(doc, load):
    assert "6.54 GFLOP" in doc
    problems = R.check_text(doc.replace("6.54 GFLOP", "6.55 GFLOP"), load)
    assert len(problems) == 1 and "flops_prose" in problems[0], problems
    problems = R.check_text(doc + "\n| a | b |\n|---|---|\n| 1 | 2 |\n", load)
    assert len(problems) == 1 and "outside any" in problems[0], problems


def test_marker_must_name_the_renderers_source(doc, load):
    src = R.source_text(R.TABLES["routed_decode"])
    edited = doc.replace(f"<!-- table: routed_decode  source: {src} -->",
                         "<!-- table: routed_decode  source: benchmarks/results/other.json -->")
    assert edited != doc
    problems = R.check_text(edited, load)
    assert len(problems) == 1 and "marker names source" in problems[0], problems


def test_tied_figures_in_other_docs(load):
    for doc in sorted({c.doc for c in R.CLAIMS.values()} - {R.DOC}):
        problems = R.check_claims((R.ROOT / doc).read_text(), load, doc)
        assert not problems, "\n".join(problems)
