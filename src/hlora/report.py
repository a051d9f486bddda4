"""Reports from `results.json` only: tables (Markdown, CSV, LaTeX), figures (PNG) and significance tests.

Everything here is a pure function of the records in `results.json` (see DESIGN.md section 5); the
report never opens a run directory, a model or an importance file. `write_report` is the entry
point of `hlora report`; `inspect_importance` is the one of `hlora inspect` (it takes per-module
norms, so this module needs no torch).

Conventions (the paper's Tables 1 and 2):
- A table cell is mean ± sample standard deviation (ddof=1) over seeds; the std is left out when a
  cell has one seed. Accuracy is shown in percent in Markdown/LaTeX and kept as a fraction in CSV.
- φ-sweep cells (`sweep: true`) never enter the tables; they feed the φ figure and the
  accuracy-vs-perplexity plane.
- Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display);
  a figure whose data is absent is skipped with a note, never an error.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .files import atomic_path

__all__ = [
    "METHOD_ORDER",
    "ABLATION_METHODS",
    "ResultsError",
    "load_results",
    "ttest",
    "mean_std",
    "aggregate",
    "results_grid",
    "grid_markdown",
    "grid_csv",
    "grid_latex",
    "complexity",
    "complexity_markdown",
    "complexity_csv",
    "complexity_latex",
    "seed_significance",
    "item_scores",
    "layer_weights",
    "entropy",
    "importance_matrix",
    "importance_heatmap",
    "importance_summary",
    "inspect_importance",
    "plot_loss_curves",
    "plot_phi_sweep",
    "plot_violin",
    "plot_acc_vs_ppl",
    "write_report",
]

def _write_text(path: str | Path, text: str) -> None:
    """Atomic write in UTF-8 whatever the locale (the tables hold ±, μ, ν, φ)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------- names and order

METHOD_ORDER = (
    "base",
    "lora_mu",
    "lora_nu_mu",
    "rslora",
    "ewc_lora",
    "hlora",
    "hlora_no_layer",
    "hlora_no_layer_element",
)
ABLATION_METHODS = ("hlora", "hlora_no_layer", "hlora_no_layer_element")
_METHOD_LABELS = {
    "base": "Base",
    "lora_mu": "LoRA(μ)",
    "lora_nu_mu": "LoRA(ν+μ)",
    "rslora": "rsLoRA",
    "ewc_lora": "EWC-LoRA",
    "hlora": "HLoRA",
    "hlora_no_layer": "HLoRA − layer",
    "hlora_no_layer_element": "HLoRA − layer, element",
}
_METHOD_LABELS_TEX = {
    "base": "Base",
    "lora_mu": r"LoRA($\mu$)",
    "lora_nu_mu": r"LoRA($\nu+\mu$)",
    "rslora": "rsLoRA",
    "ewc_lora": "EWC-LoRA",
    "hlora": "HLoRA",
    "hlora_no_layer": r"HLoRA $-$ layer",
    "hlora_no_layer_element": r"HLoRA $-$ layer, element",
}
TASK_ORDER = ("sciq", "piqa", "medmcqa")
_TASK_LABELS = {"sciq": "SciQ", "piqa": "PIQA", "medmcqa": "MedMCQA"}

# Score used for the per-item violins: the gold continuation's log-likelihood is continuous, so its
# distribution is worth drawing (acc/acc_norm are 0/1 per item, where a violin says nothing a mean
# does not). acc_norm is the fallback when a record has no ll_gold.
ITEM_SCORE = "ll_gold"
ITEM_SCORE_FALLBACK = "acc_norm"
_ITEM_SCORE_LABELS = {
    "ll_gold": "log-likelihood of the gold answer (ll_gold)",
    "acc_norm": "acc_norm per item (0/1)",
    "acc": "acc per item (0/1)",
}

# Layer weights reported by `inspect`: the reference code's scale, and the scale-free alternative.
DEFAULT_LAYER_SCALE = 1e-8
_BLOCK_RE = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
_MODULE_TYPE_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "query_key_value", "c_attn", "c_proj", "c_fc", "dense", "fc1", "fc2",
)  # fmt: skip

DPI = 120


def method_label(method: str) -> str:
    return _METHOD_LABELS.get(method, method)


def task_label(task: str) -> str:
    if task in _TASK_LABELS:
        return _TASK_LABELS[task]
    kind, sep, rest = task.partition(":")
    if sep and ("/" in rest or "\\" in rest):  # `mcq:/some/dir/file.jsonl` -> `mcq:file.jsonl`
        return kind + ":" + re.split(r"[\\/]", rest)[-1]
    return task


def order_methods(methods: Iterable[str]) -> list[str]:
    """Canonical order (METHOD_ORDER) first, then any other method in order of first appearance."""
    seen = list(dict.fromkeys(methods))
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def order_tasks(tasks: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(tasks))
    return [t for t in TASK_ORDER if t in seen] + [t for t in seen if t not in TASK_ORDER]


# ----------------------------------------------------------------------------- loading

class ResultsError(ValueError):
    """A results file that cannot be reported on; the message names the file, record and field."""


_NUM = "number"
_REQUIRED: dict[str, Any] = {
    "method": str,
    "task": str,
    "seed": int,
    "general_ppl": _NUM,
    "general_bpb": _NUM,
    "acc": _NUM,
    "acc_norm": _NUM,
}
# Optional fields: checked when present and not null; filled with these defaults when absent.
_OPTIONAL: dict[str, tuple[Any, Any]] = {
    "phi": (_NUM, None),
    "sweep": (bool, False),
    "per_item": (dict, None),
    "train_seconds": (_NUM, None),
    "importance_seconds": (_NUM, None),
    "importance_bytes": (int, None),
    "importance_kind": (str, None),
    "full_fisher_bytes": (int, None),
    "full_fisher_seconds": (_NUM, None),
    "curve": (dict, None),
    "layer_norms": (dict, None),
    "config": (dict, None),
    "git_commit": (str, None),
    "versions": (dict, None),
}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_ok(v: Any, tp: Any) -> bool:
    if tp is _NUM:
        return _is_num(v)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp)


def _type_name(tp: Any) -> str:
    return {_NUM: "a number", int: "an integer", str: "a string", bool: "true/false", dict: "an object"}[tp]


