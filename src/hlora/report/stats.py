"""Numbers behind the report: seed means, t-tests, fronts and the comparisons along them.

Pure functions of records (see `load.py`); nothing here draws or writes. A *front* is what one row
(method) reaches on one task: one point per sweep value (φ, λ, ρ, β, α, ...), the mean over seeds,
ordered by the sweep value. Comparisons along fronts use the seed means unless a docstring says
otherwise; accuracies are fractions here (the tables scale them to percent).
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np

from .load import BASE, main_cells, role_row, row_labels, row_order, sweep_key, task_order

__all__ = [
    "CAP_RATIO",
    "ttest",
    "mean_std",
    "aggregate",
    "front",
    "front_xy",
    "seed_front",
    "interp_ppl_at_acc",
    "acc_under_cap",
    "dominated_area",
    "reference_accuracy",
    "base_point",
    "paired_matched_test",
    "head_to_head",
    "matched_summary",
    "transfer_summary",
    "compute_summary",
    "seed_significance",
    "item_scores",
    "item_comparison",
]

CAP_RATIO = 1.02  # perplexity cap = Base perplexity + 2 %
_TOL = 1e-12  # accuracies closer than this are the same accuracy (seed means of the same cells)

Front = Sequence[tuple[float, float]]


# ----------------------------------------------------------------------------- basics

def ttest(a: Sequence[float], b: Sequence[float], paired: bool = False) -> tuple[float, float]:
    """Two-sided t-test of mean(a) vs mean(b): Welch's (unequal variances) or paired.

    A thin wrapper over scipy.stats.ttest_ind(equal_var=False) / ttest_rel, so the numbers are
    scipy's. Too few values or zero variance give (nan, nan) instead of a warning.
    """
    from scipy import stats

    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if paired and a.shape != b.shape:
        raise ValueError(f"paired t-test needs equal lengths, got {a.size} and {b.size}")
    # Values equal up to rounding (accuracies k/n differing by the same k on every seed) have no
    # variance: scipy would return a p of 1e-15 from the rounding error.
    if a.size and b.size:
        spread = np.ptp(a - b) if paired else max(np.ptp(a), np.ptp(b))
        if spread <= 1e-12 * max(1.0, float(np.abs(np.concatenate([a, b])).max())):
            return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); the std is None for fewer than two values, the mean nan for none."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, None
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def _stat(rs: Iterable[dict], metric: str) -> tuple[float | None, float | None]:
    """mean_std of a metric over the records that have it; (None, None) when none has it."""
    vals = [r[metric] for r in rs if r.get(metric) is not None]
    return mean_std(vals) if vals else (None, None)


_METRICS = ("general_ppl", "general_bpb", "acc", "acc_norm", "general_kl", "battery_acc", "nu_text_ppl")


def aggregate(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """Per (method, task) over the main cells: n, seeds, and mean/std of each metric."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in main_cells(records):
        groups[(r["method"], r["task"])].append(r)
    out = {}
    for key, rs in groups.items():
        cell: dict[str, Any] = {"n": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for metric in _METRICS:
            cell[metric], cell[metric + "_std"] = _stat(rs, metric)
        out[key] = cell
    return out


# ----------------------------------------------------------------------------- fronts

def _sort_key(key: tuple[str, float] | None) -> tuple:
    return ("", -math.inf) if key is None else key  # a cell off any sweep goes first


def front(records: Iterable[dict], method: str, task: str) -> list[dict]:
    """Seed-mean points of one row on one task, one per sweep value, ordered by that value.

    Each point: {"sweep": (param, value) | None, "main": bool, "n", "seeds", "end" (True for a point
    made only of end cells borrowed from other rows), and mean/std of acc, acc_norm, general_ppl,
    general_bpb, general_kl, battery_acc, nu_text_ppl} (None where no record has the metric).
    """
    records = list(records)
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in records:
        if r["method"] == method and r["task"] == task:
            groups[sweep_key(r)].append(r)
    # A row whose records name their front's ends (WiSE-FT: α=0 is Base, α=1 the adapter it scales) gets
    # those cells as its end points, so the front spans the whole trade-off.
    by_cell = {r.get("cell"): r for r in records}
    for r in [r for rs in list(groups.values()) for r in rs if r.get("front_ends") and r.get("sweep")]:
        for value, cell in r["front_ends"].items():
            end, key = by_cell.get(cell), (r["sweep"]["param"], float(value))
            if end is not None and all(x["seed"] != end["seed"] for x in groups[key]):
                groups[key].append({**end, "main": False, "_end": True})
    points = []
    for key in sorted(groups, key=_sort_key):
        rs = groups[key]
        p: dict[str, Any] = {"sweep": key, "main": any(r["main"] for r in rs), "n": len(rs),
                             "seeds": sorted({r["seed"] for r in rs}),
                             "end": all(r.get("_end") for r in rs)}  # fmt: skip
        for metric in _METRICS:
            p[metric], p[metric + "_std"] = _stat(rs, metric)
        points.append(p)
    return points


def front_xy(points: Iterable[dict], metric: str = "general_ppl") -> list[tuple[float, float]]:
    """(acc, metric) pairs of front points, leaving out points without that metric."""
    return [(p["acc"], p[metric]) for p in points if p[metric] is not None]


def seed_front(records: Iterable[dict], method: str, task: str, seed: int,
               metric: str = "general_ppl") -> list[tuple[float, float]]:  # fmt: skip
    """One seed's front of a row on a task: (acc, metric) per sweep value (duplicates averaged)."""
    mine = [r for r in records if r["seed"] == seed]
    return front_xy(front(mine, method, task), metric)


HIGHER_IS_BETTER = frozenset({"acc", "acc_norm", "battery_acc"})  # general measures where more is less forgetting


def interp_ppl_at_acc(front: Front, acc: float, higher_is_better: bool = False) -> float | None:
    """Perplexity (or any y) a front reaches at a given accuracy: the best y with at least that accuracy.

    `front` is a list of (acc, y) points in any order; they are sorted by accuracy and joined by
    straight segments. The value is the best of the segment's y at `acc` and the y of every point
    at or above `acc`: a point with more accuracy and less forgetting dominates, and a user would
    take it (WiSE-FT curves bend, so α = 0.5 can beat α = 0.75 on both axes). On a trade-off front
    (y worse as accuracy rises) this is plain linear interpolation. Best is lowest, or highest with
    `higher_is_better` (battery accuracy). None when `acc` is outside the front's accuracy range (a
    single point matches only an equal accuracy).
    """
    pts = sorted((float(a), float(p)) for a, p in front)
    if not pts or acc < pts[0][0] - _TOL or acc > pts[-1][0] + _TOL:
        return None
    candidates = [p for a, p in pts if a >= acc - _TOL]
    candidates += [p0 + (acc - a0) / (a1 - a0) * (p1 - p0) for (a0, p0), (a1, p1) in zip(pts, pts[1:])
                   if a0 < acc < a1]  # fmt: skip
    return max(candidates) if higher_is_better else min(candidates)


def acc_under_cap(front: Front, cap: float) -> float | None:
    """Highest accuracy reachable along the front with perplexity ≤ cap, or None.

    The front's points, sorted by accuracy, are joined by straight segments; a segment that
    crosses the cap contributes the accuracy where it meets it. None when no point is under the cap.
    """
    pts = sorted((float(a), float(p)) for a, p in front)
    best = [a for a, p in pts if p <= cap]
    if not best:
        return None
    for (a0, p0), (a1, p1) in zip(pts, pts[1:]):
        if p0 <= cap < p1:  # leaving the allowed region towards higher accuracy
            best.append(a0 + (cap - p0) / (p1 - p0) * (a1 - a0))
    return max(best)


def dominated_area(front: Front, base: tuple[float, float]) -> float:
    """Area that the front's points win over Base: the union of the rectangles
    [acc_base, acc_i] × [ppl_i, ppl_base] over points better than Base in both (0 if none).

    Units are those of the inputs (the tables pass accuracy in points, so: accuracy points × ppl).
    All rectangles share the corner at Base, so the union is a staircase: sweep from the highest
    accuracy down, keeping the largest perplexity gain seen so far.
    """
    acc_b, ppl_b = base
    wins = sorted(((a - acc_b, ppl_b - p) for a, p in front if a > acc_b and p < ppl_b), reverse=True)
    area, height = 0.0, 0.0
    for k, (w, h) in enumerate(wins):
        height = max(height, h)
        next_w = wins[k + 1][0] if k + 1 < len(wins) else 0.0
        area += (w - next_w) * height
    return area


# ----------------------------------------------------------------------------- matched accuracy

def reference_accuracy(records: Iterable[dict], task: str, reference: str | None = None,
                       seed: int | None = None) -> float | None:  # fmt: skip
    """Mean accuracy of the reference row's main cells on a task (one seed's when `seed` is given)."""
    records = list(records)
    reference = reference or role_row(records, "reference")  # the row that declares itself the reference
    accs = [r["acc"] for r in main_cells(records)
            if r["method"] == reference and r["task"] == task and seed in (None, r["seed"])]  # fmt: skip
    return float(np.mean(accs)) if accs else None


def _reference_metric(records: list[dict], task: str, reference: str, seed: int,
                      metric: str = "general_ppl") -> float | None:  # fmt: skip
    vals = [r[metric] for r in main_cells(records)
            if r["method"] == reference and r["task"] == task and r["seed"] == seed and r.get(metric) is not None]
    return float(np.mean(vals)) if vals else None


def paired_matched_test(records: Iterable[dict], method: str, task: str, reference: str | None = None,
                        metric: str = "general_ppl") -> dict:  # fmt: skip
    """Paired t-test over seeds of the reference's perplexity (or `metric`) against a row's, at matched accuracy.

    Per seed: the reference row's main cell gives (acc_s, ppl_s); the row's perplexity is
    interpolated at acc_s on that seed's front of the row. Seeds where both exist enter a
    scipy.stats.ttest_rel. Returns {"diff": mean(ppl_ref − ppl_row), "n", "t", "p", "seeds"};
    t and p are nan when n < 2.
    """
    records = list(records)
    reference = reference or role_row(records, "reference")  # the row that declares itself the reference
    ref_seeds = sorted({r["seed"] for r in main_cells(records) if r["method"] == reference and r["task"] == task})
    a, b, seeds = [], [], []
    for s in ref_seeds:
        acc_s = reference_accuracy(records, task, reference, seed=s)
        theirs = _reference_metric(records, task, reference, s, metric)
        mine = interp_ppl_at_acc(seed_front(records, method, task, s, metric), acc_s, metric in HIGHER_IS_BETTER)
        if mine is not None and theirs is not None:
            a.append(theirs)
            b.append(mine)
            seeds.append(s)
    diff = float(np.mean(np.subtract(a, b))) if a else math.nan
    t, p = ttest(a, b, paired=True) if len(a) >= 2 else (math.nan, math.nan)
    return {"diff": diff, "n": len(a), "t": t, "p": p, "seeds": seeds}


_H2H_METRICS = ("acc", "general_ppl", "general_kl", "battery_acc", "nu_text_ppl")


def head_to_head(records: Iterable[dict], task: str, reference: str | None = None) -> dict:
    """Every row's own front points against the reference's main cell, paired seed by seed.

    "At the same domain gain" without interpolation: where domain accuracy saturates, the accuracy
    at which `matched_summary` interpolates is itself noise. Here each point (one sweep value of a
    row) is set against the reference's main cell of the same seed: per metric (acc, general_ppl,
    general_kl, battery_acc, nu_text_ppl) the mean of row − reference over the seeds both have, and a
    paired t-test of the two
    (p is nan for fewer than two seeds). A point whose accuracy difference is small and not
    significant compares with the reference at equal domain gain. End points borrowed from other
    rows (WiSE-FT's α=0, 1) are left out: they are those rows' own points.

    Returns {"task", "reference", "ref": {metric: seed mean}, "rows": [{"method", "label", "sweep",
    "main", "seeds", metric: seed mean, "d_"+metric, "p_"+metric}]}.
    """
    records = list(records)
    reference = reference or role_row(records, "reference")  # the row that declares itself the reference
    records = [r for r in records if r["task"] == task]
    labels = row_labels(records)
    ref = {r["seed"]: r for r in main_cells(records) if r["method"] == reference}
    per_seed = {s: [r for r in records if r["seed"] == s] for s in ref}
    rows = []
    for m in row_order(records):
        by_point: dict[Any, dict[int, dict]] = defaultdict(dict)
        for s, recs in per_seed.items():
            for p in front(recs, m, task):
                if not p["end"]:
                    by_point[p["sweep"]][s] = p
        for key in sorted(by_point, key=_sort_key):
            pts = by_point[key]
            row: dict[str, Any] = {"method": m, "label": labels[m], "sweep": key, "seeds": sorted(pts),
                                   "main": any(p["main"] for p in pts.values())}  # fmt: skip
            for metric in _H2H_METRICS:
                seeds = [s for s, p in pts.items() if p[metric] is not None and ref[s].get(metric) is not None]
                mine = [pts[s][metric] for s in seeds]
                theirs = [ref[s][metric] for s in seeds]
                row[metric] = float(np.mean(mine)) if mine else None
                row["d_" + metric] = float(np.mean(np.subtract(mine, theirs))) if mine else None
                row["p_" + metric] = ttest(mine, theirs, paired=True)[1] if len(mine) >= 2 else math.nan
            rows.append(row)
    ref_mean = {k: float(np.mean(v)) if (v := [r[k] for r in ref.values() if r.get(k) is not None]) else None
                for k in _H2H_METRICS}  # fmt: skip
    return {"task": task, "reference": reference, "ref": ref_mean, "ref_seeds": sorted(ref), "rows": rows}


def base_point(records: list[dict], task: str) -> tuple[float, float] | None:
    """(acc, ppl) of Base on a task: seed means of its main cells; None without Base."""
    rs = [r for r in main_cells(records) if r["method"] == BASE and r["task"] == task]
    if not rs:
        return None
    return float(np.mean([r["acc"] for r in rs])), float(np.mean([r["general_ppl"] for r in rs]))


def _seed_interp_std(records: list[dict], method: str, task: str, acc: float) -> tuple[float | None, int]:
    """Sample std over seeds of a row's perplexity interpolated at `acc` on each seed's front."""
    vals = [v for s in sorted({r["seed"] for r in records if r["method"] == method and r["task"] == task})
            if (v := interp_ppl_at_acc(seed_front(records, method, task, s), acc)) is not None]  # fmt: skip
    return mean_std(vals)[1] if vals else None, len(vals)


def _matched_row(records: list[dict], method: str, task: str, acc_ref: float | None,
                 base: tuple[float, float] | None, reference: str, cap_ratio: float) -> dict:  # fmt: skip
    pts = front(records, method, task)
    ppl_front, kl_front = front_xy(pts), front_xy(pts, "general_kl")
    row: dict[str, Any] = {"method": method, "points": len(pts), "ppl": None, "ppl_std": None, "ppl_n": 0,
                           "kl": None, "acc_cap": None, "area": None, "battery": None, "nu_ppl": None}  # fmt: skip
    if acc_ref is not None:
        row["ppl"] = interp_ppl_at_acc(ppl_front, acc_ref)
        row["ppl_std"], row["ppl_n"] = _seed_interp_std(records, method, task, acc_ref)
        row["kl"] = interp_ppl_at_acc(kl_front, acc_ref)
        row["battery"] = interp_ppl_at_acc(front_xy(pts, "battery_acc"), acc_ref, higher_is_better=True)
        row["nu_ppl"] = interp_ppl_at_acc(front_xy(pts, "nu_text_ppl"), acc_ref)
    if base is not None:
        row["acc_cap"] = acc_under_cap(ppl_front, base[1] * cap_ratio)
        row["area"] = dominated_area([(100 * a, p) for a, p in ppl_front], (100 * base[0], base[1]))
    mine = method != reference
    row["test"] = paired_matched_test(records, method, task, reference) if mine else None
    has_kl = any(p["general_kl"] is not None for p in pts)
    row["kl_test"] = paired_matched_test(records, method, task, reference, "general_kl") if mine and has_kl else None
    has_battery = any(p["battery_acc"] is not None for p in pts)
    row["battery_test"] = (paired_matched_test(records, method, task, reference, "battery_acc")
                           if mine and has_battery else None)  # fmt: skip
    return row


def matched_summary(records: Iterable[dict], task: str, reference: str | None = None,
                    cap_ratio: float = CAP_RATIO) -> dict:  # fmt: skip
    """Every row of a task compared along its front (the matched-accuracy table).

    acc_ref = the reference row's main accuracy (seed mean). Per row: "ppl" and "kl" at acc_ref on
    the seed-mean front (None outside the front's range), "ppl_std" over the seeds whose own
    front reaches acc_ref ("ppl_n" of them), "acc_cap" = highest accuracy with perplexity ≤ Base
    × cap_ratio, "area" = dominated area vs Base in accuracy points × ppl, "test" = the paired
    test of `paired_matched_test` (None for the reference row itself), "kl_test" the same for the KL to Base
    (None without it). With the battery: "battery" (mean
    accuracy) at acc_ref and "battery_test", its paired test (reference − row); with stage ν's own text
    beside the general one: "nu_ppl" at acc_ref.
    """
    records = list(records)
    reference = reference or role_row(records, "reference")  # the row that declares itself the reference
    records = [r for r in records if r["task"] == task]
    labels = row_labels(records)
    acc_ref = reference_accuracy(records, task, reference)
    base = base_point(records, task)
    rows = [_matched_row(records, m, task, acc_ref, base, reference, cap_ratio) for m in row_order(records)]
    for row in rows:
        row["label"] = labels[row["method"]]
    return {"task": task, "reference": reference, "acc_ref": acc_ref, "base": base,
            "cap": base[1] * cap_ratio if base else None, "cap_ratio": cap_ratio, "rows": rows}  # fmt: skip


# ----------------------------------------------------------------------------- retention and compute

def transfer_summary(records: Iterable[dict], task: str, reference: str | None = None) -> dict:
    """Accuracy on the tasks a model was not tuned on, per main row tuned on `task`.

    Returns {"task", "reference", "targets": [transfer tasks], "base": {target: mean acc of Base},
    "rows": [{"method", "label", "cells": {target: (mean, std, n)}, "p": {target: p}}]}; rows
    without any transfer result are left out. `p` is a paired t-test over the seeds a row shares
    with the reference row (nan for fewer than two, and for the reference itself): transfer items
    are the same for every cell of a seed, so pairing by seed removes the item draw.
    """
    records = list(records)
    reference = reference or role_row(records, "reference")  # the row that declares itself the reference
    mine = [r for r in main_cells(records) if r["task"] == task and r.get("transfer")]
    labels = row_labels(mine)
    targets = list(dict.fromkeys(t for r in mine for t in r["transfer"]))

    def accs(m: str, t: str) -> dict[int, float]:
        return {r["seed"]: r["transfer"][t]["acc"] for r in mine if r["method"] == m and t in r["transfer"]
                and r["transfer"][t].get("acc") is not None}  # fmt: skip

    ref_accs = {t: accs(reference, t) for t in targets}
    rows = []
    for m in row_order(mine):
        cells, ps = {}, {}
        for t in targets:
            by_seed = accs(m, t)
            if not by_seed:
                continue
            cells[t] = (*mean_std(list(by_seed.values())), len(by_seed))
            ref = ref_accs[t] if m != reference else {}
            seeds = sorted(set(by_seed) & set(ref))
            ps[t] = (ttest([by_seed[s] for s in seeds], [ref[s] for s in seeds], paired=True)[1]
                     if len(seeds) >= 2 else math.nan)  # fmt: skip
        rows.append({"method": m, "label": labels[m], "cells": cells, "p": ps})
    base_row = next((row for row in rows if row["method"] == BASE), None)
    base = {t: c[0] for t, c in base_row["cells"].items()} if base_row else {}
    return {"task": task, "reference": reference, "targets": targets, "base": base, "rows": rows}


COST_FIELDS = ("wall_seconds", "train_seconds", "steps", "domain_tokens", "general_tokens", "extra_forward_tokens")


def _cost(rec: dict, key: str) -> float | None:
    """A cost number from `cost`, falling back to the old top-level fields (wall/train seconds)."""
    v = (rec.get("cost") or {}).get(key)
    return rec.get(key) if v is None else v


def compute_summary(records: Iterable[dict]) -> list[dict]:
    """Per row: the mean over its cells (all tasks, seeds and sweep points) of each cost field.

    Returns [{"method", "label", "n", field: mean or None, "wall_total": sum of wall seconds}]; None
    where no cell has the field.
    """
    records = list(records)
    labels = row_labels(records)
    out = []
    for m in row_order(records):
        rs = [r for r in records if r["method"] == m]
        row: dict[str, Any] = {"method": m, "label": labels[m], "n": len(rs)}
        for key in COST_FIELDS:
            vals = [v for r in rs if (v := _cost(r, key)) is not None]
            row[key] = float(np.mean(vals)) if vals else None
            if key == "wall_seconds":
                row["wall_total"] = float(sum(vals))
        out.append(row)
    return out


# ----------------------------------------------------------------------------- significance

def seed_significance(records: Iterable[dict], method: str | None = None) -> list[dict]:
    """Welch t-tests over seeds of `method` against every other row, per task, on general PPL and
    accuracy of the main cells (not matched: see `paired_matched_test`). Needs ≥ 2 seeds on both sides."""
    records = list(records)
    method = method or role_row(records, "reference")  # the row that declares itself the reference
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in main_cells(records):
        by[(r["method"], r["task"])].append(r)
    out = []
    for t in task_order(r for rs in by.values() for r in rs):
        mine = by.get((method, t), [])
        if len(mine) < 2:
            continue
        for other in dict.fromkeys(m for m, tt in by if tt == t):
            theirs = by[(other, t)]
            if other == method or len(theirs) < 2:
                continue
            row = {"task": t, "method": method, "other": other, "n": len(mine), "n_other": len(theirs)}
            for metric in ("general_ppl", "acc"):
                a = [r[metric] for r in mine]
                b = [r[metric] for r in theirs]
                row[metric + "_diff"] = float(np.mean(a) - np.mean(b))
                row[metric + "_t"], row[metric + "_p"] = ttest(a, b)
            out.append(row)
    return out


# Score used for the per-item comparison: the gold continuation's log-likelihood is continuous, so
# its distribution is worth drawing (acc/acc_norm are 0/1 per item). acc_norm is the fallback.
ITEM_SCORE = "ll_gold"
ITEM_SCORE_FALLBACK = "acc_norm"


def item_scores(records: Iterable[dict], method: str, task: str, key: str) -> dict[int, list[float]]:
    """Per seed, the per-item scores `per_item[key]` of a row on a task (main cells)."""
    out: dict[int, list[float]] = {}
    for r in sorted(main_cells(records), key=lambda r: r["seed"]):
        if r["method"] == method and r["task"] == task and r["per_item"] and key in r["per_item"]:
            vals = [math.nan if v is None else float(v) for v in r["per_item"][key]]
            out.setdefault(r["seed"], []).extend(vals)
    return out


def item_comparison(records: list[dict], a: str, b: str, task: str) -> dict | None:
    """Pooled per-item scores of rows a and b; paired test when the items line up seed by seed.

    Returns {"key", "a", "b" (arrays), "paired", "t", "p"}, or None without scores on both sides.
    """
    for key in (ITEM_SCORE, ITEM_SCORE_FALLBACK):
        sa, sb = item_scores(records, a, task, key), item_scores(records, b, task, key)
        if sa and sb:
            break
    else:
        return None
    paired = sa.keys() == sb.keys() and all(len(sa[s]) == len(sb[s]) for s in sa)
    xa = np.array([v for s in sorted(sa) for v in sa[s]])
    xb = np.array([v for s in sorted(sb) for v in sb[s]])
    if paired:  # drop an item from both sides when either lacks it
        ok = np.isfinite(xa) & np.isfinite(xb)
        xa, xb = xa[ok], xb[ok]
    else:
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    if xa.size == 0 or xb.size == 0:
        return None
    t, p = ttest(xa, xb, paired=paired)
    return {"key": key, "a": xa, "b": xb, "paired": paired, "t": t, "p": p}
