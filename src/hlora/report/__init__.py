"""Reports from `results.json` only: tables (Markdown, CSV, LaTeX), figures (PNG) and statistics.

Everything here is a pure function of the records in `results.json` (docs/design.md section 7.3); the
report never opens a run directory, a model or an importance file. Entry points: `write_report`
(`hlora report`) and `inspect_importance` (`hlora inspect`, from per-module norms: no torch).

Modules: `load` (reading and checking records, how the general measures are named), `stats` (seed
means, t-tests, fronts, matched accuracy, caps, dominated area, answer letters), `tables`, `figures`,
`compare` (tables against a reference: matched, retention, head to head, letters), `importance` (layer weights,
heatmap), `budget` (forgetting budgets from `hlora tune` on the fronts), `write` (`write_report`).
"""
from __future__ import annotations

from .compare import head_to_head_markdown, letter_markdown, matched_markdown, retention_markdown
from .figures import plot_acc_vs_ppl, plot_fronts, plot_loss_curves, plot_sweeps, plot_violin
from .importance import (
    entropy,
    importance_heatmap,
    importance_matrix,
    importance_summary,
    inspect_importance,
    layer_weights,
)
from .load import ResultsError, load_results, row_labels, row_order, task_label
from .letters import letter_analysis
from .stats import (
    acc_under_cap,
    aggregate,
    dominated_area,
    front,
    interp_ppl_at_acc,
    item_scores,
    matched_summary,
    mean_std,
    paired_matched_test,
    head_to_head,
    seed_significance,
    ttest,
)
from .tables import (
    ablation_rows,
    complexity,
    complexity_csv,
    complexity_latex,
    complexity_markdown,
    grid_csv,
    grid_latex,
    grid_markdown,
    results_grid,
)
from .write import write_report

plot_phi_sweep = plot_sweeps  # the old name: the sweep figure now covers any swept parameter

# What this file imports is the package's API (one list to keep, not two).
__all__ = sorted(n for n, v in dict(globals()).items() if not n.startswith("_") and callable(v)
                 and getattr(v, "__module__", "").startswith(("hlora.report", "hlora.record")))
