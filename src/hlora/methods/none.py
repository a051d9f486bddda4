"""No regularizer: plain LoRA (LoRA(μ), LoRA(ν+μ), rsLoRA, the '-layer,element' ablation, or stage ν
without importance recording)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig
from .base import Method


@dataclass
class PlainConfig(MethodConfig):
    name: str = "none"


class Plain(Method):
    config_class = PlainConfig
    stages = ("general", "domain")
