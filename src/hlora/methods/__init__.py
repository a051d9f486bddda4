"""The method registry: a method is one file here, named by one line below.

Entries are "module:Class" strings ("module" a file of this package, else an importable module of its own), imported on
first use, so that base.py never imports the methods built on it (no import cycle) and `import hlora` stays light.
A method file declares everything about the method: its typed config, its Method class (hooks, the files it writes
and their kind), and its experiment rows (`ROWS`: label, where stage μ starts, sweep field, report family and
role). The grid, the report, the CLI's flags and the bench read these; none of them names a method. Adding a
method = its file + one line here.

Row order: the modules' ROWS in registry order (a module named by several entries counts once, at its first).
"""
from __future__ import annotations

import importlib

from ..util import did_you_mean
from .spec import Row

REGISTRY: dict[str, str] = {
    "none": "none:Plain",  # plain LoRA: Base, LoRA(ν), LoRA(μ), LoRA(ν+μ), rsLoRA
    "ewc": "ewc:EWC",  # EWC-LoRA: Fisher of the pretrained model, λ·Σ F ⊙ ΔW²
    "hlora": "hlora:HLoRA",  # SI importance in stage ν, hierarchical penalty in stage μ (+ its ablations)
    "replay": "replay:Replay",  # a share ρ of every step's sequences from the general pool
    "kl_general": "kl:KLGeneral",  # CE + β·KL(p_base ‖ p_θ) on general batches
    "kl_domain": "kl:KLDomain",  # CE + β·KL(p_base ‖ p_θ) on the domain batch's own tokens (ASFT-style)
    "corda_kpm": "corda:CorDAKPM",  # PEFT's CorDA, knowledge-preserving init from general-text covariance
    "wise": "wise:WiSE",  # evaluation-time scaling of a trained adapter's ΔW by α (WiSE-FT)
}


def _module(name: str):
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, REGISTRY)}; known: {', '.join(REGISTRY)}")
    module = REGISTRY[name].split(":")[0]
    if "." not in module:  # a file of this package, else a module of its own (e.g. a plugin's, a test's)
        try:
            return importlib.import_module(f".{module}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise
    return importlib.import_module(module)


def method_class(name: str) -> type:
    return getattr(_module(name), REGISTRY[name].split(":")[1])


def config_class(name: str) -> type:
    """The typed config class of method `name` (read by config.py for the `method:` section)."""
    return method_class(name).config_class


def config_classes() -> dict[str, type]:
    """Every registered method's config class, registry order."""
    return {name: config_class(name) for name in REGISTRY}


def rows() -> dict[str, Row]:
    """Every experiment row the methods declare, in order (see the module docstring)."""
    out: dict[str, Row] = {}
    seen: set[str] = set()
    for name in REGISTRY:
        mod = _module(name)
        if mod.__name__ in seen:
            continue
        seen.add(mod.__name__)
        for r in getattr(mod, "ROWS", ()):
            if r.id in out:
                raise ValueError(f"row {r.id!r} is declared twice ({mod.__name__})")
            out[r.id] = r
    return out


def steerable(default_only: bool = False) -> list[str]:
    """Methods with a coefficient a forgetting budget can steer (Method.coefficient), registry order;
    `default_only`: those `hlora tune --method auto` tries when the user names none."""
    out = []
    for name in REGISTRY:
        cls = method_class(name)
        if cls.coefficient and (cls.tune_by_default or not default_only):
            out.append(name)
    return out


def needs_general_run(name: str) -> str:
    """The file a method's domain stage needs from its own general stage (HLoRA: the importance), else ""."""
    cls = method_class(name)
    return next(iter(cls.writes), "") if "general" in cls.stages else ""


def build_method(cfg, ctx):
    """The method of `cfg.name`, set up for the stage in `ctx` (a StageContext)."""
    cls = method_class(cfg.name)
    if not isinstance(cfg, cls.config_class):
        raise TypeError(f"method {cfg.name!r} takes a {cls.config_class.__name__}, got {type(cfg).__name__}")
    if ctx.stage not in cls.stages:
        raise ValueError(f"method {cfg.name!r} has no {ctx.stage} stage (it runs in: {', '.join(cls.stages)})")
    return cls(cfg, ctx)


def __getattr__(name):  # the protocol (it imports torch) on first use
    if name in ("Method", "StageContext", "Costs"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Method", "StageContext", "REGISTRY", "Row", "build_method", "config_class", "config_classes",
           "method_class", "rows"]
