"""Forgetting budgets on the fronts figure: each `hlora tune` result (tune.json) as its budget line and the point
of the model it returned, on the panel whose axis the budget constrains.

Pure functions of the records and the tune.json files (no torch, no model). A budget lands on a panel when its
measure is the one the fronts plot on the same task: `<general_eval>_kl` on the KL panel (its limit as it is),
`<general_eval>_ppl_rise_pct` on the perplexity panel (Base's perplexity × (1 + limit/100)), and
`battery_drop_pts` on the battery panel (Base's battery mean − limit points). The point is the returned model's
*test* measures (domain accuracy, forgetting), mapped the same way; its forgetting was measured on tune's own
test slice, so the point sits on the fronts' axes through Base, not through the same tokens.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Iterable

import numpy as np

from ..util import plus_minus
from .load import BASE, main_cells

__all__ = ["load_tuned", "budget_marks", "grouped_marks", "tuned_markdown", "verdict", "fixed_forgetting", "best_fixed_point"]


def load_tuned(paths: Iterable[str | Path]) -> list[dict]:
    """tune.json files -> their records (each with `path`); a file that is not one is an error naming it."""
    out = []
    for p in paths:
        p = Path(p)
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: cannot read a tune.json ({e})") from None
        missing = [k for k in ("budget", "winner", "config") if k not in rec]
        if missing:
            raise ValueError(f"{p}: not a tune.json (no {', '.join(missing)})")
        for k in ("task", "kind", "limit"):
            if k not in (rec["budget"] or {}):
                raise ValueError(f"{p}: budget has no {k!r}")
        out.append({**rec, "path": str(p)})
    return out


def _base_mean(records: list[dict], task: str, metric: str) -> float | None:
    vals = [r[metric] for r in main_cells(records) if r["method"] == BASE and r["task"] == task
            and r.get(metric) is not None]
    return float(np.mean(vals)) if vals else None


def budget_marks(records: Iterable[dict], tuned: Iterable[dict], task: str) -> list[dict]:
    """One mark per tune result on `task` whose budget maps onto a fronts panel: {metric (the panel's y: general_kl |
    general_ppl | battery_acc), line (the budget on that axis), x (test domain accuracy, fraction) or None when no
    model was returned, y (its test forgetting on that axis), label, budget (the measure and limit as text)}."""
    records = [r for r in records if r["task"] == task]
    evals = {r.get("general_eval") for r in records if r.get("general_eval")}
    marks = []
    for t in tuned:
        if (t.get("config") or {}).get("data") != task:
            continue
        b = t["budget"]
        limit = float(b["limit"])
        if b["kind"] == "kl" and b["task"] in evals:
            metric, line, to_y = "general_kl", limit, (lambda f: f)
        elif b["kind"] == "ppl_rise_pct" and b["task"] in evals:
            base = _base_mean(records, task, "general_ppl")
            if base is None:
                continue
            metric, line, to_y = "general_ppl", base * (1 + limit / 100), (lambda f, base=base: base * (1 + f / 100))
        elif b["kind"] == "drop_pts" and b["task"] == "battery":
            base = _base_mean(records, task, "battery_acc")
            if base is None:
                continue
            metric, line, to_y = "battery_acc", base - limit / 100, (lambda f, base=base: base - f / 100)
        else:
            continue
        w = t.get("winner") or {}
        test = w.get("test") or {}
        measure = b.get("measure") or f"{b['task']}_{b['kind']}"
        marks.append({
            "metric": metric, "line": line, "budget": f"{measure} ≤ {limit:g}",
            "x": test.get("domain_acc") if w else None, "y": to_y(test["forgetting"]) if w and "forgetting" in test else None,
            "label": f"hlora tune → {w.get('label', '?')} (α = {w.get('alpha', 1.0):.2g})" if w else "hlora tune: none within budget",
            "path": t.get("path", ""), "winner": w.get("label") if w else None, "regime": _regime(t),
        })
    return marks


def _regime(t: dict) -> str:
    """What a tune trained its candidates under, as text: the stage-μ learning rates ("lr 0.003" when one for all,
    else "each row's lr") and, where the record states it, the margin its controller aimed at
    ("lr 0.003; dual.margin 0.9"). Tunes of one budget merge only under the same regime."""
    cfg = t.get("config") or {}
    lrs = set(((cfg.get("tune") or {}).get("lr") or {}).values()) or {(cfg.get("train") or {}).get("lr")}
    lr = f"lr {next(iter(lrs)):g}" if len(lrs) == 1 and None not in lrs else "each row's lr"
    margin = (cfg.get("dual") or {}).get("margin")
    return lr if margin is None else f"{lr}; dual.margin {margin:g}"


def _regime_text(regime: str, others: set[str]) -> str:
    """" at <the parts of `regime` in which the regimes of its budget differ>", or "" where they do not."""
    split = [r.split("; ") for r in others]
    parts = regime.split("; ")
    varying = [p for i, p in enumerate(parts) if len({r[i] if i < len(r) else "" for r in split}) > 1]
    return f" at {', '.join(varying)}" if varying else ""


def grouped_marks(marks: list[dict]) -> list[dict]:
    """The marks of one budget at one set of stage-μ learning rates (the seeds of a tune) as one: the point at the
    mean of the returned models' (accuracy, forgetting), with their std (`xerr`, `yerr`; 0 for one tune), labelled
    with the winners and how often each won. The lr (the margin) enters the label only where a budget was tuned at
    several."""
    groups: dict[tuple, list[dict]] = {}
    for m in marks:
        groups.setdefault((m["metric"], m["budget"], m.get("regime", "")), []).append(m)
    regimes: dict[tuple, set] = {}
    for metric, budget, regime in groups:
        regimes.setdefault((metric, budget), set()).add(regime)
    out = []
    for (metric, budget, regime), ms in groups.items():
        at = _regime_text(regime, regimes[(metric, budget)]) if regime else ""
        pts = [(m["x"], m["y"]) for m in ms if m["x"] is not None and m["y"] is not None]
        if len(ms) == 1:
            label = f"{ms[0]['label']}, {budget}{at}"
        else:
            won: dict[str, int] = {}
            for m in ms:
                won[m["winner"] or "none within budget"] = won.get(m["winner"] or "none within budget", 0) + 1
            who = ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in won.items())
            label = f"hlora tune → {who} ({len(ms)} tunes, mean ± std), {budget}{at}"
        xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        variant = sorted(regimes[(metric, budget)]).index(regime)  # the figure's marker: which regime of the budget
        out.append({"metric": metric, "line": ms[0]["line"], "budget": budget, "label": label, "n": len(ms),
                    "variant": variant,
                    "x": float(xs.mean()) if pts else None, "y": float(ys.mean()) if pts else None,
                    "xerr": float(xs.std()) if pts else 0.0, "yerr": float(ys.std()) if pts else 0.0})
    return out


def _slack(t: dict) -> bool:
    """The budget did not bind the returned model: it is the whole adapter (α = 1) and nothing held its training
    back (plain LoRA, or a coefficient its controller lowered from the start because the proxy read under target),
    so there was no more domain accuracy to buy with the rest of the budget."""
    w = t.get("winner") or {}
    if float(w.get("alpha", 0.0)) < 1.0:
        return False
    if w.get("coefficient") is None:
        return True
    cand = next((c for c in t.get("candidates") or [] if c.get("label") == w.get("label")), {})
    trace = (cand.get("dual") or {}).get("trace") or []
    return bool(trace) and float(w["coefficient"]) < float(trace[0]["value"])


def verdict(t: dict) -> str:
    """The returned model's *test* forgetting against its budget: "within ±10 %" of the limit, "under" it
    ("under, not binding" when the budget did not bind the model, see _slack), "over, within s.e." (above by no more
    than the validation slice's standard error: what the search could not see) or "OVER" (above by more: a miss);
    "none returned" when the search gave no model."""
    w = t.get("winner") or {}
    test = w.get("test") or {}
    if "forgetting" not in test:
        return "none returned"
    f, limit = float(test["forgetting"]), float(t["budget"]["limit"])
    se = float((w.get("validation") or {}).get("se") or 0.0)
    if abs(f - limit) <= 0.1 * abs(limit):
        return "within ±10 %"
    if f < limit:
        return "under, not binding" if _slack(t) else "under"
    return "over, within s.e." if f - limit <= se else "OVER"


def fixed_forgetting(rec: dict, budget: dict, base: dict | None) -> float | None:
    """A grid cell's forgetting in a budget's own units (`base`: Base's cell of the same task and seed), or None
    when the record does not measure it: KL and perplexity rise on the budget's text (the record's `texts`), the
    battery drop in points."""
    kind, task = budget["kind"], budget["task"]
    if kind == "drop_pts" and task == "battery":
        if base is None or rec.get("battery_acc") is None or base.get("battery_acc") is None:
            return None
        return 100 * (base["battery_acc"] - rec["battery_acc"])
    text = (rec.get("texts") or {}).get(task) or {}
    if kind == "kl":
        return text.get("kl")
    if kind == "ppl_rise_pct":
        ref = ((base or {}).get("texts") or {}).get(task) or {}
        if "ppl" not in text or not ref.get("ppl"):
            return None
        return 100 * (text["ppl"] / ref["ppl"] - 1)
    return None


def best_fixed_point(records: Iterable[dict], t: dict) -> dict | None:
    """The most domain-accurate cell of a grid (any row, any fixed coefficient, Base included) whose forgetting
    meets the tune result's budget, on the tune's task and, when the grid has it, its seed: what a user who ran
    the grid and read off the budget would have picked. {record, forgetting} or None."""
    cfg = t.get("config") or {}
    task, seed = cfg.get("data"), (cfg.get("train") or {}).get("seed")
    records = [r for r in records if r["task"] == task]
    if seed is not None and any(r["seed"] == seed for r in records):
        records = [r for r in records if r["seed"] == seed]
    bases = {r["seed"]: r for r in main_cells(records) if r["method"] == BASE}
    limit = float(t["budget"]["limit"])
    ok = []
    for r in records:
        f = fixed_forgetting(r, t["budget"], bases.get(r["seed"]))
        if f is not None and f <= limit:
            ok.append((r["acc"], -f, r, f))
    if not ok:
        return None
    _, _, r, f = max(ok, key=lambda x: (x[0], x[1]))
    return {"record": r, "forgetting": f}


def _point_label(r: dict) -> str:
    sw = r.get("sweep") or {}
    return r["label"] + (f" ({sw['param']} = {sw['value']:g})" if sw.get("param") and not r.get("main") else "")


def _file_label(path: str) -> str:
    """OUT/tune.json as "OUT/tune.json"; a renamed copy (results/budget-smollm2/c4_kl=0.05-s0.json) by its name."""
    p = Path(path)
    return f"{p.parent.name}/tune.json" if p.name == "tune.json" else p.name


def tuned_markdown(tuned: Iterable[dict], records: Iterable[dict] = ()) -> str:
    """One line per tune result: budget, the model returned, its validation and test forgetting against the budget,
    its test accuracy, the best fixed point of the grid `records` within the same budget, cost; then how many
    returned models land within ±10 % of their budget and how many are above it by more than the validation s.e."""
    def forgetting(p: dict) -> str:
        return f"{p['forgetting']:.4g} {plus_minus(p.get('se'))}" if "forgetting" in p else "–"

    tuned, records = list(tuned), list(records)
    rows = ["| task | seed | budget | returned | α | forgetting, validation | forgetting, test | test vs budget | "
            "domain acc, test | best fixed point within budget | training steps (× one run) | evaluations | file |",
            "|---|---:|---|---|---:|---:|---:|---|---:|---|---:|---:|---|"]
    for t in tuned:
        b, w, c = t["budget"], t.get("winner") or {}, t.get("cost") or {}
        test = w.get("test") or {}
        acc = test.get("domain_acc")
        cfg = t.get("config") or {}
        best = best_fixed_point(records, t) if records else None
        best_txt = (f"{_point_label(best['record'])}: {100 * best['record']['acc']:.1f} % ({best['forgetting']:.3g})"
                    if best else ("none" if records else ""))
        cells = [cfg.get("data", "?"), str((cfg.get("train") or {}).get("seed", "")),
                 f"{b.get('measure', b['kind'])} ≤ {b['limit']:g}",
                 w.get("label", "none within budget"), f"{w['alpha']:.3g}" if "alpha" in w else "",
                 forgetting(w.get("validation") or {}) if w else "", forgetting(test) if w else "", verdict(t),
                 f"{100 * acc:.1f} %" if acc is not None else "", best_txt,
                 f"{c.get('training_steps', '?')} ({c.get('runs_equivalent', '?')})", str(c.get("evaluations", "?"))
                 + (f" ({c['evaluations_cached']} read back)" if c.get("evaluations_cached") else ""),
                 _file_label(t.get("path", ""))]
        rows.append("| " + " | ".join(cells) + " |")
    verdicts = [verdict(t) for t in tuned]
    slack = verdicts.count("under, not binding")
    summary = (f"{verdicts.count('within ±10 %')} of {len(tuned)} returned models land within ±10 % of their budget "
               f"on the test slice; {verdicts.count('OVER')} are above it by more than the validation slice's standard "
               "error" + (f"; {slack} {'is' if slack == 1 else 'are'} under a budget that did not bind (the whole "
                          "adapter, its coefficient relaxed by the controller or none)" if slack else "") + ".")
    # wrapped like the prose around it (the sentence lands in docs that are read as plain text too), never between a
    # number and its "%": the space before it is held by a placeholder while wrapping
    wrapped = textwrap.fill(summary.replace(" %", "\0%"), width=118, break_on_hyphens=False).replace("\0", " ")
    return "\n".join(rows) + "\n\n" + wrapped + "\n"
