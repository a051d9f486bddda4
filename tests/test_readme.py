"""The README's drop-in example runs as written (in a temp dir)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_dropin_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- example:dropin.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md:dropin", "exec"), scope)
    assert (tmp_path / "out" / "importance.safetensors").exists()
    pen = scope["penalty"].penalty().item()
    assert pen > 0  # the adapter moved away from the stage-ν solution and the penalty sees it


FRONTS = README.parent / "results" / "fronts-smollm2"
RESULTS_README = README.parent / "results" / "README.md"


def _table_blocks(text: str) -> list[str]:
    """Each run of consecutive Markdown table lines, as one string."""
    blocks, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            blocks.append("\n".join(cur))
            cur = []
    return blocks


def test_readme_fronts_tables_regenerate_from_the_committed_results(tmp_path, skip_figure_drawing):
    """The acceptance of the fronts issue: results.json holds every committed record, `hlora report` on it
    rewrites the committed tables.md byte for byte, every table of the fronts section of results/README.md is in
    it."""
    import json

    from hlora.report import write_report

    results = json.loads((FRONTS / "results.json").read_text())
    records = sorted(p.stem for p in (FRONTS / "records").glob("*.json"))
    assert sorted(r["cell"] for r in results) == records, "run `hlora run configs/fronts-smollm2.yaml --collect`"
    write_report(FRONTS / "results.json", tmp_path)
    tables = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert tables == (FRONTS / "report" / "tables.md").read_text(encoding="utf-8")
    text = RESULTS_README.read_text(encoding="utf-8")
    section = text[text.index("## Does HLoRA forget less"):text.index("## `hlora demo`")]
    blocks = _table_blocks(section)
    assert blocks, "the fronts section of results/README.md has no table"
    for block in blocks:
        assert block in tables, f"results/README.md table not in the regenerated tables.md:\n{block[:300]}"


def test_results_readme_bench_table_is_the_committed_json_rendered():
    """The bench section's table is `hlora bench --table` of the committed JSON, not numbers typed by hand."""
    import json

    from hlora.bench_table import markdown_table

    bench = README.parent / "benchmarks" / "results" / "bench-smollm2-cpu.json"
    text = RESULTS_README.read_text(encoding="utf-8")
    section = text[text.index("## `hlora bench`"):]
    section = section[:section.index("\n## ", 5)]
    assert markdown_table(json.loads(bench.read_text())) in section


LR = README.parent / "results" / "lr-smollm2"


def test_results_readme_lr_sweep_tables_regenerate_from_the_committed_records(tmp_path, skip_figure_drawing,
                                                                               bench_script):
    """The lr sweep's section: results.json holds every committed record, the pick table is pick_lr's output on it,
    and the answer-letters table is a block of the report regenerated from it."""
    import json

    from hlora.report import write_report

    results = json.loads((LR / "results.json").read_text())
    assert sorted(r["cell"] for r in results) == sorted(p.stem for p in (LR / "records").glob("*.json")), (
        "run `hlora run configs/lr-smollm2.yaml --collect`")
    pick_lr = bench_script("pick_lr")
    text = RESULTS_README.read_text(encoding="utf-8")
    section = text[text.index("## Each row at its own learning rate"):]
    section = section[:section.index("\n## ", 5)]
    assert pick_lr.markdown(pick_lr.pick(results), [r for r in results if r["method"] == "base"]) in section
    write_report(LR / "results.json", tmp_path)
    tables = (tmp_path / "tables.md").read_text(encoding="utf-8")
    blocks = _table_blocks(section)
    assert len(blocks) >= 2
    for block in blocks[1:]:
        assert block in tables, f"results/README.md table not in the regenerated tables.md:\n{block[:300]}"


HELDOUT = README.parent / "results" / "fronts-smollm2-heldout"


def test_heldout_grid_results_and_report_regenerate_from_its_records(tmp_path, skip_figure_drawing, bench_script):
    """The held-out grid commits its records as they land: results.json holds exactly those, in the plan's order,
    and `hlora report` on it rewrites the committed tables.md byte for byte."""
    import json

    from hlora.config import load_config
    from hlora.experiment import ExperimentConfig, plan
    from hlora.report import write_report

    results = json.loads((HELDOUT / "results.json").read_text())
    names = [r["cell"] for r in results]
    assert sorted(names) == sorted(p.stem for p in (HELDOUT / "records").glob("*.json")), (
        "run `hlora run configs/fronts-smollm2-heldout.yaml --collect`")
    order = [c.name for c in plan(load_config(ExperimentConfig, README.parent / "configs" / "fronts-smollm2-heldout.yaml"))]
    assert names == [n for n in order if n in set(names)]
    write_report(HELDOUT / "results.json", tmp_path)
    tables = (tmp_path / "tables.md").read_text(encoding="utf-8")
    assert tables == (HELDOUT / "report" / "tables.md").read_text(encoding="utf-8")
    # results/README.md's section on the grid is what benchmarks/results_readme.py generates from these
    gen = bench_script("results_readme")
    section = gen.heldout_section(len(order))
    count = f"all {len(order)} cells" if len(results) == len(order) else f"{len(results)} of {len(order)} cells"
    assert count in section.splitlines()[0] and _table_blocks(section)[0] in tables
    assert section in RESULTS_README.read_text(encoding="utf-8"), "run `python benchmarks/results_readme.py heldout`"
    # the README's headline table comes from this grid: every chosen row is in the report (a renamed row or sweep
    # label would silently drop out of it), it fits the README, and the README holds exactly it
    head = gen.headline_table(tables)
    assert len(head.splitlines()) == 2 + len(gen.HEADLINE) <= 15
    assert all(line in tables.splitlines() for line in head.splitlines())
    text = README.read_text(encoding="utf-8")
    section = text[text.index(gen.README_SECTION):text.index("## Where the rest lives")]
    assert _table_blocks(section) == [head], "run `python benchmarks/results_readme.py readme`"
    assert gen.readme_with_headline(text, head) == text
    with pytest.raises(ValueError, match="exactly one table"):
        gen.readme_with_headline(text.replace(head, head + "\n\ntext\n\n" + head), head)


def test_budget_doc_tables_every_committed_tune(bench_script):
    """docs/budget.md's table of returned models is what benchmarks/results_readme.py generates from the committed
    tunes (a tune record added without regenerating, or a renamed column, fails here)."""
    gen = bench_script("results_readme")
    section = gen.budget_section()
    n = len(list(gen.BUDGETS.glob("*.json")))
    assert f"({n} tunes" in section and len(_table_blocks(section)[0].splitlines()) == 2 + n
    doc = gen.BUDGET_DOC.read_text(encoding="utf-8")
    assert section in doc, "run `python benchmarks/results_readme.py budget`"
    assert gen.replace_section(doc, gen.BUDGET_TITLE, section) == doc
