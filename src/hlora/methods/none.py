"""No regularizer: plain LoRA (LoRA(μ), LoRA(ν+μ), rsLoRA, the '-layer,element' ablation)."""
from __future__ import annotations

from ..config import MethodConfig
from .base import StageContext, register


class NoPenalty:
    def penalty(self):
        return None

    def callbacks(self):
        return []


@register("none")
def build(cfg: MethodConfig, ctx: StageContext) -> NoPenalty:
    return NoPenalty()
