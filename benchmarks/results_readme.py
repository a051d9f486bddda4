#!/usr/bin/env python
"""Rewrite the generated sections of results/README.md from the committed results (run from the repo root).

    python benchmarks/results_readme.py heldout    # the held-out grid: cell count, front points (SciQ while in
                                                   # progress; PIQA and MedMCQA too once every cell is in)
                                                   # (and docs/budget.md's table, whose fixed points are its cells)
    python benchmarks/results_readme.py headline   # prints the README's headline table from the held-out grid
    python benchmarks/results_readme.py readme     # rewrites that table in README.md (the prose around it is typed)
    python benchmarks/results_readme.py budget     # rewrites docs/budget.md's table of every committed tune

A grid's section is generated, never typed: tests/test_readme.py checks that the README holds exactly what this
prints for the committed results.json and report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "results" / "fronts-smollm2-heldout"
TITLE = "## The comparison on held-out measures"  # ", in progress" follows while cells are missing
ANCHOR = "## Forgetting curves of plain LoRA(μ) on held-out measures"
BUDGETS = ROOT / "results" / "budget-smollm2"
BUDGET_DOC = ROOT / "docs" / "budget.md"
BUDGET_TITLE = "### Every returned model"


def _table_after(tables: str, heading: str) -> str:
    """The first markdown table after `heading` in a report's tables.md (up to the blank line that ends it)."""
    i = tables.index("|", tables.index(heading))
    return tables[i:tables.index("\n\n", i)]


def _front_points(tables: str, task: str) -> str:
    return _table_after(tables, f"### Front points: {task} (seed means)")


def heldout_section(n_cells: int) -> str:
    """The section for the held-out grid: its records so far and the SciQ front points of its report; once every
    cell is in, the PIQA and MedMCQA front points too."""
    results = json.loads((HELDOUT / "results.json").read_text())
    tables = (HELDOUT / "report" / "tables.md").read_text(encoding="utf-8")
    done = len(results) == n_cells
    intro = f"""{TITLE}{"" if done else ", in progress"} (`fronts-smollm2-heldout/`, {f"all {n_cells}" if done else f"{len(results)} of {n_cells}"} cells)

`hlora run configs/fronts-smollm2-heldout.yaml` (resumable from its committed records): every row and front of the
WikiText-2 grid, each row at the lr the sweep below picked, scored on SciQ test (150 items), C4 (8,192 tokens, with
KL to Base), the battery (100 items a task) and WikiText-2 (stage ν's own text), PIQA and MedMCQA as transfer tasks.
"""
    if not done:
        return intro + f"""The headline's cells run first (seed 0, then 1 and 2), then the rest of the fronts. The cells so far, SciQ (the
full report, tables and figures, is in `fronts-smollm2-heldout/report/`):

{_front_points(tables, "SciQ")}

"""
    return intro + f"""SciQ over seeds 0–2, PIQA and MedMCQA (tuned on each, thinned sweeps) over seed 0; the full report (paired
tests, matched-accuracy tables, cross-task retention, answer letters, compute, figures) is in
`fronts-smollm2-heldout/report/`. SciQ:

{_front_points(tables, "SciQ")}

PIQA (seed 0; 150 test items, ±3.9 points a cell):

{_front_points(tables, "PIQA")}

MedMCQA (seed 0; 150 test items, ±3.9 points a cell; chance 25 %, and Base answers "A" on every item):

{_front_points(tables, "MedMCQA")}

"""


# The README's headline: the rows a user weighs against HLoRA (its reference point), each at the setting the
# fronts show acting, from the held-out grid's SciQ head-to-head table (every point against HLoRA φ = 1, paired).
HEADLINE = [("Base", "main"), ("LoRA(μ)", "lr = 0.001"), ("LoRA(ν+μ)", "main"), ("HLoRA", "phi = 1 (reference)"),
            ("HLoRA", "phi = 100"), ("HLoRA −layer,element", "main"), ("EWC-LoRA", "lam = 5000"),
            ("Replay", "rho = 0.25"), ("KL-to-base (general)", "beta = 1"), ("KL-to-base (general)", "beta = 10"),
            ("CorDA-KPM", "main"), ("WiSE-FT of LoRA(μ)", "alpha = 0.5"), ("WiSE-FT of HLoRA", "alpha = 0.5")]


def headline_table(tables: str | None = None) -> str:
    """The HEADLINE rows of the held-out report's SciQ head-to-head table (header first), in HEADLINE's order; rows
    the grid has not reached are left out."""
    tables = tables if tables is not None else (HELDOUT / "report" / "tables.md").read_text(encoding="utf-8")
    block = _table_after(tables, "#### SciQ: every point against").splitlines()
    rows = [next((line for line in block if line.startswith(f"| {row} | {point} |")), None) for row, point in HEADLINE]
    return "\n".join(block[:2] + [r for r in rows if r is not None])


