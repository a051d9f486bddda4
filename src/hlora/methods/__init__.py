"""The method registry: a method is one file here, named by one line below.

Entries are "module:Class" strings, imported on first use, so that base.py never imports the methods
built on it (no import cycle) and `import hlora` stays light. Adding a method = its file + one line here
(+ a row in experiment.ROWS to put it in the grid).
"""
from __future__ import annotations

import importlib

from ..util import did_you_mean
from .base import Method, StageContext

REGISTRY: dict[str, str] = {
    "none": "none:Plain",  # plain LoRA: LoRA(μ), LoRA(ν+μ), rsLoRA, the "-layer,element" ablation
    "hlora": "hlora:HLoRA",  # SI importance in stage ν, hierarchical penalty in stage μ
    "ewc": "ewc:EWC",  # EWC-LoRA: Fisher of the pretrained model, λ·Σ F ⊙ ΔW²
    "replay": "replay:Replay",  # a share ρ of every step's sequences from the general pool
    "kl_general": "kl:KLGeneral",  # CE + β·KL(p_base ‖ p_θ) on general batches
    "kl_domain": "kl:KLDomain",  # CE + β·KL(p_base ‖ p_θ) on the domain batch's own tokens (ASFT-style)
    "wise": "wise:WiSE",  # evaluation-time scaling of a trained adapter's ΔW by α (WiSE-FT)
    "corda_kpm": "corda:CorDAKPM",  # PEFT's CorDA, knowledge-preserving init from general-text covariance
}


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, REGISTRY)}; known: {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def config_class(name: str) -> type:
    """The typed config class of method `name` (read by config.py for the `method:` section)."""
    return method_class(name).config_class


def build_method(cfg, ctx: StageContext) -> Method:
    """The method of `cfg.name`, set up for the stage in `ctx`."""
    cls = method_class(cfg.name)
    if not isinstance(cfg, cls.config_class):
        raise TypeError(f"method {cfg.name!r} takes a {cls.config_class.__name__}, got {type(cfg).__name__}")
    if ctx.stage not in cls.stages:
        raise ValueError(f"method {cfg.name!r} has no {ctx.stage} stage (it runs in: {', '.join(cls.stages)})")
    return cls(cfg, ctx)


__all__ = ["Method", "StageContext", "REGISTRY", "build_method", "config_class", "method_class"]
