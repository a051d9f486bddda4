"""Tables that set rows against a reference: matched accuracy, cross-task retention, head to head, answer letters.

Each is a pure function of a summary from `stats.py`, in Markdown, CSV and (matched) LaTeX, with the conventions of
`tables.py` (whose formatting helpers these share).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .load import BASE, general_names, task_label
from .letters import PRIOR_P
from .tables import _csv, _fmt, _fmt_p, _latex_table, _md_escape, _md_table, _num, _tex, measures_note

__all__ = [
    "matched_markdown",
    "matched_csv",
    "matched_latex",
    "retention_markdown",
    "retention_csv",
    "head_to_head_markdown",
    "letter_markdown",
    "letter_csv",
]

# ----------------------------------------------------------------------------- matched accuracy

def _matched_cells(s: dict, row: dict, names: dict) -> list[str]:
    """Display cells of one row of the matched-accuracy table (plain text, Markdown-safe)."""
    t = row["test"]
    # ppl_n counts the seeds whose own front reaches acc*: none can while the seed-mean front does
    n = row["ppl_n"]
    seeds = "" if row["ppl"] is None else " (seed means only)" if n == 0 else f" ({n} seed{'s' if n != 1 else ''})"
    ppl = _fmt(row["ppl"], row["ppl_std"]) + seeds
    kl = "—" if row["kl"] is None else f"{row['kl']:.4f}"
    test = ["—", "—", "—"] if t is None or t["n"] == 0 else [f"{t['diff']:+.3f}", str(t["n"]), _fmt_p(t["p"])]
    cells = [str(row["points"]), ppl, kl, _fmt(row["acc_cap"], None, 100.0), _fmt(row["area"], None)] + test
    if names["kl_test"]:
        kt = row.get("kl_test")
        cells.append("—" if kt is None or kt["n"] == 0 else _delta(kt["diff"], kt["p"], 1.0, 3) + f", n {kt['n']}")
    if names["battery"]:
        bt = row.get("battery_test")
        cells += [_fmt(row.get("battery"), None, 100.0),
                  "—" if bt is None or bt["n"] == 0 else _delta(bt["diff"], bt["p"], 100.0) + f", n {bt['n']}"]
    if names["nu_ppl"]:
        cells.append(_fmt(row.get("nu_ppl"), None))
    return cells


def _matched_title(s: dict, labels_ref: str, names: dict) -> str:
    acc = "—" if s["acc_ref"] is None else f"{100 * s['acc_ref']:.2f} %"
    cap = "—" if s["cap"] is None else f"{s['cap']:.3f}"
    cap_text = f"cap = Base {names['ppl_short']} × {s['cap_ratio']:g} = {cap}"
    return f"{task_label(s['task'])}: at {labels_ref}'s accuracy acc* = {acc}; {cap_text}"


def _matched_header(names: dict) -> list[str]:
    ppl, kl, short = names["ppl"], names["kl"], names["ppl_short"]
    header = ["Method", "Points", f"{ppl} @ acc* ↓", f"{kl} @ acc* ↓", "Acc % under cap ↑",
              f"Dominated area ↑ (acc points × {short})", f"Δ{short} ref − row (paired)", "n", "p"]  # fmt: skip
    if names["kl_test"]:
        header.append(f"Δ{kl} ref − row (p), n")
    if names["battery"]:
        header += ["Battery % @ acc* ↑", "ΔBattery pts ref − row (p), n"]
    if names["nu_ppl"]:
        header.append(f"{names['nu_ppl']} @ acc* ↓")
    return header


def matched_markdown(summaries: Sequence[dict], names: dict | None = None) -> str:
    """The matched-accuracy table, one block per task (summaries from `stats.matched_summary`; `names` from
    `load.general_names`: the text the perplexity is on, and whether to show the battery's columns)."""
    names = names or general_names([])
    lines = []
    for s in summaries:
        ref = next((r["label"] for r in s["rows"] if r["method"] == s["reference"]), s["reference"])
        lines += [f"#### {_matched_title(s, ref, names)}", ""]
        lines += _md_table(_matched_header(names),
                           [[_md_escape(r["label"])] + _matched_cells(s, r, names) for r in s["rows"]])
        lines.append("")
    ppl, kl = names["ppl_short"], names["kl"]
    lines += [f"{ppl} and {kl} at acc*: the best each row's seed-mean front reaches with at least acc*, each "
              "measure on its own (linear interpolation between its sweep points sorted by accuracy, or a point "
              "with more accuracy and less forgetting where the front bends), — where acc* lies outside the "
              "front; ± is the std over the seeds (in "
              "brackets) whose own front reaches acc*. Acc under cap: highest accuracy along the front with "
              f"{ppl} ≤ the cap. "
              f"Dominated area: the region of the (accuracy points, {ppl}) plane between Base and the row's points "
              f"that beat Base in both. Δ{ppl}: the reference's main {ppl} minus the row's {ppl} at the reference's "
              "accuracy, seed by seed (negative favours the reference), paired t-test over those seeds."]  # fmt: skip
    if names["kl_test"]:
        lines[-1] += (f" Δ{kl}: the same for {kl}, the row's interpolated at the reference's accuracy seed by seed "
                      "(negative favours the reference).")
    if names["battery"]:
        lines[-1] += (" Battery: the battery's mean accuracy, interpolated the same way; ΔBattery: the reference's "
                      "main battery accuracy minus the row's at the reference's accuracy, seed by seed (positive "
                      "favours the reference), p of the paired t-test over those seeds.")
    if names["named"]:
        lines[-1] += " " + measures_note(names)
    return "\n".join(lines) + "\n"


def matched_csv(summaries: Sequence[dict], names: dict | None = None) -> str:
    names = names or general_names([])
    header = ["task", "method", "label", "points", "acc_ref", "ppl", "ppl_std", "ppl_n", "kl", "cap",
              "acc_under_cap", "dominated_area_accpts_x_ppl", "paired_diff", "paired_n", "paired_p"]  # fmt: skip
    if names["kl_test"]:
        header += ["kl_paired_diff", "kl_paired_n", "kl_paired_p"]
    if names["battery"]:
        header += ["battery_acc", "battery_paired_diff", "battery_paired_n", "battery_paired_p"]
    if names["nu_ppl"]:
        header.append("nu_text_ppl")
    rows = []
    for s in summaries:
        for r in s["rows"]:
            t = r["test"] or {"diff": None, "n": "", "p": None}
            row = [s["task"], r["method"], r["label"], r["points"], _num(s["acc_ref"]), _num(r["ppl"]),
                   _num(r["ppl_std"]), r["ppl_n"], _num(r["kl"]), _num(s["cap"]), _num(r["acc_cap"]),
                   _num(r["area"]), _num(t["diff"]), t["n"], _num(t["p"])]  # fmt: skip
            if names["kl_test"]:
                kt = r.get("kl_test") or {"diff": None, "n": "", "p": None}
                row += [_num(kt["diff"]), kt["n"], _num(kt["p"])]
            if names["battery"]:
                bt = r.get("battery_test") or {"diff": None, "n": "", "p": None}
                row += [_num(r.get("battery")), _num(bt["diff"]), bt["n"], _num(bt["p"])]
            if names["nu_ppl"]:
                row.append(_num(r.get("nu_ppl")))
            rows.append(row)
    return _csv(header, rows)


def matched_latex(s: dict, label: str, names: dict | None = None) -> str:
    names = names or general_names([])
    ref = next((r["label"] for r in s["rows"] if r["method"] == s["reference"]), s["reference"])
    rows = [[_tex(r["label"])] + [_tex(c) for c in _matched_cells(s, r, names)] for r in s["rows"]]
    header = _matched_header(names)
    return _latex_table([_tex(h) for h in header], rows, _tex(_matched_title(s, ref, names)), label,
                        "l" + "r" * (len(header) - 1))


# ----------------------------------------------------------------------------- cross-task retention

def _retention_cell(s: dict, row: dict, target: str) -> str:
    cell = row["cells"].get(target)
    if cell is None:
        return "—"
    mean, std, _ = cell
    base = s["base"].get(target)
    extra = [f"{100 * (mean - base):+.2f}"] if base is not None else []
    p = row["p"].get(target)  # nan for the reference itself
    if p is not None and math.isfinite(p):
        extra.append(f"p {_fmt_p(p)}")
    return _fmt(mean, std, 100.0) + (f" ({'; '.join(extra)})" if extra else "")


def _reference_label(s: dict) -> str:
    return next((r["label"] for r in s["rows"] if r["method"] == s["reference"]), s["reference"] or "the reference")


def retention_markdown(summaries: Sequence[dict]) -> str:
    """Accuracy on the tasks a model was not tuned on (summaries from `stats.transfer_summary`)."""
    lines = []
    for s in summaries:
        lines += [f"#### Tuned on {task_label(s['task'])}", ""]
        header = ["Method"] + [f"{task_label(t)} Acc %" for t in s["targets"]]
        lines += _md_table(header, [[_md_escape(r["label"])] + [_retention_cell(s, r, t) for t in s["targets"]]
                                    for r in s["rows"]])  # fmt: skip
        lines.append("")
    ref = _reference_label(summaries[0]) if summaries else "the reference"
    lines.append("Accuracy % on each other task, mean ± std over seeds of the main cells; in brackets the "
                 "difference from Base in points (negative = forgotten) and p of a paired t-test over seeds against "
                 f"{ref}'s main cell (none with fewer than two seeds, or where the difference is the same on "
                 "every seed).")
    return "\n".join(lines) + "\n"


def retention_csv(summaries: Sequence[dict]) -> str:
    rows = []
    for s in summaries:
        for r in s["rows"]:
            for t, (mean, std, n) in r["cells"].items():
                base = s["base"].get(t)
                rows.append([s["task"], r["method"], r["label"], t, n, _num(mean), _num(std), _num(base),
                             _num(None if base is None else mean - base), _num(r["p"].get(t))])  # fmt: skip
    return _csv(["tuned_task", "method", "label", "transfer_task", "n", "acc_mean", "acc_std", "base_acc",
                 "delta_vs_base", "p_vs_reference"], rows)  # fmt: skip


# ----------------------------------------------------------------------------- head to head

def _delta(d: float | None, p: float, scale: float = 1.0, digits: int = 2) -> str:
    if d is None:
        return "—"
    v = round(scale * d, digits) + 0.0  # + 0.0: no "-0.00" from rounding noise
    return f"{v:+.{digits}f} ({_fmt_p(p)})"


def head_to_head_markdown(h: dict, names: dict | None = None) -> str:
    """One task's head-to-head table (from `stats.head_to_head`): every front point against the
    reference's main cell, differences row − reference with paired p-values over seeds (`names`:
    `load.general_names`, naming the text and adding the battery's and stage ν's text's columns)."""
    names = names or general_names([])
    ref_label = next((r["label"] for r in h["rows"] if r["method"] == h["reference"] and r["main"]), h["reference"])
    rows = []
    for r in h["rows"]:
        point = "main" if r["sweep"] is None else f"{r['sweep'][0]} = {r['sweep'][1]:g}"
        if r["method"] == h["reference"] and r["main"]:
            point += " (reference)"
        row = [_md_escape(r["label"]), point, _fmt(r["acc"], None, 100.0, 1),
               _delta(r["d_acc"], r["p_acc"], 100.0, 1), _fmt(r["general_ppl"], None),
               _delta(r["d_general_ppl"], r["p_general_ppl"]), _fmt(r["general_kl"], None, digits=3),
               _delta(r["d_general_kl"], r["p_general_kl"], digits=3)]  # fmt: skip
        if names["battery"]:
            row += [_fmt(r.get("battery_acc"), None, 100.0, 1),
                    _delta(r.get("d_battery_acc"), r.get("p_battery_acc", math.nan), 100.0, 1)]
        if names["nu_ppl"]:
            row += [_fmt(r.get("nu_text_ppl"), None), _delta(r.get("d_nu_text_ppl"), r.get("p_nu_text_ppl", math.nan))]
        rows.append(row + [",".join(map(str, r["seeds"]))])
    ppl, kl, short = names["ppl"], names["kl"], names["ppl_short"]
    header = ["Row", "Point", "Acc %", "ΔAcc pts (p)", f"{ppl} ↓", f"Δ{short} (p)", f"{kl} to Base ↓",
              f"Δ{kl} (p)"]
    if names["battery"]:
        header += ["Battery % ↑", "ΔBattery pts (p)"]
    if names["nu_ppl"]:
        header += [f"{names['nu_ppl']} ↓", "Δ (p)"]
    header.append("seeds")
    ref = h["ref"]
    extra = f", battery {_fmt(ref.get('battery_acc'), None, 100.0, 1)} %" if names["battery"] else ""
    lines = [f"#### {task_label(h['task'])}: every point against {ref_label}'s main cell "
             f"(acc {_fmt(ref['acc'], None, 100.0, 1)} %, {short} {_fmt(ref['general_ppl'], None)}, "
             f"{kl} {_fmt(ref['general_kl'], None, digits=3)}{extra}; seeds {','.join(map(str, h['ref_seeds']))})", ""]
    lines += _md_table(header, rows)
    note = ("Δ = row − reference, mean over the seeds both have (paired by seed); p: paired t-test over those "
            f"seeds (n/a with one seed). Negative Δ{short} / Δ{kl} favour the row; a small ΔAcc with a large p "
            "means the two are at the same domain gain.")  # fmt: skip
    if names["battery"]:
        note += " Positive ΔBattery favours the row."
    lines += ["", note]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- answer letters

def _shares(v: Sequence[float]) -> str:
    return " / ".join(f"{100 * x:.0f}" for x in v)


def _chi2(row: dict) -> str:
    if math.isnan(row["p"]):
        return "n/a"
    stat = "∞" if math.isinf(row["chi2"]) else f"{row['chi2']:.1f}"
    return f"{stat} ({_fmt_p(row['p'])})"


def _verdict(block: dict, row: dict) -> str:
    if block["base"] is None:
        return "— (no Base)"
    if row["method"] == BASE:
        return "reference"
    if not row["lost"]:
        return "no loss"
    if row["prior"]:
        return "yes: letter prior"
    if not row["recovers"]:
        return "no: debiased acc stays below Base"
    return f"no: letters as gold (p ≥ {PRIOR_P:g})"


def letter_markdown(blocks: Sequence[dict]) -> str:
    """The answer-letter analysis (blocks from `stats.letter_analysis`): per row, which letter it picks
    against the gold letters, accuracy, the chi-square test, the debiased accuracy and the verdict."""
    lines = []
    for b in blocks:
        t, letters = task_label(b["task"]), " / ".join(b["letters"])
        where = f"tuned on {t}" if b["tuned"] == b["task"] else f"as a transfer task, tuned on {task_label(b['tuned'])}"
        base = "" if b["base"] is None else f"; Base {100 * b['base']['acc']:.1f} % ± {100 * b['base']['se']:.1f} (se)"
        lines += [f"#### {t} answer letters, {where}{base}", ""]
        header = ["Row", "Items (seeds)", f"Predicted {letters} %", f"Gold {letters} %", "Acc %",
                  "χ² pred vs gold (p)", "Debiased acc %", "Loss = letter prior?"]  # fmt: skip
        rows = [[_md_escape(r["label"]), f"{r['n']} ({','.join(map(str, r['seeds']))})", _shares(r["pred"]),
                 _shares(r["gold"]), f"{100 * r['acc']:.1f}", _chi2(r), _fmt(r["debiased_acc"], None, 100.0, 1),
                 _verdict(b, r)] for r in b["rows"]]  # fmt: skip
        lines += _md_table(header, rows) + [""]
    if not blocks:
        return ""
    lines.append(
        ("Every sweep point as its own row" if any(b.get("points") for b in blocks) else "Main cells") +
        ", items pooled over seeds. Predicted / Gold: share of items whose predicted / gold answer is each "
        "letter. χ²: scipy.stats.chisquare of the predicted letters' counts against the gold letters' counts "
        "(∞, p 0: a letter predicted that is never gold). Debiased acc: for each model (cell), each choice's "
        "log-likelihood less that letter's mean log-likelihood over the model's items, argmax again; it removes a "
        "preference for a letter whatever the question. The rule: a row *loses* when its accuracy is below Base's "
        "by more than one standard error of Base's accuracy (se = √(b(1−b)/n)); the loss is a *letter prior* when "
        f"its predictions differ from the gold letters (χ² p < {PRIOR_P:g}) and its debiased accuracy is back at "
        "Base's debiased level (≥ Base's debiased accuracy − se; Base's own accuracy can be a letter prior): the "
        "knowledge is there and only the letter the model favours moved. A loss whose debiased accuracy stays below "
        "Base's is lost knowledge (or more than a letter prior).")
    return "\n".join(lines) + "\n"


def letter_csv(blocks: Sequence[dict]) -> str:
    header = ["task", "tuned_task", "method", "label", "n", "letters", "pred_shares", "gold_shares", "acc", "chi2",
              "chi2_p", "debiased_acc", "base_acc", "base_se", "lost", "recovers", "letter_prior"]  # fmt: skip
    rows = []
    for b in blocks:
        base = b["base"] or {"acc": None, "se": None}
        for r in b["rows"]:
            rows.append([b["task"], b["tuned"], r["method"], r["label"], r["n"], b["letters"],
                         " ".join(_num(x) for x in r["pred"]), " ".join(_num(x) for x in r["gold"]), _num(r["acc"]),
                         _num(r["chi2"]), _num(r["p"]), _num(r["debiased_acc"]), _num(base["acc"]), _num(base["se"]),
                         "" if r["lost"] is None else r["lost"], "" if r["recovers"] is None else r["recovers"],
                         "" if r["prior"] is None else r["prior"]])  # fmt: skip
    return _csv(header, rows)
