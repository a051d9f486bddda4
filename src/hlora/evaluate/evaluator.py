"""Tasks through the engine: a task's items or texts become requests, the engine scores them, the metrics
aggregate them (lm-eval's evaluator). `evaluate` runs task objects; `evaluate_mcq` and `perplexity` run
items and texts."""
from __future__ import annotations

import time
from typing import Sequence

from ..data.base import MCQItem, PartialItem
from .engine import loglikelihood, loglikelihood_rolling, resolve_max_length
from .metrics import mcq_result, perplexity_result
from .requests import encode_docs


def evaluate_mcq(
    model, tokenizer, items: Sequence[MCQItem | PartialItem], batch_size: int = 8, progress: bool = True,
    max_length: int | None = None,
) -> dict:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character of the choice).
    A `PartialItem` scores its one continuation after each context (lm-eval's partial scoring)."""
    requests, spans = [], []
    for it in items:
        reqs = it.requests()  # one per option: (context, " " + choice), or for partial scoring (context_i, " " + rest)
        spans.append((len(requests), len(reqs)))
        requests.extend(reqs)
    res = loglikelihood(model, tokenizer, requests, batch_size=batch_size, max_length=max_length, progress=progress)
    return mcq_result(items, [[res[s + j][0] for j in range(n)] for s, n in spans])


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    window: int = 512,
    batch_size: int = 8,
    max_tokens: int = 0,
    progress: bool = True,
    kl_reference=None,
) -> dict:
    """Token / word perplexity and bits per byte of `texts`, summed over documents, as lm-eval's
    `loglikelihood_rolling` computes them with `max_length=window` (see `requests.rolling_windows`):
    word perplexity counts whitespace-separated words, bits per byte UTF-8 bytes.

    `max_tokens > 0` scores only the first `max_tokens` tokens of the documents in order (the last
    document is cut; its words and bytes are those of the decoded kept tokens).
    `kl_reference` (None, an nn.Module, or "base" for this PEFT model with its adapter disabled)
    adds `kl`: the mean over predicted tokens of KL(p_ref || p_model) in nats, on the same inputs."""
    L = resolve_max_length(model, tokenizer, None)
    window = max(1, min(int(window), L))
    docs = encode_docs(tokenizer, texts, max_tokens)
    nll_doc, count_doc, kl_doc = loglikelihood_rolling(
        model, tokenizer, [toks for toks, _, _ in docs], window, batch_size=batch_size, progress=progress,
        kl_reference=kl_reference,
    )
    return perplexity_result(docs, nll_doc, count_doc, kl_doc, window)


def evaluate(
    model,
    tokenizer,
    tasks: Sequence,
    limit: int = 0,
    batch_size: int = 8,
    ppl_window: int = 512,
    ppl_max_tokens: int = 0,
    progress: bool = True,
    kl_reference=None,
) -> dict:
    """Evaluate on task objects (`.name`, `.kind` "mcq"|"text", `.eval_items(limit)`,
    `.eval_texts()`, `.describe()`). `limit` caps MCQ items; `ppl_max_tokens` caps text tasks;
    `kl_reference` (None, an nn.Module or "base") adds `kl` to text tasks (see `perplexity`).

    Returns {"tasks": {name: {metrics..., "per_item", "seconds", "n", "data"}}, "groups": {...}}; "groups"
    (only when every task of a group, e.g. the battery, was evaluated) holds their mean accuracy."""
    results: dict[str, dict] = {}
    for task in tasks:
        t0 = time.perf_counter()
        if task.kind == "mcq":
            items = task.eval_items(limit)
            r = evaluate_mcq(model, tokenizer, items, batch_size=batch_size, progress=progress)
            r["metrics"] = list(getattr(task, "metrics", ("acc", "acc_norm")))
        elif task.kind == "text":
            r = perplexity(
                model, tokenizer, task.eval_texts(), window=ppl_window, batch_size=batch_size,
                max_tokens=ppl_max_tokens, progress=progress, kl_reference=kl_reference,
            )
            r["n"] = r["n_docs"]
        else:
            raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r} (expected 'mcq' or 'text')")
        r["seconds"] = time.perf_counter() - t0
        r["data"] = task.describe()
        results[task.name] = r
    from ..data.tasks import group_results

    groups = group_results(results)
    return {"tasks": results, **({"groups": groups} if groups else {})}
