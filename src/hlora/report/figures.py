"""Figures (PNG) from records: fronts per task, sweeps, loss curves, per-item violins, acc vs ppl.

Drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display). Every `plot_*`
returns the path written, or None when its data is absent (the caller notes the skip). Colours and
markers follow the rows' order of first appearance, so a row looks the same in every figure; Base is
always a black star. Figures are kept small (100 dpi) so that they load quickly in a README.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..files import atomic_path
from .budget import budget_marks, grouped_marks
from .load import BASE, family_label, role_row, general_names, main_cells, row_labels, row_order, task_label, task_order
from .stats import CAP_RATIO, aggregate, base_point, front, item_comparison, reference_accuracy

__all__ = [
    "DPI",
    "fronts_name",
    "by_family",
    "plot_fronts",
    "plot_sweeps",
    "plot_loss_curves",
    "plot_violin",
    "plot_acc_vs_ppl",
    "violin_pair",
]

DPI = 100
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p")  # "*" is Base's
_PARAM_SYMBOLS = {"phi": "φ", "lam": "λ", "rho": "ρ", "beta": "β", "alpha": "α"}
ITEM_SCORE_LABELS = {
    "ll_gold": "log-likelihood of the gold answer (ll_gold)",
    "acc_norm": "acc_norm per item (0/1)",
    "acc": "acc per item (0/1)",
}


# ----------------------------------------------------------------------------- shared helpers

def new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas is used on save; no pyplot, no display

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def save_png(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out_png


def _tex_safe(s: str) -> str:  # a literal "$" must not start matplotlib's math mode
    return s.replace("$", r"\$")


def _param(param: str) -> str:
    return _PARAM_SYMBOLS.get(param, param)


def style(records: Iterable[dict]) -> dict[str, dict]:
    """A fixed colour and marker per row (order of first appearance); Base a black star. Records with the
    battery (whose fronts figure draws LoRA(μ) as a grey reference) give no row a grey."""
    import matplotlib

    records = list(records)
    rows = [m for m in row_order(records) if m != BASE]
    no_grey = any(r.get("battery_acc") is not None for r in records)
    # tab10 for up to ten rows; beyond, tab20's dark shades then its light ones (no colour used twice)
    big = len(rows) > (9 if no_grey else 10)
    cmap = matplotlib.colormaps["tab20" if big else "tab10"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2)) if big else list(range(10))
    if no_grey:
        order = [k for k in order if k not in ((14, 15) if big else (7,))]
    out = {m: {"color": cmap(order[i % len(order)]), "marker": _MARKERS[i % len(_MARKERS)]} for i, m in enumerate(rows)}
    out[BASE] = {"color": "black", "marker": "*"}
    return out


def _grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return int(math.ceil(n / cols)), cols


def _hide_unused(axes, used: int) -> None:
    nrows, ncols = axes.shape
    for k in range(used, nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)


def _finish(fig, axes, used: int, legend: dict, ncol: int, title: str, out_png: str | Path) -> Path:
    """Hide the unused panels, put the shared legend below them and the title above, and save."""
    _hide_unused(axes, used)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), ncol),
               fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(title, fontsize=11)
    return save_png(fig, out_png)


def _fmt_value(v: float) -> str:
    return f"{v:g}"  # 0.001, 0.5, 1e-05: short either way


# ----------------------------------------------------------------------------- fronts (the headline figure)

def fronts_name(task: str) -> str:
    """File name of a task's fronts figure: `fronts_<task>.png`, the task id made file-name safe
    (`mcq:/dir/my.jsonl` -> `fronts_mcq_my.jsonl.png`)."""
    name = task_label(task) if ":" in task else task  # a data file's path shrinks to its name
    safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in name)
    return f"fronts_{safe}.png"


def _front_label(label: str, pts: list[dict]) -> str:
    params = list(dict.fromkeys(p["sweep"][0] for p in pts if p["sweep"]))
    return _tex_safe(label) + (f" ({', '.join(map(_param, params))})" if len(pts) >= 2 and params else "")


def _axis_scale(metric: str) -> float:
    return 100.0 if metric in ("acc", "battery_acc") else 1.0  # accuracies in percent, anything else as it is


def _xy(p: dict, metric: str) -> tuple[float, float]:
    """A point's value and std on an axis."""
    k = _axis_scale(metric)
    return k * p[metric], k * (p[metric + "_std"] or 0)


