#!/usr/bin/env python
"""Pick each row's stage-μ learning rate from an lr-sweep grid (configs/lr-smollm2.yaml), by the stated rule:

    among a row's learning rates, keep those whose validation domain accuracy is within one standard error
    of the row's best (the s.e. of a difference of two accuracies on the same n items, sqrt(2 p (1 - p) / n)),
    and of these take the one with the lowest KL(p_base ‖ p) on the held-out general text (C4): the most
    domain gain we can tell apart, at the least drift from the base model.

    python benchmarks/pick_lr.py results/lr-smollm2/results.json      # prints a table and the `options` lines
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict


def pick(records: list[dict]) -> dict[str, dict]:
    """{row id: {"lr": picked, "points": [(lr, acc, kl, n)], "se": s.e. used}} for rows with ≥ 2 lrs."""
    by_row: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("lr") is not None:
            by_row[r["method"]].append(r)
    out = {}
    for row, rs in by_row.items():
        pts = sorted({r["lr"]: r for r in rs}.values(), key=lambda r: r["lr"])
        if len(pts) < 2:
            continue
        best = max(pts, key=lambda r: r["acc"])
        n = len((best.get("per_item") or {}).get("acc") or []) or 1
        se = math.sqrt(2 * best["acc"] * (1 - best["acc"]) / n)
        near = [r for r in pts if r["acc"] >= best["acc"] - se]
        chosen = min(near, key=lambda r: (r.get("general_kl") if r.get("general_kl") is not None else math.inf,
                                          -r["acc"]))
        out[row] = {"lr": chosen["lr"], "se": se, "label": best.get("label", row),
                    "points": [(r["lr"], r["acc"], r.get("general_kl"), (r.get("battery") or {}).get("acc"))
                               for r in pts]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json of the lr-sweep grid")
    args = ap.parse_args(argv)
    picks = pick(json.load(open(args.results)))
    if not picks:
        print("no row has two or more learning rates in these records", file=sys.stderr)
        return 1
    print("| row | lr | val acc % | C4 KL | battery % | picked |\n|---|---:|---:|---:|---:|---|")
    for row, p in picks.items():
        for lr, acc, kl, bat in p["points"]:
            kl_s = f"{kl:.3f}" if kl is not None else "—"
            bat_s = f"{100 * bat:.1f}" if bat is not None else "—"
            print(f"| {p['label']} | {lr:g} | {100 * acc:.1f} | {kl_s} | {bat_s} | {'**yes**' if lr == p['lr'] else ''} |")
    print("\noptions (one s.e. of accuracy: " + ", ".join(f"{r} {100 * p['se']:.1f}" for r, p in picks.items()) + "):")
    for row, p in picks.items():
        print(f"  {row}: {{lr: {p['lr']:g}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
