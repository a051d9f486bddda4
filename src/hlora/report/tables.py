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

from .load import general_names, main_cells, role_row, row_labels, row_order, task_label, task_order
from .stats import COST_FIELDS, aggregate, front, mean_std

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
    "sweeps_across_tasks_markdown",
    "compute_markdown",
    "compute_csv",
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
    me = labels.get(method, method) or "the reference row"
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
