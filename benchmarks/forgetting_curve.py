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


def _point(step: int, res: dict, tasks: list[str], general: str, texts: list[str], battery: list[str]) -> dict:
    t = res["tasks"]
    out = {"step": step, **{f"acc_{k}": t[k]["acc"] for k in tasks}, "general_ppl": t[general]["token_ppl"],
           "general_word_ppl": t[general]["word_ppl"], "general_kl": t[general].get("kl", 0.0),
           "seconds": sum(r.get("seconds", 0.0) for r in t.values())}
    for name in texts:  # e.g. c4: held-out web text; wikitext: stage ν's own distribution
        out[f"{name}_ppl"], out[f"{name}_kl"] = t[name]["token_ppl"], t[name].get("kl", 0.0)
        out[f"{name}_bpb"] = t[name]["bits_per_byte"]
    if battery:
        out.update({f"acc_{k}": t[k]["acc"] for k in battery})
        out["battery_acc"] = sum(t[k]["acc"] for k in battery) / len(battery)
        out["battery_acc_stderr"] = (res.get("groups", {}).get("battery") or {}).get("acc_stderr")
    return out


def plot(curve: dict, png: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = curve["points"]
    steps = [p["step"] for p in pts]
    texts = curve.get("texts") or [curve["general"]]
    battery = curve.get("battery") or []
    fig = Figure(figsize=(3.6 * (2 + bool(battery)), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 + bool(battery))
    for t in curve["tasks"]:
        style = "-o" if t == curve["tuned"] else "--s"
        axes[0].plot(steps, [100 * p[f"acc_{t}"] for p in pts], style, ms=3,
                     label=t + (" (tuned)" if t == curve["tuned"] else ""))
    axes[0].set(xlabel="stage-μ step", ylabel="accuracy %", title="tuned (and other) tasks")
    axes[0].legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    ax = axes[1]  # perplexity rise (% over the base model) and KL to the base, per general text
    ax2 = ax.twinx()
    for i, name in enumerate(texts):
        key = "general" if f"{name}_ppl" not in pts[0] else name
        base = pts[0][f"{key}_ppl"]
        ax.plot(steps, [100 * (p[f"{key}_ppl"] / base - 1) for p in pts], "-o", ms=3, color=f"C{i}",
                label=f"{name} ppl rise %")
        ax2.plot(steps, [p[f"{key}_kl"] for p in pts], ":^", ms=3, color=f"C{i}", label=f"{name} KL")
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set(xlabel="stage-μ step", ylabel="perplexity rise over Base, %", title="general text (— ppl, ··· KL)")
    ax2.set_ylabel("KL(p_base ‖ p), nats / token")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    if battery:
        ax = axes[2]
        se = pts[0].get("battery_acc_stderr") or 0.0
        ax.errorbar(steps, [100 * p["battery_acc"] for p in pts], yerr=[100 * se] * len(pts), fmt="-o", ms=3,
                    color="k", label="battery mean (± s.e. of one eval)", zorder=3)
        for i, t in enumerate(battery):
            ax.plot(steps, [100 * p[f"acc_{t}"] for p in pts], "--", lw=0.8, color=f"C{i}", label=t)
        ax.set(xlabel="stage-μ step", ylabel="accuracy %", title="zero-shot battery (untuned)")
        ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.suptitle(curve["title"], fontsize=9)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="RunConfig YAML of the stage-μ run (model, lora, train, data)")
    ap.add_argument("--steps", default="", help="comma list of steps to evaluate (the last = max_steps)")
    ap.add_argument("--tasks", default="sciq,piqa,medmcqa", help="tuned task first is not required: data= picks it")
    ap.add_argument("--general", default="wikitext", help="the general text of `general_ppl` / `general_kl`")
    ap.add_argument("--texts", default="", help="comma list of general texts to record too (e.g. c4,wikitext)")
    ap.add_argument("--battery", default="", help="zero-shot tasks or groups no stage tunes on (e.g. battery)")
    ap.add_argument("--battery-limit", type=int, default=100, help="items per battery task")
    ap.add_argument("--limit", type=int, default=150, help="items per multiple-choice task")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--work", default="runs/forgetting", help="run directory (not committed)")
    ap.add_argument("--out", required=True, help="curve JSON (small; commit it)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG of an existing --out JSON (trains nothing)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return 0
    if not args.steps:
        ap.error("--steps is required (unless --plot-only)")

    steps = sorted({int(s) for s in args.steps.split(",")})
    cfg = load_config(RunConfig, args.config, [*args.overrides, f"train.max_steps={steps[-1]}",
                                               f"train.snapshot_steps={','.join(map(str, steps))}",
                                               "method.name=none", f"out={args.work}"])
    from hlora.data.tasks import expand_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    texts = [t.strip() for t in args.texts.split(",") if t.strip()] or [args.general]
    battery = expand_tasks([t.strip() for t in args.battery.split(",") if t.strip()])
    ecfg = EvalConfig(limit=args.limit, ppl_max_tokens=args.ppl_tokens, kl=True,
                      task_limits={t: args.battery_limit for t in battery})
    out = Path(args.out)
    curve = json.loads(out.read_text()) if out.exists() else {
        "title": f"LoRA(μ) on {cfg.data}: lr {cfg.train.lr:g}, targets {','.join(cfg.lora.targets)}, r={cfg.lora.r}, "
                 f"{cfg.train.batch_size}×{cfg.train.seq_len} tokens/step",
        "tuned": cfg.data, "tasks": tasks, "general": args.general, "texts": texts, "battery": battery,
        "battery_limit": args.battery_limit, "config": json.loads(json.dumps(
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
        evals = list(dict.fromkeys([*tasks, args.general, *texts, *battery]))
        res = evaluate_checkpoint(cfg.model, adapter, evals, ecfg)
        curve["points"].append(_point(step, res, tasks, args.general, texts, battery))
        curve["points"].sort(key=lambda p: p["step"])
        write_json(out, curve)
        print(json.dumps(curve["points"][-1] if step == max(p["step"] for p in curve["points"]) else
                         next(p for p in curve["points"] if p["step"] == step)), flush=True)
    plot(curve, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
