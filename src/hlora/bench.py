"""`hlora bench`: the performance targets of DESIGN section 7, measured as ratios within one run.

Variants are interleaved round by round and summarised by the median, so a noisy machine slows
all of them alike. Nothing here asserts a threshold: it prints what it measured and what the
target is.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Iterable

import torch
from torch import nn

from .config import LoraConfig, ModelConfig
from .lora import lora_modules
from .methods.ewc import forward_inputs, masked_labels, per_sample_loss
from .util import adapter_disabled, eval_mode, model_device, requires_grad


def _targets(model_name: str) -> list[str]:
    from .tiny import TINY_TARGETS

    return TINY_TARGETS.get(model_name, ["q_proj", "v_proj"])


def _step_fn(model, opt, batch, recorder=None, penalty=None):
    def step():
        out = model(**batch)
        loss = out.loss
        if penalty is not None:
            loss = loss + penalty.penalty()
        loss.backward()
        if recorder is not None:
            recorder.before_step(opt)
        opt.step()
        if recorder is not None:
            recorder.after_step()
        opt.zero_grad(set_to_none=True)

    return step


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def bench_training(model_name: str, steps: int, batch_size: int = 4, seq_len: int = 128, rounds: int = 5) -> dict:
    """Seconds per step: plain LoRA, + SI recording, + HLoRA penalty; and the SI cost vs an EWC Fisher."""
    from .lora import lora_modules
    from .methods.ewc import fisher_diagonal
    from .methods.hlora import HLoRAPenalty
    from .model import attach_lora, load_model
    from .si import SIRecorder

    base, tok, _ = load_model(ModelConfig(name=model_name))
    model = attach_lora(base, LoraConfig(targets=_targets(model_name), dropout=0.0))
    model.train()
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=next(model.parameters()).device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    with torch.no_grad():  # nonzero B so that ΔW and the penalty are not trivially zero
        for r in lora_modules(model):
            r.B.normal_(0, 1e-3)
    rec = SIRecorder(model)
    imp = rec.importance()
    for k in imp.omega:
        imp.omega[k] = torch.rand_like(imp.omega[k])
    pen = HLoRAPenalty(model, imp, phi=1e-3)

    variants = {"lora": _step_fn(model, opt, batch), "lora+si": _step_fn(model, opt, batch, recorder=rec),
                "lora+penalty": _step_fn(model, opt, batch, penalty=pen)}
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(_time(fn, per_round))
    med = {k: statistics.median(v) for k, v in times.items()}

    # Importance cost on the same tokens: SI's added time over `steps` steps vs a Fisher over those tokens.
    si_added = max(med["lora+si"] - med["lora"], 0.0) * steps
    fisher_batches = [batch] * steps
    t = time.perf_counter()
    fisher_diagonal(model, fisher_batches)
    fisher_s = time.perf_counter() - t
    return {
        "model": model_name, "batch_size": batch_size, "seq_len": seq_len, "steps": steps, "rounds": rounds,
        "step_seconds": med,
        "si_overhead": med["lora+si"] / med["lora"] - 1.0,
        "penalty_overhead": med["lora+penalty"] / med["lora"] - 1.0,
        "si_added_seconds": si_added, "fisher_seconds": fisher_s,
        "fisher_over_si_added": fisher_s / si_added if si_added > 0 else float("inf"),
        "fisher_over_si_total": fisher_s / (med["lora+si"] * steps),
    }


def bench_storage(model_name: str) -> dict:
    """Bytes of the importance file (fp32 and fp16 Ω) against a full-model fp32 Fisher."""
    import tempfile
    from pathlib import Path

    from .model import attach_lora, load_model
    from .si import SIRecorder

    base, _, _ = load_model(ModelConfig(name=model_name))
    n_params = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraConfig(targets=_targets(model_name)))
    imp = SIRecorder(model).importance()
    out = {"model": model_name, "full_fisher_bytes": 4 * n_params}
    with tempfile.TemporaryDirectory() as d:
        for dt in ("float32", "float16"):
            p = Path(d) / f"imp-{dt}.safetensors"
            imp.save(p, dtype=dt, reference=False)  # as `hlora general` stores it
            out[f"importance_bytes_{dt}"] = p.stat().st_size
            out[f"ratio_{dt}"] = p.stat().st_size / out["full_fisher_bytes"]
    return out


def bench_eval(model_name: str, n_items: int = 24) -> dict:
    """Shared-context scoring against one-row-per-choice scoring (lm-eval's way) on the same items."""
    from .data import get_task
    from .evaluate import loglikelihood, loglikelihood_full
    from .model import load_model

    model, tok, _ = load_model(ModelConfig(name=model_name))
    items = get_task("sciq").eval_items(n_items)
    reqs = [(it.context, it.delimiter + c) for it in items for c in it.choices]
    t = time.perf_counter()
    fast = loglikelihood(model, tok, reqs, batch_size=8, progress=False)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    full = loglikelihood_full(model, tok, reqs, batch_size=8, progress=False)
    t_full = time.perf_counter() - t
    diff = max(abs(a[0] - b[0]) for a, b in zip(fast, full))
    return {"model": model_name, "items": n_items, "shared_context_seconds": t_fast, "full_seconds": t_full,
            "speedup": t_full / t_fast, "max_abs_ll_diff": diff}


def main(args) -> dict:
    import json

    from .files import write_json

    res = {"training": bench_training(args.model, args.steps), "storage": bench_storage(args.model),
           "eval": bench_eval(args.model)}
    tr, st, ev = res["training"], res["storage"], res["eval"]
    print(f"model {args.model}; {tr['steps']} steps of {tr['batch_size']}x{tr['seq_len']} tokens, median of {tr['rounds']} interleaved rounds")
    print(f"  step seconds: " + ", ".join(f"{k} {v:.4f}" for k, v in tr["step_seconds"].items()))
    print(f"  SI recording overhead   {tr['si_overhead'] * 100:+.2f} %   (target <= 2 %)")
    print(f"  HLoRA penalty overhead  {tr['penalty_overhead'] * 100:+.2f} %   (target <= 2 %)")
    print(f"  Fisher / SI added time  {tr['fisher_over_si_added']:.1f}x     (target >= 100x; Fisher {tr['fisher_seconds']:.2f} s, "
          f"SI added {tr['si_added_seconds']:.3f} s on the same tokens)")
    print(f"  Fisher / whole SI run   {tr['fisher_over_si_total']:.2f}x")
    print(f"  storage: importance fp32 {st['ratio_float32'] * 100:.2f} % of a full fp32 Fisher (target <= 15 %), "
          f"fp16 {st['ratio_float16'] * 100:.2f} % (target <= 5 %)")
    print(f"  eval: shared-context scoring {ev['speedup']:.2f}x faster than one row per choice on {ev['items']} SciQ items "
          f"(max |Δll| {ev['max_abs_ll_diff']:.2e})")
    if args.out:
        write_json(args.out, res)
    else:
        print(json.dumps(res, indent=1, default=float)[:0])
    return res


# ---------------------------------------------------------------- cost of a full-model Fisher


def full_fisher_cost(
    model: nn.Module,
    batches: Iterable[dict],
    n_examples: int = 2,
    fisher_examples: int = 64,
    targets: list[str] | None = None,
) -> dict:
    """What a diagonal Fisher of *all* pretrained parameters (fp32) would cost, vs the targeted one.

    `model` is the pretrained model, with or without a LoRA adapter (adapter parameters are not
    counted and the adapter is switched off). Storage is exact: 4 bytes × parameter count. Time is
    measured: per-sample gradients of every parameter for `n_examples` sequences, squared and
    accumulated into a full-size buffer, extrapolated linearly to `fisher_examples` sequences (the
    number the LoRA Fisher uses). This uses one backward per sample — acceptable here because it is
    only a cost measurement (and is what a plain full-model EWC implementation does).
    The targeted-only Fisher size comes from the LoRA modules, or, for a model without an adapter,
    from the modules whose last name component is in `targets` (e.g. ["q_proj", "v_proj"]).

    Keys: n_params, full_bytes, targeted_params, targeted_bytes, targeted_fraction, examples_timed,
    seconds_per_example, fisher_examples, full_seconds (= seconds_per_example × fisher_examples).
    """
    base_params = [(n, p) for n, p in model.named_parameters() if "lora_" not in n]
    n_params = sum(p.numel() for _, p in base_params)
    if targets is not None:
        wanted = set(targets)
        targeted = sum(
            m.weight.numel()
            for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in wanted and isinstance(getattr(m, "weight", None), torch.Tensor)
            and "lora_" not in n
        )
    else:
        try:
            targeted = sum(r.base_weight.numel() for r in lora_modules(model))
        except ValueError:  # no adapter and no target names: unknown
            targeted = None
    device = model_device(model)
    params = [p for _, p in base_params]
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    timed = 0
    seconds = 0.0
    with adapter_disabled(model), eval_mode(model), requires_grad(params), torch.enable_grad():
        for batch in batches:
            bsz = int(torch.as_tensor(batch["input_ids"]).shape[0])
            for b in range(bsz):
                if timed >= n_examples:
                    break
                one = {k: torch.as_tensor(v)[b : b + 1] for k, v in batch.items() if v is not None}
                inputs = forward_inputs(one, device, None)
                target = masked_labels(one, inputs, None)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                logits = model(**inputs, use_cache=False).logits
                loss, counted, _ = per_sample_loss(logits, target, "empirical", None)
                if not bool(counted.any()):
                    continue
                grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += g.float().pow(2)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - t0
                timed += 1
            if timed >= n_examples:
                break
    del acc
    per = seconds / timed if timed else math.nan
    return {
        "n_params": n_params,
        "full_bytes": 4 * n_params,
        "targeted_params": targeted,
        "targeted_bytes": None if targeted is None else 4 * targeted,
        "targeted_fraction": None if targeted is None or not n_params else targeted / n_params,
        "examples_timed": timed,
        "seconds_per_example": per,
        "fisher_examples": fisher_examples,
        "full_seconds": per * fisher_examples,
    }
