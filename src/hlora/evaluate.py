"""Evaluation: a log-likelihood engine that agrees with lm-evaluation-harness, MCQ accuracy, perplexity.

Log-likelihood follows lm-evaluation-harness 0.4.13 (`HFLM`, causal backend) request by request:

* a request is (context, continuation); trailing whitespace of the context moves to the front of
  the continuation; `whole = encode(context + continuation)`, `ctx = encode(context)`,
  `cont = whole[len(ctx):]` (the model reads `ctx + cont`, not `whole`);
* strings are encoded with the tokenizer's own default for special tokens (lm-eval's
  `add_bos_token=None`), except a string that already starts with the prefix token's text;
  `add_special_tokens=True/False` forces it, like lm-eval's `add_bos_token`;
* an empty context becomes `[prefix]` (BOS, else EOS) and the continuation is encoded without
  special tokens; if it already starts with the prefix token, that token becomes the context;
* the model input is `(ctx + cont)[-(max_length + 1):][:-1]`; the result is the sum of the
  log-softmax at the positions that predict `cont`, and whether every one of them is the argmax.

The fast path scores a shared context once: the distinct contexts of a batch run left-padded
(explicit `position_ids`) with a KV cache; the cache is expanded to one row per continuation and
all continuations run right-padded, positions continuing after their context. Requests that
need truncation take the plain full-sequence path (`loglikelihood_full`, lm-eval's way).

Perplexity (`perplexity`) splits each document into non-overlapping windows: every token is
predicted exactly once, the first from the prefix token, each later window from the one token
before it (lm-eval's rolling windows with context length 1). It reports token perplexity, word
perplexity (whitespace-separated words) and bits per UTF-8 byte over all documents together.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .data.base import MCQItem

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer states a length
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


# ----------------------------------------------------------------------------- model helpers
@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode and no autograd for the block; every module's own train/eval flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _base(model):
    """The transformers model under a PEFT wrapper (for config and signature checks)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(_base(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def resolve_max_length(model, tokenizer, max_length: int | None = None) -> int:
    """lm-eval's rule: explicit > config n_positions / max_position_embeddings / n_ctx > tokenizer > 2048."""
    if max_length:
        return int(max_length)
    cfg = getattr(_base(model), "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY:
        return int(mml)
    return DEFAULT_MAX_LENGTH


def prefix_token_id(tokenizer) -> int:
    """Token that conditions an empty context and a document's first token (lm-eval: BOS, else EOS)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition on")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    return 0


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr; off when `enabled` is False or $HLORA_PROGRESS is "0"."""
    from tqdm.auto import tqdm

    enabled = enabled and os.environ.get("HLORA_PROGRESS", "1") != "0"
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


# ----------------------------------------------------------------------------- encoding
class _Encoder:
    """lm-eval's tok_encode / _encode_pair, with a cache for contexts shared by several requests."""

    def __init__(self, tokenizer, add_special_tokens: bool | None = None):
        self.tok = tokenizer
        self.add_special_tokens = add_special_tokens
        self.prefix = prefix_token_id(tokenizer)
        self.prefix_text = tokenizer.decode([self.prefix])
        self._cache: dict[str, list[int]] = {}

    def encode(self, s: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_special_tokens
        kw = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.prefix_text and s.startswith(self.prefix_text):
            kw["add_special_tokens"] = False
        return list(self.tok.encode(s, **kw))

    def encode_cached(self, s: str) -> list[int]:
        ids = self._cache.get(s)
        if ids is None:
            ids = self._cache[s] = self.encode(s)
        return ids

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            cont = self.encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix:
                return cont[:1], cont[1:]
            return [self.prefix], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode_cached(context)
        cont = whole[len(ctx):]
        if not ctx:  # a whitespace-only context (lm-eval would fail here): condition on the prefix token
            ctx = [self.prefix]
        return ctx, cont


def encode_requests(tokenizer, requests: Sequence[tuple[str, str]], add_special_tokens: bool | None = None):
    """[(context tokens, continuation tokens)] exactly as lm-eval builds them."""
    enc = _Encoder(tokenizer, add_special_tokens)
    return [enc.pair(c, x) for c, x in requests]


# ----------------------------------------------------------------------------- log-likelihood
def _score(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """logprobs [n, V] (log-softmax), targets [n] -> (sum of target log-probs, all greedy)."""
    ll = logprobs.gather(-1, targets[:, None]).double().sum().item()
    greedy = bool((logprobs.argmax(-1) == targets).all().item())
    return float(ll), greedy


def loglikelihood_full(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    add_special_tokens: bool | None = None,
    _encoded: list[tuple[list[int], list[int]]] | None = None,
) -> list[tuple[float, bool]]:
    """Reference path, lm-eval's way: one row per request, `(ctx+cont)[-(L+1):][:-1]`, right-padded."""
    encoded = _encoded if _encoded is not None else encode_requests(tokenizer, requests, add_special_tokens)
    L = resolve_max_length(model, tokenizer, max_length)
    dev = _device(model)
    pad = _pad_id(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    out: list[tuple[float, bool] | None] = [None] * len(encoded)
    bar = _progress(len(encoded), "loglikelihood (full)", progress)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            rows, conts = [], []
            for i in idx:
                ctx, cont = encoded[i]
                if not cont:
                    raise ValueError(f"request {i} has an empty continuation after tokenization")
                rows.append((ctx + cont)[-(L + 1):][:-1])
                conts.append(cont)
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
            for r, i in enumerate(idx):
                n_in, cont = len(rows[r]), conts[r]
                k = min(len(cont), n_in)  # a continuation longer than the window loses its first tokens
                lp = F.log_softmax(logits[r, n_in - k:n_in].float(), dim=-1)
                out[i] = _score(lp, torch.tensor(cont[-k:], device=lp.device))
            bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


def loglikelihood(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    add_special_tokens: bool | None = None,
) -> list[tuple[float, bool]]:
    """[(log P(continuation | context), is_greedy)] per request, as lm-eval's HFLM computes them.

    `batch_size` counts distinct contexts per forward pass; each is run once however many
    continuations share it. `max_length` defaults to the model's (lm-eval's rule)."""
    encoded = encode_requests(tokenizer, requests, add_special_tokens)
    L = resolve_max_length(model, tokenizer, max_length)
    for i, (_, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {i} has an empty continuation after tokenization: {requests[i]!r}")
    out: list[tuple[float, bool] | None] = [None] * len(encoded)

    # Requests that fit go to the cached path, grouped by their context tokens.
    groups: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
    truncated: list[int] = []
    for i, (ctx, cont) in enumerate(encoded):
        if len(ctx) + len(cont) > L + 1:
            truncated.append(i)
        else:
            groups.setdefault(tuple(ctx), []).append(i)

    if truncated:
        res = loglikelihood_full(
            model, tokenizer, [requests[i] for i in truncated], batch_size=batch_size, max_length=L,
            progress=False, _encoded=[encoded[i] for i in truncated],
        )
        for i, r in zip(truncated, res):
            out[i] = r

    keys = sorted(groups, key=len, reverse=True)  # longest first: any memory error shows at once
    dev = _device(model)
    pad = _pad_id(tokenizer)
    keep_last = _accepts(model, "logits_to_keep")
    bar = _progress(len(encoded) - len(truncated), "loglikelihood", progress)
    with _eval_mode(model):
        for batch in _length_batches(keys, batch_size):
            _score_shared(model, batch, groups, encoded, out, dev, pad, keep_last)
            bar.update(sum(len(groups[k]) for k in batch))
    bar.close()
    return out  # type: ignore[return-value]


def _length_batches(keys: list, batch_size: int, slack: float = 0.2, min_slack: int = 16):
    """Consecutive runs of length-sorted (descending) contexts, at most `batch_size` each; a run also
    ends where padding to its first (longest) context would waste more than `slack` of it
    (and more than `min_slack` tokens): on CPU padded tokens cost as much as real ones."""
    batch: list = []
    for k in keys:
        if batch and (
            len(batch) >= max(1, batch_size)
            or len(batch[0]) - len(k) > max(slack * len(batch[0]), min_slack)
        ):
            yield batch
            batch = []
        batch.append(k)
    if batch:
        yield batch


def _score_shared(model, ctxs, groups, encoded, out, dev, pad, keep_last):
    """One batch of distinct contexts: contexts once (left-padded) with a cache, then all continuations."""
    B, Lc = len(ctxs), max(len(c) for c in ctxs)
    ids = torch.full((B, Lc), pad, dtype=torch.long)
    mask = torch.zeros((B, Lc), dtype=torch.long)
    for b, c in enumerate(ctxs):
        ids[b, Lc - len(c):] = torch.tensor(c)
        mask[b, Lc - len(c):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {"logits_to_keep": 1} if keep_last else {}
    o = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), use_cache=True, **kw)
    last = F.log_softmax(o.logits[:, -1].float(), dim=-1)  # [B, V]: predicts each first continuation token
    cache = o.past_key_values
    del o

    # Continuation inputs are cont[:-1] (the last token is only predicted). Requests whose inputs
    # coincide (single-token continuations, or ones that differ only in the last token) share a row.
    rows: list[tuple[int, tuple[int, ...]]] = []
    row_of: dict[tuple[int, tuple[int, ...]], int] = {}
    for b, c in enumerate(ctxs):
        for i in groups[c]:
            key = (b, tuple(encoded[i][1][:-1]))
            if key[1] and key not in row_of:
                row_of[key] = len(rows)
                rows.append(key)
    cont_logits = None
    if rows:
        R, M = len(rows), max(len(inp) for _, inp in rows)
        cids = torch.full((R, M), pad, dtype=torch.long)
        cmask = torch.zeros((R, M), dtype=torch.long)
        cpos = torch.zeros((R, M), dtype=torch.long)
        for r, (b, inp) in enumerate(rows):
            cids[r, :len(inp)] = torch.tensor(inp)
            cmask[r, :len(inp)] = 1
            cpos[r, :len(inp)] = torch.arange(len(ctxs[b]), len(ctxs[b]) + len(inp))
        index = torch.tensor([b for b, _ in rows], device=dev)
        cache.reorder_cache(index)  # one cache row per distinct continuation input
        full_mask = torch.cat([mask.to(dev).index_select(0, index), cmask.to(dev)], dim=1)
        cont_logits = model(
            input_ids=cids.to(dev), attention_mask=full_mask, position_ids=cpos.to(dev),
            past_key_values=cache, use_cache=True,
        ).logits
    del cache

    for b, c in enumerate(ctxs):
        for i in groups[c]:
            cont = encoded[i][1]
            lp = last[b:b + 1]
            if len(cont) > 1:
                r = row_of[(b, tuple(cont[:-1]))]
                lp = torch.cat([lp, F.log_softmax(cont_logits[r, :len(cont) - 1].float(), dim=-1)])
            out[i] = _score(lp, torch.tensor(cont, device=lp.device))


# ----------------------------------------------------------------------------- multiple choice
def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy.argmax's tie rule)."""
    best = 0
    for j in range(1, len(values)):
        if values[j] > values[best]:
            best = j
    return best


def _stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def evaluate_mcq(
    model, tokenizer, items: Sequence[MCQItem], batch_size: int = 8, progress: bool = True,
    max_length: int | None = None,
) -> dict:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character of the choice)."""
    requests, spans = [], []
    for it in items:
        spans.append((len(requests), len(it.choices)))
        requests.extend((it.context, it.delimiter + ch) for ch in it.choices)
    res = loglikelihood(model, tokenizer, requests, batch_size=batch_size, max_length=max_length, progress=progress)
    per = {"id": [], "acc": [], "acc_norm": [], "ll": [], "ll_gold": [], "pred": [], "pred_norm": [], "gold": []}
    for it, (s, n) in zip(items, spans):
        lls = [res[s + j][0] for j in range(n)]
        # lm-eval divides by len(choice) in characters; an empty choice counts as 1 (not a division by 0)
        normed = [ll / max(len(ch), 1) for ll, ch in zip(lls, it.choices)]
        pred, pred_norm = _argmax(lls), _argmax(normed)
        per["id"].append(it.id)
        per["gold"].append(it.gold)
        per["ll"].append(lls)
        per["ll_gold"].append(lls[it.gold])
        per["pred"].append(pred)
        per["pred_norm"].append(pred_norm)
        per["acc"].append(int(pred == it.gold))
        per["acc_norm"].append(int(pred_norm == it.gold))
    n = len(items)
    return {
        "acc": sum(per["acc"]) / n if n else float("nan"),
        "acc_stderr": _stderr(per["acc"]),
        "acc_norm": sum(per["acc_norm"]) / n if n else float("nan"),
        "acc_norm_stderr": _stderr(per["acc_norm"]),
        "n": n,
        "per_item": per,
    }


# ----------------------------------------------------------------------------- perplexity
def _windows(tokens: list[int], prefix: int, window: int) -> Iterable[tuple[list[int], list[int]]]:
    """(inputs, targets) per non-overlapping window: targets cover every token once; inputs are
    the token before the window (the prefix token for the first) plus the targets but the last."""
    for s in range(0, len(tokens), window):
        tgt = tokens[s:s + window]
        yield [tokens[s - 1] if s else prefix] + tgt[:-1], tgt


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    window: int = 512,
    batch_size: int = 8,
    max_tokens: int = 0,
    progress: bool = True,
) -> dict:
    """Token / word perplexity and bits per byte of `texts`, summed over documents.

    `max_tokens > 0` scores only the first `max_tokens` tokens of the documents in order (the last
    document is cut; its words and bytes are those of the decoded kept tokens)."""
    L = resolve_max_length(model, tokenizer, None)
    window = max(1, min(int(window), L))
    prefix = prefix_token_id(tokenizer)
    docs: list[tuple[list[int], int, int]] = []  # tokens, words, bytes
    budget = max_tokens if max_tokens > 0 else None
    for text in texts:
        if budget is not None and budget <= 0:
            break
        toks = list(tokenizer.encode(text, add_special_tokens=False))
        if budget is not None and len(toks) > budget:
            toks = toks[:budget]
            text = tokenizer.decode(toks)
        if budget is not None:
            budget -= len(toks)
        docs.append((toks, len(text.split()), len(text.encode("utf-8"))))

    wins = [(d, inp, tgt) for d, (toks, _, _) in enumerate(docs) for inp, tgt in _windows(toks, prefix, window)]
    nll_doc = [0.0] * len(docs)
    count_doc = [0] * len(docs)
    dev = _device(model)
    pad = _pad_id(tokenizer)
    bar = _progress(sum(len(t) for t, _, _ in docs), "perplexity", progress)
    with _eval_mode(model):
        for start in range(0, len(wins), max(1, batch_size)):
            chunk = wins[start:start + batch_size]
            width = max(len(inp) for _, inp, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, inp, _) in enumerate(chunk):
                ids[r, :len(inp)] = torch.tensor(inp)
                mask[r, :len(inp)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits
            for r, (d, _, tgt) in enumerate(chunk):
                lp = F.log_softmax(logits[r, :len(tgt)].float(), dim=-1)
                t = torch.tensor(tgt, device=lp.device)
                nll_doc[d] -= lp.gather(-1, t[:, None]).double().sum().item()
                count_doc[d] += len(tgt)
            del logits
            bar.update(sum(len(t) for _, _, t in chunk))
    bar.close()

    nll = sum(nll_doc)
    n_tokens = sum(count_doc)
    n_words = sum(w for _, w, _ in docs)
    n_bytes = sum(b for _, _, b in docs)
    return {
        "token_ppl": math.exp(nll / n_tokens) if n_tokens else float("nan"),
        "word_ppl": math.exp(nll / n_words) if n_words else float("nan"),
        "bits_per_byte": nll / (n_bytes * math.log(2)) if n_bytes else float("nan"),
        "nll": nll,
        "n_tokens": n_tokens,
        "n_words": n_words,
        "n_bytes": n_bytes,
        "n_docs": len(docs),
        "window": window,
        "per_item": {
            "nll": nll_doc,
            "n_tokens": count_doc,
            "n_words": [w for _, w, _ in docs],
            "n_bytes": [b for _, _, b in docs],
        },
    }


# ----------------------------------------------------------------------------- tasks
def evaluate(
    model,
    tokenizer,
    tasks: Sequence,
    limit: int = 0,
    batch_size: int = 8,
    ppl_window: int = 512,
    ppl_max_tokens: int = 0,
    progress: bool = True,
) -> dict:
    """Evaluate on task objects (`.name`, `.kind` "mcq"|"text", `.eval_items(limit)`,
    `.eval_texts()`, `.describe()`). `limit` caps MCQ items; `ppl_max_tokens` caps text tasks.

    Returns {"tasks": {name: {metrics..., "per_item", "seconds", "n", "data"}}}."""
    results: dict[str, dict] = {}
    for task in tasks:
        t0 = time.perf_counter()
        if task.kind == "mcq":
            items = task.eval_items(limit)
            r = evaluate_mcq(model, tokenizer, items, batch_size=batch_size, progress=progress)
        elif task.kind == "text":
            r = perplexity(
                model, tokenizer, task.eval_texts(), window=ppl_window, batch_size=batch_size,
                max_tokens=ppl_max_tokens, progress=progress,
            )
            r["n"] = r["n_docs"]
        else:
            raise ValueError(f"task {task.name!r} has unknown kind {task.kind!r} (expected 'mcq' or 'text')")
        r["seconds"] = time.perf_counter() - t0
        r["data"] = task.describe()
        results[task.name] = r
    return {"tasks": results}