def _check_record(i: int, rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise ResultsError(f"{where}: record {i}: expected an object, got {type(rec).__name__}")

    def name() -> str:  # identify the record by what it has
        parts = [f"{k}={rec[k]!r}" for k in ("method", "task", "seed") if k in rec]
        return f"record {i}" + (f" ({', '.join(parts)})" if parts else "")

    for key, tp in _REQUIRED.items():
        if key not in rec or rec[key] is None:
            raise ResultsError(f"{where}: {name()}: missing required field '{key}'")
        if not _type_ok(rec[key], tp):
            raise ResultsError(
                f"{where}: {name()}: field '{key}' must be {_type_name(tp)}, got {type(rec[key]).__name__}"
            )
    out = dict(rec)
    for key, (tp, default) in _OPTIONAL.items():
        v = rec.get(key)
        if v is None:
            out[key] = default
        elif not _type_ok(v, tp):
            raise ResultsError(
                f"{where}: {name()}: field '{key}' must be {_type_name(tp)} or null, got {type(v).__name__}"
            )
    # Nested structures the figures rely on.
    curve = out["curve"]
    if curve is not None:
        for k in ("step", "loss"):
            if not isinstance(curve.get(k), list):
                raise ResultsError(f"{where}: {name()}: field 'curve.{k}' must be a list")
        for k in ("loss", "penalty"):
            if curve.get(k) is not None and (
                not isinstance(curve[k], list) or len(curve[k]) != len(curve["step"])
            ):
                raise ResultsError(
                    f"{where}: {name()}: field 'curve.{k}' must be a list as long as 'curve.step'"
                )
    if out["per_item"] is not None:
        for k, v in out["per_item"].items():
            if not isinstance(v, list) or not all(x is None or _is_num(x) for x in v):
                raise ResultsError(f"{where}: {name()}: field 'per_item.{k}' must be a list of numbers")
    if out["layer_norms"] is not None:
        for k, v in out["layer_norms"].items():
            if not _is_num(v):
                raise ResultsError(f"{where}: {name()}: field 'layer_norms.{k}' must be a number")
    return out


def load_results(path: str | Path) -> list[dict]:
    """Read and check `results.json`; returns the records with optional fields filled in.

    Raises FileNotFoundError for a missing file and ResultsError (a ValueError) naming the file,
    the record index and the field for anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, list):
        raise ResultsError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ResultsError(f"{path}: contains no records")
    return [_check_record(i, rec, str(path)) for i, rec in enumerate(data)]


# ----------------------------------------------------------------------------- statistics

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if paired:
            res = stats.ttest_rel(a, b)
        else:
            res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1); the std is None for fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, None
    return float(x.mean()), (float(x.std(ddof=1)) if x.size > 1 else None)


def _main(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if not r.get("sweep")]


def aggregate(records: Iterable[dict]) -> dict[tuple[str, str], dict]:
    """Per (method, task) over the non-sweep records: n, seeds, and mean/std of each metric."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in _main(records):
        groups[(r["method"], r["task"])].append(r)
    out = {}
    for key, rs in groups.items():
        cell: dict[str, Any] = {"n": len(rs), "seeds": sorted(r["seed"] for r in rs)}
        for metric in ("general_ppl", "general_bpb", "acc", "acc_norm"):
            cell[metric], cell[metric + "_std"] = mean_std([r[metric] for r in rs])
        out[key] = cell
    return out


# ----------------------------------------------------------------------------- tables 1 and 2

def results_grid(records: Iterable[dict], methods: Sequence[str] | None = None) -> dict:
    """Rows = methods (canonical order), columns = tasks; cells from `aggregate` (sweeps excluded).

    `methods` restricts and orders the rows (Table 2 passes ABLATION_METHODS); absent methods are
    dropped.
    """
    records = list(records)
    cells = aggregate(records)
    present = order_methods(m for m, _ in cells)
    if methods is not None:
        present = [m for m in methods if m in present]
    tasks = order_tasks(t for m, t in cells if m in present)
    return {"methods": present, "tasks": tasks, "cells": {k: v for k, v in cells.items() if k[0] in present}}


def _fmt(mean: float, std: float | None, scale: float = 1.0, digits: int = 2, pm: str = " ± ") -> str:
    if mean is None or not math.isfinite(mean):
        return str(mean) if mean is not None else "—"
    s = f"{mean * scale:.{digits}f}"
    if std is not None and math.isfinite(std):
        s += f"{pm}{std * scale:.{digits}f}"
    return s


def _best(grid: dict) -> set[tuple[str, str, str]]:
    """(method, task, metric) of the best mean per column: lowest perplexity, highest accuracy."""
    best = set()
    if len(grid["methods"]) < 2:
        return best
    for t in grid["tasks"]:
        col = {m: grid["cells"][(m, t)] for m in grid["methods"] if (m, t) in grid["cells"]}
        for metric, pick in (("general_ppl", min), ("acc", max)):
            vals = {m: c[metric] for m, c in col.items() if math.isfinite(c[metric])}
            if len(vals) >= 2:
                target = pick(vals.values())
                best |= {(m, t, metric) for m, v in vals.items() if v == target}
    return best


def _seed_note(grid: dict) -> str:
    ns = sorted({c["n"] for c in grid["cells"].values()})
    if not ns:
        return "No cells."
    if len(ns) == 1:
        n = ns[0]
        return (
            f"Mean ± sample std (ddof=1) over {n} seeds." if n > 1 else "One seed per cell (no std)."
        ) + " Accuracy in %; PPL = general perplexity (held-out general text)."
    return (
        f"Mean ± sample std (ddof=1) over seeds; seeds per cell vary ({', '.join(map(str, ns))}); "
        "cells with one seed show no std. Accuracy in %; PPL = general perplexity."
    )


def _md_escape(s: str) -> str:
    return s.replace("|", r"\|")


def grid_markdown(grid: dict, title: str | None = None) -> str:
    """Markdown table: per task `PPL ↓` and `Acc % ↑`, best mean per column in bold."""
    best = _best(grid)
    header = ["Method"]
    for t in grid["tasks"]:
        header += [f"{task_label(t)} PPL ↓", f"{task_label(t)} Acc % ↑"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    for m in grid["methods"]:
        row = [_md_escape(method_label(m))]
        for t in grid["tasks"]:
            c = grid["cells"].get((m, t))
            if c is None:
                row += ["—", "—"]
                continue
            ppl = _fmt(c["general_ppl"], c["general_ppl_std"])
            acc = _fmt(c["acc"], c["acc_std"], scale=100.0)
            row += [f"**{ppl}**" if (m, t, "general_ppl") in best else ppl,
                    f"**{acc}**" if (m, t, "acc") in best else acc]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", _seed_note(grid)]
    return "\n".join(lines) + "\n"


def grid_csv(grid: dict) -> str:
    """Wide CSV, one row per method; per task n, PPL, bits per byte, acc and acc_norm (fractions)."""
    cols = ["method", "label"]
    metrics = ("general_ppl", "general_bpb", "acc", "acc_norm")
    for t in grid["tasks"]:
        cols.append(f"{t}_n")
        for metric in metrics:
            cols += [f"{t}_{metric}_mean", f"{t}_{metric}_std"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for m in grid["methods"]:
        row: list[Any] = [m, method_label(m)]
        for t in grid["tasks"]:
            c = grid["cells"].get((m, t))
            if c is None:
                row += [""] * (1 + 2 * len(metrics))
                continue
            row.append(c["n"])
            for metric in metrics:
                std = c[metric + "_std"]
                row += [_num(c[metric]), _num(std)]
        w.writerow(row)
    return buf.getvalue()


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}  # fmt: skip


def _num(v: float | None) -> str:
    """A CSV number: 12 significant digits, empty for None."""
    return "" if v is None else f"{v:.12g}"


def _tex(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def grid_latex(grid: dict, caption: str, label: str) -> str:
    """A booktabs table with the paper's layout: a column pair (PPL, Acc) per task.

    `caption` is LaTeX source (not escaped); method and task names are escaped."""
    best = _best(grid)
    nt = len(grid["tasks"])
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        rf"\label{{{label}}}",
        r"\begin{tabular}{l" + " cc" * nt + "}",
        r"\toprule",
    ]
    if nt:
        lines.append(
            " & " + " & ".join(rf"\multicolumn{{2}}{{c}}{{{_tex(task_label(t))}}}" for t in grid["tasks"]) + r" \\"
        )
        lines.append("".join(rf"\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(nt)))
    lines.append("Method" + r" & PPL$\downarrow$ & Acc$\uparrow$" * nt + r" \\")
    lines.append(r"\midrule")
    for m in grid["methods"]:
        row = [_METHOD_LABELS_TEX.get(m, _tex(m))]
        for t in grid["tasks"]:
            c = grid["cells"].get((m, t))
            if c is None:
                row += ["--", "--"]
                continue
            for metric, scale in (("general_ppl", 1.0), ("acc", 100.0)):
                s = _fmt(c[metric], c[metric + "_std"], scale=scale, pm=r"$\pm$")
                row.append(rf"\textbf{{{s}}}" if (m, t, metric) in best else s)
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- complexity (6.2)

def _pick(records: list[dict], method: str, kind: str) -> tuple[list[dict], str]:
    rs = [r for r in _main(records) if r["method"] == method]
    if any(r["importance_seconds"] is not None or r["importance_bytes"] is not None for r in rs):
        return rs, method
    rs = [r for r in records if r.get("importance_kind") == kind]
    methods = ",".join(order_methods(r["method"] for r in rs))
    return rs, methods


def complexity(records: Iterable[dict]) -> dict:
    """Importance cost: SI (HLoRA) vs diagonal Fisher on the LoRA targets (EWC-LoRA) vs full-model
    Fisher, with ratios. Means over the records that carry each number (None where none does)."""
    records = list(records)

    def stats(rs: list[dict], sec_key: str, byte_key: str) -> dict:
        secs = [r[sec_key] for r in rs if r.get(sec_key) is not None]
        byts = [r[byte_key] for r in rs if r.get(byte_key) is not None]
        s_mean, s_std = mean_std(secs) if secs else (None, None)
        return {
            "n": max(len(secs), len(byts)),
            "seconds": s_mean,
            "seconds_std": s_std,
            "bytes": float(np.mean(byts)) if byts else None,
        }

    si_rs, si_src = _pick(records, "hlora", "si")
    fi_rs, fi_src = _pick(records, "ewc_lora", "fisher")
    rows = [
        {"name": "SI importance (HLoRA)", "source": si_src,
         **stats(si_rs, "importance_seconds", "importance_bytes")},
        {"name": "Diagonal Fisher, LoRA targets (EWC-LoRA)", "source": fi_src,
         **stats(fi_rs, "importance_seconds", "importance_bytes")},
        {"name": "Full-model diagonal Fisher", "source": "full_fisher_*",
         **stats(records, "full_fisher_seconds", "full_fisher_bytes")},
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
    lines += ["| Importance | From | n | Time (s) | Storage |", "|---|---|---|---|---|"]
    for r in comp["rows"]:
        lines.append(
            f"| {r['name']} | {_md_escape(r['source'] or '—')} | {r['n']} | "
            f"{_fmt_secs(r['seconds'], r['seconds_std'])} | {_fmt_bytes(r['bytes'])} |"
        )
    lines += ["", "| Ratio | Value |", "|---|---|"]
    lines += [f"| {r['name']} | {_fmt_ratio(r)} |" for r in comp["ratios"]]
    lines += [
        "",
        "SI time is the time added to stage ν by recording importance; Fisher time is the separate "
        "pass over general data. Storage is the importance file as saved; the full-model Fisher is "
        "one fp32 value per weight of the model.",
    ]
    return "\n".join(lines) + "\n"


def complexity_csv(comp: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "name", "source", "n", "seconds_mean", "seconds_std", "bytes_mean", "ratio"])

    cell = _num
    for r in comp["rows"]:
        w.writerow(["importance", r["name"], r["source"], r["n"], cell(r["seconds"]), cell(r["seconds_std"]),
                    cell(r["bytes"]), ""])  # fmt: skip
    for r in comp["ratios"]:
        w.writerow(["ratio", r["name"], "", "", "", "", "", cell(r["value"])])
    return buf.getvalue()


def complexity_latex(comp: dict, caption: str, label: str) -> str:
    lines = [
        r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}", rf"\label{{{label}}}",
        r"\begin{tabular}{lrrr}", r"\toprule", r"Importance & $n$ & Time (s) & Storage \\", r"\midrule",
    ]  # fmt: skip
    for r in comp["rows"]:
        secs = _fmt_secs(r["seconds"], r["seconds_std"]).replace("±", r"$\pm$").replace("—", "--")
        lines.append(rf"{_tex(r['name'])} & {r['n']} & {secs} & {_fmt_bytes(r['bytes']).replace('—', '--')} \\")
    lines.append(r"\midrule")
    for r in comp["ratios"]:
        v = _fmt_ratio(r).replace("×", r"$\times$").replace("%", r"\%").replace("—", "--")
        lines.append(rf"\multicolumn{{3}}{{l}}{{{_tex(r['name'])}}} & {v} \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- significance

def seed_significance(records: Iterable[dict], method: str = "hlora") -> list[dict]:
    """Welch t-tests over seeds of `method` against every other method, per task, on general PPL
    and accuracy (the paper's Figure 3 compares HLoRA with EWC-LoRA this way). Needs ≥ 2 seeds on
    both sides."""
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in _main(records):
        by[(r["method"], r["task"])].append(r)
    out = []
    tasks = order_tasks(t for _, t in by)
    for t in tasks:
        mine = by.get((method, t), [])
        if len(mine) < 2:
            continue
        for other in order_methods(m for m, tt in by if tt == t):
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


def _fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def significance_markdown(rows: list[dict], method: str = "hlora") -> str:
    if not rows:
        return f"No seed-level test: {method_label(method)} and the others need ≥ 2 seeds per task.\n"
    lines = [
        f"Welch t-tests over seeds, {method_label(method)} minus the other method "
        "(ΔPPL < 0 and ΔAcc > 0 favour it); p two-sided, n/a where both sides have zero variance.",
        "",
        "| Task | vs | n | ΔPPL | p (PPL) | ΔAcc (points) | p (Acc) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_md_escape(task_label(r['task']))} | {_md_escape(method_label(r['other']))} | "
            f"{r['n']} vs {r['n_other']} | {r['general_ppl_diff']:+.3f} | {_fmt_p(r['general_ppl_p'])} | "
            f"{100 * r['acc_diff']:+.2f} | {_fmt_p(r['acc_p'])} |"
        )
    return "\n".join(lines) + "\n"


def item_scores(records: Iterable[dict], method: str, task: str, key: str) -> dict[int, list[float]]:
    """Per seed, the per-item scores `per_item[key]` of a method on a task (non-sweep records)."""
    out: dict[int, list[float]] = {}
    for r in sorted(_main(records), key=lambda r: r["seed"]):
        if r["method"] == method and r["task"] == task and r["per_item"] and key in r["per_item"]:
            vals = [math.nan if v is None else float(v) for v in r["per_item"][key]]
            out.setdefault(r["seed"], []).extend(vals)
    return out


def _item_comparison(records: list[dict], a: str, b: str, task: str) -> dict | None:
    """Pooled per-item scores of methods a and b; paired test when the items line up seed by seed."""
    for key in (ITEM_SCORE, ITEM_SCORE_FALLBACK):
        sa, sb = item_scores(records, a, task, key), item_scores(records, b, task, key)
        if sa and sb:
            break
    else:
        return None
    paired = sa.keys() == sb.keys() and all(len(sa[s]) == len(sb[s]) for s in sa)
    xa = np.array([v for s in sorted(sa) for v in sa[s]])
    xb = np.array([v for s in sorted(sb) for v in sb[s]])
    if paired:
        ok = np.isfinite(xa) & np.isfinite(xb)
        xa, xb = xa[ok], xb[ok]
    else:
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    if xa.size == 0 or xb.size == 0:
        return None
    t, p = ttest(xa, xb, paired=paired)
    return {"key": key, "a": xa, "b": xb, "paired": paired, "t": t, "p": p}


# ----------------------------------------------------------------------------- importance (6.4)

def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x)
    e = np.exp(z)
    return e / e.sum()


def layer_weights(layer_norms: dict[str, float], layer_scale: float | str = DEFAULT_LAYER_SCALE) -> dict[str, float]:
    """w = softmax_l(‖Ω_l‖ · layer_scale) as in DESIGN.md section 2; "auto" = 1/mean_l ‖Ω_l‖."""
    names = list(layer_norms)
    norms = np.array([layer_norms[n] for n in names], dtype=float)
    if layer_scale == "auto":
        mean = float(norms.mean()) if norms.size else 0.0
        scale = 1.0 / mean if mean > 0 else 0.0
    else:
        scale = float(layer_scale)
    w = _softmax(norms * scale) if norms.size else norms
    return dict(zip(names, w.tolist()))


def entropy(weights: Iterable[float]) -> float:
    """Shannon entropy in nats (0·log 0 = 0)."""
    w = np.asarray(list(weights), dtype=float)
    w = w[w > 0]
    return float(-(w * np.log(w)).sum())


def _split_module(path: str) -> tuple[int | None, str]:
    """(block index, module suffix after the block) of a PEFT module path; (None, path) if no block."""
    m = None
    for m in _BLOCK_RE.finditer(path):
        pass
    if m is None:
        return None, path
    return int(m.group(1)), path[m.end():]


def _type_key(suffix: str) -> tuple:
    last = suffix.rsplit(".", 1)[-1]
    i = _MODULE_TYPE_ORDER.index(last) if last in _MODULE_TYPE_ORDER else len(_MODULE_TYPE_ORDER)
    return (i, suffix)


def importance_matrix(layer_norms: dict[str, float]) -> dict:
    """Arrange per-module norms as rows = module type, columns = transformer block.

    Returns {"rows": labels, "row_keys": suffixes, "blocks": [block indices], "values": 2-D array
    (nan where a module is absent), "unplaced": [paths with no `.layers.N.` / `.h.N.` part]}.
    A row label is the module's last name (q_proj) when that is unique, else its path after the
    block (self_attn.c_proj vs mlp.c_proj).
    """
    placed: dict[tuple[str, int], float] = {}
    unplaced = []
    for path, v in layer_norms.items():
        block, suffix = _split_module(path)
        if block is None:
            unplaced.append(path)
        else:
            placed[(suffix, block)] = float(v)
    row_keys = sorted({s for s, _ in placed}, key=_type_key)
    blocks = sorted({b for _, b in placed})
    values = np.full((len(row_keys), len(blocks)), np.nan)
    for (s, b), v in placed.items():
        values[row_keys.index(s), blocks.index(b)] = v
    lasts = [s.rsplit(".", 1)[-1] for s in row_keys]
    rows = lasts if len(set(lasts)) == len(lasts) else list(row_keys)
    return {"rows": rows, "row_keys": row_keys, "blocks": blocks, "values": values, "unplaced": unplaced}


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas is used on save; no pyplot, no display

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save_png(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out_png


def importance_heatmap(layer_norms: dict[str, float], out_png: str | Path, title: str = "Importance per module") -> Path:
    """Heatmap of log10 ‖Ω_l‖ (rows = module type, columns = block index), as the paper's Figure 7."""
    mat = importance_matrix(layer_norms)
    if not mat["blocks"]:
        raise ValueError(
            "no module path has a block index (.layers.N. / .h.N. / .blocks.N.); nothing to place in a heatmap"
        )
    vals = mat["values"]
    with np.errstate(divide="ignore", invalid="ignore"):
        logv = np.where(vals > 0, np.log10(np.where(vals > 0, vals, 1.0)), np.nan)
    nr, nc = logv.shape
    fig = _new_figure(min(max(3.0 + 0.38 * nc, 6.0), 20.0), 1.9 + 0.55 * nr)
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(logv), aspect="auto", cmap=cmap, interpolation="nearest")
    step = 1 if nc <= 32 else int(math.ceil(nc / 32))
    ax.set_xticks(range(0, nc, step), [str(b) for b in mat["blocks"]][::step])
    ax.set_yticks(range(nr), mat["rows"])
    ax.set_xlabel("transformer block")
    ax.set_ylabel("module")
    ax.set_title(title)
    cb = fig.colorbar(im, ax=ax, pad=0.01)
    cb.set_label(r"$\log_{10}\,\Vert\Omega_l\Vert_F$")
    if nc <= 16 and nr <= 10 and np.isfinite(logv).any():
        lo, hi = np.nanmin(logv), np.nanmax(logv)
        mid = (lo + hi) / 2
        for i in range(nr):
            for j in range(nc):
                if np.isfinite(logv[i, j]):
                    ax.text(j, i, f"{logv[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="black" if logv[i, j] > mid else "white")  # fmt: skip
    return _save_png(fig, out_png)


def importance_summary(layer_norms: dict[str, float]) -> str:
    """Text: per module type min/median/max of ‖Ω_l‖, and the softmax layer weights at
    layer_scale=1e-8 (reference code) and "auto" with their entropy."""
    if not layer_norms:
        return "Importance: no modules.\n"
    mat = importance_matrix(layer_norms)
    by_type: dict[str, list[float]] = defaultdict(list)
    labels = dict(zip(mat["row_keys"], mat["rows"]))
    for path, v in layer_norms.items():
        block, suffix = _split_module(path)
        by_type[labels[suffix] if block is not None else path.rsplit(".", 1)[-1]].append(float(v))
    n = len(layer_norms)
    lines = [
        f"Importance norms ‖Ω_l‖_F: {n} modules, {len(mat['blocks'])} blocks, "
        f"module types: {', '.join(sorted(by_type, key=_type_key))}",
        "",
        f"{'module type':<22} {'n':>4} {'min':>11} {'median':>11} {'max':>11}",
    ]
    for typ in sorted(by_type, key=lambda s: _type_key(s)):
        v = np.array(by_type[typ])
        lines.append(f"{typ:<22} {v.size:>4} {v.min():>11.4g} {np.median(v):>11.4g} {v.max():>11.4g}")
    lines += ["", "Layer weights w = softmax_l(‖Ω_l‖_F · layer_scale) over the modules:"]
    uniform_h = math.log(n)
    norms = np.array(list(layer_norms.values()), dtype=float)
    for scale in (DEFAULT_LAYER_SCALE, "auto"):
        w = layer_weights(layer_norms, scale)
        arr = np.array(list(w.values()))
        h = entropy(arr)
        if scale == "auto":
            mean = norms.mean()
            desc = f"layer_scale=auto (1/mean ‖Ω_l‖ = {1 / mean:.4g})" if mean > 0 else "layer_scale=auto (mean 0)"
        else:
            desc = f"layer_scale={scale:g}"
        lines.append(
            f"  {desc}: max w {arr.max():.4g}, min w {arr.min():.4g} (uniform {1 / n:.4g}); "
            f"entropy {h:.4f} nats of {uniform_h:.4f} ({h / uniform_h if n > 1 else 1.0:.3f} of uniform)"
        )
        top = sorted(w.items(), key=lambda kv: -kv[1])[:3]
        lines.append("    top: " + ", ".join(f"{k.removeprefix('base_model.model.')} {v:.4g}" for k, v in top))
    if mat["unplaced"]:
        lines += ["", f"{len(mat['unplaced'])} modules have no block index and are not in the heatmap: "
                  + ", ".join(mat["unplaced"][:5]) + (" ..." if len(mat["unplaced"]) > 5 else "")]  # fmt: skip
    return "\n".join(lines) + "\n"


def inspect_importance(
    layer_norms: dict[str, float], out_dir: str | Path, title: str = r"$\log_{10}\,\Vert\Omega_l\Vert_F$ per module"
) -> str:
    """Write `importance_heatmap.png` and `importance_summary.txt` into out_dir; return the summary."""
    out_dir = Path(out_dir)
    text = importance_summary(layer_norms)
    try:
        importance_heatmap(layer_norms, out_dir / "importance_heatmap.png", title)
    except ValueError as e:
        text += f"\nHeatmap skipped: {e}\n"
    _write_text(out_dir / "importance_summary.txt", text)
    return text


# ----------------------------------------------------------------------------- figures


def _ml(method: str) -> str:  # a label for matplotlib: a literal "$" must not start math mode
    return method_label(method).replace("$", r"\$")


def _tl(task: str) -> str:
    return task_label(task).replace("$", r"\$")

_MARKERS = ("o", "s", "^", "D", "v", "*", "P", "X", "<", ">", "h")  # HLoRA gets the star


def _style(methods_all: Sequence[str]) -> dict[str, dict]:
    """A fixed colour and marker per method: canonical methods keep theirs in every figure."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    extra = [m for m in methods_all if m not in METHOD_ORDER]
    out = {}
    for i, m in enumerate(list(METHOD_ORDER) + extra):
        out[m] = {"color": cmap(i % 10), "marker": _MARKERS[i % len(_MARKERS)]}
    return out


def _grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return int(math.ceil(n / cols)), cols


def _smooth(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    if window <= 1 or y.size < window:
        return x, y
    k = np.ones(window) / window
    return x[window - 1:], np.convolve(y, k, mode="valid")


def _as_float(v: list | None, n: int) -> np.ndarray:
    if v is None:
        return np.full(n, np.nan)
    return np.array([math.nan if x is None else float(x) for x in v], dtype=float)


def _method_curve(rs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Mean curve over seeds when their steps agree, else the lowest seed's curve."""
    rs = [r for r in sorted(rs, key=lambda r: r["seed"]) if r["curve"] and r["curve"]["step"]]
    if not rs:
        return None
    steps0 = rs[0]["curve"]["step"]
    same = [r for r in rs if r["curve"]["step"] == steps0]
    if len(same) != len(rs):
        same = rs[:1]
    n = len(steps0)
    x = np.array(steps0, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean([_as_float(r["curve"]["loss"], n) for r in same], axis=0)
        pen = np.nanmean([_as_float(r["curve"].get("penalty"), n) for r in same], axis=0)
    return x, loss, pen, len(same)


def plot_loss_curves(records: Iterable[dict], out_png: str | Path) -> Path | None:
    """Stage-μ task loss (top row) and penalty (bottom row) per method against step, a column per
    task; mean over seeds with equal steps. Returns None when no record has a curve."""
    main = [r for r in _main(records) if r["curve"] and r["curve"].get("step")]
    if not main:
        return None
    tasks = order_tasks(r["task"] for r in main)
    style = _style(order_methods(r["method"] for r in main))
    nt = len(tasks)
    fig = _new_figure(max(5.0 * nt, 6.5), 7.0)
    axes = fig.subplots(2, nt, sharex="col", squeeze=False)
    handles = {}
    windows: set[int] = set()
    seeds_used: set[int] = set()
    for j, t in enumerate(tasks):
        ax_l, ax_p = axes[0, j], axes[1, j]
        methods = order_methods(r["method"] for r in main if r["task"] == t)
        pen_pos = []
        window = 1
        nseeds = set()
        for m in methods:
            cur = _method_curve([r for r in main if r["task"] == t and r["method"] == m])
            if cur is None:
                continue
            x, loss, pen, ns = cur
            nseeds.add(ns)
            window = max(window, x.size // 50)
            st = style[m]
            ax_l.plot(x, loss, color=st["color"], alpha=0.2, lw=0.8)
            xs, ls = _smooth(x, loss, x.size // 50)
            (h,) = ax_l.plot(xs, ls, color=st["color"], lw=1.6, label=_ml(m))
            handles.setdefault(m, h)
            if np.nanmax(np.abs(np.nan_to_num(pen)), initial=0.0) > 0:
                xs, ps = _smooth(x, pen, x.size // 50)
                ax_p.plot(xs, ps, color=st["color"], lw=1.6)
                pen_pos.extend(pen[np.isfinite(pen) & (pen > 0)].tolist())
        windows.add(window)
        seeds_used |= nseeds
        ax_l.set_title(f"{_tl(t)}: task loss", fontsize=10)
        ax_l.set_ylabel("task loss (CE)")
        ax_l.grid(alpha=0.3)
        ax_p.set_title(f"{_tl(t)}: regularization penalty", fontsize=10)
        ax_p.set_ylabel("penalty (added to loss)")
        ax_p.set_xlabel("step")
        ax_p.grid(alpha=0.3)
        if not pen_pos:
            ax_p.text(0.5, 0.5, "no method logged a nonzero penalty", ha="center", va="center",
                      transform=ax_p.transAxes, color="grey")  # fmt: skip
        elif max(pen_pos) / min(pen_pos) > 1e2:
            ax_p.set_yscale("log")
    labels_order = [m for m in order_methods(handles)]
    fig.legend([handles[m] for m in labels_order], [_ml(m) for m in labels_order],
               loc="outside lower center", ncol=min(len(labels_order), 5), frameon=False)  # fmt: skip
    notes = ["mean over seeds" if seeds_used and max(seeds_used) > 1 else "one seed"]
    if max(windows, default=1) > 1:
        notes.append(f"moving average over {max(windows)} steps, raw faint")
    fig.suptitle(f"Stage μ training: task loss and penalty per method ({'; '.join(notes)})")
    return _save_png(fig, out_png)


def _sweep_points(records: list[dict], method: str, task: str) -> list[tuple[float, dict]]:
    by_phi: dict[float, list[dict]] = defaultdict(list)
    for r in records:
        if r["method"] == method and r["task"] == task and r["phi"] is not None and r["phi"] > 0:
            by_phi[float(r["phi"])].append(r)
    out = []
    for phi in sorted(by_phi):
        rs = by_phi[phi]
        cell = {"n": len(rs)}
        for metric in ("general_ppl", "acc"):
            cell[metric], cell[metric + "_std"] = mean_std([r[metric] for r in rs])
        out.append((phi, cell))
    return out


def _sweep_methods(records: list[dict]) -> list[str]:
    return order_methods(r["method"] for r in records if r["sweep"] and r["phi"] is not None)


def plot_phi_sweep(records: Iterable[dict], out_png: str | Path) -> Path | None:
    """Accuracy (left axis) and general perplexity (right axis) against φ (log axis), a panel per
    task, for each method with φ-sweep cells (its main cell joins the sweep at its φ). LoRA(ν+μ),
    the φ = 0 limit, is drawn as dotted reference lines. None when there is no sweep."""
    records = list(records)
    methods = _sweep_methods(records)
    if not methods:
        return None
    tasks = order_tasks(r["task"] for r in records if r["sweep"] and r["method"] in methods)
    tasks = [t for t in tasks if any(len(_sweep_points(records, m, t)) >= 2 for m in methods)]
    if not tasks:
        return None
    nrows, ncols = _grid_shape(len(tasks))
    fig = _new_figure(max(5.2 * ncols, 6.5), 4.2 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    acc_c, ppl_c = "tab:blue", "tab:red"
    ref = aggregate(records)
    legend: dict[str, Any] = {}
    for k, t in enumerate(tasks):
        ax = axes[k // ncols, k % ncols]
        ax2 = ax.twinx()
        for i, m in enumerate(methods):
            pts = _sweep_points(records, m, t)
            if len(pts) < 2:
                continue
            phis = [p for p, _ in pts]
            mk = _MARKERS[i % len(_MARKERS)]
            acc = [c["acc"] * 100 for _, c in pts]
            acc_e = [(c["acc_std"] or 0) * 100 for _, c in pts]
            ppl = [c["general_ppl"] for _, c in pts]
            ppl_e = [c["general_ppl_std"] or 0 for _, c in pts]
            h1 = ax.errorbar(phis, acc, yerr=acc_e, color=acc_c, marker=mk, ls="-", capsize=3)
            h2 = ax2.errorbar(phis, ppl, yerr=ppl_e, color=ppl_c, marker=mk, ls="--", capsize=3, mfc="white")
            legend.setdefault(f"{_ml(m)} accuracy (left)", h1)
            legend.setdefault(f"{_ml(m)} general PPL (right)", h2)
        c = ref.get(("lora_nu_mu", t))
        if c is not None:
            h3 = ax.axhline(c["acc"] * 100, color=acc_c, ls=":", lw=1.2)
            ax2.axhline(c["general_ppl"], color=ppl_c, ls=":", lw=1.2)
            legend.setdefault("LoRA(ν+μ), the φ = 0 limit (dotted)", h3)
        ax.set_xscale("log")
        ax.set_xlabel("φ (penalty coefficient, log scale)")
        ax.set_ylabel("accuracy % ↑", color=acc_c)
        ax2.set_ylabel("general perplexity ↓", color=ppl_c)
        ax.tick_params(axis="y", colors=acc_c)
        ax2.tick_params(axis="y", colors=ppl_c)
        ax.grid(alpha=0.3, which="major")
        ax.set_title(_tl(t))
    for k in range(len(tasks), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 3),
               frameon=False)  # fmt: skip
    fig.suptitle("φ sweep: domain accuracy and general perplexity (mean ± std over seeds)")
    return _save_png(fig, out_png)


def plot_violin(records: Iterable[dict], out_png: str | Path, a: str = "hlora", b: str = "ewc_lora") -> Path | None:
    """Violins of per-item ll_gold (acc_norm if absent) of method a vs b per task, t-test p in each
    title (paired when the items line up seed by seed, else Welch). None without both methods."""
    records = list(records)
    tasks = order_tasks(r["task"] for r in _main(records))
    comps = [(t, c) for t in tasks if (c := _item_comparison(records, a, b, t)) is not None]
    if not comps:
        return None
    style = _style(order_methods(r["method"] for r in records))
    nrows, ncols = _grid_shape(len(comps))
    fig = _new_figure(max(4.2 * ncols, 5.0), 4.3 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, (t, c) in enumerate(comps):
        ax = axes[k // ncols, k % ncols]
        for pos, (m, x) in enumerate(((a, c["a"]), (b, c["b"])), start=1):
            if x.size >= 2 and np.ptp(x) > 0:
                parts = ax.violinplot([x], positions=[pos], showmedians=True, widths=0.8)
                for body in parts["bodies"]:
                    body.set_facecolor(style[m]["color"])
                    body.set_edgecolor("black")
                    body.set_alpha(0.6)
                for key in ("cmedians", "cmins", "cmaxes", "cbars"):
                    if key in parts:
                        parts[key].set_color("black")
                        parts[key].set_linewidth(1.0)
            else:  # a constant sample has no density to draw
                ax.scatter([pos] * x.size, x, color=style[m]["color"], s=12)
            ax.scatter([pos], [x.mean()], color="white", edgecolor="black", zorder=3, s=30,
                       label="mean" if pos == 1 else None)  # fmt: skip
        ax.set_xticks([1, 2], [f"{_ml(a)}\n(n={c['a'].size})", f"{_ml(b)}\n(n={c['b'].size})"])
        ax.set_ylabel(_ITEM_SCORE_LABELS.get(c["key"], c["key"]))
        test = "paired t" if c["paired"] else "Welch t"
        ax.set_title(f"{_tl(t)}: {test}-test p = {_fmt_p(c['p'])}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="lower right", fontsize=8)
    for k in range(len(comps), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    fig.suptitle(f"Per-item scores, {_ml(a)} vs {_ml(b)} (items pooled over seeds; bar: median, ○: mean)")
    return _save_png(fig, out_png)


def plot_acc_vs_ppl(records: Iterable[dict], out_png: str | Path) -> Path | None:
    """Domain accuracy against general perplexity, one marker per method (mean ± std over seeds),
    a panel per task; φ-sweep cells as a dashed line labelled with φ. Up-left is better."""
    records = list(records)
    cells = aggregate(records)
    if not cells:
        return None
    tasks = order_tasks(t for _, t in cells)
    methods = order_methods(m for m, _ in cells)
    style = _style(order_methods(r["method"] for r in records))
    sweepers = _sweep_methods(records)
    nrows, ncols = _grid_shape(len(tasks))
    fig = _new_figure(max(5.0 * ncols, 6.0), 4.4 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    legend: dict[str, Any] = {}
    for k, t in enumerate(tasks):
        ax = axes[k // ncols, k % ncols]
        for m in sweepers:
            pts = _sweep_points(records, m, t)
            if len(pts) < 2:
                continue
            xs = [c["general_ppl"] for _, c in pts]
            ys = [c["acc"] * 100 for _, c in pts]
            (h,) = ax.plot(xs, ys, ls="--", lw=1, color=style[m]["color"], marker=".", ms=5, alpha=0.8)
            legend.setdefault(f"{_ml(m)} φ sweep", h)
            for phi, x, y in zip([p for p, _ in pts], xs, ys):
                ax.annotate(f"φ={phi:.0e}", (x, y), xytext=(4, -9), textcoords="offset points", fontsize=6.5,
                            color=style[m]["color"])  # fmt: skip
        for m in methods:
            c = cells.get((m, t))
            if c is None:
                continue
            st = style[m]
            h = ax.errorbar(c["general_ppl"], c["acc"] * 100, xerr=c["general_ppl_std"] or 0,
                            yerr=(c["acc_std"] or 0) * 100, color=st["color"], marker=st["marker"],
                            ms=13 if st["marker"] == "*" else 8,
                            mec="black", ls="none", capsize=3)  # fmt: skip
            legend.setdefault(_ml(m), h)
        ax.set_xlabel("general perplexity (lower is better)")
        ax.set_ylabel("accuracy % (higher is better)")
        ax.set_title(f"{_tl(t)}   (↖ better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(0.12)
    for k in range(len(tasks), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 5),
               frameon=False)  # fmt: skip
    fig.suptitle("Accuracy vs general perplexity\n(up-left is better: higher accuracy, less forgetting)")
    return _save_png(fig, out_png)


# ----------------------------------------------------------------------------- the report

_FIGURES = {
    "loss_curves.png": "Stage-μ task loss (top) and regularization penalty (bottom) per method against step.",
    "importance_heatmap.png": "log10 ‖Ω_l‖ of the general-stage importance per module type and transformer block.",
    "phi_sweep.png": "Domain accuracy and general perplexity of HLoRA against φ (log scale).",
    "violin_hlora_vs_ewc.png": "Per-item gold log-likelihood (ll_gold), HLoRA vs EWC-LoRA, with t-test p-values.",
    "acc_vs_ppl.png": "Domain accuracy against general perplexity for every method (up-left is better).",
}


def _heatmap_source(records: list[dict]) -> dict | None:
    cands = [r for r in records if r["layer_norms"]]
    if not cands:
        return None

    tasks = order_tasks(r["task"] for r in records)

    def rank(r):  # prefer a main HLoRA record with SI importance, lowest seed, first task
        kind = r.get("importance_kind")
        return (r["sweep"], r["method"] != "hlora", kind not in (None, "si"), r["seed"], tasks.index(r["task"]))

    return min(cands, key=rank)


def _provenance(records: list[dict], source_name: str) -> list[str]:
    main = _main(records)
    commits = sorted({r["git_commit"] for r in records if r.get("git_commit")})
    lines = [
        f"Source: `{source_name}`, {len(records)} records ({len(main)} main cells, "
        f"{len(records) - len(main)} φ-sweep cells); methods: "
        + ", ".join(method_label(m) for m in order_methods(r["method"] for r in records))
        + "; tasks: " + ", ".join(task_label(t) for t in order_tasks(r["task"] for r in records))
        + "; seeds: " + ", ".join(map(str, sorted({r["seed"] for r in records}))) + ".",
    ]  # fmt: skip
    if commits:
        lines.append("git commit" + ("s" if len(commits) > 1 else "") + ": " + ", ".join(f"`{c[:12]}`" for c in commits))
    versions = next((r["versions"] for r in records if r.get("versions")), None)
    if versions:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines


def write_report(results_path: str | Path, out_dir: str | Path) -> dict:
    """Tables, figures and `report.md` from `results.json` into out_dir, every file atomically.

    Reads only results_path, and checks it fully before writing anything. Returns
    {"files": [paths written], "skipped": {figure: reason}, "notes": [notes in report.md]}.
    """
    results_path = Path(results_path)
    records = load_results(results_path)
    out = Path(out_dir)
    written: list[Path] = []
    skipped: dict[str, str] = {}
    notes: list[str] = []

    def put(name: str, text: str) -> None:
        _write_text(out / name, text)
        written.append(out / name)

    main = _main(records)
    seen: dict[tuple, int] = defaultdict(int)
    for r in main:
        seen[(r["method"], r["task"], r["seed"])] += 1
    dups = [k for k, n in seen.items() if n > 1]
    if dups:
        notes.append(
            f"{len(dups)} (method, task, seed) main cells occur more than once (e.g. {dups[0]}); all are averaged."
        )
    if not main:
        notes.append("Every record is a φ-sweep cell: Tables 1 and 2 are empty.")

    t1 = results_grid(records)
    t2 = results_grid(records, ABLATION_METHODS)
    if not t2["methods"]:
        notes.append("Table 2 is empty: no ablation methods (hlora, hlora_no_layer, hlora_no_layer_element).")
    comp = complexity(records)
    if all(r["seconds"] is None and r["bytes"] is None for r in comp["rows"]):
        notes.append("Complexity table is empty: no record has importance or full-Fisher cost fields.")
    sig = seed_significance(records)

    md_t1 = grid_markdown(t1, "Table 1: general perplexity and domain accuracy per method")
    md_t2 = grid_markdown(t2, "Table 2: ablations (layer-wise and element-wise regularization)")
    md_c = complexity_markdown(comp, "Importance cost: SI (HLoRA) vs Fisher (EWC-LoRA)")
    md_s = "### Significance over seeds\n\n" + significance_markdown(sig)
    put("tables.md", "\n".join([md_t1, md_t2, md_c, md_s]))
    put("table1.csv", grid_csv(t1))
    put("table2.csv", grid_csv(t2))
    put("complexity.csv", complexity_csv(comp))
    put(
        "tables.tex",
        "% Generated by `hlora report`; needs \\usepackage{booktabs}.\n"
        + grid_latex(t1, r"General perplexity (PPL, lower is better) and domain accuracy (Acc \%, higher is "
                     r"better), mean $\pm$ std over seeds.", "tab:hlora-main")  # fmt: skip
        + "\n"
        + grid_latex(t2, "Ablations: layer-wise and element-wise regularization removed.", "tab:hlora-ablation")
        + "\n"
        + complexity_latex(comp, "Cost of the importance: SI (HLoRA) vs diagonal Fisher (EWC-LoRA).", "tab:hlora-cost"),
    )

    # Figures: each is skipped with a note when its data is absent.
    figs: dict[str, str] = {}

    def figure(name: str, make, reason: str) -> None:
        path = make(out / name)
        if path is None:
            skipped[name] = reason
        else:
            written.append(path)
            figs[name] = _FIGURES[name]

    figure("loss_curves.png", lambda p: plot_loss_curves(records, p), "no record has a stage-μ curve")
    src = _heatmap_source(records)
    if src is None:
        skipped["importance_heatmap.png"] = "no record has layer_norms"
    else:
        title = (rf"$\log_{{10}}\,\Vert\Omega_l\Vert_F$ per module ({_ml(src['method'])}, {_tl(src['task'])}, "
                 f"seed {src['seed']})")  # fmt: skip
        try:
            written.append(importance_heatmap(src["layer_norms"], out / "importance_heatmap.png", title))
            figs["importance_heatmap.png"] = _FIGURES["importance_heatmap.png"] + (
                f" From the {method_label(src['method'])} record on {task_label(src['task'])}, seed {src['seed']}."
            )
        except ValueError as e:
            skipped["importance_heatmap.png"] = str(e)
    figure("phi_sweep.png", lambda p: plot_phi_sweep(records, p),
           "no φ-sweep cells (records with sweep=true and φ set, ≥ 2 values of φ > 0 on a task)")  # fmt: skip
    figure("violin_hlora_vs_ewc.png", lambda p: plot_violin(records, p),
           "needs per-item scores of both hlora and ewc_lora on a task")  # fmt: skip
    figure("acc_vs_ppl.png", lambda p: plot_acc_vs_ppl(records, p), "no main cells")
    for name, reason in skipped.items():
        notes.append(f"{name} skipped: {reason}.")

    # Per-item tests, HLoRA vs EWC-LoRA (the numbers in the violin titles).
    item_rows = []
    for t in order_tasks(r["task"] for r in main):
        c = _item_comparison(records, "hlora", "ewc_lora", t)
        if c is not None:
            item_rows.append(
                f"| {_md_escape(task_label(t))} | {c['key']} | {'paired' if c['paired'] else 'Welch'} | "
                f"{c['a'].size} / {c['b'].size} | {c['a'].mean() - c['b'].mean():+.4f} | {_fmt_p(c['p'])} |"
            )

    lines = ["# HLoRA report", ""] + _provenance(records, results_path.name) + [""]
    lines += ["## Tables", "", md_t1, md_t2, md_c]
    lines += ["## Significance", "", significance_markdown(sig)]
    if item_rows:
        lines += [
            "Per-item t-tests, HLoRA minus EWC-LoRA, items pooled over seeds (paired when the items line up):",
            "",
            "| Task | Score | Test | n | Δ mean | p |",
            "|---|---|---|---|---|---|",
            *item_rows,
            "",
        ]
    lines += ["## Figures", ""]
    for name, caption in figs.items():
        lines += [f"![{name}]({name})", "", caption, ""]
    if not figs:
        lines += ["No figure could be drawn from these results.", ""]
    lines += ["Tables also as CSV ([table1.csv](table1.csv), [table2.csv](table2.csv), "
              "[complexity.csv](complexity.csv)) and LaTeX ([tables.tex](tables.tex)).", ""]  # fmt: skip
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    put("report.md", "\n".join(lines))
    return {"files": [str(p) for p in written], "skipped": skipped, "notes": notes}
