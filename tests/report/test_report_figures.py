"""Figures: one fronts PNG per task, sweeps over any parameter, skips when data is absent."""
from __future__ import annotations

from report_records import PNG_MAGIC, ROW_IDS, make_results, png_size

from hlora.report import load_results, plot_fronts, plot_sweeps, write_report
from hlora.report.figures import fronts_name


def test_fronts_png_per_task(write_results, tmp_path):
    res = write_report(write_results(make_results(wise=True)), tmp_path / "r")
    for name in ("fronts_sciq.png", "fronts_piqa.png"):
        data = (tmp_path / "r" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and 10_000 < len(data) < 200_000, name
        w, h = png_size(data)
        assert 1400 <= w <= 1900 and 400 <= h <= 600  # three panels (acc-PPL, acc-KL, KL-PPL) at 100 dpi
        assert any(f.endswith(name) for f in res["files"])
    assert fronts_name("mcq:/some/dir/my data.jsonl") == "fronts_mcq_my_data.jsonl.png"


def test_fronts_without_kl_has_one_panel(write_results, tmp_path):
    recs = make_results()
    for r in recs:
        r["general_kl"] = None
    path = plot_fronts(load_results(write_results(recs)), "sciq", tmp_path / "f.png")
    w, _ = png_size(path.read_bytes())
    assert w < 700
    assert plot_fronts(load_results(write_results(recs)), "no-such-task", tmp_path / "g.png") is None


def test_sweep_figure_takes_any_parameter(write_results, tmp_path):
    recs = make_results(sweep=False)
    for lam in (0.1, 1.0, 10.0):  # an EWC row swept over λ, no φ sweep at all
        for r in [r for r in recs if r["method"] == "ewc_lora" and r["main"]]:
            recs.append(dict(r, sweep={"param": "lam", "value": lam}, main=False, acc=r["acc"] - 0.01 * lam))
    assert plot_sweeps(load_results(write_results(recs)), tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC
    no_sweep = [r for r in make_results(sweep=False) if r["method"] != "hlora_no_layer"]
    for r in no_sweep:
        r["sweep"] = None
    assert plot_sweeps(load_results(write_results(no_sweep)), tmp_path / "t.png") is None


def test_missing_ewc_skips_violin(write_results, tmp_path):
    p = write_results(make_results(rows=tuple(m for m in ROW_IDS if m != "ewc_lora")))
    out = tmp_path / "r"
    res = write_report(p, out)
    assert "violin_hlora_vs_ewc.png" in res["skipped"]
    assert not (out / "violin_hlora_vs_ewc.png").exists()
    assert "violin_hlora_vs_ewc.png skipped" in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "acc_vs_ppl.png").read_bytes()[:8] == PNG_MAGIC