def _draw_front(ax, pts: list[dict], metric: str, st: dict, label: str, is_base: bool, xmetric: str = "acc",
                thin: bool = False) -> Any:  # fmt: skip
    """One row on one panel: a line through its sweep points (or a lone marker), ±std in both axes; `thin`
    draws it as a grey reference (small markers, no value labels)."""
    (x, xerr), (y, yerr) = zip(*[_xy(p, xmetric) for p in pts]), zip(*[_xy(p, metric) for p in pts])
    line = "-" if len(pts) >= 2 and not is_base else "none"
    if thin:
        return ax.errorbar(x, y, xerr=xerr, yerr=yerr, ls=line, lw=0.9, color="0.6", marker=st["marker"], ms=3.5,
                           mec="0.6", elinewidth=0.5, capsize=1, label=label, zorder=2)  # fmt: skip
    h = ax.errorbar(x, y, xerr=xerr, yerr=yerr, ls=line, lw=1.4, color=st["color"], marker=st["marker"],
                    ms=15 if is_base else 6, mec="black" if is_base else st["color"], elinewidth=0.8,
                    capsize=2, label=label, zorder=4 if is_base else 3)  # fmt: skip
    if len(pts) >= 2:  # name each point by its sweep value, small, beside it
        for p, xi, yi in zip(pts, x, y):
            if p["sweep"]:
                ax.annotate(_fmt_value(p["sweep"][1]), (xi, yi), xytext=(3, 3), textcoords="offset points",
                            fontsize=6.5, color=st["color"])  # fmt: skip
    return h


_ACC = "domain accuracy % (higher is better)"
_BATTERY = "battery: mean zero-shot accuracy %\n(higher is better)"


def _axis_labels(names: dict) -> dict[str, str]:
    """Axis labels that name the general text ("C4 perplexity", "WikiText-2 perplexity ... stage ν's own text"),
    on two lines where one would outgrow the panel."""
    text = _tex_safe(names["text"])
    own = "\nstage ν's own text" if names["on_nu"] else ""
    return {"acc": _ACC, "general_ppl": f"{text} perplexity (lower is better){own}",
            "general_kl": f"KL(p_base ‖ p_model) on {text}\nnats/token (lower is better)",
            "battery_acc": _BATTERY, "nu_text_ppl": "stage ν's own text: perplexity (lower is better)"}  # fmt: skip


# (x, y) per panel. The third sets the two measures of general ability against each other: where domain
# accuracy saturates, it is where the rows differ (which of the two each one protects).
_FRONT_PANELS = (("acc", "general_ppl"), ("acc", "general_kl"), ("general_kl", "general_ppl"))
# With the battery: domain accuracy against each measure of general ability, one row of panels per family.
_FAMILY_METRICS = ("general_ppl", "general_kl", "battery_acc")
_FAMILY_ORDER = ("hlora", "alternatives", "wise")  # the default families (load.default_family), in this order


def _guides(ax, cap: float | None, cap_ratio: float, acc_ref: float | None, ref_label: str, handles: dict) -> None:
    """The perplexity cap (dashed) and the reference's accuracy acc* (dotted): where the tables read."""
    if cap is not None:
        handles.setdefault(f"cap: Base PPL × {cap_ratio:g}", ax.axhline(cap, ls="--", lw=1, color="grey"))
    if acc_ref is not None:
        h = ax.axvline(100 * acc_ref, ls=":", lw=1, color="grey")
        handles.setdefault(f"acc* = {_tex_safe(ref_label)} main accuracy", h)


