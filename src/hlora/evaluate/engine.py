"""The model boundary (lm-eval's `LM` interface): log-likelihoods of token requests from forward passes.

`loglikelihood` and `loglikelihood_full` follow lm-evaluation-harness 0.4.13 (`HFLM`, causal backend)
request by request (requests are encoded as in `requests.py`): the model input is
`(ctx + cont)[-(max_length + 1):][:-1]`; the result is the sum of the log-softmax at the positions that
predict `cont`, and whether every one of them is the argmax.

The fast path (`loglikelihood`) scores a shared context once, together with the tokens that all
its continuations start with: contexts run left-padded (explicit `position_ids`) and keep their
KV cache; then their continuations run right-padded on copies of their contexts' cache rows,
positions continuing after their context. One-request contexts that start alike (lm-eval's partial
scoring: WinoGrande's two contexts differ from the blank on) run their common prefix once, the rest of
each context in its continuation row, unscored. Contexts, and the continuations of each context pass,
are sorted by length and cut into passes that minimise padding plus a fixed cost per pass
(`batches.py`). Requests that need truncation take the plain full-sequence path
(`loglikelihood_full`, lm-eval's way).

`loglikelihood_rolling` follows lm-eval's `loglikelihood_rolling` with `max_length = window`: documents
(token ids) are cut into rolling windows (`requests.rolling_windows`); rows of different lengths run
right-padded, and only the logits of target positions are kept. It returns per document the summed
negative log-likelihood and, optionally, the summed KL divergence from a reference model (or the PEFT
model's base) on the same predictions. Inside `reference_cache()` the reference's logits are kept by input and
by the reference's weights: a grid evaluates many adapters of one base model on the same text, and the base's
forward is the same every time (the cached logits are the ones the forward gave, so KL is unchanged to the bit).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..util import eval_mode, model_device, progress_enabled
from . import batches
from .batches import _length_batches, _packed_batches
from .metrics import _kl
from .requests import encode_requests, prefix_token_id, rolling_windows

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback when neither config nor tokenizer states a length
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length


# ----------------------------------------------------------------------------- model helpers
@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (util.eval_mode) and no autograd for the block."""
    with eval_mode(model), torch.inference_mode():
        yield


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


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    return 0


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr; off when `enabled` is False or $HLORA_PROGRESS turns bars off (util.progress_enabled)."""
    from tqdm.auto import tqdm

    enabled = enabled and progress_enabled()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


def _right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- log-likelihood
def _score(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """logprobs [n, V] (log-softmax), targets [n] -> (sum of target log-probs, all greedy)."""
    picked = logprobs.gather(-1, targets[:, None])[:, 0]
    # greedy = every target is the argmax (its first maximum); amax is far cheaper than argmax,
    # and argmax only needs to settle ties once every target reaches the maximum
    greedy = bool((picked == logprobs.amax(-1)).all()) and bool((logprobs.argmax(-1) == targets).all())
    return float(picked.double().sum().item()), greedy


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
    dev = model_device(model)
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
            ids, mask = _right_padded(rows, pad)
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

    A forward pass holds `batch_size` distinct contexts, more when they are short (up to
    `batch_size * TOKENS_PER_CONTEXT` padded tokens); each context runs once however many
    continuations share it, and so do the tokens all of them start with. `max_length` defaults to
    the model's (lm-eval's rule)."""
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

    contexts = _contexts(groups, encoded)
    contexts.sort(key=lambda c: -len(c.tokens))  # longest first: any memory error shows at once
    dev = model_device(model)
    pad = _pad_id(tokenizer)
    keep_last = _accepts(model, "logits_to_keep")
    bar = _progress(len(encoded) - len(truncated), "loglikelihood", progress)
    budget = max(1, batch_size) * batches.TOKENS_PER_CONTEXT
    with _eval_mode(model):
        for batch in _packed_batches(contexts, lambda c: len(c.tokens), batch_size, budget):
            _score_contexts(model, batch, encoded, out, dev, pad, keep_last, budget)
            bar.update(sum(len(c.requests) for c in batch))
    bar.close()
    return out  # type: ignore[return-value]


MIN_SHARED_CONTEXT = 4  # tokens two one-request contexts must share before they run as one