def budget_section() -> str:
    """docs/budget.md's table of every committed tune (results/budget-smollm2/), as `hlora report --tune` tables it
    against the held-out grid's fixed cells: one row a tune, the count within ±10 % under it."""
    from hlora.config import load_config
    from hlora.experiment import ExperimentConfig, plan
    from hlora.report.budget import load_tuned, tuned_markdown
    from hlora.report.load import load_results

    tunes = load_tuned(sorted(BUDGETS.glob("*.json")))
    seeds = sorted({(t.get("config") or {}).get("train", {}).get("seed") for t in tunes} - {None})
    records = load_results(HELDOUT / "results.json")
    # the grid fills seed by seed (it regenerates this table as cells land): a seed with fewer cells offers fewer
    # fixed points to beat
    planned = [c for c in plan(load_config(ExperimentConfig, ROOT / "configs" / "fronts-smollm2-heldout.yaml"))
               if c.task == "sciq"]
    cells = ", ".join(f"seed {s}: {sum(r['task'] == 'sciq' and r['seed'] == s for r in records)} of "
                      f"{sum(c.seed == s for c in planned)}" for s in seeds)
    return f"""{BUDGET_TITLE} ({len(tunes)} tunes, seeds {", ".join(map(str, seeds))})

Generated from `results/budget-smollm2/` by `python benchmarks/results_readme.py budget` (the same table as `hlora
report results/fronts-smollm2-heldout/results.json --tune results/budget-smollm2/*.json`). Forgetting in the budget's
units (nats/token, or % rise), validation on tune's own slice, test on the grid's; "best fixed point": the most
SciQ-accurate cell of the held-out grid (same seed) within the budget on the grid's test slice,
among the cells committed so far (SciQ cells, {cells}).
It is picked by its test accuracy, which the returned model never sees (tune picks on validation): the best of some
thirty cells, each ±2.4 points on 150 items, so an optimistic mark.

{tuned_markdown(tunes, records)}
"""


README_SECTION = "## Does HLoRA forget less"


def readme_with_headline(text: str, table: str) -> str:
    """README text with the one table of its comparison section replaced by `table`."""
    start = text.index(README_SECTION)
    end = text.index("\n## ", start + 5)
    lines = text[start:end].split("\n")
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not rows or rows[-1] - rows[0] + 1 != len(rows):
        raise ValueError(f"README.md: the section {README_SECTION!r} must hold exactly one table")
    lines[rows[0]:rows[-1] + 1] = table.split("\n")
    return text[:start] + "\n".join(lines) + text[end:]


def replace_section(text: str, title: str, section: str, anchor: str | None = None) -> str:
    """`text` with the section starting at `title` (up to the next heading of its level or above) replaced by
    `section`; inserted before `anchor` when the title is absent (an error without an anchor)."""
    start = text.find(title)
    if start < 0:
        if anchor is None:
            raise ValueError(f"no section {title!r} to replace")
        return text.replace(anchor, section + anchor, 1)
    level = len(title) - len(title.lstrip("#"))
    ends = [text.find("\n" + "#" * k + " ", start + len(title)) for k in range(1, level + 1)]
    end = min([e for e in ends if e >= 0], default=len(text) - 1) + 1
    return text[:start] + section + text[end:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("section", choices=["heldout", "headline", "readme", "budget"])
    args = ap.parse_args(argv)
    if args.section == "headline":
        print(headline_table())
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    from hlora.config import load_config
    from hlora.experiment import ExperimentConfig, plan
    from hlora.files import write_text

    if args.section in ("budget", "heldout"):  # the tunes' best fixed points are the held-out grid's cells
        write_text(BUDGET_DOC, replace_section(BUDGET_DOC.read_text(encoding="utf-8"), BUDGET_TITLE, budget_section()))
        print(f"rewrote the table of tunes in {BUDGET_DOC.relative_to(ROOT)}")
        if args.section == "budget":
            return 0
    if args.section == "readme":
        path = ROOT / "README.md"
        write_text(path, readme_with_headline(path.read_text(encoding="utf-8"), headline_table()))
        print(f"rewrote the headline table of {path.relative_to(ROOT)}")
        return 0

    n = len(plan(load_config(ExperimentConfig, ROOT / "configs" / "fronts-smollm2-heldout.yaml")))
    path = ROOT / "results" / "README.md"
    write_text(path, replace_section(path.read_text(encoding="utf-8"), TITLE, heldout_section(n), ANCHOR))
    print(f"rewrote {args.section} section of {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