_BUDGET_COLORS = ("black", "darkred", "darkgreen", "navy", "purple", "saddlebrown")


def _budget_guides(ax, marks: list[dict], metric: str, handles: dict) -> None:
    """Each forgetting budget on this panel's axis (dash-dot) and the models `hlora tune` returned for it (✕, or +
    and ◆ for the same budget tuned at other learning rates; the seeds' mean ± std, report.budget.grouped_marks),
    one colour per budget."""
    k = _axis_scale(metric)
    colours = {b: _BUDGET_COLORS[i % len(_BUDGET_COLORS)] for i, b in enumerate(dict.fromkeys(m["budget"] for m in marks))}
    for m in marks:
        if m["metric"] != metric:
            continue
        c = colours[m["budget"]]
        handles.setdefault(f"budget {_tex_safe(m['budget'])}", ax.axhline(k * m["line"], ls="-.", lw=1, color=c))
        if m["x"] is not None and m["y"] is not None:
            h = ax.errorbar([100 * m["x"]], [k * m["y"]], xerr=[100 * m.get("xerr", 0.0)] if m.get("xerr") else None,
                            yerr=[k * m.get("yerr", 0.0)] if m.get("yerr") else None, marker="XPD"[m.get("variant", 0) % 3], ms=10, color=c,
                            mec="white", ls="none", zorder=6, elinewidth=1, capsize=2)
            handles.setdefault(_tex_safe(m["label"]), h)


def _outlier_bounds(recs: list[dict], metric: str) -> tuple[float, float] | None:
    """(lowest value, p75 + 3·IQR) of a metric over the records, when some record lies above the latter."""
    vals = sorted(r[metric] for r in recs if r.get(metric) is not None)
    if len(vals) < 4:
        return None
    q1, q3 = float(np.percentile(vals, 25)), float(np.percentile(vals, 75))
    top = q3 + 3 * max(q3 - q1, 1e-12)
    return (vals[0], top) if vals[-1] > top else None


def _clip_outliers(ax, recs: list[dict], metric: str, labels: dict, styles: dict, xmetric: str = "acc",
                   only: set[str] | None = None) -> None:  # fmt: skip
    """A row far above the others (e.g. a method that broke the model) would squash every front into a
    line: cap the axes at p75 + 3·IQR of the values and name what lies above at the top edge (the rows
    in `only`, when given: those drawn on this panel)."""
    if xmetric != "acc" and (xb := _outlier_bounds(recs, xmetric)) is not None:
        lo, right = min(xb[0], ax.get_xlim()[0]), xb[1]
        ax.set_xlim(lo, right + 0.08 * (right - lo))
    yb = _outlier_bounds(recs, metric)
    if yb is None:
        return
    lo, top = min(yb[0], ax.get_ylim()[0]), yb[1]
    ax.set_ylim(lo, top + 0.08 * (top - lo))
    over: dict[str, list[float]] = {}
    for r in recs:
        if r.get(metric) is not None and r[metric] > top and (only is None or r["method"] in only):
            over.setdefault(r["method"], []).append(r[metric])
    x_left, x_right = ax.get_xlim()
    for k, (m, vs) in enumerate(over.items()):
        xs = [r[xmetric] for r in recs if r["method"] == m and r.get(xmetric) is not None]
        x = _axis_scale(xmetric) * float(np.mean(xs)) if xs else (x_left + x_right) / 2
        # an outlier on both axes is named near the corner, its label inside the panel
        x = min(max(x, x_left + 0.15 * (x_right - x_left)), x_right - 0.15 * (x_right - x_left))
        ax.annotate(f"{_tex_safe(labels.get(m, m))}: {max(vs):.3g} ↑", (x, top), xytext=(0, -10 - 9 * k),
                    textcoords="offset points", fontsize=7, ha="center", color=styles[m]["color"],
                    arrowprops={"arrowstyle": "-|>", "color": styles[m]["color"], "lw": 0.8})


