"""Pure helpers over PEFT LoRA modules: which modules, their scale s, and ΔW = s·B·A.

Shared by the SI recorder, the penalties and the Fisher code so that "a LoRA module" and
"its update" mean exactly one thing in the whole package.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

_BLOCK_RE = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA-wrapped module of the active adapter."""

    name: str  # PEFT module path, e.g. base_model.model.model.layers.3.self_attn.v_proj
    module: nn.Module
    adapter: str

    @property
    def A(self) -> nn.Parameter:  # r x in
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # out x r
        return self.module.lora_B[self.adapter].weight

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.module, "fan_in_fan_out", False))

    @property
    def base_weight(self) -> torch.Tensor:
        return self.module.get_base_layer().weight

    @property
    def block(self) -> int:
        return block_index(self.name)


def block_index(name: str) -> int:
    """Transformer block number of a module path (-1 if it sits outside the block stack)."""
    m = _BLOCK_RE.search(name + ".")
    return int(m.group(1)) if m else -1


def lora_modules(model: nn.Module, adapter: str | None = None) -> list[LoraRef]:
    """All LoRA-wrapped modules of `adapter` (default: the active one), in model order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            ad = adapter or (mod.active_adapters[0] if mod.active_adapters else "default")
            if ad in getattr(mod, "lora_A", {}):
                out.append(LoraRef(name, mod, ad))
    if not out:
        raise ValueError("model has no LoRA modules: attach an adapter first (hlora.model.attach_lora)")
    return out


def delta_w(ref: LoraRef, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = s·B·A in the base weight's layout (transposed for fan_in_fan_out, e.g. GPT-2 Conv1D)."""
    A = ref.A if A is None else A
    B = ref.B if B is None else B
    d = ref.scale * (B @ A)
    return d.T if ref.fan_in_fan_out else d


def to_weight_layout(ref: LoraRef, m: torch.Tensor) -> torch.Tensor:
    """Map an (out x in) matrix to the base weight's layout (identity unless fan_in_fan_out)."""
    return m.T if ref.fan_in_fan_out else m
