"""Which answer letter each row picks on a letter task (MedMCQA), and whether a loss there is a letter prior.

Pure functions of records (see `load.py`), like `stats.py`; `compare.letter_markdown` writes the table.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from .load import BASE, main_cells, row_labels, row_order, task_order

__all__ = ["LETTER_TASKS", "PRIOR_P", "letter_analysis", "each_point_as_row"]

LETTER_TASKS = {"medmcqa": "ABCD"}  # tasks whose choices are answer letters (lm-eval's MedMCQA prompt)
PRIOR_P = 0.05  # predictions skewed: chi-square p of the letters against the gold letters below this


def _letter_items(rec: dict, task: str) -> dict | None:
    """pred / gold / ll of a record on a letter task: its own items when tuned on it, else its transfer entry."""
    src = rec.get("per_item") if rec["task"] == task else (rec.get("transfer") or {}).get(task)
    if not src or src.get("pred") is None or src.get("gold") is None:
        return None
    return src


def _debiased(ll: list, k: int) -> list[int | None]:
    """argmax_j (ll[i][j] − mean over i of ll[i][j]): each choice's log-likelihood less that letter's mean
    over the model's items (items without a full row of k numbers give None and enter no mean)."""
    ok = [x is not None and len(x) == k and all(v is not None for v in x) for x in ll]
    if not any(ok):
        return [None] * len(ll)
    arr = np.array([x for x, good in zip(ll, ok) if good], dtype=float)
    mean = arr.mean(axis=0)
    out: list[int | None] = []
    for x, good in zip(ll, ok):
        out.append(int(np.argmax(np.asarray(x, dtype=float) - mean)) if good else None)
    return out