def by_family(records: Iterable[dict], task: str) -> bool:
    """Whether a task's fronts figure is drawn one row of panels per family: when its records have the battery."""
    return any(r["task"] == task and r.get("battery_acc") is not None for r in records)


def plot_fronts(records: Iterable[dict], task: str, out_png: str | Path, reference: str | None = None,
                cap_ratio: float = CAP_RATIO, families: bool | None = None,
                metrics: Iterable[str] | None = None, tuned: Iterable[dict] | None = None) -> Path | None:  # fmt: skip
    """Domain accuracy (x) against general ability (y) on one task, each row's front drawn as a line
    through its sweep points (seed means, ±std both ways, labelled with the sweep value). Base is a star,
    with the cap (Base PPL × cap_ratio) dashed and the reference's main accuracy dotted.

    Without the battery (default `families` False): a panel of general perplexity, a second with KL to
    Base when the records have it, a third setting KL (x) against perplexity (y). With it (`families`
    True): panels of perplexity, KL and the battery's mean (or `metrics`) in columns, one row of panels
    per family of rows (the records' `family`: HLoRA and its variants, practical alternatives, WiSE-FT
    curves), Base and, thin and grey, the row whose records say role "plain" (LoRA(μ)) in every row. `reference`:
    default the row whose records say role "reference". `tuned`: `hlora tune` results (report.budget.load_tuned),
    drawn as their budget lines and returned models. None when the task has no record."""
    records = list(records)
    reference = reference or role_row(records, "reference")
    recs = [r for r in records if r["task"] == task]
    if not recs:
        return None
    marks = grouped_marks(budget_marks(records, tuned or [], task))
    if (by_family(recs, task) if families is None else families) and _families(recs):  # Base alone: one row
        return _plot_fronts_by_family(records, recs, task, out_png, reference, cap_ratio, metrics, marks)
    names = general_names(recs, legacy=False)
    axis = _axis_labels(names)
    panels = [p for p in _FRONT_PANELS if all(any(r.get(m) is not None for r in recs) for m in p)]
    styles, labels = style(records), row_labels(records)
    fig = new_figure(5.2 * len(panels) + 0.6, 4.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    base, acc_ref = base_point(recs, task), reference_accuracy(recs, task, reference)
    handles: dict[str, Any] = {}
    for ax, (xmetric, metric) in zip(axes, panels):
        for m in row_order(recs):
            pts = [p for p in front(recs, m, task) if p[metric] is not None and p[xmetric] is not None]
            if pts:
                label = _front_label(labels[m], pts)
                handles.setdefault(label, _draw_front(ax, pts, metric, styles[m], label, m == BASE, xmetric))
        cap = base[1] * cap_ratio if metric == "general_ppl" and base is not None else None
        _guides(ax, cap, cap_ratio, acc_ref if xmetric == "acc" else None, labels.get(reference, reference), handles)
        if xmetric == "acc":
            _budget_guides(ax, marks, metric, handles)
        _clip_outliers(ax, recs, metric, labels, styles, xmetric)
        ax.set_xlabel(axis[xmetric])
        ax.set_ylabel(axis[metric])
        ax.grid(alpha=0.3)
        ax.margins(0.08)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=8,
               ncol=min(len(handles), 3 + len(panels)), frameon=False)  # fmt: skip
    fig.suptitle(f"{_tex_safe(task_label(task))}: domain gain vs general ability (↘ better; mean ± std over seeds)",
                 fontsize=10)  # fmt: skip
    return save_png(fig, out_png)


def _families(recs: list[dict]) -> dict[str, list[str]]:
    """Rows per family (Base left out), the default families first in their fixed order, others as they come."""
    fam: dict[str, list[str]] = {}
    for m in row_order(recs):
        if m != BASE:
            f = next(r.get("family") or "alternatives" for r in recs if r["method"] == m)
            fam.setdefault(f, []).append(m)
    order = [f for f in _FAMILY_ORDER if f in fam] + [f for f in fam if f not in _FAMILY_ORDER]
    return {f: fam[f] for f in order}


