"""What a request is, as token ids: lm-evaluation-harness 0.4.13's encoding (`HFLM`, causal backend).

* a request is (context, continuation); trailing whitespace of the context moves to the front of
  the continuation; `whole = encode(context + continuation)`, `ctx = encode(context)`,
  `cont = whole[len(ctx):]` (the model reads `ctx + cont`, not `whole`);
* strings are encoded with the tokenizer's own default for special tokens (lm-eval's
  `add_bos_token=None`), except a string that already starts with the prefix token's text;
  `add_special_tokens=True/False` forces it, like lm-eval's `add_bos_token`;
* an empty context becomes `[prefix]` (BOS, else EOS) and the continuation is encoded without
  special tokens; if it already starts with the prefix token, that token becomes the context.

A document to score whole (perplexity) is encoded like lm-eval's `tok_encode` and cut into rolling
windows (`rolling_windows`, lm-eval's `loglikelihood_rolling`) that predict every token once.
"""
from __future__ import annotations

from typing import Sequence


def prefix_token_id(tokenizer) -> int:
    """Token that conditions an empty context and a document's first token (lm-eval: BOS, else EOS)."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition on")


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


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`: (context, targets)
    pairs that predict every token once. The first predicts up to `max_len` tokens from the prefix
    token; each later one predicts the next up to `max_len` tokens with the model reading the
    `max_len` tokens that end just before its last target (a short last window keeps a full window
    of context). The model input is `(context + targets)[:-1]`, at most `max_len` tokens."""
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    out = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + max_len, len(tokens))
        out.append((tokens[end - max_len - 1:done], tokens[done:end]))
        done = end
    return out


def encode_docs(tokenizer, texts: Sequence[str], max_tokens: int) -> list[tuple[list[int], int, int]]:
    """(tokens, words, UTF-8 bytes) per document; tokens as lm-eval's `tok_encode` makes them.
    `max_tokens > 0` keeps only the first `max_tokens` tokens of the documents in order (the last
    document is cut; its words and bytes are those of the decoded kept tokens)."""
    enc = _Encoder(tokenizer)
    docs = []
    budget = max_tokens if max_tokens > 0 else None
    for text in texts:
        if budget is not None and budget <= 0:
            break
        toks = enc.encode(text)
        if budget is not None and len(toks) > budget:
            toks = toks[:budget]
            text = tokenizer.decode(toks, skip_special_tokens=True)
        if budget is not None:
            budget -= len(toks)
        docs.append((toks, len(text.split()), len(text.encode("utf-8"))))
    return docs
