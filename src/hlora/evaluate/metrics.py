"""Metrics from the engine's log-likelihoods: MCQ accuracy (acc, acc_norm) with standard errors, and token /
word perplexity, bits per UTF-8 byte and KL divergence summed over documents (lm-eval's definitions)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from ..data.base import MCQItem, PartialItem


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


def mcq_result(items: Sequence[MCQItem | PartialItem], lls: Sequence[Sequence[float]]) -> dict:
    """acc (argmax log-likelihood) and acc_norm (argmax log-likelihood per character of the choice), given
    each item's log-likelihood per option, with their standard errors and what each item chose."""
    per = {"id": [], "acc": [], "acc_norm": [], "ll": [], "ll_gold": [], "pred": [], "pred_norm": [], "gold": []}
    for it, ll in zip(items, lls):
        ll = list(ll)
        # lm-eval divides by len(choice) in characters; an empty choice counts as 1 (not a division by 0)
        normed = [x / k for x, k in zip(ll, it.norm_lengths())]
        pred, pred_norm = _argmax(ll), _argmax(normed)
        per["id"].append(it.id)
        per["gold"].append(it.gold)
        per["ll"].append(ll)
        per["ll_gold"].append(ll[it.gold])
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


def _kl(ref_lp: torch.Tensor, lp: torch.Tensor) -> float:
    """Σ over positions of KL(p_ref || p) = Σ_v p_ref(v) (log p_ref(v) − log p(v)); [n, V] log-probs."""
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1).double().sum().item()


def perplexity_result(docs, nll_doc, count_doc, kl_doc, window: int) -> dict:
    """docs [(tokens, words, bytes)], and per document the summed NLL (nats), the predicted tokens and the
    summed KL (None: no KL asked) -> token_ppl, word_ppl, bits_per_byte (and kl, the mean per token)."""
    nll = sum(nll_doc)
    n_tokens = sum(count_doc)
    n_words = sum(w for _, w, _ in docs)
    n_bytes = sum(b for _, _, b in docs)
    res = {
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
    if kl_doc is not None:
        res["kl"] = sum(kl_doc) / n_tokens if n_tokens else float("nan")
        res["kl_tokens"] = n_tokens
        res["per_item"]["kl_sum"] = kl_doc  # per document, summed over its tokens (like "nll")
    return res