def _plot_fronts_by_family(records: list[dict], recs: list[dict], task: str, out_png: str | Path, reference: str,
                           cap_ratio: float, metrics: Iterable[str] | None, marks: list[dict]) -> Path | None:  # fmt: skip
    """The fronts figure with one row of panels per family (see `plot_fronts`)."""
    names = general_names(recs, legacy=False)
    axis = _axis_labels(names)
    ys = [m for m in (metrics or _FAMILY_METRICS) if any(r.get(m) is not None for r in recs)]
    fams = _families(recs)
    if not ys:
        return None
    styles, labels = style(records), row_labels(records)
    base, acc_ref = base_point(recs, task), reference_accuracy(recs, task, reference)
    fronts = {m: front(recs, m, task) for m in row_order(recs)}
    plain = role_row(records, "plain")
    fig = new_figure(4.6 * len(ys) + 3.4, 3.5 * len(fams) + 1.0)
    axes = fig.subplots(len(fams), len(ys), squeeze=False, sharex=True, sharey="col")
    shared: dict[str, Any] = {}  # Base, LoRA(μ) as a reference, the guides: one legend under the figure
    for i, (f, members) in enumerate(fams.items()):
        own: dict[str, Any] = {}
        drawn = set(members) | {BASE}
        for j, metric in enumerate(ys):
            ax = axes[i, j]
            rows = [BASE] + ([plain] if plain in fronts and plain not in members else []) + members
            for m in rows:
                pts = [p for p in fronts.get(m, []) if p[metric] is not None and p["acc"] is not None]
                if not pts:
                    continue
                thin = m == plain and m not in members
                label = _front_label(labels[m], pts) + (" (grey reference)" if thin else "")
                h = _draw_front(ax, pts, metric, styles[m], label, m == BASE, thin=thin)
                (shared if m == BASE or thin else own).setdefault(label, h)
            cap = base[1] * cap_ratio if metric == "general_ppl" and base is not None else None
            _guides(ax, cap, cap_ratio, acc_ref, labels.get(reference, reference), shared)
            _budget_guides(ax, marks, metric, shared)
            if metric != "battery_acc":  # a broken model is an outlier upwards in PPL and KL only
                _clip_outliers(ax, recs, metric, labels, styles, only=drawn)
            ax.set_ylabel(axis[metric], fontsize=8.5)
            ax.grid(alpha=0.3)
            ax.margins(0.08)
            if i == len(fams) - 1:
                ax.set_xlabel(axis["acc"])
            ax.tick_params(labelbottom=True)
        axes[i, 0].set_title(_tex_safe(family_label(f)), loc="left", fontsize=10, fontweight="bold")
        axes[i, -1].legend(list(own.values()), list(own), loc="upper left", bbox_to_anchor=(1.03, 1.0), fontsize=7.5,
                           frameon=False, borderaxespad=0.0)  # fmt: skip
    fig.legend(list(shared.values()), list(shared), loc="outside lower center", fontsize=8, ncol=min(len(shared), 4),
               frameon=False)  # fmt: skip
    fig.suptitle(f"{_tex_safe(task_label(task))}: domain gain vs general ability, one row per family (→ better; "
                 "lower PPL and KL, higher battery better; mean ± std over seeds)", fontsize=10)  # fmt: skip
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- sweeps

def _sweep_panels(records: list[dict]) -> list[tuple[str, str]]:
    """(row, param) pairs with ≥ 2 values of that param on some task."""
    out: list[tuple[str, str]] = []
    for m in row_order(records):
        for t in task_order(records):
            counts = Counter(p["sweep"][0] for p in front(records, m, t) if p["sweep"])
            out += [(m, param) for param, n in counts.items() if n >= 2 and (m, param) not in out]
    return out


_ACC_C, _PPL_C = "tab:blue", "tab:red"