def _chisquare(obs: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """scipy.stats.chisquare of the predicted letters' counts against the gold letters' counts (same total).

    Letters neither predicted nor gold drop out; a letter predicted but never gold makes the two
    distributions incompatible: (inf, 0)."""
    from scipy import stats

    keep = (obs > 0) | (gold > 0)
    obs, gold = obs[keep], gold[keep]
    if obs.size < 2 or gold.sum() == 0:
        return math.nan, math.nan
    if np.any((gold == 0) & (obs > 0)):
        return math.inf, 0.0
    res = stats.chisquare(obs, gold * obs.sum() / gold.sum())
    return float(res.statistic), float(res.pvalue)


def _letter_row(rs: list[dict], task: str, k: int) -> dict | None:
    pred_c, gold_c = np.zeros(k), np.zeros(k)
    n = correct = n_deb = correct_deb = 0
    for r in rs:
        items = _letter_items(r, task)
        if items is None:
            continue
        preds, golds = items["pred"], items["gold"]
        deb = _debiased(items["ll"], k) if items.get("ll") is not None else [None] * len(golds)
        for pr, g, d in zip(preds, golds, deb):
            if pr is None or g is None or not (0 <= pr < k and 0 <= g < k):
                continue
            pred_c[int(pr)] += 1
            gold_c[int(g)] += 1
            n += 1
            correct += int(pr == g)
            if d is not None:
                n_deb += 1
                correct_deb += int(d == g)
    if n == 0:
        return None
    chi2, p = _chisquare(pred_c, gold_c)
    return {"n": n, "seeds": sorted({r["seed"] for r in rs}), "pred": (pred_c / n).tolist(),
            "gold": (gold_c / n).tolist(), "acc": correct / n, "chi2": chi2, "p": p,
            "debiased_acc": correct_deb / n_deb if n_deb else None, "n_debiased": n_deb}  # fmt: skip


def each_point_as_row(records: Iterable[dict]) -> list[dict]:
    """Every sweep point as a row of its own (id `<row>@<param>=<value>`, label `<label> (<param> = <value>)`, main):
    for an lr sweep, whose points are one row's settings rather than a front."""
    out = []
    for r in records:
        sw = r.get("sweep")
        if sw and sw.get("value") is not None:
            r = {**r, "method": f"{r['method']}@{sw['param']}={sw['value']:g}",
                 "label": f"{r['label']} ({sw['param']} = {sw['value']:g})", "main": True}
        out.append(r)
    return out


def letter_analysis(records: Iterable[dict], letter_tasks: dict[str, str] | None = None,
                    points: bool = False) -> list[dict]:
    """Which answer letter each row picks on a letter task (MedMCQA), and whether a loss there is a letter prior.

    One block per (letter task, tuned task) with predictions recorded: the letter task itself as the tuned
    task (its `per_item`) or as a transfer task (`transfer.<task>`). Per row, main cells with seeds pooled:
    the share of predictions and of gold answers on each letter, accuracy, the chi-square test
    (scipy.stats.chisquare) of the predicted letters' counts against the gold letters' counts, and the
    *debiased accuracy*: per model (record), each choice's log-likelihood less that letter's mean
    log-likelihood over the model's items, argmax again. Against Base in the same block, with
    se = sqrt(b (1 − b) / n) of Base's accuracy b over its n items: a row *loses* when its accuracy is
    below b − se; its debiased accuracy *recovers* when ≥ Base's debiased accuracy − se (Base's own accuracy may
    be a letter prior); the loss is a *letter prior* when it loses, its predictions differ from the gold letters
    (p < PRIOR_P) and the debiased accuracy recovers.

    `points`: every sweep point is a row of its own (`each_point_as_row`), not only the main cells.

    Returns [{"task", "tuned", "letters", "points", "base": {"acc", "se", "debiased_acc"} | None, "rows": [{"method",
    "label", "n",
    "seeds", "pred", "gold" (shares per letter), "acc", "chi2", "p", "debiased_acc", "lost", "recovers",
    "prior"}]}]; lost/recovers/prior are None for Base and without Base.
    """
    letter_tasks = LETTER_TASKS if letter_tasks is None else letter_tasks
    main = main_cells(each_point_as_row(records) if points else records)
    labels = row_labels(main)
    seen = dict.fromkeys([r["task"] for r in main] + [t for r in main for t in (r.get("transfer") or {})])
    # a task is a letter task by its name or its name before a split ("medmcqa:validation")
    found = {t: letter_tasks.get(t) or letter_tasks.get(t.partition(":")[0]) for t in seen}
    blocks = []
    for task, letters in found.items():
        if not letters:
            continue
        k = len(letters)
        for tuned in task_order(main):
            rs = [r for r in main if r["task"] == tuned and _letter_items(r, task) is not None]
            if not rs:
                continue
            rows = []
            for m in row_order(rs):
                row = _letter_row([r for r in rs if r["method"] == m], task, k)
                if row is not None:
                    rows.append({"method": m, "label": labels[m], **row})
            base_row = next((r for r in rows if r["method"] == BASE), None)
            base = None
            if base_row is not None:
                b = base_row["acc"]
                base = {"acc": b, "se": math.sqrt(b * (1 - b) / base_row["n"]), "debiased_acc": base_row["debiased_acc"]}
            for row in rows:
                row["lost"] = row["recovers"] = row["prior"] = None
                if base is None or row["method"] == BASE:
                    continue
                row["lost"] = row["acc"] < base["acc"] - base["se"]
                # knowledge against knowledge: Base's own accuracy may be a letter prior (SmolLM2 answers A on
                # every MedMCQA item), so the debiased accuracy is held against Base's debiased accuracy
                known = base["debiased_acc"] if base["debiased_acc"] is not None else base["acc"]
                row["recovers"] = None if row["debiased_acc"] is None else row["debiased_acc"] >= known - base["se"]
                skewed = not math.isnan(row["p"]) and row["p"] < PRIOR_P
                row["prior"] = bool(row["lost"] and skewed and row["recovers"])
            blocks.append({"task": task, "tuned": tuned, "letters": letters, "points": points, "base": base,
                           "rows": rows})
    return blocks
