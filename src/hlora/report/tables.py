"""Tables as text: Markdown for report.md, CSV with raw numbers, LaTeX (booktabs) for papers.

Each table is a pure function of records or of a summary from `stats.py`. Conventions: a cell is
mean ± sample std (ddof=1) over seeds, the std left out for one seed; accuracy is in percent in
Markdown/LaTeX and a fraction in CSV; "—" marks a number that cannot be computed. Row names are the
labels the runner wrote into the records.

The general measures are named by their text ("C4 PPL", "WikiText-2 PPL (stage ν's text)": see
`load.general_names`); columns for the battery and for stage ν's own text appear only when the records
have them, and records that predate named texts keep the old headers ("PPL", "KL").
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .load import BASE, general_names, main_cells, role_row, row_labels, row_order, task_label, task_order
from .stats import COST_FIELDS, PRIOR_P, aggregate, front, mean_std

__all__ = [
    "ablation_rows",
    "front_points_markdown",
    "results_grid",
    "grid_markdown",
    "grid_csv",
    "grid_latex",
    "complexity",
    "complexity_markdown",
    "complexity_csv",
    "complexity_latex",
    "significance_markdown",
    "item_tests_markdown",
    "matched_markdown",
    "matched_csv",
    "matched_latex",
    "retention_markdown",
    "retention_csv",
    "sweeps_across_tasks_markdown",
    "compute_markdown",
    "compute_csv",
    "head_to_head_markdown",
    "letter_markdown",
    "letter_csv",
    "measures_note",
]

def ablation_rows(records: Iterable[dict]) -> list[str]:
    """The rows of the ablation table (the paper's Table 2): those whose records say `ablation`, record order."""
    return row_order(r for r in records if r.get("ablation"))


# ----------------------------------------------------------------------------- formatting

def _fmt(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2, pm: str = " ± ") -> str:
    if mean is None:
        return "—"
    if not math.isfinite(mean):
        return str(mean)
    s = f"{mean * scale:.{digits}f}"
    if std is not None and math.isfinite(std):
        s += f"{pm}{std * scale:.{digits}f}"
    return s


def _num(v: float | None) -> str:
    """A CSV number: 12 significant digits, empty for None."""
    return "" if v is None else f"{v:.12g}"


def _fmt_p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _md_escape(s: str) -> str:
    return s.replace("|", r"\|")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# Labels carry Greek letters (LoRA(ν+μ)) and a Unicode minus: LaTeX gets them as math.
_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                "μ": r"$\mu$", "ν": r"$\nu$", "φ": r"$\phi$", "λ": r"$\lambda$", "ρ": r"$\rho$",
                "β": r"$\beta$", "α": r"$\alpha$", "Ω": r"$\Omega$", "−": r"$-$", "±": r"$\pm$",
                "×": r"$\times$", "—": "--", "↓": r"$\downarrow$", "↑": r"$\uparrow$"}  # fmt: skip