def _contexts(groups: "OrderedDict[tuple[int, ...], list[int]]", encoded) -> list["_Context"]:
    """The context passes' rows: one per distinct context, extended by the tokens all its continuations start
    with (PIQA's two solutions often start alike), which run once with it.

    Contexts with a single request each that start alike run their common prefix once too, each the rest of its
    context as part of its continuation row: lm-eval's partial scoring (WinoGrande) scores one continuation after
    two contexts that differ only from the blank on. Sorted, such contexts are neighbours; a run of them joins
    while the prefix they share stays at least MIN_SHARED_CONTEXT tokens and half of the run's prefix so far."""
    out: list[_Context] = []
    singles = []
    for ctx, idx in groups.items():
        if len(idx) == 1:
            singles.append(ctx)
        else:
            n = _shared_prefix([encoded[i][1] for i in idx])
            out.append(_Context(ctx + tuple(encoded[idx[0]][1][:n]), n, idx))

    def close(run: list, prefix: tuple) -> None:
        if len(run) == 1:
            out.append(_Context(run[0], 0, groups[run[0]]))
        else:
            reqs = [groups[ctx][0] for ctx in run]
            out.append(_Context(prefix, 0, reqs, tails={i: ctx[len(prefix):] for i, ctx in zip(reqs, run)}))

    run, prefix = [], ()
    for ctx in sorted(singles):
        if run:
            k = len(os.path.commonprefix([prefix, ctx]))  # works on any sequences, token tuples too
            if k >= MIN_SHARED_CONTEXT and 2 * k >= len(prefix):
                run.append(ctx)
                prefix = prefix[:k]
                continue
            close(run, prefix)
        run, prefix = [ctx], ctx
    if run:
        close(run, prefix)
    return out


def _shared_prefix(conts: list[list[int]]) -> int:
    """Length of the prefix common to all (two or more) continuations, each keeping one own token."""
    if len(conts) < 2:
        return 0
    n, most = 0, min(len(c) for c in conts) - 1
    while n < most and all(c[n] == conts[0][n] for c in conts):
        n += 1
    return n


@dataclass
class _Context:
    """A distinct context extended by the `n` tokens its continuations share, and its requests."""

    tokens: tuple[int, ...]
    n: int
    requests: list[int]
    # A run of one-request contexts that share `tokens` as their prefix: each request's own rest of its context,
    # scored as part of its continuation row but not counted in its log-likelihood (n is 0 then).
    tails: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Set by its context pass: the log-prob and greediness of the shared tokens, and the
    # log-probs [1, V] that predict the first token after them.
    shared: tuple[float, bool] = (0.0, True)
    first: torch.Tensor | None = None


def _score_contexts(model, contexts, encoded, out, dev, pad, keep_last, budget):
    """One pass over the contexts, which keeps their cache; then their continuations, in
    length-packed passes on copies of their contexts' cache rows."""
    mask, cache = _context_batch(model, contexts, dev, pad, keep_last)

    # Continuation inputs are cont[n:-1] (the last token is only predicted). Requests whose inputs
    # coincide (ones that differ only in the last token) share a row; some need no row at all.
    rows: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for b, c in enumerate(contexts):
        for i in c.requests:
            after = c.tails.get(i, ()) + tuple(encoded[i][1][c.n:])  # the tokens after c.tokens
            if len(after) == 1:
                out[i] = _joined(c.shared, _score(c.first, torch.tensor(after, device=dev)))
            else:
                rows.setdefault((b, after[:-1]), []).append(i)

    by_length = sorted(rows, key=lambda r: -len(r[1]))
    for sub in _packed_batches(by_length, lambda r: len(r[1]), 1, budget):
        index = torch.tensor([b for b, _ in sub], device=dev)
        inputs, starts = [inp for _, inp in sub], [len(contexts[b].tokens) for b, _ in sub]
        logits = _continuation_pass(
            model, inputs, starts, mask.index_select(0, index), _select_cache(model, cache, index), dev, pad
        )
        for r, (b, inp) in enumerate(sub):
            c = contexts[b]
            lp = torch.cat([c.first, F.log_softmax(logits[r, :len(inp)].float(), dim=-1)])
            for i in rows[(b, inp)]:
                k = len(c.tails.get(i, ()))  # the rest of a shared context predicts nothing that counts
                out[i] = _joined(c.shared, _score(lp[k:], torch.tensor(encoded[i][1][c.n:], device=dev)))
        del logits


def _joined(a: tuple[float, bool], b: tuple[float, bool]) -> tuple[float, bool]:
    """Scores of consecutive token spans -> score of the whole."""
    return a[0] + b[0], a[1] and b[1]


