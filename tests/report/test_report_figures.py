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


def _drawn(monkeypatch, records, task="sciq", **kw):
    """plot_fronts's figure: its visible axes as a grid of (title, y label, labels of what each panel draws)."""
    import hlora.report.figures as F

    figs = []
    monkeypatch.setattr(F, "save_png", lambda fig, out: figs.append(fig) or out)
    assert plot_fronts(records, task, "unused.png", **kw) == "unused.png"
    (fig,) = figs
    return [ax for ax in fig.axes if ax.get_visible()], fig


def test_fronts_with_the_battery_have_a_row_of_panels_per_family(write_results, monkeypatch):
    from report_records import to_new_format

    recs = load_results(write_results([to_new_format(r) for r in make_results(wise=True)]))
    axes, fig = _drawn(monkeypatch, recs)
    assert len(axes) == 9 and axes[0].get_gridspec().get_geometry() == (3, 3)  # families × (PPL, KL, battery)
    assert [ax.get_title(loc="left") for ax in axes[::3]] == ["HLoRA and its variants", "Practical alternatives",
                                                              "WiSE-FT curves"]  # fmt: skip
    assert [ax.get_ylabel() for ax in axes[:3]] == [
        "C4 perplexity (lower is better)", "KL(p_base ‖ p_model) on C4\nnats/token (lower is better)",
        "battery: mean zero-shot accuracy %\n(higher is better)"]  # fmt: skip
    drawn = [{c.get_label() for c in ax.containers} for ax in axes]
    assert all("Base" in d for d in drawn)  # Base in every panel
    assert all("LoRA(μ) (grey reference)" in d for d in drawn[:3] + drawn[6:])  # LoRA(μ) thin and grey elsewhere
    assert {"LoRA(μ)", "rsLoRA", "EWC-LoRA", "LoRA(ν+μ)"} <= drawn[3] and "HLoRA (φ)" not in drawn[3]
    assert {"HLoRA (φ)", "HLoRA −layer", "HLoRA −layer,element"} <= drawn[0]
    assert "WiSE-FT LoRA(ν+μ) (α)" in drawn[6] and "HLoRA (φ)" not in drawn[6]
    # a record may name its own family: a fourth row of panels
    for r in recs:
        if r["method"] == "rslora":
            r["family"] = "rank-stabilised"
    axes, _ = _drawn(monkeypatch, recs)
    assert len(axes) == 12 and axes[9].get_title(loc="left") == "rank-stabilised"


def test_fronts_without_the_battery_keep_their_layout(write_results, monkeypatch):
    axes, _ = _drawn(monkeypatch, load_results(write_results(make_results(wise=True))))
    assert len(axes) == 3 and axes[0].get_gridspec().get_geometry() == (1, 3)  # acc-PPL, acc-KL, KL-PPL
    assert [ax.get_xlabel() for ax in axes] == ["domain accuracy % (higher is better)"] * 2 + [
        "KL(p_base ‖ p_model) on WikiText-2\nnats/token (lower is better)"]  # fmt: skip
    assert axes[0].get_ylabel() == "WikiText-2 perplexity (lower is better)\nstage ν's own text"
    assert all(ax.get_title(loc="left") == "" for ax in axes)


def test_battery_fronts_png(write_results, tmp_path):
    from report_records import to_new_format

    res = write_report(write_results([to_new_format(r) for r in make_results(wise=True)]), tmp_path / "r")
    w, h = png_size((tmp_path / "r" / "fronts_sciq.png").read_bytes())
    assert 1500 <= w <= 2000 and 1000 <= h <= 1400  # 3 × 3 panels and the legends beside them, at 100 dpi
    assert "one row of panels per family" in (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert not res["skipped"].get("fronts_sciq.png")


def _tune_json(path, data="sciq", measure="c4_kl", kind="kl", task="c4", limit=0.05, forgetting=0.04, acc=0.9):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "budget": {"measure": measure, "task": task, "kind": kind, "limit": limit, "units": ""},
        "config": {"data": data}, "cost": {"training_steps": 120, "runs_equivalent": 2.0, "evaluations": 7},
        "winner": {"label": "kl_general", "alpha": 0.75, "validation": {"forgetting": 0.045, "se": 0.004},
                   "test": {"forgetting": forgetting, "se": 0.005, "domain_acc": acc}}}))
    return path


