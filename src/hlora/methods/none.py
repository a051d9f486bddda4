"""No regularizer: plain LoRA (LoRA(μ), LoRA(ν+μ), rsLoRA, the '-layer,element' ablation, or stage ν
without importance recording)."""
from __future__ import annotations

from dataclasses import dataclass

from .spec import MethodConfig, Row
from .base import Method


@dataclass
class PlainConfig(MethodConfig):
    name: str = "none"


class Plain(Method):
    config_class = PlainConfig
    stages = ("general", "domain")


# Plain LoRA's rows; the report's grey reference in every fronts panel is LoRA(μ) (role "plain").
ROWS = [
    Row("base", "Base", "none", family="base"),
    Row("lora_nu", "LoRA(ν) only", "nu_adapter"),  # stage ν alone: how far the general-text adapter itself moves
    Row("lora_mu", "LoRA(μ)", "fresh", role="plain"),
    Row("lora_nu_mu", "LoRA(ν+μ)", "nu"),
    Row("rslora", "rsLoRA", "fresh", lora=("rslora=true",)),
]