def _context_batch(model, batch: list[_Context], dev, pad, keep_last):
    """One context pass; fills each context's shared-prefix score and next-token log-probs, and
    returns (attention mask, cache as [(keys, values, ...)] per layer)."""
    keep = 1 + max(c.n for c in batch)
    mask, logits, cache = _context_pass(model, [c.tokens for c in batch], dev, pad, keep if keep_last else None)
    for b, c in enumerate(batch):
        # log-probs that predict the shared tokens, then the first token after them
        lp = F.log_softmax(logits[b, logits.shape[1] - c.n - 1:].float(), dim=-1)
        if c.n:
            c.shared = _score(lp[:-1], torch.tensor(c.tokens[-c.n:], device=dev))
        c.first = lp[-1:].clone()
    return mask, list(cache)


def _context_pass(model, ctxs, dev, pad, keep: int | None):
    """Left-padded contexts with explicit positions -> (mask, logits of the last `keep` positions
    (all if None), cache)."""
    B, Lc = len(ctxs), max(len(c) for c in ctxs)
    ids = torch.full((B, Lc), pad, dtype=torch.long)
    mask = torch.zeros((B, Lc), dtype=torch.long)
    for b, c in enumerate(ctxs):
        ids[b, Lc - len(c):] = torch.tensor(c)
        mask[b, Lc - len(c):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    mask = mask.to(dev)
    kw = {"logits_to_keep": keep} if keep else {}
    o = model(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev), use_cache=True, **kw)
    return mask, o.logits, o.past_key_values


def _select_cache(model, layers, index):
    """A new cache holding rows `index` of the cache `layers` ([(keys, values, ...)] per layer)."""
    from transformers import DynamicCache

    rows = [(k.index_select(0, index), v.index_select(0, index), *rest) for k, v, *rest in layers]
    return DynamicCache(rows, config=_base(model).config)


def _continuation_pass(model, inputs, starts, ctx_mask, cache, dev, pad):
    """Right-padded continuation inputs after their cached contexts (positions go on from `starts`)."""
    R, M = len(inputs), max(len(inp) for inp in inputs)
    ids = torch.full((R, M), pad, dtype=torch.long)
    mask = torch.zeros((R, M), dtype=torch.long)
    pos = torch.zeros((R, M), dtype=torch.long)
    for r, (inp, start) in enumerate(zip(inputs, starts)):
        ids[r, :len(inp)] = torch.tensor(inp)
        mask[r, :len(inp)] = 1
        pos[r, :len(inp)] = torch.arange(start, start + len(inp))
    full_mask = torch.cat([ctx_mask, mask.to(dev)], dim=1)
    return model(
        input_ids=ids.to(dev), attention_mask=full_mask, position_ids=pos.to(dev),
        past_key_values=cache, use_cache=True,
    ).logits


# ----------------------------------------------------------------------------- rolling windows (perplexity)
def _reference(model, kl_reference):
    """(module to call for p_ref, context manager to call it in), or None when no KL is asked."""
    if kl_reference is None:
        return None
    if isinstance(kl_reference, str):
        if kl_reference != "base":
            raise ValueError(f"kl_reference must be None, a model or 'base', got {kl_reference!r}")
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise ValueError("kl_reference='base' needs a PEFT model (its adapter is disabled to get the base)")
        return model, model.disable_adapter
    if not isinstance(kl_reference, torch.nn.Module):
        raise ValueError(f"kl_reference must be None, an nn.Module or 'base', got {type(kl_reference).__name__}")
    return kl_reference, contextlib.nullcontext


_REF_CACHE: "OrderedDict | None" = None  # (reference weights, input) -> its kept logits, while reference_cache() is open
_REF_CACHE_LIMIT = 0  # its bytes at most


@contextlib.contextmanager
def reference_cache(max_bytes: int = 6 << 30):
    """Keep the KL reference's window logits across `loglikelihood_rolling` calls in this block, up to `max_bytes`
    (least recently used dropped first); e.g. 8,192 tokens of a 49,152-token vocabulary take 1.6 GB in fp32."""
    global _REF_CACHE, _REF_CACHE_LIMIT
    outer = _REF_CACHE
    if outer is None:
        _REF_CACHE, _REF_CACHE_LIMIT = OrderedDict(), max_bytes
    try:
        yield
    finally:
        if outer is None:
            _REF_CACHE = None


