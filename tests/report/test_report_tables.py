"""Tables: the hand-checked main cell, seeds, cost ratios, labels from records, the new tables."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from report_records import ROW_IDS, TASKS, cell, make_results
from scipy import stats

from hlora import report
from hlora.report import load_results, write_report
from hlora.report.load import normalize_record
from hlora.report.stats import compute_summary, transfer_summary
from hlora.report.compare import retention_markdown
from hlora.report.tables import compute_markdown


def _rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def test_hand_checked_cell(results_file, tmp_path):
    out = tmp_path / "r"
    write_report(results_file, out)
    md = (out / "tables.md").read_text()
    hl = next(line for line in md.splitlines() if line.startswith("| HLoRA |") and "±" in line)
    cells = [c.strip().strip("*") for c in hl.strip("|").split("|")]
    assert cells[1:3] == ["23.60 ± 0.14", "89.00 ± 1.41"]  # sciq PPL, sciq Acc %
    row = next(r for r in _rows(out / "table1.csv") if r["method"] == "hlora")
    assert row["label"] == "HLoRA"
    assert float(row["sciq_general_ppl_mean"]) == pytest.approx(23.6)
    assert float(row["sciq_general_ppl_std"]) == pytest.approx(math.sqrt(0.02))
    assert float(row["sciq_acc_mean"]) == pytest.approx(0.89)
    assert float(row["sciq_acc_std"]) == pytest.approx(math.sqrt(2e-4))
    assert row["sciq_n"] == "2"  # sweep cells do not enter the table: 2 seeds, not 8


def test_rows_in_record_order(results_file, tmp_path):
    write_report(results_file, tmp_path / "r")
    rows = _rows(tmp_path / "r" / "table1.csv")
    assert [r["method"] for r in rows] == list(ROW_IDS)
    for t in TASKS:
        assert all(r[f"{t}_n"] == "2" for r in rows)
    ablation = ["hlora", "hlora_no_layer", "hlora_no_layer_element"]  # old records: the rows of that time
    assert report.ablation_rows(load_results(results_file)) == ablation
    assert [r["method"] for r in _rows(tmp_path / "r" / "table2.csv")] == ablation
    assert "tab:hlora-main" in (tmp_path / "r" / "tables.tex").read_text()


def test_one_seed_omits_std(write_results, tmp_path):
    p = write_results([r for r in make_results(sweep=False) if r["seed"] == 0])
    write_report(p, tmp_path / "r")
    md = (tmp_path / "r" / "tables.md").read_text()
    hl = next(line for line in md.splitlines() if line.startswith("| HLoRA |") and "88.00" in line)
    assert "±" not in hl and "23.50" in hl


def test_complexity_ratios(results_file):
    comp = report.complexity(load_results(results_file))
    si, fi, full = comp["rows"]
    assert si["bytes"] == 1_000_000 and fi["bytes"] == 8_000_000 and full["bytes"] == 540_000_000
    ratios = {r["name"]: r["value"] for r in comp["ratios"]}
    assert ratios["SI storage / Fisher (targets) storage"] == pytest.approx(1 / 8)
    assert ratios["Fisher (targets) time / SI time"] == pytest.approx(30.5 / 0.205)
    text = report.complexity_csv(comp)
    assert "SI importance (HLoRA)" in text and "ratio" in text


def test_labels_come_from_records(write_results, tmp_path):
    recs = make_results(sweep=False)
    for r in recs:
        if r["method"] == "lora_mu":
            r["label"] = "My Method"
    extra = dict(recs[0], method="unlabelled_row", label=None, task="mcq:data/my.jsonl")
    write_report(write_results(recs + [extra]), tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "| My Method |" in md and "LoRA(μ)" not in md
    assert "unlabelled_row" in md and "mcq:my.jsonl" in md
    assert _rows(tmp_path / "r" / "table1.csv")[-1]["method"] == "unlabelled_row"
    assert r"LoRA($\nu$+$\mu$)" in (tmp_path / "r" / "tables.tex").read_text(encoding="utf-8")


def test_matched_table_written(write_results, tmp_path):
    write_report(write_results(make_results(wise=True)), tmp_path / "r")
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "at HLoRA's accuracy acc* = 89.00 %" in md and "(acc points × PPL)" in md
    rows = _rows(tmp_path / "r" / "matched.csv")
    hl = next(r for r in rows if r["task"] == "sciq" and r["method"] == "hlora")
    assert float(hl["ppl"]) == pytest.approx(23.6) and float(hl["acc_ref"]) == pytest.approx(0.89)
    wise = next(r for r in rows if r["task"] == "sciq" and r["method"] == "wise_lora_nu_mu")
    assert wise["label"] == "WiSE-FT LoRA(ν+μ)" and wise["points"] == "3"


def test_retention_and_compute_tables():
    recs = [normalize_record(r) for r in [
        cell("base", "sciq", 0, 0.6, 30.0, label="Base", transfer={"piqa": {"acc": 0.70, "n": 100}}),
        cell("hlora", "sciq", 0, 0.8, 25.0, label="HLoRA", transfer={"piqa": {"acc": 0.68, "n": 100}},
             cost={"wall_seconds": 10.0, "steps": 60, "domain_tokens": 1000}),
        cell("hlora", "sciq", 1, 0.8, 25.0, label="HLoRA", transfer={"piqa": {"acc": 0.66, "n": 100}},
             cost={"wall_seconds": 14.0, "steps": 60, "domain_tokens": 1000}),
    ]]  # fmt: skip
    s = transfer_summary(recs, "sciq")
    assert s["targets"] == ["piqa"] and s["base"] == {"piqa": pytest.approx(0.70)}
    md = retention_markdown([s])
    assert "| HLoRA | 67.00 ± 1.41 (-3.00) |" in md
    comp = {r["method"]: r for r in compute_summary(recs)}
    assert comp["hlora"]["wall_seconds"] == pytest.approx(12.0) and comp["hlora"]["n"] == 2
    assert comp["base"]["wall_seconds"] is None
    md = compute_markdown(list(comp.values()))
    assert "| HLoRA | 2 | 12.0 | — | 60 | 1,000 | — | — |" in md
    total = 24.0  # 10 + 14: the Base cell has no cost
    assert comp["hlora"]["wall_total"] == pytest.approx(24.0) and f"together: {total:,.0f} s of wall time" in md


def test_retention_pairs_each_row_with_the_reference_by_seed():
    from scipy.stats import ttest_rel

    def rec(m, seed, acc, label):
        return normalize_record(cell(m, "sciq", seed, 0.8, 25.0, label=label, transfer={"medmcqa": {"acc": acc, "n": 100}}))

    ref = [0.25, 0.25, 0.29]
    lora = [0.28, 0.38, 0.36]
    recs = ([rec("hlora", s, a, "HLoRA") for s, a in enumerate(ref)]
            + [rec("lora_mu", s, a, "LoRA(μ)") for s, a in enumerate(lora)]
            + [rec("ewc_lora", 0, 0.30, "EWC-LoRA")])  # one seed: nothing to pair
    s = transfer_summary(recs, "sciq")
    rows = {r["method"]: r for r in s["rows"]}
    assert rows["lora_mu"]["p"]["medmcqa"] == pytest.approx(ttest_rel(lora, ref).pvalue)
    assert math.isnan(rows["hlora"]["p"]["medmcqa"]) and math.isnan(rows["ewc_lora"]["p"]["medmcqa"])
    md = retention_markdown([s])
    p = ttest_rel(lora, ref).pvalue
    assert f"| LoRA(μ) | 34.00 ± 5.29 (p {p:.3f}) |" in md  # no Base here: only the p in brackets
    assert "| HLoRA | 26.33 ± 2.31 |" in md and "| EWC-LoRA | 30.00 |" in md
    assert "against HLoRA's main cell" in md


def test_front_points_table_lists_each_sweep_point_as_seed_means():
    from hlora.report.tables import front_points_markdown

    recs = [normalize_record(r) for r in [
        cell("base", "sciq", 0, 0.60, 30.0, label="Base", kl=0.0),
        cell("hlora", "sciq", 0, 0.80, 25.0, label="HLoRA", sweep=("phi", 1.0), kl=0.2),
        cell("hlora", "sciq", 1, 0.90, 27.0, label="HLoRA", sweep=("phi", 1.0), kl=0.4),
        cell("hlora", "sciq", 0, 0.70, 24.0, label="HLoRA", sweep=("phi", 10.0), main=False, kl=0.1),
        # a WiSE-FT point whose front borrows Base (α=0) as an end: the table shows only its own points
        cell("wise", "sciq", 0, 0.75, 28.0, label="WiSE", sweep=("alpha", 0.5), kl=0.05,
             front_ends={"0": "base-sciq-s0"}),
    ]]  # fmt: skip
    md = front_points_markdown(recs, "sciq")
    assert "| HLoRA phi = 1 / 10 | 85.0 / 70.0 | 26.00 / 24.00 | 0.300 / 0.100 | 0,1 |" in md
    assert "| WiSE alpha = 0.5 | 75.0 | 28.00 | 0.050 | 0 |" in md
    assert "| Base | 60.0 | 30.00 | 0.000 | 0 |" in md


def test_sweeps_across_tasks_put_each_value_side_by_side():
    from hlora.report.tables import sweeps_across_tasks_markdown

    recs = [normalize_record(r) for r in [
        cell("hlora_norm", "sciq", 0, 0.80, 25.0, label="Ω/mean", sweep=("phi", 1.0), kl=0.2),
        cell("hlora_norm", "sciq", 1, 0.90, 27.0, label="Ω/mean", sweep=("phi", 1.0), kl=0.4),
        cell("hlora_norm", "sciq", 0, 0.70, 24.0, label="Ω/mean", sweep=("phi", 10.0), main=False, kl=0.1),
        cell("hlora_norm", "piqa", 0, 0.65, 31.0, label="Ω/mean", sweep=("phi", 1.0), kl=0.15),
        cell("replay", "sciq", 0, 0.82, 22.0, label="Replay", sweep=("rho", 0.5), kl=0.3),  # one task only
        cell("replay", "sciq", 0, 0.84, 21.0, label="Replay", sweep=("rho", 0.75), main=False, kl=0.4),
        # on both tasks but one value of its parameter everywhere: not a sweep
        cell("ablated", "sciq", 0, 0.8, 25.0, label="Ablated", sweep=("phi", 1.0)),
        cell("ablated", "piqa", 0, 0.6, 32.0, label="Ablated", sweep=("phi", 1.0)),
        cell("base", "sciq", 0, 0.60, 30.0, label="Base", kl=0.0),
        cell("base", "piqa", 0, 0.60, 33.0, label="Base", kl=0.0),
    ]]  # fmt: skip
    md = sweeps_across_tasks_markdown(recs)
    assert "#### Ω/mean over phi" in md and "Replay" not in md and "Base" not in md and "Ablated" not in md
    assert "| phi | SciQ Acc % | SciQ PPL ↓ | SciQ KL ↓ | PIQA Acc % | PIQA PPL ↓ | PIQA KL ↓ |" in md
    assert "| 1 | 85.0 | 26.00 | 0.300 | 65.0 | 31.00 | 0.150 |" in md
    assert "| 10 | 70.0 | 24.00 | 0.100 | — | — | — |" in md
    assert sweeps_across_tasks_markdown([r for r in recs if r["task"] == "sciq"]) == ""


def test_head_to_head_table_shows_differences_with_paired_p():
    from hlora.report.stats import head_to_head
    from hlora.report.compare import head_to_head_markdown

    recs = [normalize_record(r) for r in [
        cell("hlora", "sciq", 0, 0.80, 25.0, label="HLoRA", sweep=("phi", 1.0), kl=0.2),
        cell("hlora", "sciq", 1, 0.90, 27.0, label="HLoRA", sweep=("phi", 1.0), kl=0.4),
        cell("replay", "sciq", 0, 0.82, 22.0, label="Replay", sweep=("rho", 0.5), kl=0.3),
        cell("replay", "sciq", 1, 0.88, 23.0, label="Replay", sweep=("rho", 0.5), kl=0.6),
    ]]  # fmt: skip
    md = head_to_head_markdown(head_to_head(recs, "sciq"))
    p = stats.ttest_rel([22.0, 23.0], [25.0, 27.0]).pvalue  # ΔPPL -3, -4
    assert f"| Replay | rho = 0.5 | 85.0 | +0.0 (1.000) | 22.50 | -3.50 ({p:.3f}) | 0.450 | +0.150 (" in md
    assert "| HLoRA | phi = 1 (reference) | 85.0 | +0.0 (n/a) | 26.00 | +0.00 (n/a) |" in md
    assert "HLoRA's main cell (acc 85.0 %, PPL 26.00, KL 0.300; seeds 0,1)" in md


def test_new_records_name_the_text_and_add_the_battery(write_results, tmp_path):
    from report_records import battery_acc, to_new_format

    recs = [to_new_format(r) for r in make_results(wise=True)]
    write_report(write_results(recs), tmp_path / "r")
    md = (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")
    header = ("| Method | SciQ C4 PPL ↓ | SciQ Acc % ↑ | SciQ Battery % ↑ | SciQ WikiText-2 PPL (stage ν's own "
              "distribution) ↓ | PIQA C4 PPL ↓ |")  # fmt: skip
    assert header in md
    hl = next(line for line in md.splitlines() if line.startswith("| HLoRA |") and "±" in line)
    cells = [c.strip().strip("*") for c in hl.strip("|").split("|")]
    bat = [battery_acc(r) for r in recs if r["method"] == "hlora" and r["task"] == "sciq" and r["main"]]
    assert cells[1:5] == ["33.04 ± 0.20", "89.00 ± 1.41",  # C4 = 1.4 × the old general PPL
                          f"{100 * np.mean(bat):.2f} ± {100 * np.std(bat, ddof=1):.2f}", "23.60 ± 0.14"]  # fmt: skip
    assert "C4 PPL: perplexity on C4, a text no stage trains on" in md
    assert "WikiText-2 PPL (stage ν's own distribution): perplexity on WikiText-2, the text stage ν" in md
    # matched accuracy: battery columns; head to head: battery differences, paired over seeds like scipy
    assert "### C4 perplexity, C4 KL and battery at matched domain accuracy" in md
    assert "| C4 PPL @ acc* ↓ | C4 KL @ acc* ↓ |" in md
    assert "| Battery % @ acc* ↑ | ΔBattery pts ref − row (p), n |" in md
    assert "| n | p | ΔC4 KL ref − row (p), n |" in md and "ΔC4 KL: the same for C4 KL" in md
    assert "cap = Base C4 PPL × 1.02" in md
    assert "| C4 PPL ↓ | ΔC4 PPL (p) | C4 KL to Base ↓ | ΔC4 KL (p) | Battery % ↑ | ΔBattery pts (p) |" in md

    def bat_of(m):
        return [battery_acc(r) for r in sorted(recs, key=lambda r: r["seed"])
                if r["method"] == m and r["task"] == "sciq" and r["main"]]  # fmt: skip

    mine, ref = bat_of("lora_mu"), bat_of("hlora")
    p = stats.ttest_rel(mine, ref).pvalue
    line = next(x for x in md.splitlines() if x.startswith("| LoRA(μ) | main |"))
    assert f"| {100 * np.mean(mine):.1f} | {100 * np.mean(np.subtract(mine, ref)):+.1f} ({p:.3f}) |" in line
    assert "| Acc % | C4 PPL ↓ | C4 KL to Base ↓ | Battery % ↑ |" in md  # front points
    csv_row = next(r for r in _rows(tmp_path / "r" / "table1.csv") if r["method"] == "hlora")
    assert float(csv_row["sciq_battery_acc_mean"]) == pytest.approx(np.mean(bat))
    assert float(csv_row["sciq_nu_text_ppl_mean"]) == pytest.approx(23.6)
    assert "battery_paired_p" in (tmp_path / "r" / "matched.csv").read_text()
    rep = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "General measures (general_ppl, general_kl): C4 PPL; stage ν's own text also as WikiText-2 PPL" in rep
    # the same records before named texts: the old headers, no battery or stage-ν column
    write_report(write_results(make_results(wise=True)), tmp_path / "old")
    old = (tmp_path / "old" / "tables.md").read_text(encoding="utf-8")
    assert "| Method | SciQ PPL ↓ | SciQ Acc % ↑ | PIQA PPL ↓ | PIQA Acc % ↑ |" in old
    assert "Battery" not in old and "C4" not in old and "WikiText" not in old
    old_rep = (tmp_path / "old" / "report.md").read_text(encoding="utf-8")
    assert "General measures (general_ppl, general_kl): WikiText-2 PPL (stage ν's text), the text stage ν" in old_rep


def test_a_grid_whose_reference_row_has_no_cell_yet(write_results, tmp_path):
    """A grid in progress (records committed as cells land) may not hold its reference row yet: the report names
    no missing row as 'None', skips the matched table and says why."""
    from report_records import to_new_format

    recs = [to_new_format(r) for r in make_results(rows=("base", "lora_mu", "ewc_lora"), sweep=False)]
    res = write_report(write_results(recs), tmp_path / "r")
    md = (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")
    assert "None" not in md and "matched domain accuracy" not in md
    assert "the reference row" in md  # the significance line names what is missing
    assert any("no main cell of the reference row (none in these records)" in n for n in res["notes"])