def test_budget_marks_map_each_budget_onto_its_panel(write_results, tmp_path):
    """A KL budget is its own limit on the KL axis; a perplexity-rise budget is Base's C4 perplexity × (1 + limit);
    a battery drop is Base's battery mean − limit points; budgets on another task or measure are left out."""
    from report_records import battery_acc, to_new_format

    from hlora.report.budget import budget_marks, load_tuned

    recs = load_results(write_results([to_new_format(r) for r in make_results(wise=True)]))
    bases = [r for r in recs if r["method"] == "base" and r["task"] == "sciq" and r["main"]]
    base_ppl = sum(r["general_ppl"] for r in bases) / len(bases)  # Base's seed mean
    base_battery = sum(battery_acc(r) for r in bases) / len(bases)
    tuned = load_tuned([
        _tune_json(tmp_path / "kl" / "tune.json"),
        _tune_json(tmp_path / "ppl" / "tune.json", measure="c4_ppl_rise_pct", kind="ppl_rise_pct", limit=2.0,
                   forgetting=1.5),
        _tune_json(tmp_path / "bat" / "tune.json", measure="battery_drop_pts", kind="drop_pts", task="battery",
                   limit=1.0, forgetting=0.5),
        _tune_json(tmp_path / "other" / "tune.json", data="piqa"),  # another task's tune
        _tune_json(tmp_path / "wiki" / "tune.json", measure="wikitext_kl", task="wikitext"),  # not the fronts' text
    ])
    marks = budget_marks(recs, tuned, "sciq")
    assert [m["metric"] for m in marks] == ["general_kl", "general_ppl", "battery_acc"]
    kl, ppl, bat = marks
    assert (kl["line"], kl["y"], kl["x"]) == (0.05, 0.04, 0.9) and kl["budget"] == "c4_kl ≤ 0.05"
    assert abs(ppl["line"] - base_ppl * 1.02) < 1e-9 and abs(ppl["y"] - base_ppl * 1.015) < 1e-9
    assert abs(bat["line"] - (base_battery - 0.01)) < 1e-9 and abs(bat["y"] - (base_battery - 0.005)) < 1e-9
    assert "kl_general" in kl["label"] and "0.75" in kl["label"]
    assert kl["regime"] == "each row's lr"  # no lr in its config
    from hlora.report.budget import _regime

    assert _regime({"config": {"train": {"lr": 1e-3}, "tune": {"lr": {"none": 3e-3, "ewc": 3e-3}}}}) == "lr 0.003"
    assert _regime({"config": {"train": {"lr": 1e-3}, "tune": {"lr": {}}}}) == "lr 0.001"
    assert _regime({"config": {"train": {"lr": 1e-3}, "tune": {"lr": {"none": 1e-3, "hlora": 3e-3}}}}) == "each row's lr"


def test_budget_marks_of_one_budget_merge_over_seeds():
    """The seeds of one budget make one point (mean ± std) naming how often each candidate won; the same budget
    at another learning rate stays apart, and only then does the label name the lr."""
    from hlora.report.budget import grouped_marks

    def m(x, y, winner, lr="each row's lr", budget="c4_kl ≤ 0.05"):
        return {"metric": "general_kl", "line": 0.05, "budget": budget, "x": x, "y": y, "winner": winner, "regime": lr,
                "label": f"hlora tune → {winner} (α = 1)"}

    g = grouped_marks([m(0.90, 0.05, "kl_general"), m(0.92, 0.04, "kl_general"), m(0.88, 0.06, "ewc"),
                       m(0.91, 0.03, "ewc", lr="lr 0.003"), m(0.8, 0.01, "none", budget="c4_kl ≤ 0.02")])
    assert [x["n"] for x in g] == [3, 1, 1]
    three, other_lr, other_budget = g
    assert abs(three["x"] - 0.90) < 1e-12 and abs(three["y"] - 0.05) < 1e-12
    assert abs(three["yerr"] - 0.0081649658) < 1e-9 and abs(three["xerr"] - 0.0163299316) < 1e-9
    assert three["label"] == "hlora tune → kl_general ×2, ewc (3 tunes, mean ± std), c4_kl ≤ 0.05 at each row's lr"
    assert other_lr["label"] == "hlora tune → ewc (α = 1), c4_kl ≤ 0.05 at lr 0.003" and other_lr["yerr"] == 0.0
    assert other_budget["label"] == "hlora tune → none (α = 1), c4_kl ≤ 0.02"  # one lr: not named


