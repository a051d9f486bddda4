"""Evaluation: a log-likelihood engine that agrees with lm-evaluation-harness 0.4.13, MCQ accuracy, perplexity.

- requests.py: what a request is, as token ids (lm-eval's encoding of (context, continuation) pairs, of
  documents, and their rolling windows);
- batches.py: which rows share a forward pass (length-sorted runs, padding plus a cost per pass);
- engine.py: the model boundary, lm-eval's `LM` interface: `loglikelihood` (shared contexts scored once,
  with their KV cache reused), `loglikelihood_full` (lm-eval's plain path), `loglikelihood_rolling`
  (the perplexity forward passes, with the optional KL to a reference model);
- metrics.py: acc / acc_norm and their standard errors, perplexity, bits per byte, KL;
- evaluator.py: `evaluate` on task objects, `evaluate_mcq` on items, `perplexity` on texts.

The names below are this package's interface (`hlora.evaluate` the function is `evaluator.evaluate`).
The batching constants are read where they are used: set `hlora.evaluate.batches.FORWARD_COST` (or
`TOKENS_PER_CONTEXT`) to change them; the copies here are for reading.
"""
# The private names are read by the tests and benchmarks/lmeval_parity.py.
from .batches import FORWARD_COST, TOKENS_PER_CONTEXT, _length_batches, _packed_batches  # noqa: F401
from .engine import (DEFAULT_MAX_LENGTH, loglikelihood, loglikelihood_full, loglikelihood_rolling,
                     reference_cache, resolve_max_length)
from .evaluator import evaluate, evaluate_mcq, perplexity
from .metrics import _argmax, _stderr, mcq_result, perplexity_result  # noqa: F401
from .requests import _Encoder, encode_docs, encode_requests, prefix_token_id, rolling_windows  # noqa: F401

__all__ = [
    "evaluate", "evaluate_mcq", "perplexity", "loglikelihood", "loglikelihood_full", "loglikelihood_rolling",
    "reference_cache", "resolve_max_length", "encode_requests", "encode_docs", "prefix_token_id", "rolling_windows",
    "mcq_result", "perplexity_result", "TOKENS_PER_CONTEXT", "FORWARD_COST", "DEFAULT_MAX_LENGTH",
]
