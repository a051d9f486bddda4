"""The one protocol every stage-μ regularizer implements, and the registry train.py looks it up in.

train.py never branches on a method's name: it asks the registry for a Method, adds
`method.penalty()` to the task loss, and hands `method.callbacks()` to the Trainer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..config import MethodConfig


@dataclass
class StageContext:
    """What a method may need to set itself up for stage μ."""

    model: nn.Module  # the PeftModel being trained
    importance_file: str = ""  # stage-ν importance (hlora) or where a Fisher is cached (ewc)
    general_batches: Callable[[], Any] | None = None  # iterable of {input_ids, attention_mask, labels} on general text
    extras: dict = field(default_factory=dict)


class Method(Protocol):
    def penalty(self) -> torch.Tensor | None:
        """Scalar added to the task loss (None = no penalty)."""

    def callbacks(self) -> list:
        """transformers TrainerCallbacks the method needs (usually none)."""


_REGISTRY: dict[str, Callable[[MethodConfig, StageContext], Method]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def build_method(cfg: MethodConfig, ctx: StageContext) -> Method:
    from . import ewc, hlora, none  # noqa: F401  (registration side effect)

    if cfg.name not in _REGISTRY:
        import difflib

        hint = difflib.get_close_matches(cfg.name, list(_REGISTRY), n=1)
        raise ValueError(
            f"unknown method {cfg.name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; known: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[cfg.name](cfg, ctx)