def _tex(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def _latex_table(header: Sequence[str], rows: Iterable[Sequence[str]], caption: str, label: str,
                 align: str) -> str:  # fmt: skip
    """A booktabs table from cells already in LaTeX; `caption` is LaTeX source."""
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]  # fmt: skip
    lines += [" & ".join(row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main and ablation tables

def results_grid(records: Iterable[dict], methods: Sequence[str] | None = None) -> dict:
    """Rows = methods (first appearance), columns = tasks; cells from `aggregate` (main cells only).

    `methods` restricts and orders the rows (the ablation table passes `ablation_rows`); absent
    methods are dropped. Returns {"methods", "tasks", "cells", "labels", "names" (`general_names`)}.
    """
    records = list(records)
    cells = aggregate(records)
    main = main_cells(records)
    present = [m for m in row_order(main)]
    if methods is not None:
        present = [m for m in methods if m in present]
    tasks = [t for t in task_order(main) if any((m, t) in cells for m in present)]
    return {"methods": present, "tasks": tasks, "labels": row_labels(records), "names": general_names(records),
            "cells": {k: v for k, v in cells.items() if k[0] in present}}  # fmt: skip


def _grid_columns(grid: dict) -> list[tuple[str, str, str, float, Any]]:
    """(metric, Markdown header, LaTeX header, scale, best) per column of a task: general PPL and accuracy,
    then the battery's mean and stage ν's own text's PPL where the records have them."""
    names = grid.get("names") or general_names([])
    cols = [("general_ppl", f"{names['ppl']} ↓", _tex(names["ppl"]) + r"$\downarrow$", 1.0, min),
            ("acc", "Acc % ↑", r"Acc$\uparrow$", 100.0, max)]  # fmt: skip
    if names["battery"]:
        cols.append(("battery_acc", "Battery % ↑", r"Battery$\uparrow$", 100.0, max))
    if names["nu_ppl"]:
        cols.append(("nu_text_ppl", f"{names['nu_ppl']} ↓", _tex(names["nu_ppl"]) + r"$\downarrow$", 1.0, None))
    return cols


def _best(grid: dict) -> set[tuple[str, str, str]]:
    """(method, task, metric) of the best mean per column: lowest perplexity, highest accuracy (and battery)."""
    best: set[tuple[str, str, str]] = set()
    if len(grid["methods"]) < 2:
        return best
    for t in grid["tasks"]:
        col = {m: grid["cells"][(m, t)] for m in grid["methods"] if (m, t) in grid["cells"]}
        for metric, _, _, _, pick in _grid_columns(grid):
            if pick is None:
                continue
            vals = {m: c[metric] for m, c in col.items() if c.get(metric) is not None and math.isfinite(c[metric])}
            if len(vals) >= 2:
                target = pick(vals.values())
                best |= {(m, t, metric) for m, v in vals.items() if v == target}
    return best


def measures_note(names: dict) -> str:
    """What the named general measures are (empty for records that predate named texts)."""
    if not names["named"]:
        return ""
    if names["on_nu"]:
        what = (f"{names['ppl']}: perplexity on {names['text']}, the text stage ν (and replay) train on: stage ν's "
                "own distribution, not held out")
    else:
        what = f"{names['ppl']}: perplexity on {names['text']}, a text no stage trains on"
    parts = [what, f"{names['kl']}: KL(p_base ‖ p_model) per token on that text"]
    if names["nu_ppl"]:
        parts.append(f"{names['nu_ppl']}: perplexity on {names['nu_text']}, the text stage ν (and replay) train on")
    if names["battery"]:
        parts.append("Battery: unweighted mean zero-shot accuracy over the battery's tasks")
    if names["mixed"]:
        parts.append("the records measure general perplexity on different texts: compare only rows on the same one")
    return "; ".join(parts) + "."


def _seed_note(grid: dict) -> str:
    ns = sorted({c["n"] for c in grid["cells"].values()})
    if not ns:
        return "No cells."
    names = grid.get("names") or general_names([])
    tail = (" Accuracy in %; PPL = general perplexity (held-out general text)." if not names["named"]
            else " Accuracy in %. " + measures_note(names))  # fmt: skip
    if len(ns) == 1:
        one = f"Mean ± sample std (ddof=1) over {ns[0]} seeds." if ns[0] > 1 else "One seed per cell (no std)."
        return one + tail
    return (f"Mean ± sample std (ddof=1) over seeds; seeds per cell vary ({', '.join(map(str, ns))}); "
            "cells with one seed show no std." + tail)  # fmt: skip


def _label(grid: dict, m: str) -> str:
    return grid["labels"].get(m, m)


def grid_markdown(grid: dict, title: str | None = None) -> str:
    """Markdown table: per task `PPL ↓` and `Acc % ↑` (and the battery, stage ν's text), best mean per column
    in bold."""
    best = _best(grid)
    cols = _grid_columns(grid)
    header = ["Method"] + [f"{task_label(t)} {h}" for t in grid["tasks"] for _, h, _, _, _ in cols]
    rows = []
    for m in grid["methods"]:
        row = [_md_escape(_label(grid, m))]
        for t in grid["tasks"]:
            c = grid["cells"].get((m, t))
            if c is None:
                row += ["—"] * len(cols)
                continue
            for metric, _, _, scale, _ in cols:
                v = _fmt(c.get(metric), c.get(metric + "_std"), scale=scale)
                row.append(f"**{v}**" if (m, t, metric) in best else v)
        rows.append(row)
    lines = [f"### {title}", ""] if title else []
    lines += _md_table(header, rows) + ["", _seed_note(grid)]
    return "\n".join(lines) + "\n"


_GRID_METRICS = ("general_ppl", "general_bpb", "acc", "acc_norm")


def grid_csv(grid: dict) -> str:
    """Wide CSV, one row per method; per task n, PPL, bits per byte, acc and acc_norm (fractions), and the
    battery's mean and stage ν's own text's PPL where the records have them."""
    names = grid.get("names") or general_names([])
    metrics = _GRID_METRICS + ("battery_acc",) * names["battery"] + ("nu_text_ppl",) * bool(names["nu_ppl"])
    cols = ["method", "label"]
    for t in grid["tasks"]:
        cols += [f"{t}_n"] + [f"{t}_{metric}_{s}" for metric in metrics for s in ("mean", "std")]
    rows = []
    for m in grid["methods"]:
        row: list[Any] = [m, _label(grid, m)]
        for t in grid["tasks"]:
            c = grid["cells"].get((m, t))
            if c is None:
                row += [""] * (1 + 2 * len(metrics))
                continue
            row += [c["n"]] + [_num(c.get(metric + sfx)) for metric in metrics for sfx in ("", "_std")]
        rows.append(row)
    return _csv(cols, rows)


def grid_latex(grid: dict, caption: str, label: str) -> str:
    """A booktabs table with the paper's layout: a column group (PPL, Acc, and the battery and stage ν's text
    where present) per task.

    `caption` is LaTeX source (not escaped); labels and task names are escaped."""
    best = _best(grid)
    cols = _grid_columns(grid)
    nt, k = len(grid["tasks"]), len(cols)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + (" " + "c" * k) * nt + "}", r"\toprule"]  # fmt: skip
    if nt:
        lines.append(" & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{_tex(task_label(t))}}}" for t in grid["tasks"])
                     + r" \\")  # fmt: skip
        lines.append("".join(rf"\cmidrule(lr){{{2 + k * i}-{1 + k * (i + 1)}}}" for i in range(nt)))
    lines += ["Method" + "".join(" & " + tex for _, _, tex, _, _ in cols) * nt + r" \\", r"\midrule"]
    for m in grid["methods"]:
        row = [_tex(_label(grid, m))]
        for t in grid["tasks"]:
            c = grid["cells"].get((m, t))
            if c is None:
                row += ["--"] * k
                continue
            for metric, _, _, scale, _ in cols:
                v = _fmt(c.get(metric), c.get(metric + "_std"), scale=scale, pm=r"$\pm$")
                row.append(rf"\textbf{{{v}}}" if (m, t, metric) in best else v)
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- importance cost (paper 6.2)

