"""`write_report` end to end on synthetic records: the files, relative links, absent data, old records."""
from __future__ import annotations

import csv
import io

import pytest
from report_records import PNG_MAGIC, ROWS, TASKS, make_results, to_old_format

from hlora.report import write_report

FIGURES = ("loss_curves.png", "importance_heatmap.png", "sweeps.png", "violin_hlora_vs_ewc.png", "acc_vs_ppl.png",
           "fronts_sciq.png", "fronts_piqa.png")  # fmt: skip
TABLES = ("tables.md", "table1.csv", "table2.csv", "complexity.csv", "compute.csv", "matched.csv", "retention.csv",
          "tables.tex", "report.md")  # fmt: skip


def test_write_report_outputs(results_file, tmp_path):
    out = tmp_path / "report"
    res = write_report(results_file, out)
    expected = {*TABLES, *FIGURES}
    assert {p.name for p in out.iterdir()} == expected  # and nothing else: no temp file left behind
    assert {p.rsplit("/", 1)[-1] for p in res["files"]} == expected
    assert res["skipped"] == {} and res["notes"] == []
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name

    md = (out / "tables.md").read_text(encoding="utf-8")
    for _, label, _ in ROWS:
        assert f"| {label} |" in md, label
    assert "SciQ" in md and "PIQA" in md
    assert "### One setting across tasks" in md and "| phi | SciQ Acc % |" in md  # HLoRA's φ swept on both tasks
    report_md = (out / "report.md").read_text(encoding="utf-8")
    for name in FIGURES:
        assert f"]({name})" in report_md  # relative links
    assert report_md.index("fronts_sciq.png") < report_md.index("## Tables")  # the headline comes first
    assert str(tmp_path) not in report_md and str(tmp_path) not in md


def test_no_sweep_no_curves_no_norms(write_results, tmp_path):
    recs = make_results(sweep=False)
    for r in recs:
        r["curve"] = r["layer_norms"] = r["transfer"] = None
        r["sweep"] = None
        r.pop("per_item")
    res = write_report(write_results(recs), tmp_path / "r")
    assert set(res["skipped"]) == {"loss_curves.png", "importance_heatmap.png", "sweeps.png",
                                   "violin_hlora_vs_ewc.png"}  # fmt: skip
    assert (tmp_path / "r" / "acc_vs_ppl.png").exists()
    assert all((tmp_path / "r" / f"fronts_{t}.png").exists() for t in TASKS)  # single points still plot
    assert not (tmp_path / "r" / "retention.csv").exists()
    assert any("retention" in n for n in res["notes"])
    assert "One setting across tasks" not in (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")


def test_old_records_report(write_results, tmp_path):
    """Records from the runner before labels and general sweeps still give every table and figure."""
    res = write_report(write_results([to_old_format(r) for r in make_results()]), tmp_path / "r")
    assert set(res["skipped"]) == set()
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "| hlora |" in md  # no label: the row id
    matched = list(csv.DictReader(io.StringIO((tmp_path / "r" / "matched.csv").read_text(encoding="utf-8"))))
    hl = next(r for r in matched if r["task"] == "sciq" and r["method"] == "hlora")
    assert hl["points"] == "4" and float(hl["ppl"]) == pytest.approx(23.6)  # main φ + 3 sweep cells, one front
    assert (tmp_path / "r" / "sweeps.png").read_bytes()[:8] == PNG_MAGIC