def _sweep_panel(ax, ax2, records: list[dict], m: str, param: str, legend: dict) -> list[float]:
    """One row's sweep of one param: accuracy on ax, perplexity on ax2, a marker per task.

    Returns the swept values drawn (to choose a log axis)."""
    values: list[float] = []
    for j, t in enumerate(task_order(records)):
        pts = [p for p in front(records, m, t) if p["sweep"] and p["sweep"][0] == param]
        if len(pts) < 2:
            continue
        xs = [p["sweep"][1] for p in pts]
        values += xs
        mk = _MARKERS[j % len(_MARKERS)]
        h1 = ax.errorbar(xs, [100 * p["acc"] for p in pts], yerr=[100 * (p["acc_std"] or 0) for p in pts],
                         color=_ACC_C, marker=mk, ls="-", capsize=2)  # fmt: skip
        h2 = ax2.errorbar(xs, [p["general_ppl"] for p in pts], yerr=[p["general_ppl_std"] or 0 for p in pts],
                          color=_PPL_C, marker=mk, ls="--", capsize=2, mfc="white")  # fmt: skip
        legend.setdefault(f"{_tex_safe(task_label(t))} accuracy % (left)", h1)
        ppl = _tex_safe(general_names(records, legacy=False)["ppl"])
        legend.setdefault(f"{_tex_safe(task_label(t))} {ppl} (right)", h2)
    return values