# What an importance kind (the `importance_kind` a method's records carry) is called in the complexity table.
_KIND_NAMES = {"si": "SI importance", "fisher": "Diagonal Fisher, LoRA targets"}


def _kind(records: list[dict], method: str | None) -> str | None:
    return next((r["importance_kind"] for r in records if r["method"] == method and r.get("importance_kind")), None)


def _pick(records: list[dict], method: str | None, kind: str | None) -> tuple[list[dict], str]:
    """The records that carry one importance's cost: the row's main cells, else any of that kind."""
    labels = row_labels(records)
    rs = [r for r in main_cells(records) if r["method"] == method]
    if any(r["importance_seconds"] is not None or r["importance_bytes"] is not None for r in rs):
        return rs, labels[method]
    rs = [r for r in records if kind is not None and r.get("importance_kind") == kind]
    return rs, ",".join(labels[m] for m in row_order(rs))


def _cost_stats(rs: list[dict], sec_key: str, byte_key: str) -> dict:
    secs = [r[sec_key] for r in rs if r.get(sec_key) is not None]
    byts = [r[byte_key] for r in rs if r.get(byte_key) is not None]
    s_mean, s_std = mean_std(secs) if secs else (None, None)
    return {"n": max(len(secs), len(byts)), "seconds": s_mean, "seconds_std": s_std,
            "bytes": float(np.mean(byts)) if byts else None}  # fmt: skip