def test_a_tune_at_another_controller_margin_is_not_merged_with_the_seeds_of_the_default():
    """The same budget at the same lrs but another dual.margin is another regime: its own point, labelled by the
    margin alone (the lr, the same for both, is not named)."""
    from hlora.report.budget import _regime, grouped_marks

    cfg = {"train": {"lr": 1e-3}, "tune": {"lr": {"none": 1e-3, "hlora": 3e-3}}}
    default, aimed = (_regime({"config": {**cfg, "dual": {"margin": m}}}) for m in (0.9, 1.0))
    assert (default, aimed) == ("each row's lr; dual.margin 0.9", "each row's lr; dual.margin 1")

    def m(x, regime):
        return {"metric": "general_kl", "line": 0.1, "budget": "c4_kl ≤ 0.1", "x": x, "y": 0.08, "winner": "ewc",
                "regime": regime, "label": "hlora tune → ewc (α = 1)"}

    g = grouped_marks([m(0.90, default), m(0.91, default), m(0.92, aimed)])
    assert [x["n"] for x in g] == [2, 1] and g[0]["variant"] != g[1]["variant"]
    assert g[0]["label"].endswith("c4_kl ≤ 0.1 at dual.margin 0.9")
    assert g[1]["label"] == "hlora tune → ewc (α = 1), c4_kl ≤ 0.1 at dual.margin 1"
    alone = grouped_marks([m(0.90, default), m(0.91, default)])  # one regime: nothing named
    assert alone[0]["label"].endswith("(2 tunes, mean ± std), c4_kl ≤ 0.1")


