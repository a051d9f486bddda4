"""`write_report`: every table and figure from `results.json` into one folder, with `report.md`.

The report answers one question first: does HLoRA forget less than the alternatives at the same
domain gain? So `report.md` opens with the matched-accuracy table and the fronts per task, then the
fixed tables (main cells only), significance and the other figures. Absent data skips a table or
figure with a note, never an error; bad input fails before anything is written.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from ..files import write_text
from . import compare as C
from . import figures as F
from . import tables as T
from .budget import load_tuned, tuned_markdown
from .importance import importance_heatmap
from .load import general_names, load_results, main_cells, role_row, row_labels, row_order, task_label, task_order
from .letters import letter_analysis
from .stats import (
    compute_summary,
    head_to_head,
    item_comparison,
    matched_summary,
    seed_significance,
    transfer_summary,
)

__all__ = ["write_report", "FIGURE_CAPTIONS"]

FIGURE_CAPTIONS = {
    "loss_curves.png": "Stage-μ task loss (top) and regularization penalty (bottom) per method against step.",
    "importance_heatmap.png": "log10 ‖Ω_l‖ of the general-stage importance per module type and transformer block.",
    "sweeps.png": "Domain accuracy and general perplexity against each swept hyper-parameter, per method.",
    "violin_hlora_vs_ewc.png": "Per-item gold log-likelihood (ll_gold), HLoRA vs the EWC row, with t-test p-values.",
    "acc_vs_ppl.png": "Domain accuracy against general perplexity of every method's main cells (up-left is better).",
}
_SKIP_REASONS = {
    "loss_curves.png": "no record has a stage-μ curve",
    "sweeps.png": "no row has a sweep of ≥ 2 values of one parameter on a task",
    "violin_hlora_vs_ewc.png": "needs per-item scores of both HLoRA and the EWC row on a task",
    "acc_vs_ppl.png": "no main cells",
}


_MATCHED_TITLE = "### General perplexity at matched domain accuracy\n\n"
_LETTER_TITLE = "### Answer letters: which letter each row picks, and whether a loss is a letter prior\n\n"


def _matched_title(names: dict) -> str:
    if not names["named"]:
        return _MATCHED_TITLE
    what = (f"{names['text']} perplexity, {names['kl']} and battery" if names["battery"]
            else f"{names['text']} perplexity and {names['kl']}")
    return f"### {what} at matched domain accuracy\n\n"


def _main_title(names: dict) -> str:
    if not names["named"]:
        return "Main table: general perplexity and domain accuracy per method (main cells)"
    extra = ", battery mean" if names["battery"] else ""
    return f"Main table: {names['text']} perplexity{extra} and domain accuracy per method (main cells)"
_H2H_TITLE = "### Head to head: every front point against the reference, paired by seed\n\n"


class _Out:
    """The files written so far, the skips and the notes: what `write_report` returns."""

    def __init__(self, folder: Path):
        self.folder, self.files, self.skipped, self.notes = folder, [], {}, []
        self.captions: dict[str, str] = {}

    def put(self, name: str, text: str) -> None:
        write_text(self.folder / name, text)
        self.files.append(self.folder / name)

    def figure(self, name: str, make: Callable[[Path], Path | None], caption: str, reason: str) -> None:
        path = make(self.folder / name)
        if path is None:
            self.skipped[name] = reason
        else:
            self.files.append(path)
            self.captions[name] = caption


# ----------------------------------------------------------------------------- tables

def _table_sections(records: list[dict], reference: str, out: _Out) -> dict[str, str]:
    """Compute every table, write its CSV/LaTeX files, return the Markdown sections by name."""
    labels, names = row_labels(records), general_names(records)
    t1, t2 = T.results_grid(records), T.results_grid(records, T.ablation_rows(records))
    comp = T.complexity(records, reference)
    # a grid in progress whose reference row has no cell yet gets no matched table
    has_ref = any(r["method"] == reference for r in records)
    matched = [matched_summary(records, t, reference) for t in task_order(records)] if has_ref else []
    matched = [s for s in matched if s["acc_ref"] is not None or s["base"] is not None]
    transfer = [s for t in task_order(main_cells(records))
                if (s := transfer_summary(records, t, reference))["targets"]]
    compute = compute_summary(records)
    h2h = [h for t in task_order(records) if (h := head_to_head(records, t, reference))["ref_seeds"]]
    across = T.sweeps_across_tasks_markdown(records)
    # An lr sweep's points are one row's settings, not a front: each gets its own line in the letters table.
    swept = [r["sweep"]["param"] for r in records if r.get("sweep")]
    letters = letter_analysis(records, points=bool(swept) and set(swept) == {"lr"})
    md = {
        "h2h": (_H2H_TITLE + "\n".join(C.head_to_head_markdown(h, names) for h in h2h)) if h2h else "",
        "matched": _matched_title(names) + C.matched_markdown(matched, names) if matched else "",
        "main": T.grid_markdown(t1, _main_title(names)),
        "ablation": T.grid_markdown(t2, "Ablations (layer-wise and element-wise regularization)"),
        "retention": ("### Cross-task retention\n\n" + C.retention_markdown(transfer)) if transfer else "",
        "letters": (_LETTER_TITLE + C.letter_markdown(letters)) if letters else "",
        "compute": "### Compute per method\n\n" + T.compute_markdown(compute),
        "complexity": T.complexity_markdown(comp, "Importance cost: SI (HLoRA) vs Fisher (EWC-LoRA)"),
        "significance": T.significance_markdown(seed_significance(records, reference), labels, reference, names),
        "fronts": "".join(f"### Front points: {task_label(t)} (seed means)\n\n" + T.front_points_markdown(records, t)
                          + "\n" for t in task_order(records)),
        "across": ("### One setting across tasks (seed means)\n\n" + across) if across else "",
    }
    out.put("table1.csv", T.grid_csv(t1))
    out.put("table2.csv", T.grid_csv(t2))
    out.put("complexity.csv", T.complexity_csv(comp))
    out.put("compute.csv", T.compute_csv(compute))
    if matched:
        out.put("matched.csv", C.matched_csv(matched, names))
    if transfer:
        out.put("retention.csv", C.retention_csv(transfer))
    if letters:
        out.put("letters.csv", C.letter_csv(letters))
    out.put("tables.tex", _latex(t1, t2, comp, matched, names))
    _table_notes(records, t2, comp, matched, transfer, reference, out)
    return md


def _latex(t1: dict, t2: dict, comp: dict, matched: list[dict], names: dict) -> str:
    what = (f"{T._tex(names['text'])} perplexity ({T._tex(names['ppl'])}" if names["named"]
            else "General perplexity (PPL")
    parts = [
        "% Generated by `hlora report`; needs \\usepackage{booktabs}.\n",
        T.grid_latex(t1, what + r", lower is better) and domain accuracy (Acc \%, higher is "
                     r"better), mean $\pm$ std over seeds.", "tab:hlora-main"),  # fmt: skip
        T.grid_latex(t2, "Ablations: layer-wise and element-wise regularization removed.", "tab:hlora-ablation"),
        T.complexity_latex(comp, "Cost of the importance: SI (HLoRA) vs diagonal Fisher (EWC-LoRA).", "tab:hlora-cost"),
    ]
    parts += [C.matched_latex(s, f"tab:hlora-matched-{i}", names) for i, s in enumerate(matched)]
    return "\n".join(parts)


def _table_notes(records, t2, comp, matched, transfer, reference, out: _Out) -> None:
    if not t2["methods"]:
        out.notes.append("Ablation table is empty: no record is of a row of the ablation table.")
    if all(r["seconds"] is None and r["bytes"] is None for r in comp["rows"]):
        out.notes.append("Complexity table is empty: no record has importance or full-Fisher cost fields.")
    if not matched:
        out.notes.append(f"Matched-accuracy table skipped: no main cell of the reference row "
                         f"{repr(reference) if reference else '(none in these records)'}.")
    for s in matched:
        if s["acc_ref"] is None:
            out.notes.append(f"{task_label(s['task'])}: no main cell of '{reference}', so no matched accuracy.")
        if s["base"] is None:
            out.notes.append(f"{task_label(s['task'])}: no Base cell, so no perplexity cap and no dominated area.")
    if not transfer:
        out.notes.append("Cross-task retention table skipped: no record has `transfer` results.")
    evals = list(dict.fromkeys(r["general_eval"] for r in records))
    if len(evals) > 1:
        out.notes.append("The records measure general perplexity and KL on different texts (" + ", ".join(evals)
                         + "): rows on different texts do not compare on those columns.")


# ----------------------------------------------------------------------------- figures

def _heatmap_source(records: list[dict], reference: str | None) -> dict | None:
    """The record whose layer_norms to draw: a main record of the reference with its importance kind, lowest seed."""
    cands = [r for r in records if r["layer_norms"]]
    if not cands:
        return None
    tasks = task_order(records)
    kind = next((r["importance_kind"] for r in records if r["method"] == reference and r.get("importance_kind")), None)

    def rank(r):
        return (not r["main"], r["method"] != reference, r.get("importance_kind") not in (None, kind), r["seed"],
                tasks.index(r["task"]))  # fmt: skip

    return min(cands, key=rank)


def _heatmap(records: list[dict], reference: str | None, out: _Out) -> None:
    src = _heatmap_source(records, reference)
    name = "importance_heatmap.png"
    if src is None:
        out.skipped[name] = "no record has layer_norms"
        return
    who = f"{row_labels(records)[src['method']]}, {task_label(src['task'])}, seed {src['seed']}"
    try:
        title = rf"$\log_{{10}}\,\Vert\Omega_l\Vert_F$ per module ({who.replace('$', chr(92) + '$')})"
        out.files.append(importance_heatmap(src["layer_norms"], out.folder / name, title))
        out.captions[name] = FIGURE_CAPTIONS[name] + f" From the record {who}."
    except ValueError as e:
        out.skipped[name] = str(e)


def _fronts_caption(records: list[dict], task: str) -> str:
    names = general_names([r for r in records if r["task"] == task], legacy=False)
    if F.by_family(records, task):
        return (f"{task_label(task)}: domain accuracy against {names['ppl']}, {names['kl']} to Base and the battery's "
                "mean accuracy, one row of panels per family of rows (HLoRA and its variants, practical alternatives, "
                "WiSE-FT curves) with Base (star) and LoRA(μ) (thin grey) in every panel; each method's sweep is a "
                "line through its points, labelled with the swept value.")
    return (f"{task_label(task)}: domain accuracy against {names['ppl']} (and {names['kl']} to Base where measured); "
            "each method's sweep is a line through its points, labelled with the swept value.")


def _figures(records: list[dict], reference: str, out: _Out, tunes: list[dict] = ()) -> list[str]:
    """Draw every figure; returns the names of the fronts figures (shown first in report.md)."""
    fronts = []
    for t in task_order(records):
        name = F.fronts_name(t)
        out.figure(name, lambda p, t=t: F.plot_fronts(records, t, p, reference, tuned=tunes), _fronts_caption(records, t),
                   "no record on this task")  # fmt: skip
        fronts.append(name)
    out.figure("loss_curves.png", lambda p: F.plot_loss_curves(records, p), FIGURE_CAPTIONS["loss_curves.png"],
               _SKIP_REASONS["loss_curves.png"])  # fmt: skip
    _heatmap(records, reference, out)
    for name, plot in (("sweeps.png", F.plot_sweeps), ("violin_hlora_vs_ewc.png", F.plot_violin),
                       ("acc_vs_ppl.png", F.plot_acc_vs_ppl)):  # fmt: skip
        out.figure(name, lambda p, plot=plot: plot(records, p), FIGURE_CAPTIONS[name], _SKIP_REASONS[name])
    return [n for n in fronts if n in out.captions]


# ----------------------------------------------------------------------------- report.md

def _provenance(records: list[dict], source_name: str) -> list[str]:
    main = main_cells(records)
    labels = row_labels(records)
    lines = [
        f"Source: `{source_name}`, {len(records)} records ({len(main)} main cells, "
        f"{len(records) - len(main)} other sweep cells); methods: " + ", ".join(labels[m] for m in row_order(records))
        + "; tasks: " + ", ".join(task_label(t) for t in task_order(records))
        + "; seeds: " + ", ".join(map(str, sorted({r["seed"] for r in records}))) + ".",
    ]  # fmt: skip
    names = general_names(records, legacy=False)
    text = f"General measures (general_ppl, general_kl): {names['ppl']}"
    if names["on_nu"]:
        text += ", the text stage ν (and replay) train on: stage ν's own distribution, not held out from those rows"
    if not any(r["record_version"] >= 2 for r in records):
        text += " (records from before records named their text)"
    lines.append(text + (f"; stage ν's own text also as {names['nu_ppl']}" if names["nu_ppl"] else "")
                 + ("; battery: mean zero-shot accuracy over its tasks" if names["battery"] else "") + ".")
    commits = sorted({r["git_commit"] for r in records if r.get("git_commit")})
    if commits:
        plural = "s" if len(commits) > 1 else ""
        lines.append(f"git commit{plural}: " + ", ".join(f"`{c[:12]}`" for c in commits))
    versions = next((r["versions"] for r in records if r.get("versions")), None)
    if versions:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return lines


def _record_notes(records: list[dict], out: _Out) -> None:
    main = main_cells(records)
    dups = [k for k, n in Counter((r["method"], r["task"], r["seed"]) for r in main).items() if n > 1]
    if dups:
        out.notes.append(f"{len(dups)} (method, task, seed) main cells occur more than once (e.g. {dups[0]}); "
                         "all are averaged.")  # fmt: skip
    if not main:
        out.notes.append("No record is a main cell: the main and ablation tables are empty.")


def _item_tests(records: list[dict], reference: str) -> list[str]:
    """Per-item t-tests of the violin figure, as Markdown lines (empty without per-item scores)."""
    a, b = F.violin_pair(records, reference)
    comps = {t: c for t in task_order(main_cells(records)) if (c := item_comparison(records, a, b, t)) is not None}
    return [T.item_tests_markdown(comps, row_labels(records), a, b)] if comps else []


def _report_md(records, source: str, md: dict, fronts: list[str], reference: str, out: _Out) -> str:
    ref = row_labels(records).get(reference, reference)
    lines = ["# HLoRA report", ""] + _provenance(records, source) + [""]
    lines += [f"## Forgetting at matched domain gain ({ref} as reference)", ""]
    lines += [md["h2h"], md["matched"] or "No matched-accuracy table (see the notes).", ""]
    if md.get("budgets"):
        lines += [md["budgets"], ""]
    for name in fronts:
        lines += [f"![{name}]({name})", "", out.captions[name], ""]
    tables = ("main", "ablation", "across", "retention", "letters", "compute", "complexity")
    lines += ["## Tables", ""] + [md[k] for k in tables if md[k]]
    lines += ["## Significance", "", md["significance"]] + _item_tests(records, reference)
    others = [n for n in out.captions if n not in fronts]
    lines += ["## Figures", ""]
    for name in others:
        lines += [f"![{name}]({name})", "", out.captions[name], ""]
    if not out.captions:
        lines += ["No figure could be drawn from these results.", ""]
    csvs = [p.name for p in out.files if p.suffix == ".csv"]
    links = ", ".join(f"[{n}]({n})" for n in csvs)
    lines += [f"Tables also as CSV ({links}) and LaTeX ([tables.tex](tables.tex)).", ""]
    if out.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in out.notes] + [""]
    return "\n".join(lines)


def write_report(results_path: str | Path, out_dir: str | Path, reference: str | None = None,
                 tuned: Iterable[str | Path] = ()) -> dict:
    """Tables, figures and `report.md` from `results.json` into out_dir, every file atomically.

    Reads only results_path, and checks it fully before writing anything. `reference` is the row
    the others are matched against (its main cell's accuracy); default the row whose records say role "reference"
    (hlora.record: HLoRA for records older than roles). `tuned`: `hlora tune` results (tune.json files) whose budget
    lines and returned models the fronts figures add, with a table of them. Returns {"files": [paths written],
    "skipped": {figure: reason}, "notes": [notes in report.md]}.
    """
    results_path = Path(results_path)
    records = load_results(results_path)
    tunes = load_tuned(tuned)
    reference = reference or role_row(records, "reference") or ""
    out = _Out(Path(out_dir))
    _record_notes(records, out)
    md = _table_sections(records, reference, out)
    md["budgets"] = ("### Forgetting budgets (`hlora tune`)\n\n" + tuned_markdown(tunes, records)) if tunes else ""
    fronts = _figures(records, reference, out, tunes)
    out.notes += [f"{name} skipped: {reason}." for name, reason in out.skipped.items()]
    order = ("h2h", "matched", "budgets", "fronts", "across", "main", "ablation", "retention", "letters", "compute",
             "complexity")
    sections = [md[k] for k in order if md[k]] + ["### Significance over seeds\n", md["significance"]]
    out.put("tables.md", "\n".join(sections))
    out.put("report.md", _report_md(records, results_path.name, md, fronts, reference, out))
    return {"files": [str(p) for p in out.files], "skipped": out.skipped, "notes": out.notes}
