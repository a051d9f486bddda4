#!/usr/bin/env python
"""How fast does plain LoRA(μ) forget? One stage-μ run keeps its adapter at chosen steps; each snapshot is
evaluated on the tuned task, the other tasks and held-out general text (perplexity and KL to the base model).

    python benchmarks/forgetting_curve.py --config configs/forgetting.yaml --steps 25,50,100,200 \
        --tasks sciq,piqa,medmcqa --out results/forgetting/sciq-all-linear.json [key=value ...]

The run directory (work, not committed) is `--work`; the JSON (small, committed) holds one entry per step
(step 0 = the base model) and is written after each evaluation, so an interrupted curve resumes where it
stopped. A PNG of the curves is written beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import hlora.evaluate  # noqa: F401  (loaded now: later edits of the checkout do not reach a running curve)
from hlora.config import EvalConfig, RunConfig, load_config
from hlora.eval_recipe import evaluate_checkpoint
from hlora.files import atomic_path, write_json
from hlora.train import run_stage


def _point(step: int, res: dict, tasks: list[str], general: str) -> dict:
    t = res["tasks"]
    return {"step": step, **{f"acc_{k}": t[k]["acc"] for k in tasks}, "general_ppl": t[general]["token_ppl"],
            "general_word_ppl": t[general]["word_ppl"], "general_kl": t[general].get("kl", 0.0),
            "seconds": sum(r.get("seconds", 0.0) for r in t.values())}


def plot(curve: dict, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = curve["points"]
    steps = [p["step"] for p in pts]
    fig = Figure(figsize=(10, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for t in curve["tasks"]:
        style = "-o" if t == curve["tuned"] else "--s"
        axes[0].plot(steps, [100 * p[f"acc_{t}"] for p in pts], style, ms=3,
                     label=t + (" (tuned)" if t == curve["tuned"] else ""))
    axes[0].set(xlabel="stage-μ step", ylabel="accuracy %", title="domain and untuned tasks")
    axes[0].legend(fontsize=7)
    axes[1].plot(steps, [p["general_ppl"] for p in pts], "-o", ms=3)
    axes[1].set(xlabel="stage-μ step", ylabel="token perplexity", title=f"{curve['general']} test perplexity")
    axes[2].plot(steps, [p["general_kl"] for p in pts], "-o", ms=3)
    axes[2].set(xlabel="stage-μ step", ylabel="nats / token", title="KL(p_base ‖ p) on general text")
    fig.suptitle(curve["title"], fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="RunConfig YAML of the stage-μ run (model, lora, train, data)")
    ap.add_argument("--steps", required=True, help="comma list of steps to evaluate (the last = max_steps)")
    ap.add_argument("--tasks", default="sciq,piqa,medmcqa", help="tuned task first is not required: data= picks it")
    ap.add_argument("--general", default="wikitext")
    ap.add_argument("--limit", type=int, default=150, help="items per multiple-choice task")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--work", default="runs/forgetting", help="run directory (not committed)")
    ap.add_argument("--out", required=True, help="curve JSON (small; commit it)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    steps = sorted({int(s) for s in args.steps.split(",")})
    cfg = load_config(RunConfig, args.config, [*args.overrides, f"train.max_steps={steps[-1]}",
                                               f"train.snapshot_steps={','.join(map(str, steps))}",
                                               "method.name=none", f"out={args.work}"])
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ecfg = EvalConfig(limit=args.limit, ppl_max_tokens=args.ppl_tokens, kl=True)
    out = Path(args.out)
    curve = json.loads(out.read_text()) if out.exists() else {
        "title": f"LoRA(μ) on {cfg.data}: lr {cfg.train.lr:g}, targets {','.join(cfg.lora.targets)}, r={cfg.lora.r}, "
                 f"{cfg.train.batch_size}×{cfg.train.seq_len} tokens/step",
        "tuned": cfg.data, "tasks": tasks, "general": args.general, "config": json.loads(json.dumps(
            __import__("dataclasses").asdict(cfg), default=str)), "points": []}
    done = {p["step"] for p in curve["points"]}
    run = Path(cfg.out)
    if not (run / "DONE").exists():
        t = time.perf_counter()
        run_stage(cfg, "domain", resume=run.exists())
        curve["train_seconds"] = time.perf_counter() - t
    for step in [0, *steps]:
        if step in done:
            continue
        adapter = None if step == 0 else run / "snapshots" / f"step-{step}"
        res = evaluate_checkpoint(cfg.model, adapter, [*tasks, args.general], ecfg)
        curve["points"].append(_point(step, res, tasks, args.general))
        curve["points"].sort(key=lambda p: p["step"])
        write_json(out, curve)
        print(json.dumps(curve["points"][-1] if step == max(p["step"] for p in curve["points"]) else
                         next(p for p in curve["points"] if p["step"] == step)), flush=True)
    plot(curve, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
