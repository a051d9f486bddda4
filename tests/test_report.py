"""Reports from a synthetic results.json: tables, figures, significance, and bad input."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy import stats

from hlora import report
from hlora.report import METHOD_ORDER, ResultsError, load_results, ttest, write_report

TASKS = ("sciq", "piqa")
SEEDS = (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss_curves.png", "importance_heatmap.png", "phi_sweep.png", "violin_hlora_vs_ewc.png", "acc_vs_ppl.png")

# Hand-checked cell: hlora on sciq, seeds 0 and 1.
HLORA_SCIQ_PPL = (23.5, 23.7)  # mean 23.60, sample std 0.1414 -> "23.60 ± 0.14"
HLORA_SCIQ_ACC = (0.88, 0.90)  # mean 89.00 %, sample std 1.414 points -> "89.00 ± 1.41"


def _layer_norms(rng) -> dict[str, float]:
    out = {}
    for block in range(6):
        for mod, scale in (("q_proj", 5e3), ("v_proj", 5e4)):
            out[f"base_model.model.model.layers.{block}.self_attn.{mod}"] = float(scale * (1 + rng.random()))
    return out


def _record(method: str, task: str, seed: int, rng, *, phi=None, sweep=False) -> dict:
    i = METHOD_ORDER.index(method)
    ppl = 28.5 - 0.5 * i + 0.1 * seed + (1.0 if task == "piqa" else 0.0)
    acc = 0.60 + 0.03 * i + 0.01 * seed
    if sweep:  # a larger phi keeps perplexity lower and costs accuracy
        ppl = 22.0 + 2.0 / (1 + 10 * phi) + 0.1 * seed
        acc = 0.85 - 0.05 * math.log10(1 + 100 * phi) + 0.01 * seed
    if method == "hlora" and task == "sciq" and not sweep:
        ppl, acc = HLORA_SCIQ_PPL[seed], HLORA_SCIQ_ACC[seed]
    n_items = 40
    ll = (-2.0 + 0.15 * i + rng.normal(0, 1.0, n_items)).tolist()
    trained = method != "base"
    steps = list(range(1, 61))
    has_penalty = method in ("hlora", "hlora_no_layer", "ewc_lora")
    curve = None
    if trained:
        curve = {
            "step": steps,
            "loss": [2.5 * math.exp(-s / 20) + 0.3 + 0.07 * i + 0.05 * rng.random() for s in steps],
            "penalty": [{"hlora": 1e-3, "hlora_no_layer": 5e-4}.get(method, 1e-1) * (1 - math.exp(-s / 10))
                        if has_penalty else 0.0 for s in steps],  # fmt: skip
        }
    is_si = method.startswith("hlora")
    return {
        "method": method, "task": task, "seed": seed, "phi": phi, "sweep": sweep,
        "general_ppl": ppl, "general_bpb": math.log2(ppl) / 4, "acc": acc, "acc_norm": acc - 0.02,
        "per_item": {"acc": [int(x > -1.5) for x in ll], "acc_norm": [int(x > -1.6) for x in ll], "ll_gold": ll},
        "train_seconds": 10.0 if trained else 0.0,
        "importance_seconds": 0.2 + 0.01 * seed if is_si else (30.0 + seed if method == "ewc_lora" else None),
        "importance_bytes": 1_000_000 if is_si else (8_000_000 if method == "ewc_lora" else None),
        "importance_kind": "si" if is_si else ("fisher" if method == "ewc_lora" else None),
        "full_fisher_bytes": 540_000_000 if method == "ewc_lora" else None,
        "full_fisher_seconds": 300.0 if method == "ewc_lora" else None,
        "curve": curve,
        "layer_norms": _layer_norms(rng) if is_si else None,
        "config": {"method": {"name": method}}, "git_commit": "0123456789abcdef", "versions": {"torch": "2.x"},
    }  # fmt: skip


def make_results(methods=METHOD_ORDER, sweep=True) -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for t in TASKS:
        for m in methods:
            for s in SEEDS:
                recs.append(_record(m, t, s, rng, phi=1e-3 if m == "hlora" else None))
        if sweep and "hlora" in methods:
            for phi in (1e-2, 1e-1, 1.0):
                for s in SEEDS:
                    recs.append(_record("hlora", t, s, rng, phi=phi, sweep=True))
    return recs


@pytest.fixture
def results_file(tmp_path):
    p = tmp_path / "results.json"
    p.write_text(json.dumps(make_results()))
    return p


def _files_in(d):
    return sorted(p.name for p in d.iterdir())


def test_write_report_outputs(results_file, tmp_path):
    out = tmp_path / "report"
    res = write_report(results_file, out)
    expected = {"tables.md", "table1.csv", "table2.csv", "complexity.csv", "tables.tex", "report.md", *FIGURES}
    assert set(_files_in(out)) == expected  # and nothing else: no temp file left behind
    assert {p.rsplit("/", 1)[-1] for p in res["files"]} == expected
    assert res["skipped"] == {}
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, name

    md = (out / "tables.md").read_text()
    for m in METHOD_ORDER:
        assert report.method_label(m) in md, m
    for t in TASKS:
        assert report.task_label(t) in md
    report_md = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"]({name})" in report_md  # relative links
    assert str(tmp_path) not in report_md and str(tmp_path) not in md

    rows = list(csv.DictReader(io.StringIO((out / "table1.csv").read_text())))
    assert [r["method"] for r in rows] == list(METHOD_ORDER)
    for t in TASKS:
        assert all(r[f"{t}_n"] == "2" for r in rows)
    rows2 = list(csv.DictReader(io.StringIO((out / "table2.csv").read_text())))
    assert [r["method"] for r in rows2] == list(report.ABLATION_METHODS)
    assert "tab:hlora-main" in (out / "tables.tex").read_text()


def test_hand_checked_cell(results_file, tmp_path):
    out = tmp_path / "r"
    write_report(results_file, out)
    md = (out / "tables.md").read_text()
    hl = next(line for line in md.splitlines() if line.startswith("| HLoRA |"))
    cells = [c.strip().strip("*") for c in hl.strip("|").split("|")]
    assert cells[1:3] == ["23.60 ± 0.14", "89.00 ± 1.41"]  # sciq PPL, sciq Acc %
    row = next(r for r in csv.DictReader(io.StringIO((out / "table1.csv").read_text())) if r["method"] == "hlora")
    assert float(row["sciq_general_ppl_mean"]) == pytest.approx(23.6)
    assert float(row["sciq_general_ppl_std"]) == pytest.approx(math.sqrt(0.02))
    assert float(row["sciq_acc_mean"]) == pytest.approx(0.89)
    assert float(row["sciq_acc_std"]) == pytest.approx(math.sqrt(2e-4))
    # Sweep cells do not enter the table: 2 seeds, not 8.
    assert row["sciq_n"] == "2"


def test_one_seed_omits_std(tmp_path):
    recs = [r for r in make_results(sweep=False) if r["seed"] == 0]
    p = tmp_path / "results.json"
    p.write_text(json.dumps(recs))
    write_report(p, tmp_path / "r")
    md = (tmp_path / "r" / "tables.md").read_text()
    hl = next(line for line in md.splitlines() if line.startswith("| HLoRA |"))
    assert "±" not in hl and "23.50" in hl and "88.00" in hl


def test_complexity_ratios(results_file):
    comp = report.complexity(load_results(results_file))
    si, fi, full = comp["rows"]
    assert si["bytes"] == 1_000_000 and fi["bytes"] == 8_000_000 and full["bytes"] == 540_000_000
    ratios = {r["name"]: r["value"] for r in comp["ratios"]}
    assert ratios["SI storage / Fisher (targets) storage"] == pytest.approx(1 / 8)
    assert ratios["Fisher (targets) time / SI time"] == pytest.approx(30.5 / 0.205)
    text = report.complexity_csv(comp)
    assert "SI importance (HLoRA)" in text and "ratio" in text


def test_ttest_matches_scipy():
    a = [1.2, 2.3, 2.9, 4.1, 5.0, 5.5]
    b = [0.9, 1.8, 3.5, 3.0, 4.2, 4.4]
    t, p = ttest(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    t, p = ttest(a, b, paired=True)
    ref = stats.ttest_rel(a, b)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    with pytest.raises(ValueError, match="equal lengths"):
        ttest(a, b[:3], paired=True)
    t, p = ttest([1.0], [2.0])  # too few values: nan, no exception
    assert math.isnan(p)


def test_missing_ewc_skips_violin(tmp_path):
    p = tmp_path / "results.json"
    p.write_text(json.dumps(make_results(methods=tuple(m for m in METHOD_ORDER if m != "ewc_lora"))))
    out = tmp_path / "r"
    res = write_report(p, out)
    assert "violin_hlora_vs_ewc.png" in res["skipped"]
    assert not (out / "violin_hlora_vs_ewc.png").exists()
    assert "violin_hlora_vs_ewc.png skipped" in (out / "report.md").read_text()
    assert (out / "acc_vs_ppl.png").read_bytes()[:8] == PNG_MAGIC


def test_no_sweep_no_curves_no_norms(tmp_path):
    recs = make_results(sweep=False)
    for r in recs:
        r["curve"] = r["layer_norms"] = None
        r.pop("per_item")
    p = tmp_path / "results.json"
    p.write_text(json.dumps(recs))
    res = write_report(p, tmp_path / "r")
    assert set(res["skipped"]) == {"loss_curves.png", "importance_heatmap.png", "phi_sweep.png",
                                   "violin_hlora_vs_ewc.png"}  # fmt: skip
    assert (tmp_path / "r" / "acc_vs_ppl.png").exists()


def test_malformed_results(tmp_path):
    recs = make_results(sweep=False)
    del recs[3]["acc"]
    p = tmp_path / "results.json"
    p.write_text(json.dumps(recs))
    out = tmp_path / "r"
    with pytest.raises(ResultsError, match=r"record 3 .*'acc'"):
        write_report(p, out)
    assert not out.exists()  # nothing written on bad input

    recs = make_results(sweep=False)
    recs[5]["seed"] = "zero"
    p.write_text(json.dumps(recs))
    with pytest.raises(ResultsError, match=r"record 5 .*'seed' must be an integer"):
        load_results(p)
    recs = make_results(sweep=False)
    recs[2]["curve"]["penalty"] = [0.0]
    p.write_text(json.dumps(recs))
    with pytest.raises(ResultsError, match=r"record 2 .*'curve.penalty'"):
        load_results(p)

    p.write_text(json.dumps({"method": "hlora"}))
    with pytest.raises(ResultsError, match="JSON list"):
        load_results(p)
    p.write_text("[{")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(p)
    with pytest.raises(FileNotFoundError, match="results file not found"):
        load_results(tmp_path / "nope.json")


def test_unknown_method_and_task_are_reported(tmp_path):
    recs = make_results(sweep=False)
    extra = dict(recs[0], method="my_method", task="mcq:data/my.jsonl")
    p = tmp_path / "results.json"
    p.write_text(json.dumps(recs + [extra]))
    write_report(p, tmp_path / "r")
    md = (tmp_path / "r" / "tables.md").read_text()
    assert "my_method" in md and "mcq:my.jsonl" in md
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r" / "table1.csv").read_text())))
    assert rows[-1]["method"] == "my_method"


def test_inspect_importance(tmp_path):
    norms = {f"base_model.model.transformer.h.{b}.attn.c_attn": 10.0 ** (3 + b) for b in range(4)}
    norms["base_model.model.lm_head"] = 5.0
    text = report.inspect_importance(norms, tmp_path)
    assert (tmp_path / "importance_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    assert "c_attn" in text and "layer_scale=1e-08" in text and "layer_scale=auto" in text
    assert "no block index" in text
    w = report.layer_weights(norms, 1e-8)
    assert sum(w.values()) == pytest.approx(1.0)
    assert report.entropy([0.25] * 4) == pytest.approx(math.log(4))
    m = report.importance_matrix(norms)
    assert m["rows"] == ["c_attn"] and m["blocks"] == [0, 1, 2, 3]
    assert all(".tmp" not in p.name for p in tmp_path.iterdir())
