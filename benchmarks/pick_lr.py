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
                               for r in pts],
                    "records": pts}
    return out


def markdown(picks: dict[str, dict], base: list[dict] = ()) -> str:
    """The table behind the picks (every lr of every row, Base first when given) and the `options` lines."""
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = ["| row | lr | val acc % | C4 PPL | C4 KL | battery % | MedMCQA % | PIQA % | picked |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    rows = [("Base", None, b, False) for b in base]
    rows += [(p["label"], r["lr"], r, r["lr"] == p["lr"]) for p in picks.values() for r in p["records"]]
    for label, lr, r, chosen in rows:
        tr = r.get("transfer") or {}
        lines.append(f"| {label} | {'—' if lr is None else format(lr, 'g')} | {pct(r['acc'])} | "
                     f"{num(r.get('general_ppl'), '.2f')} | {num(r.get('general_kl'), '.3f')} | "
                     f"{pct((r.get('battery') or {}).get('acc'))} | {pct((tr.get('medmcqa') or {}).get('acc'))} | "
                     f"{pct((tr.get('piqa') or {}).get('acc'))} | {'**yes**' if chosen else ''} |")
    lines += ["", "options (one s.e. of accuracy: " + ", ".join(f"{r} {100 * p['se']:.1f}" for r, p in picks.items())
              + "):"]
    lines += [f"  {row}: {{lr: {p['lr']:g}}}" for row, p in picks.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="results.json of the lr-sweep grid")
    args = ap.parse_args(argv)
    picks = pick(json.load(open(args.results)))
    if not picks:
        print("no row has two or more learning rates in these records", file=sys.stderr)
        return 1
    print(markdown(picks, [r for r in json.load(open(args.results)) if r["method"] == "base"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