def _weights_id(module) -> str:
    """Identifies a reference model's weights (LoRA parameters left out: "base" runs with the adapter disabled)."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                continue
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().double().sum().cpu().numpy().tobytes())
            h.update(p.detach().flatten()[:: max(1, p.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _cached_ref_logits(ref, ref_id: str | None, ids, mask, keep: int):
    """The reference's logits of the kept columns, from the cache when it is open and holds them."""
    if _REF_CACHE is None or ref_id is None:
        with ref[1]():
            return _window_logits(ref[0], ids, mask, keep)
    key = (ref_id, tuple(ids.shape), keep,
           hashlib.sha1(ids.cpu().numpy().tobytes() + mask.cpu().numpy().tobytes()).hexdigest())
    hit = _REF_CACHE.get(key)
    if hit is not None:
        _REF_CACHE.move_to_end(key)
        return hit.to(ids.device)
    with ref[1]():
        logits = _window_logits(ref[0], ids, mask, keep)
    _REF_CACHE[key] = logits.detach().cpu()
    while len(_REF_CACHE) > 1 and sum(v.numel() * v.element_size() for v in _REF_CACHE.values()) > _REF_CACHE_LIMIT:
        _REF_CACHE.popitem(last=False)
    return logits


def _window_logits(model, ids, mask, keep: int):
    """Logits of the last `keep` columns (right-padded rows); the LM head skips the others if it can."""
    kw = {"logits_to_keep": keep} if _accepts(model, "logits_to_keep") else {}
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
    return logits[:, -keep:]



def loglikelihood_rolling(
    model,
    tokenizer,
    docs: Sequence[Sequence[int]],
    window: int,
    batch_size: int = 8,
    progress: bool = True,
    kl_reference=None,
) -> tuple[list[float], list[int], list[float] | None]:
    """Per document (token ids): the summed negative log-likelihood (nats) of its tokens, each predicted
    once by the rolling windows of at most `window` tokens (`requests.rolling_windows`), the number of
    predicted tokens, and with `kl_reference` (None, an nn.Module, or "base" for this PEFT model with its
    adapter disabled) the summed KL(p_ref || p_model) in nats on the same inputs (else None)."""
    prefix = prefix_token_id(tokenizer)
    ref = _reference(model, kl_reference)
    # (doc, model input, targets at its end), longest inputs first
    wins = [
        (d, (ctx + tgt)[:-1], tgt)
        for d, toks in enumerate(docs) for ctx, tgt in rolling_windows(toks, prefix, window)
    ]
    wins.sort(key=lambda w: -len(w[1]))
    nll_doc = [0.0] * len(docs)
    kl_doc = [0.0] * len(docs)
    count_doc = [0] * len(docs)
    dev = model_device(model)
    pad = _pad_id(tokenizer)
    ref_id = None
    if ref is not None and _REF_CACHE is not None:
        with ref[1]():
            ref_id = _weights_id(ref[0])
    bar = _progress(sum(len(t) for t in docs), "perplexity", progress)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_eval_mode(model))
        if ref is not None and ref[0] is not model:
            stack.enter_context(_eval_mode(ref[0]))
        for chunk in _length_batches(wins, batch_size, size=lambda w: len(w[1])):
            ids, mask = _right_padded([inp for _, inp, _ in chunk], pad)
            ids, mask = ids.to(dev), mask.to(dev)
            width = ids.shape[1]
            keep = width - min(len(inp) - len(tgt) for _, inp, tgt in chunk)  # columns holding targets
            ref_logits = None
            if ref is not None:
                ref_logits = _cached_ref_logits(ref, ref_id, ids, mask, keep)
            logits = _window_logits(model, ids, mask, keep)
            if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
                raise ValueError(
                    f"kl_reference has {ref_logits.shape[-1]} logits per token, the model {logits.shape[-1]}"
                )
            for r, (d, inp, tgt) in enumerate(chunk):
                cols = slice(len(inp) - len(tgt) - (width - keep), len(inp) - (width - keep))
                lp = F.log_softmax(logits[r, cols].float(), dim=-1)
                t = torch.tensor(tgt, device=lp.device)
                nll_doc[d] -= lp.gather(-1, t[:, None]).double().sum().item()
                count_doc[d] += len(tgt)
                if ref_logits is not None:
                    kl_doc[d] += _kl(F.log_softmax(ref_logits[r, cols].float(), dim=-1), lp)
            del logits, ref_logits
            bar.update(sum(len(t) for _, _, t in chunk))
    bar.close()
    return nll_doc, count_doc, kl_doc if ref is not None else None