def test_fronts_draw_budgets_and_the_report_lists_them(write_results, tmp_path, monkeypatch):
    import pytest
    from report_records import to_new_format

    from hlora.report.budget import load_tuned

    path = write_results([to_new_format(r) for r in make_results(wise=True)])
    tune = _tune_json(tmp_path / "t" / "tune.json")
    axes, _ = _drawn(monkeypatch, load_results(path), tuned=load_tuned([tune]))
    kl_axes = [ax for ax in axes if ax.get_ylabel().startswith("KL")]
    assert kl_axes and all(any(ln.get_linestyle() == "-." and ln.get_ydata()[0] == 0.05 for ln in ax.lines)
                           for ax in kl_axes)  # the budget on every KL panel
    assert all(any(ln.get_marker() == "X" and ln.get_xdata()[0] == 90.0 for ln in ax.lines) for ax in kl_axes)
    monkeypatch.undo()
    write_report(path, tmp_path / "r", tuned=[tune])
    md = (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")
    assert "### Forgetting budgets" in md and "| sciq |  | c4_kl ≤ 0.05 | kl_general | 0.75 |" in md
    assert "0 of 1 returned models land within ±10 %" in md  # test 0.04 against 0.05: under
    with pytest.raises(ValueError, match="not a tune.json"):
        (tmp_path / "bad.json").write_text("{}")
        write_report(path, tmp_path / "r2", tuned=[tmp_path / "bad.json"])
    assert not (tmp_path / "r2").exists()  # checked before anything is written


def test_budget_verdicts_and_the_best_fixed_point_within_each_budget(tmp_path):
    """The acceptance of a tune result, by hand: its test forgetting against the budget (±10 %, under, over within
    the validation s.e., over by more) and the grid's most accurate cell whose forgetting meets the same budget, in
    the budget's units (KL as it is, perplexity rise against Base of the same seed, battery drop in points)."""
    import json

    from report_records import cell

    from hlora.report.budget import best_fixed_point, fixed_forgetting, load_tuned, tuned_markdown, verdict

    def t(f, limit=0.05, se=0.008):
        return {"budget": {"kind": "kl", "task": "c4", "limit": limit},
                "winner": {"validation": {"se": se}, "test": {"forgetting": f}}}

    assert [verdict(t(f)) for f in (0.05, 0.0549, 0.04, 0.0551, 0.058, 0.0581)] == [
        "within ±10 %", "within ±10 %", "under", "over, within s.e.", "over, within s.e.", "OVER"]
    assert verdict({"budget": {"limit": 1.0}, "winner": None}) == "none returned"
    # under with α = 1 and nothing holding the training back: the budget did not bind
    relaxed = {**t(0.01), "candidates": [{"label": "kl_general", "dual": {"trace": [{"value": 0.1}, {"value": 1e-5}]}}]}
    relaxed["winner"].update(label="kl_general", alpha=1.0, coefficient=1e-5)
    assert verdict(relaxed) == "under, not binding"
    relaxed["winner"]["coefficient"] = 0.2  # the controller raised it: it bound, and the run undershot
    assert verdict(relaxed) == "under"
    relaxed["winner"].update(coefficient=None, alpha=1.0)  # plain LoRA, whole
    assert verdict(relaxed) == "under, not binding"
    relaxed["winner"]["alpha"] = 0.9  # scaled down: the α search spent the budget
    assert verdict(relaxed) == "under"
    summary = tuned_markdown([{**relaxed, "winner": {**relaxed["winner"], "alpha": 1.0}}]).split("\n\n")[-1]
    assert "1 is under a budget that did not bind" in " ".join(summary.split())
    assert max(map(len, summary.splitlines())) <= 118  # wrapped like the prose around it
    assert not any(line.startswith("%") for line in summary.splitlines())  # "±10 %" stays on one line

    def rec(method, seed, acc, kl, ppl, bat, sweep=None):
        r = cell(method, "sciq", seed, acc, ppl, kl=kl, sweep=sweep, main=sweep is None)
        r.update(texts={"c4": {"ppl": ppl, "kl": kl}}, battery_acc=bat)
        return r

    base0, base1 = rec("base", 0, 0.70, 0.0, 30.0, 0.50), rec("base", 1, 0.71, 0.0, 30.0, 0.50)
    grid = [base0, base1, rec("lora_mu", 0, 0.90, 0.20, 31.5, 0.47), rec("hlora", 0, 0.88, 0.04, 30.3, 0.495),
            rec("hlora", 0, 0.85, 0.01, 30.1, 0.499, sweep=("phi", 100.0)), rec("lora_mu", 1, 0.95, 0.01, 30.0, 0.5)]
    kl = {"kind": "kl", "task": "c4", "limit": 0.05}
    rise = {"kind": "ppl_rise_pct", "task": "c4", "limit": 2.0}
    drop = {"kind": "drop_pts", "task": "battery", "limit": 1.0}
    assert abs(fixed_forgetting(grid[2], rise, base0) - 5.0) < 1e-9
    assert abs(fixed_forgetting(grid[2], drop, base0) - 3.0) < 1e-9
    assert fixed_forgetting(grid[2], {"kind": "kl", "task": "wikitext", "limit": 1}, base0) is None  # not measured

    def best(budget, seed=0, task="sciq"):
        b = best_fixed_point(grid, {"budget": budget, "config": {"data": task, "train": {"seed": seed}}})
        return b and (b["record"]["method"], b["record"]["acc"])

    assert best(kl) == ("hlora", 0.88)  # lora_mu at seed 1 is more accurate, but another seed
    assert best(rise) == ("hlora", 0.88)  # +1 % against Base of seed 0
    assert best({**drop, "limit": 0.2}) == ("hlora", 0.85)  # the φ = 100 point
    assert best({**kl, "limit": -1.0}) is None
    assert best(kl, seed=1) == ("lora_mu", 0.95)

    path = tmp_path / "a" / "tune.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"budget": {"measure": "c4_kl", **kl}, "config": {"data": "sciq", "train": {"seed": 0}},
                                "winner": {"label": "hlora", "alpha": 1.0, "validation": {"forgetting": 0.05, "se": 0.004},
                                           "test": {"forgetting": 0.052, "se": 0.005, "domain_acc": 0.89}},
                                "cost": {"training_steps": 200, "runs_equivalent": 2.0, "evaluations": 9}}))
    md = tuned_markdown(load_tuned([path]), grid)
    assert "| sciq | 0 | c4_kl ≤ 0.05 | hlora | 1 | 0.05 ± 0.004 | 0.052 ± 0.005 | within ±10 % | 89.0 % | " \
           "hlora: 88.0 % (0.04) | 200 (2.0) | 9 | a/tune.json |" in md
    assert "1 of 1 returned models land within ±10 % of their budget on the test slice; 0 are above it" in md
    # a committed copy is named by its file; a test slice of one document has no s.e.
    copy = tmp_path / "c4_kl=0.05-s0.json"
    rec = json.loads(path.read_text())
    rec["winner"]["test"]["se"] = float("nan")
    rec["cost"]["evaluations_cached"] = 4  # points an earlier tune of the same adapter measured
    copy.write_text(json.dumps(rec))
    md = tuned_markdown(load_tuned([copy]), grid)
    assert "| 0.05 ± 0.004 | 0.052 ± n/a | within ±10 % |" in md and "| 9 (4 read back) | c4_kl=0.05-s0.json |" in md
