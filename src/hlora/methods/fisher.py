"""EWC-LoRA's math (the method, its config and rows: methods/ewc.py): the diagonal Fisher of the pretrained model
and the penalty λ·Σ F ⊙ ΔW².

The Fisher is taken for the *base* weight matrices of the LoRA-targeted modules only, on general
text, with the adapter switched off (it is the pretrained model's Fisher). It is computed from
per-sample gradients in one batched forward/backward per batch:

    forward hook on each targeted base layer   -> its input x  (B, T, in) and output y (B, T, out)
    autograd.grad(Σ_b loss_b, [y ...])          -> g = ∂loss/∂y (B, T, out); since the samples do
                                                   not interact, g[b] is the gradient of loss_b alone
    G_b = Σ_t g_{b,t} x_{b,t}ᵀ                  -> per-sample weight gradient (einsum), out × in
    F  += Σ_b G_b²                              -> then F /= N (number of samples)

Choices (kept consistent with the penalty's default λ = 0.5):
- a "sample" is one sequence and its loss is the *mean* token cross-entropy over its labelled
  tokens (labels != -100 and attention_mask = 1), i.e. what `model(**batch).loss` gives for a batch
  of one — the convention of a batch-of-one EWC loop. A sequence with no labelled token is skipped
  and not counted.
- F is divided by the number of samples counted, so λ does not depend on how many were used.
- `fisher="empirical"` uses the data's labels (EWC-LoRA's code); `"sampled"` draws each label
  from the model's own predictive distribution (the true Fisher, as the paper describes), with a
  seeded generator so a seed gives the same Fisher.

The model is left exactly as it was: training mode per module, requires_grad flags, no hooks and
no `.grad` anywhere (gradients are taken with `torch.autograd.grad`, never `.backward()`).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import torch
import torch.nn.functional as F_
from torch import nn

from ..lora import DriftPenalty, LoraRef, lora_modules, to_weight_layout
from ..util import adapter_disabled, eval_mode, model_device, requires_grad

# Largest per-chunk (samples × out × in) tensor of per-sample gradients (elements, fp32 → 128 MiB).
_CHUNK_ELEMENTS = 1 << 25


# ---------------------------------------------------------------------------------- helpers


def forward_inputs(batch: dict, device: torch.device, take: int | None) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    out = {}
    for k in keys:
        if k in batch and batch[k] is not None:
            v = torch.as_tensor(batch[k])
            out[k] = (v[:take] if take is not None else v).to(device)
    return out


def masked_labels(batch: dict, inputs: dict, take: int | None) -> torch.Tensor:
    """Labels aligned with input_ids, -100 wherever a token or the one predicting it is padding.

    (With left padding the first real token would otherwise be "predicted" from a pad position.)
    """
    labels = batch.get("labels")
    labels = inputs["input_ids"].clone() if labels is None else torch.as_tensor(labels)
    labels = (labels[:take] if take is not None else labels).to(inputs["input_ids"].device)
    if "attention_mask" in inputs:
        pad = inputs["attention_mask"] == 0
        pad[:, 1:] |= pad[:, :-1].clone()
        labels = labels.masked_fill(pad, -100)
    return labels


def per_sample_loss(
    logits: torch.Tensor, labels: torch.Tensor, mode: str, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_b per sequence = mean CE over its labelled tokens, mask of sequences that count,
    labelled tokens per sequence).

    HF convention: logits at position t predict labels[t + 1].
    """
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:]
    valid = target != -100
    if mode == "sampled":  # y_t ~ p_θ(· | x_<t) at each labelled position
        with torch.no_grad():
            probs = torch.softmax(logits.detach()[valid], dim=-1)
            target = target.clone()
            if probs.shape[0]:
                target[valid] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    elif mode != "empirical":
        raise ValueError(f"fisher must be 'empirical' or 'sampled', got {mode!r}")
    ce = F_.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view_as(target)
    n_tok = valid.sum(dim=1)
    counted = n_tok > 0
    loss = (ce * valid).sum(dim=1) / n_tok.clamp(min=1)
    return loss, counted, n_tok


