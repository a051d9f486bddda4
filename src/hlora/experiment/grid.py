"""The grid: every cell of a plan without a record, results.json after each, the report; and the demo."""
from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path

from ..files import write_json
from .plan import ExperimentConfig, plan, run_order
from .records import run_cell


class _DataRoot:
    """Point task lookups at cfg.data_root for the duration of the experiment (demo: embedded data)."""

    def __init__(self, root: str):
        self.root, self.old = root, None

    def __enter__(self):
        import os

        if self.root:
            self.old = os.environ.get("HLORA_DATA")
            os.environ["HLORA_DATA"] = self.root

    def __exit__(self, *exc):
        import os

        if self.root:
            if self.old is None:
                os.environ.pop("HLORA_DATA", None)
            else:
                os.environ["HLORA_DATA"] = self.old


def records_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.records) if cfg.records else Path(cfg.out) / "records"


def run_experiment(cfg: ExperimentConfig, progress=print, report: bool = True, collect_only: bool = False) -> Path:
    """Run every cell without a record; rewrite results.json after each; write the report.
    `collect_only`: run nothing, gather the cells that have a record (checked against this config).
    Returns the folder holding results.json (the records' parent)."""
    from ..evaluate.engine import reference_cache
    from ..report import write_report

    cells = plan(cfg)
    if cfg.data_root == "embedded":  # the subset shipped inside the package
        from ..assets import EMBEDDED_DATA

        cfg = dataclasses.replace(cfg, data_root=str(EMBEDDED_DATA))
    records = records_dir(cfg)
    records.mkdir(parents=True, exist_ok=True)
    home = records.parent
    done_recs: dict[str, dict] = {}

    def results() -> list[dict]:  # in the plan's order, whatever order the cells ran in
        return [done_recs[c.name] for c in cells if c.name in done_recs]

    # Every cell's KL is taken against the same base model on the same text: its forward is computed once.
    with _DataRoot(cfg.data_root), reference_cache():
        for i, cell in enumerate(run_order(cfg, cells), 1):
            tag = f"[{i}/{len(cells)}] {cell.name}"
            done = (records / f"{cell.name}.json").exists()
            if collect_only and not done:
                continue
            t0 = time.perf_counter()
            if not done:
                progress(f"{tag} ...")
            rec = run_cell(cfg, cell, records)
            gc.collect()  # a cell's model, trainer and penalty sit in reference cycles: free them before the next
            if not done:
                progress(f"{tag}: acc {rec['acc']:.3f}, general ppl {rec['general_ppl']:.2f} "
                         f"({time.perf_counter() - t0:.0f} s)")
            done_recs[cell.name] = rec
            if not collect_only:
                write_json(home / "results.json", results())
    if collect_only:
        progress(f"{len(done_recs)} of {len(cells)} cells have a record")
        write_json(home / "results.json", results())
    if report:
        write_report(home / "results.json", home / "report")
    return home


def summary_table(results: list[dict]) -> str:
    """One line per cell: domain accuracy and, per general text, perplexity and KL to the base model (the text
    stage ν trains on is marked: it favours the rows that train on it)."""
    texts = list(dict.fromkeys(t for r in results for t in (r.get("texts") or {"general": None})))
    nu = {t for r in results for t, v in (r.get("texts") or {}).items() if v.get("stage_nu_text")}
    head = ["method", "task", "seed", "acc", "acc_norm"]
    for t in texts:
        name = f"{t} (stage ν's text)" if t in nu else t
        head += [f"{name} ppl ↓", f"{name} KL ↓"]
    rows = ["| " + " | ".join(head + ["train s"]) + " |", "|---|---|---:|" + "---:|" * (len(head) - 2)]
    for r in results:
        point = f" ({r['sweep']['param']}={r['sweep']['value']:g})" if r.get("sweep") else ""
        cells = [f"{r['label']}{point}", r["task"], str(r["seed"]), f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}"]
        for t in texts:
            v = (r.get("texts") or {}).get(t) or {"ppl": r["general_ppl"], "kl": r.get("general_kl")}
            cells += [f"{v['ppl']:.2f}", "—" if v.get("kl") is None else f"{v['kl']:.3f}"]
        rows.append("| " + " | ".join(cells + [f"{r['train_seconds']:.0f}"]) + " |")
    return "\n".join(rows)


def demo(out: str = "runs/demo", overrides: list[str] | None = None, config: str | None = None) -> Path:
    """The main job: SmolLM2 from the wheel + the data subset shipped in the package."""
    from ..assets import PACKAGE_DIR
    from ..config import load_config

    cfg = load_config(ExperimentConfig, config or PACKAGE_DIR / "configs" / "demo.yaml",
                      [f"out={out}", *(overrides or [])])
    t = time.perf_counter()
    home = run_experiment(cfg)
    results = json.loads((home / "results.json").read_text())
    print()
    print(summary_table(results))
    print(f"\ndemo finished in {time.perf_counter() - t:.0f} s; report: {home / 'report' / 'report.md'}")
    return home
