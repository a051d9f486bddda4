"""WiSE-FT for LoRA: evaluate a trained adapter with its ΔW scaled by α ∈ [0, 1] (α = 1: as trained,
α = 0: the base model). PEFT's `rescale_adapter_scale` does exactly this for LoRA; a whole front of
accuracy against forgetting for the cost of evaluations. Trained as plain LoRA when used as a stage-μ method;
in an experiment a WiSE row evaluates another row's trained adapter."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

from .spec import MethodConfig, Row
from .base import Method


@dataclass
class WiSEConfig(MethodConfig):
    name: str = "wise"
    alpha: float = 0.5  # scale of the trained ΔW at evaluation
    # `hlora eval --scale α`: this method, with this α, applied to the adapter being evaluated
    eval_flags: ClassVar[dict] = {"--scale": ("alpha", "WiSE-FT: evaluate the adapter's ΔW scaled by this α in [0, 1]")}


_W = (("name", "wise"),)
# Each evaluates another row's trained adapter (its main cell) with ΔW scaled by α.
ROWS = [
    Row("wise_lora_mu", "WiSE-FT of LoRA(μ)", "lora_mu", _W, sweep="alpha", family="wise"),
    Row("wise_lora_nu_mu", "WiSE-FT of LoRA(ν+μ)", "lora_nu_mu", _W, sweep="alpha", family="wise"),
    Row("wise_hlora", "WiSE-FT of HLoRA", "hlora", _W, sweep="alpha", family="wise"),
]


class WiSE(Method):
    config_class = WiSEConfig
    front_ends = {0.0: "base", 1.0: "source"}

    @contextlib.contextmanager
    def evaluation(self, model):
        from peft.helpers import rescale_adapter_scale

        alpha = float(self.cfg.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"wise: alpha must be in [0, 1], got {alpha}")
        with rescale_adapter_scale(model, alpha):
            yield model