def complexity(records: Iterable[dict], reference: str | None = None, rival: str | None = None) -> dict:
    """Importance cost: the reference's importance (SI, HLoRA) vs the rival's (diagonal Fisher on the LoRA targets,
    EWC-LoRA) vs full-model Fisher, with ratios; the two rows default to the rows whose records say role
    "reference" and "rival". Means over the records that carry each number (None where none does)."""
    records = list(records)
    labels = row_labels(records)
    ref, riv = reference or role_row(records, "reference"), rival or role_row(records, "rival")
    (ref_kind, riv_kind) = (_kind(records, ref) or "si", _kind(records, riv) or "fisher")
    si_rs, si_src = _pick(records, ref, ref_kind)
    fi_rs, fi_src = _pick(records, riv, riv_kind)

    def name(kind, row):
        return f"{_KIND_NAMES.get(kind, kind)} ({labels.get(row, row)})" if row else _KIND_NAMES.get(kind, kind)

    rows = [
        {"name": name(ref_kind, ref), "source": si_src, **_cost_stats(si_rs, "importance_seconds", "importance_bytes")},
        {"name": name(riv_kind, riv), "source": fi_src, **_cost_stats(fi_rs, "importance_seconds", "importance_bytes")},
        {"name": "Full-model diagonal Fisher", "source": "full_fisher_*",
         **_cost_stats(records, "full_fisher_seconds", "full_fisher_bytes")},
    ]  # fmt: skip
    si, fi, full = rows

    def ratio(a, b):
        return a / b if a is not None and b not in (None, 0) else None

    ratios = [
        {"name": "Fisher (targets) time / SI time", "value": ratio(fi["seconds"], si["seconds"]), "unit": "x"},
        {"name": "Full-model Fisher time / SI time", "value": ratio(full["seconds"], si["seconds"]), "unit": "x"},
        {"name": "SI storage / Fisher (targets) storage", "value": ratio(si["bytes"], fi["bytes"]), "unit": "%"},
        {"name": "SI storage / full-model Fisher storage", "value": ratio(si["bytes"], full["bytes"]), "unit": "%"},
    ]
    return {"rows": rows, "ratios": ratios}


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def _fmt_secs(s: float | None, std: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.3g}" + (f" ± {std:.2g}" if std is not None else "")


def _fmt_ratio(r: dict) -> str:
    v = r["value"]
    if v is None:
        return "—"
    if r["unit"] == "x":
        return f"{v:.0f}×" if v >= 100 else f"{v:.3g}×"
    return f"{100 * v:.3g} %"


