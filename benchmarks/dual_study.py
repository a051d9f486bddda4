#!/usr/bin/env python
"""How the dual update of a method's coefficient behaves for several step sizes η and update intervals K.

    python benchmarks/dual_study.py --model tiny-llama --method kl_general --steps 120 --budget 0.005 \
        --eta 0.1,0.5,2 --every 5 [--kp 0.5] [--kd 2] [--json FILE] [key=value ...]

Each (η, K) is one stage-μ run on the embedded SciQ subset with the coefficient steered toward the budget on
the KL / perplexity rise of the embedded WikiText-2 test text (a general slice no stage trains on), read as
`hlora tune` reads it: groups of whole pieces in rotation over a 2,048-token validation slice (dual.TextProxy);
`--eta 0` measures the unsteered run (the coefficient stays at its start). Prints per run the trace of
(step, coefficient, proxy) and a summary: the proxy over the last third of the run against the target (mean,
spread), how often the violation changed sign there (ringing), and the final proxy. docs/budget.md holds a run
of it on tiny-llama and the choice of η and K it supports (traces: results/dual-study/tiny-llama.json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from hlora.assets import EMBEDDED_DATA
from hlora.budget.dual import DualConfig, DualController, TextProxy
from hlora.budget.measure import SliceConfig, text_slices
from hlora.config import RunConfig, load_config
from hlora.model import load_model
from hlora.train import run_stage


def summarise(trace: list[dict], target: float) -> dict:
    steps = trace[-1]["step"]
    tail = [r for r in trace if r["step"] >= 2 * steps / 3]
    proxies = [r["proxy"] for r in tail]
    signs = [math.copysign(1, p - target) for p in proxies]
    mean = sum(proxies) / len(proxies)
    return {"tail_mean_over_target": mean / target, "tail_spread_over_target": (max(proxies) - min(proxies)) / target,
            "tail_sign_changes": sum(a != b for a, b in zip(signs, signs[1:])), "tail_points": len(tail),
            "final_over_target": trace[-1]["proxy"] / target, "final_coefficient": trace[-1]["value"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--method", default="kl_general")
    ap.add_argument("--kind", default="kl", choices=["kl", "ppl_rise_pct"])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--budget", type=float, default=0.02)
    ap.add_argument("--eta", default="0,0.1,0.5,2")
    ap.add_argument("--every", default="5")
    ap.add_argument("--kp", type=float, default=0.0)
    ap.add_argument("--kd", type=float, default=0.0)
    ap.add_argument("--start", type=float, default=0.0, help="starting coefficient (0 = the method's default)")
    ap.add_argument("--json", help="write the traces and summaries here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import os

    os.environ.setdefault("HLORA_DATA", str(EMBEDDED_DATA))
    os.environ.setdefault("HLORA_PROGRESS", "0")
    base = [f"model.name={args.model}", "data=sciq", "general_data=wikitext", f"method.name={args.method}",
            f"train.max_steps={args.steps}", "train.seq_len=64", "train.lr=0.01", "lora.r=4", "lora.alpha=16"]
    _, tok, _ = load_model(args.model)
    val, _ = text_slices("wikitext", tok, SliceConfig(general_val_tokens=2048, general_test_tokens=1))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for every in [int(k) for k in args.every.split(",")]:
            for eta in [float(e) for e in args.eta.split(",")]:
                if eta == 0 and every != int(args.every.split(",")[0]):
                    continue  # the unsteered run once
                cfg = load_config(RunConfig, None, base + args.overrides + [f"out={tmp}/k{every}-eta{eta}"])
                dcfg = DualConfig(every=every, eta=max(eta, 1e-12), kp=args.kp, kd=args.kd, proxy_tokens=512,
                                  start=args.start)
                ctrl = DualController(TextProxy(args.kind, val.texts, 512, 64), args.budget, dcfg)
                t0 = time.perf_counter()
                run_stage(cfg, "domain", extra_callbacks=[ctrl])
                s = summarise(ctrl.trace, ctrl.rule.target)
                results.append({"eta": eta, "every": every, "seconds": time.perf_counter() - t0, **s,
                                "trace": [(r["step"], r["value"], r["proxy"]) for r in ctrl.trace]})
                r = results[-1]
                print(f"η={eta:<5g} K={every:<3d} tail mean/target {r['tail_mean_over_target']:.2f}  spread/target "
                      f"{r['tail_spread_over_target']:.2f}  sign changes {r['tail_sign_changes']}/{r['tail_points']}  "
                      f"final/target {r['final_over_target']:.2f}  final {ctrl.name} {r['final_coefficient']:.4g}  "
                      f"({r['seconds']:.0f} s)")
                print("   trace (step, coefficient, proxy): " + ", ".join(
                    f"({st}, {v:.3g}, {p:.4f})" for st, v, p in r["trace"][:: max(1, len(r["trace"]) // 12)]))
                sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