def plot_sweeps(records: Iterable[dict], out_png: str | Path) -> Path | None:
    """Accuracy (left axis, solid) and general perplexity (right axis, dashed) against the swept value,
    one panel per (row, swept param), a marker per task; log axis when the values span ≥ 20× and are
    positive. None when no row has a sweep of ≥ 2 values."""
    records = list(records)
    panels = _sweep_panels(records)
    if not panels:
        return None
    labels = row_labels(records)
    nrows, ncols = _grid_shape(len(panels))
    fig = new_figure(max(4.6 * ncols, 5.5), 3.6 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    legend: dict[str, Any] = {}
    for k, (m, param) in enumerate(panels):
        ax = axes[k // ncols, k % ncols]
        ax2 = ax.twinx()
        values = _sweep_panel(ax, ax2, records, m, param, legend)
        if min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(f"{_param(param)}")
        ax.set_ylabel("accuracy % ↑", color=_ACC_C)
        ax2.set_ylabel(f"{_tex_safe(general_names(records, legacy=False)['ppl'])} ↓", color=_PPL_C)
        ax.tick_params(axis="y", colors=_ACC_C)
        ax2.tick_params(axis="y", colors=_PPL_C)
        ax.grid(alpha=0.3)
        ax.set_title(f"{_tex_safe(labels[m])}: {_param(param)} sweep", fontsize=10)
    text = _tex_safe(general_names(records, legacy=False)["text"])
    return _finish(fig, axes, len(panels), legend, 4,
                   f"Sweeps: domain accuracy and {text} perplexity (mean ± std over seeds)", out_png)


# ----------------------------------------------------------------------------- loss curves

def _smooth(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    if window <= 1 or y.size < window:
        return x, y
    return x[window - 1:], np.convolve(y, np.ones(window) / window, mode="valid")


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss = np.nanmean([_as_float(r["curve"]["loss"], n) for r in same], axis=0)
        pen = np.nanmean([_as_float(r["curve"].get("penalty"), n) for r in same], axis=0)
    return np.array(steps0, dtype=float), loss, pen, len(same)


def _curve_panels(ax_l, ax_p, main: list[dict], t: str, styles: dict, labels: dict, handles: dict) -> tuple[int, set]:
    """Draw one task's loss and penalty panels; returns (smoothing window, seed counts)."""
    pen_pos: list[float] = []
    window, nseeds = 1, set()
    for m in row_order(r for r in main if r["task"] == t):
        cur = _method_curve([r for r in main if r["task"] == t and r["method"] == m])
        if cur is None:
            continue
        x, loss, pen, ns = cur
        nseeds.add(ns)
        window = max(window, x.size // 50)
        st = styles[m]
        ax_l.plot(x, loss, color=st["color"], alpha=0.2, lw=0.8)
        (h,) = ax_l.plot(*_smooth(x, loss, x.size // 50), color=st["color"], lw=1.6)
        handles.setdefault(_tex_safe(labels[m]), h)
        if np.nanmax(np.abs(np.nan_to_num(pen)), initial=0.0) > 0:
            ax_p.plot(*_smooth(x, pen, x.size // 50), color=st["color"], lw=1.6)
            pen_pos.extend(pen[np.isfinite(pen) & (pen > 0)].tolist())
    if not pen_pos:
        ax_p.text(0.5, 0.5, "no method logged a nonzero penalty", ha="center", va="center",
                  transform=ax_p.transAxes, color="grey")  # fmt: skip
    elif max(pen_pos) / min(pen_pos) > 1e2:
        ax_p.set_yscale("log")
    return window, nseeds


def plot_loss_curves(records: Iterable[dict], out_png: str | Path) -> Path | None:
    """Stage-μ task loss (top row) and penalty (bottom row) per row against step, a column per task;
    mean over seeds with equal steps (main cells). None when no record has a curve."""
    records = list(records)
    main = [r for r in main_cells(records) if r["curve"] and r["curve"].get("step")]
    if not main:
        return None
    tasks = task_order(main)
    styles, labels = style(records), row_labels(records)
    fig = new_figure(max(4.6 * len(tasks), 6.0), 6.4)
    axes = fig.subplots(2, len(tasks), sharex="col", squeeze=False)
    handles: dict[str, Any] = {}
    windows, seeds_used = {1}, set()
    for j, t in enumerate(tasks):
        ax_l, ax_p = axes[0, j], axes[1, j]
        window, nseeds = _curve_panels(ax_l, ax_p, main, t, styles, labels, handles)
        windows.add(window)
        seeds_used |= nseeds
        ax_l.set_title(f"{_tex_safe(task_label(t))}: task loss", fontsize=10)
        ax_l.set_ylabel("task loss (CE)")
        ax_p.set_title(f"{_tex_safe(task_label(t))}: regularization penalty", fontsize=10)
        ax_p.set_ylabel("penalty (added to loss)")
        ax_p.set_xlabel("step")
        for ax in (ax_l, ax_p):
            ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 5),
               fontsize=8, frameon=False)  # fmt: skip
    notes = ["mean over seeds" if seeds_used and max(seeds_used) > 1 else "one seed"]
    if max(windows) > 1:
        notes.append(f"moving average over {max(windows)} steps, raw faint")
    fig.suptitle(f"Stage μ training: task loss and penalty per method ({'; '.join(notes)})", fontsize=11)
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- per-item violins

def violin_pair(records: Iterable[dict], a: str | None = None) -> tuple[str | None, str | None]:
    """(a, b) rows for the per-item comparison: the reference (`a`, default the row whose records say role
    "reference") against the row whose records say role "rival" (EWC-LoRA); None where no record says it."""
    records = list(records)
    return a or role_row(records, "reference"), role_row(records, "rival")


def _violin(ax, x: np.ndarray, pos: int, color) -> None:
    if x.size >= 2 and np.ptp(x) > 0:
        parts = ax.violinplot([x], positions=[pos], showmedians=True, widths=0.8)
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_edgecolor("black")
            body.set_alpha(0.6)
        for key in ("cmedians", "cmins", "cmaxes", "cbars"):
            if key in parts:
                parts[key].set_color("black")
                parts[key].set_linewidth(1.0)
    else:  # a constant sample has no density to draw
        ax.scatter([pos] * x.size, x, color=color, s=12)
    ax.scatter([pos], [x.mean()], color="white", edgecolor="black", zorder=3, s=30, label="mean" if pos == 1 else None)


def _fmt_p(p: float) -> str:
    return "n/a" if p is None or not math.isfinite(p) else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def plot_violin(records: Iterable[dict], out_png: str | Path, a: str | None = None,
                b: str | None = None) -> Path | None:  # fmt: skip
    """Violins of per-item ll_gold (acc_norm if absent) of rows a vs b per task (default: HLoRA vs
    the EWC row), t-test p in each title (paired when the items line up seed by seed, else Welch).
    None without per-item scores of both rows on some task."""
    records = list(records)
    da, db = violin_pair(records)
    a, b = a or da, b or db
    comps = [(t, c) for t in task_order(main_cells(records)) if (c := item_comparison(records, a, b, t)) is not None]
    if not comps:
        return None
    styles, labels = style(records), row_labels(records)
    nrows, ncols = _grid_shape(len(comps))
    fig = new_figure(max(3.8 * ncols, 4.5), 3.9 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, (t, c) in enumerate(comps):
        ax = axes[k // ncols, k % ncols]
        for pos, (m, x) in enumerate(((a, c["a"]), (b, c["b"])), start=1):
            _violin(ax, x, pos, styles[m]["color"])
        ax.set_xticks([1, 2], [f"{_tex_safe(labels[m])}\n(n={c[k].size})" for m, k in ((a, "a"), (b, "b"))])
        ax.set_ylabel(ITEM_SCORE_LABELS.get(c["key"], c["key"]))
        test = "paired t" if c["paired"] else "Welch t"
        ax.set_title(f"{_tex_safe(task_label(t))}: {test}-test p = {_fmt_p(c['p'])}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="lower right", fontsize=8)
    _hide_unused(axes, len(comps))
    fig.suptitle(f"Per-item scores, {_tex_safe(labels[a])} vs {_tex_safe(labels[b])} "
                 "(items pooled over seeds; bar: median, ○: mean)", fontsize=10)  # fmt: skip
    return save_png(fig, out_png)


# ----------------------------------------------------------------------------- overview

def plot_acc_vs_ppl(records: Iterable[dict], out_png: str | Path) -> Path | None:
    """Domain accuracy against general perplexity, one marker per row's main cells (mean ± std over
    seeds), a panel per task; a row's other sweep points as a dashed line through them. Up-left is
    better. None without main cells."""
    records = list(records)
    cells = aggregate(records)
    if not cells:
        return None
    tasks = [t for t in task_order(records) if any(k[1] == t for k in cells)]
    styles, labels = style(records), row_labels(records)
    nrows, ncols = _grid_shape(len(tasks))
    fig = new_figure(max(4.6 * ncols, 5.5), 4.0 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    legend: dict[str, Any] = {}
    for k, t in enumerate(tasks):
        ax = axes[k // ncols, k % ncols]
        for m in row_order(records):
            pts = front(records, m, t)
            if len(pts) >= 2:
                ax.plot([p["general_ppl"] for p in pts], [100 * p["acc"] for p in pts], ls="--", lw=1,
                        color=styles[m]["color"], marker=".", ms=5, alpha=0.8)  # fmt: skip
            c = cells.get((m, t))
            if c is None:
                continue
            st = styles[m]
            h = ax.errorbar(c["general_ppl"], c["acc"] * 100, xerr=c["general_ppl_std"] or 0,
                            yerr=(c["acc_std"] or 0) * 100, color=st["color"], marker=st["marker"],
                            ms=13 if m == BASE else 7, mec="black", ls="none", capsize=3)  # fmt: skip
            legend.setdefault(_tex_safe(labels[m]), h)
        ax.set_xlabel(_axis_labels(general_names(records, legacy=False))["general_ppl"])
        ax.set_ylabel("accuracy % (higher is better)")
        ax.set_title(f"{_tex_safe(task_label(t))}   (↖ better)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.margins(0.12)
    text = _tex_safe(general_names(records, legacy=False)["text"])
    return _finish(fig, axes, len(tasks), legend, 5,
                   f"Accuracy vs {text} perplexity: main cells, sweeps dashed (up-left is better)", out_png)