def complexity_markdown(comp: dict, title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    body = [[r["name"], _md_escape(r["source"] or "—"), str(r["n"]), _fmt_secs(r["seconds"], r["seconds_std"]),
             _fmt_bytes(r["bytes"])] for r in comp["rows"]]  # fmt: skip
    lines += _md_table(["Importance", "From", "n", "Time (s)", "Storage"], body)
    lines += [""] + _md_table(["Ratio", "Value"], [[r["name"], _fmt_ratio(r)] for r in comp["ratios"]])
    lines += ["", "SI time is the time added to stage ν by recording importance; Fisher time is the separate "
              "pass over general data. Storage is the importance file as saved; the full-model Fisher is "
              "one fp32 value per weight of the model."]  # fmt: skip
    return "\n".join(lines) + "\n"


def complexity_csv(comp: dict) -> str:
    rows = [["importance", r["name"], r["source"], r["n"], _num(r["seconds"]), _num(r["seconds_std"]),
             _num(r["bytes"]), ""] for r in comp["rows"]]  # fmt: skip
    rows += [["ratio", r["name"], "", "", "", "", "", _num(r["value"])] for r in comp["ratios"]]
    return _csv(["kind", "name", "source", "n", "seconds_mean", "seconds_std", "bytes_mean", "ratio"], rows)


def complexity_latex(comp: dict, caption: str, label: str) -> str:
    rows = [[_tex(r["name"]), str(r["n"]), _tex(_fmt_secs(r["seconds"], r["seconds_std"])),
             _tex(_fmt_bytes(r["bytes"]))] for r in comp["rows"]]  # fmt: skip
    rows += [[rf"\multicolumn{{3}}{{l}}{{{_tex(r['name'])}}}", _tex(_fmt_ratio(r))] for r in comp["ratios"]]
    return _latex_table(["Importance", "$n$", "Time (s)", "Storage"], rows, caption, label, "lrrr")


# ----------------------------------------------------------------------------- significance over seeds

def significance_markdown(rows: list[dict], labels: dict[str, str] | None = None, method: str = "",
                          names: dict | None = None) -> str:  # fmt: skip
    """Welch t-tests of `stats.seed_significance` as a Markdown table (`names`: `load.general_names`)."""
    labels = labels or {}
    ppl = (names or general_names([]))["ppl_short"]
    me = labels.get(method, method)
    if not rows:
        return f"No seed-level test: {me} and the others need ≥ 2 seeds per task.\n"
    lines = [f"Welch t-tests over seeds of the main cells, {me} minus the other method (Δ{ppl} < 0 and "
             "ΔAcc > 0 favour it); p two-sided, n/a where both sides have zero variance.", ""]  # fmt: skip
    lines += _md_table(["Task", "vs", "n", f"Δ{ppl}", f"p ({ppl})", "ΔAcc (points)", "p (Acc)"],
                       [[_md_escape(task_label(r["task"])), _md_escape(labels.get(r["other"], r["other"])),
                         f"{r['n']} vs {r['n_other']}", f"{r['general_ppl_diff']:+.3f}", _fmt_p(r["general_ppl_p"]),
                         f"{100 * r['acc_diff']:+.2f}", _fmt_p(r["acc_p"])] for r in rows])  # fmt: skip
    return "\n".join(lines) + "\n"


def item_tests_markdown(comps: dict[str, dict], labels: dict[str, str], a: str, b: str) -> str:
    """Per-item t-tests per task (comparisons from `stats.item_comparison`, keyed by task)."""
    rows = [[_md_escape(task_label(t)), c["key"], "paired" if c["paired"] else "Welch",
             f"{c['a'].size} / {c['b'].size}", f"{c['a'].mean() - c['b'].mean():+.4f}", _fmt_p(c["p"])]
            for t, c in comps.items()]  # fmt: skip
    lines = [f"Per-item t-tests, {_md_escape(labels.get(a, a))} minus {_md_escape(labels.get(b, b))}, items pooled "
             "over seeds (paired when the items line up):", ""]  # fmt: skip
    return "\n".join(lines + _md_table(["Task", "Score", "Test", "n", "Δ mean", "p"], rows)) + "\n"


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
    lines += [f"{ppl} and {kl} are interpolated linearly along each row's seed-mean front (its sweep points sorted "
              "by accuracy) at acc*, — where acc* lies outside the front; ± is the std over the seeds (in "
              "brackets) whose own front reaches acc*. Acc under cap: highest accuracy along the front with "
              f"{ppl} ≤ the cap. "
              f"Dominated area: the region of the (accuracy points, {ppl}) plane between Base and the row's points "
              f"that beat Base in both. Δ{ppl}: the reference's main {ppl} minus the row's {ppl} at the reference's "
              "accuracy, seed by seed (negative favours the reference), paired t-test over those seeds."]  # fmt: skip
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
    return next((r["label"] for r in s["rows"] if r["method"] == s["reference"]), s["reference"])


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


# ----------------------------------------------------------------------------- compute

_COMPUTE_HEADER = ["Method", "Cells", "Wall s", "Train s", "Steps", "Domain tokens", "General tokens",
                   "Extra forward tokens"]  # fmt: skip


def _count(v: float | None, secs: bool) -> str:
    if v is None:
        return "—"
    return f"{v:,.1f}" if secs else f"{v:,.0f}"


def compute_markdown(rows: Sequence[dict]) -> str:
    """Cost per row (rows from `stats.compute_summary`)."""
    body = [[_md_escape(r["label"]), str(r["n"])] + [_count(r[k], k.endswith("seconds")) for k in COST_FIELDS]
            for r in rows]  # fmt: skip
    lines = _md_table(_COMPUTE_HEADER, body)
    total, cells = sum(r.get("wall_total", 0.0) for r in rows), sum(r["n"] for r in rows)
    lines += ["", f"All {cells} cells together: {total:,.0f} s of wall time ({total / 3600:.2f} h), each cell "
              "counting what it ran itself (a cached adapter or evaluation it reused is counted once, where it ran)."]
    lines += ["", "Mean over a row's cells (all tasks, seeds and sweep points), as the runner recorded them; "
              "— where no cell has the number. Extra forward tokens: tokens a method runs through the model "
              "beyond its training batches (e.g. the base model's pass for a KL term)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def compute_csv(rows: Sequence[dict]) -> str:
    return _csv(["method", "label", "cells", *COST_FIELDS],
                [[r["method"], r["label"], r["n"]] + [_num(r[k]) for k in COST_FIELDS] for r in rows])  # fmt: skip


def front_points_markdown(records: Iterable[dict], task: str) -> str:
    """Every row's front on one task, a line per row: its sweep values and, per point, the seed means of
    domain accuracy, general perplexity and KL to Base (and the battery's mean and stage ν's text's
    perplexity where measured): the numbers behind fronts_<task>.png."""
    records = list(records)
    recs = [r for r in records if r["task"] == task]
    labels, names = row_labels(records), general_names(records)
    rows = []
    for m in row_order(recs):
        pts = [p for p in front(recs, m, task) if p["n"]]
        own = [p for p in pts if not p["end"]]  # not the ends borrowed from other rows
        param = next((p["sweep"][0] for p in own if p["sweep"]), None)
        name = _md_escape(labels.get(m, m))
        if param:
            name += f" {param} = " + " / ".join(f"{p['sweep'][1]:g}" for p in own)
        seeds = sorted({s for p in own for s in p["seeds"]})

        def col(metric, scale=1.0, digits=2):
            return " / ".join("—" if p.get(metric) is None else f"{scale * p[metric]:.{digits}f}" for p in own)

        row = [name, col("acc", 100.0, 1), col("general_ppl"), col("general_kl", digits=3)]
        if names["battery"]:
            row.append(col("battery_acc", 100.0, 1))
        if names["nu_ppl"]:
            row.append(col("nu_text_ppl"))
        rows.append(row + [",".join(map(str, seeds))])
    header = ["Row (sweep)", "Acc %", f"{names['ppl']} ↓", f"{names['kl']} to Base ↓"]
    header += ["Battery % ↑"] * names["battery"] + [f"{names['nu_ppl']} ↓"] * bool(names["nu_ppl"]) + ["seeds"]
    return "\n".join(_md_table(header, rows)) + "\n"


def sweeps_across_tasks_markdown(records: Iterable[dict]) -> str:
    """Each row swept (two or more values) and run on two or more tasks: one line per sweep value, its
    seed means (acc, PPL, KL to Base, and the battery's mean where measured) on every task side by side, so
    one can see whether a single value (φ, λ, ...) is best everywhere. Empty when no row has a sweep on two
    tasks."""
    records = list(records)
    labels, tasks, names = row_labels(records), task_order(records), general_names(records)
    metrics = [("Acc %", "acc", 100.0, 1), (f"{names['ppl']} ↓", "general_ppl", 1.0, 2),
               (f"{names['kl']} ↓", "general_kl", 1.0, 3)]
    metrics += [("Battery % ↑", "battery_acc", 100.0, 1)] * names["battery"]
    blocks = []
    for m in row_order(records):
        fronts = {t: [p for p in front(records, m, t) if p["n"] and not p["end"] and p["sweep"]] for t in tasks}
        fronts = {t: f for t, f in fronts.items() if f}
        if len(fronts) < 2 or max(map(len, fronts.values())) < 2:
            continue  # on one task only, or never swept (one value of its parameter everywhere)
        param = next(iter(fronts.values()))[0]["sweep"][0]
        values = sorted({p["sweep"][1] for f in fronts.values() for p in f})
        header = [param] + [f"{task_label(t)} {c}" for t in fronts for c, _, _, _ in metrics]
        rows = []
        for v in values:
            row = [f"{v:g}"]
            for f in fronts.values():
                p = next((p for p in f if p["sweep"] == (param, v)), None)
                row += (["—"] * len(metrics) if p is None
                        else [_fmt(p.get(k), None, scale, digits) for _, k, scale, digits in metrics])  # fmt: skip
            rows.append(row)
        blocks += [f"#### {_md_escape(labels.get(m, m))} over {param}", ""] + _md_table(header, rows) + [""]
    if not blocks:
        return ""
    blocks.append("Seed means of each sweep point (a task's seeds as in its front table); a value missing on a "
                  "task was not run there.")
    return "\n".join(blocks) + "\n"


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
        "Main cells, items pooled over seeds. Predicted / Gold: share of items whose predicted / gold answer is each "
        "letter. χ²: scipy.stats.chisquare of the predicted letters' counts against the gold letters' counts "
        "(∞, p 0: a letter predicted that is never gold). Debiased acc: for each model (cell), each choice's "
        "log-likelihood less that letter's mean log-likelihood over the model's items, argmax again; it removes a "
        "preference for a letter whatever the question. The rule: a row *loses* when its accuracy is below Base's "
        "by more than one standard error of Base's accuracy (se = √(b(1−b)/n)); the loss is a *letter prior* when "
        f"its predictions differ from the gold letters (χ² p < {PRIOR_P:g}) and its debiased accuracy is back at "
        "Base's level (≥ Base − se): the knowledge is there and only the letter the model favours moved. A loss "
        "whose debiased accuracy stays below Base's is lost knowledge (or more than a letter prior).")
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