def _accumulate_sq_grads(acc: torch.Tensor, xs: list, gs: list, counted: torch.Tensor, fan_in_fan_out: bool):
    """acc += Σ_b (Σ_calls Σ_t g_{b,t} x_{b,t}ᵀ)² over counted samples b, in the weight's layout."""
    idx = counted.nonzero().flatten()
    if idx.numel() == 0:
        return
    out_f, in_f = gs[0].shape[-1], xs[0].shape[-1]
    chunk = max(1, _CHUNK_ELEMENTS // (out_f * in_f))
    # Linear: G (out × in) = Σ_t g xᵀ;  Conv1D / fan_in_fan_out: G (in × out) = Σ_t x gᵀ.
    eq = "bto,bti->bio" if fan_in_fan_out else "bto,bti->boi"
    for s in range(0, idx.numel(), chunk):
        sel = idx[s : s + chunk]
        G = None
        for x, g in zip(xs, gs):  # a module called more than once per forward: sum its gradients
            if g is None:
                continue
            x3 = x.reshape(x.shape[0], -1, in_f)[sel].float()
            g3 = g.reshape(g.shape[0], -1, out_f)[sel].float()
            part = torch.einsum(eq, g3, x3)
            G = part if G is None else G + part
        if G is not None:
            acc += G.pow(2).sum(dim=0)


# ------------------------------------------------------------------------------- the Fisher


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[dict],
    targets_of: Callable[[nn.Module], list[LoraRef]] = lora_modules,
    labels: str = "empirical",
    max_examples: int | None = None,
    seed: int = 0,
    stats: dict | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the pretrained model (adapter off) for the targeted base weights.

    Returns {PEFT module name: fp32 tensor shaped like that module's base weight} = (1/N) Σ_b G_b²,
    G_b the gradient of sample b's mean token cross-entropy. `batches` yields dicts with
    input_ids, attention_mask, labels (and optionally position_ids); padding is excluded through
    labels == -100 / attention_mask == 0. Without position_ids, sequences should be right-padded
    (the models' default positions are then those of the unpadded sequence).
    `max_examples` (None or 0 = all) caps the number of sequences read. `seed` seeds the label
    draws of "sampled". `stats`, if given, receives {"examples": N, "tokens": labelled tokens}.
    """
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"fisher labels must be 'empirical' or 'sampled', got {labels!r}")
    refs = targets_of(model)
    device = model_device(model)
    weights = {r.name: r.module.get_base_layer().weight for r in refs}
    acc = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    captured: dict[str, list] = {r.name: [] for r in refs}  # name -> [(x, y), ...] for one batch

    def make_hook(name):
        def hook(module, args, output):
            x = args[0] if args else None
            if isinstance(output, torch.Tensor) and x is not None and output.requires_grad:
                captured[name].append((x.detach(), output))

        return hook

    generator = None  # "sampled": made on the logits' device at the first batch

    handles = []
    n_seen = 0  # sequences read
    n_counted = 0  # sequences with at least one labelled token
    n_tokens = 0
    limit = max_examples if max_examples and max_examples > 0 else None
    try:
        for r in refs:
            handles.append(r.module.get_base_layer().register_forward_hook(make_hook(r.name)))
        with adapter_disabled(model), eval_mode(model), requires_grad(weights.values()), torch.enable_grad():
            for batch in batches:
                if limit is not None and n_seen >= limit:
                    break
                bsz = int(torch.as_tensor(batch["input_ids"]).shape[0])
                take = None if limit is None or n_seen + bsz <= limit else limit - n_seen
                inputs = forward_inputs(batch, device, take)
                target = masked_labels(batch, inputs, take)
                n_seen += int(inputs["input_ids"].shape[0])
                for v in captured.values():
                    v.clear()
                try:
                    logits = model(**inputs, use_cache=False).logits
                    if labels == "sampled" and generator is None:
                        generator = torch.Generator(device=logits.device).manual_seed(seed)
                    loss_b, counted, n_tok = per_sample_loss(logits, target.to(logits.device), labels, generator)
                    if not bool(counted.any()):
                        continue
                    outs = [(n, i, y) for n, lst in captured.items() for i, (_, y) in enumerate(lst)]
                    if not outs:
                        raise RuntimeError("no targeted module took part in the forward pass")
                    grads = torch.autograd.grad(
                        loss_b.sum(), [y for _, _, y in outs], allow_unused=True
                    )
                    gmap: dict[str, list] = {n: [None] * len(captured[n]) for n in captured}
                    for (n, i, _), g in zip(outs, grads):
                        gmap[n][i] = g
                    del logits, loss_b, grads, outs
                    for r in refs:
                        xs = [x for x, _ in captured[r.name]]
                        if xs:
                            _accumulate_sq_grads(acc[r.name], xs, gmap[r.name], counted, r.fan_in_fan_out)
                    n_counted += int(counted.sum())
                    n_tokens += int(n_tok.sum())
                finally:
                    for v in captured.values():
                        v.clear()
    finally:
        for h in handles:
            h.remove()
    if n_counted == 0:
        raise ValueError("Fisher: the batches held no labelled token (all labels -100 or no batches)")
    if stats is not None:
        stats.update(examples=n_counted, tokens=n_tokens)
    return {n: a / n_counted for n, a in acc.items()}


# ------------------------------------------------------------------------------ the penalty


class EWCPenalty(DriftPenalty):
    """λ · Σ_modules Σ F ⊙ (ΔW)², ΔW = s·B·A of the current adapter (differentiable in A and B).

    F is kept as fp32 buffers of this object (not of the model), each on its module's device.
    """

    def __init__(self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float = 0.5):
        super().__init__(model)
        self.lam = float(lam)
        refs = self._refs
        for ref in refs:
            if ref.name not in fisher:
                raise ValueError(f"Fisher has no entry for LoRA module {ref.name!r}")
            f, w = fisher[ref.name], ref.base_weight
            if tuple(f.shape) != tuple(w.shape):
                raise ValueError(
                    f"Fisher for {ref.name!r} has shape {tuple(f.shape)}, base weight has {tuple(w.shape)}"
                )
        extra = sorted(set(fisher) - {r.name for r in refs})
        if extra:
            raise ValueError(f"Fisher has an entry for {extra[0]!r}, which is not a LoRA module of the model")
        # Modules of one shape stacked (lora.group_modules, as the HLoRA penalty and the SI recorder do): the
        # penalty is lora.WeightedSquaredDrift with Ω = F, no reference and unit weights.
        for gi in range(len(self._groups)):
            rs = self._group_refs(gi)
            dev = rs[0].A.device
            f = torch.stack([to_weight_layout(r, fisher[r.name].detach()).to(device=dev, dtype=torch.float32)
                             for r in rs])
            self.register_buffer(f"fisher_{gi}", f)
            self.register_buffer(f"scale_{gi}", self._scales(rs), persistent=False)
            self.register_buffer(f"weight_{gi}", torch.ones(len(rs), 1, 1, device=dev), persistent=False)

    def fisher(self) -> dict[str, torch.Tensor]:
        """F per module, in the base weight's layout."""
        out = {}
        for gi, idx in enumerate(self._groups):
            f = getattr(self, f"fisher_{gi}")
            for k, i in enumerate(idx):
                out[self._refs[i].name] = to_weight_layout(self._refs[i], f[k])
        return out

    def penalty(self) -> torch.Tensor:
        return self.lam * self.drift("fisher")


# ------------------------------------------------------------------------------------- the method


# What full-model EWC would cost, the baseline's own comparison (the report's complexity table, the bench).


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
