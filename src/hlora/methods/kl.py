"""KL-to-base: CE + β·KL(p_base ‖ p_θ), anchoring the fine-tuned model to the pretrained one.

p_base is the same model with its adapter disabled (PEFT's `disable_adapter()`: no second copy in memory),
in eval mode and without gradients; p_θ is the model being trained. The KL is the mean over non-padding
positions of Σ_v p_base(v)·(log p_base(v) − log p_θ(v)).
- `kl_general`: on a batch drawn from the general pool of stage ν at every micro-batch (LwF-style): one
  extra forward with gradients and one without; the general tokens count as trained on.
- `kl_domain`: on the domain batch's own tokens (ASFT-style), reusing the training forward's logits: one
  extra forward without gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..util import adapter_disabled, eval_mode
from .base import Method
from .spec import MethodConfig, Row

if TYPE_CHECKING:
    import torch


@dataclass
class KLConfig(MethodConfig):
    name: str = "kl_general"
    beta: float = 0.1  # weight of the KL term (LLaMA-Factory's ASFT suggests 0.05–0.1)


def kl_to_reference(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions with mask = 1 of KL(softmax(ref) ‖ softmax(logits)), in nats."""
    import torch.nn.functional as F

    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    per_pos = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)


def _unwrap(model):
    """The PeftModel under a DDP / accelerate wrapper."""
    return getattr(model, "module", model)


def base_logits(model, inputs: dict) -> torch.Tensor:
    import torch

    peft = _unwrap(model)
    if not hasattr(peft, "disable_adapter"):
        raise ValueError("KL-to-base needs a PEFT model (the base distribution is the model with its adapter off)")
    with torch.no_grad(), adapter_disabled(peft), eval_mode(peft):
        return peft(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits


ROWS = [
    Row("kl_general", "KL-to-base (general)", "fresh", (("name", "kl_general"),), sweep="beta"),
    Row("kl_domain", "KL-to-base (domain)", "fresh", (("name", "kl_domain"),), sweep="beta"),
]


class _KL(Method):
    config_class = KLConfig
    coefficient, coefficient_range = "beta", (1e-6, 1e4)  # _term reads cfg.beta at every call

    def _term(self, model, inputs: dict, logits: torch.Tensor) -> torch.Tensor:
        ref = base_logits(model, inputs)
        n = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        self.costs.extra_forward_tokens += n
        return self.cfg.beta * kl_to_reference(ref, logits, inputs.get("attention_mask"))

    def bench_variant(self, model, omega, domain, general):
        self.setup(model)
        return {"extra": self.loss}


class KLDomain(_KL):
    tune_by_default = False  # its KL is taken on the domain's own tokens: no anchor on general text

    def loss(self, model, inputs, outputs):
        return self._term(model, inputs, outputs.logits)


class KLGeneral(_KL):
    def setup(self, model) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("kl_general runs a second forward pass with gradients per backward, which DDP does "
                             "not allow; run it in one process, or use kl_domain")
        if self.ctx.general_pool is None:
            raise ValueError("method 'kl_general' needs the general pool of stage ν (general_data)")
        from ..data.packing import shuffled_batches

        t = self.ctx.run.train
        self._batches = shuffled_batches(self.ctx.general_pool(), t.batch_size, seed=t.seed + 1)

    def loss(self, model, inputs, outputs):
        dev = inputs["input_ids"].device
        batch = {k: v.to(dev) for k, v in next(self._batches).items() if k != "labels"}
        logits = model(**batch).logits
        n = int(batch["attention_mask"].sum())
        self.costs.general_tokens += n
        self.costs.extra_forward_tokens += n  # the forward with gradients; _term counts the base one
        return self._term(model, batch, logits)
