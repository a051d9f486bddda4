"""The one protocol every method implements; train.py drives it and never asks for a method's name.

A stage (`general` = ν, `domain` = μ) is: load the base model, `attach` an adapter, `setup`, build the
training data and pass it through `train_dataset`, train with the transformers Trainer while
`loss(model, inputs, outputs)` is added to the task loss (TRL's trainers override `compute_loss` with
the same things in hand) and `callbacks()` ride along, then `save` the adapter and what the method
produced. `evaluation(model)` is where a method may change a trained model for evaluation (WiSE-FT).
Every hook has a neutral default, so a method overrides only what it does.

Each method brings its typed config (a `MethodConfig` subclass in its own file, `config_class`) and
counts the extra work it causes (`costs`): general tokens it trained on and tokens it ran through
extra forward passes, so that every experiment record says what the method spent.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:  # torch is the hooks' business: importing a method (its config, its rows) does not import it
    import torch
    from torch import nn

from .spec import MethodConfig


@dataclass
class StageContext:
    """What a method may use to set itself up for one stage."""

    stage: str  # "general" (ν) or "domain" (μ)
    run: Any = None  # the stage's RunConfig (lora, train, data, init_adapter, importance_file, ...)
    tokenizer: Any = None
    out: Path | None = None  # the run directory (None: not run by train.py, e.g. a test or a notebook)
    general_pool: Callable[[], Any] | None = None  # -> PackedDataset of general text (stage ν's data settings)
    model_name: str = ""  # the base model as the user named it (recorded in files the method writes)


@dataclass
class Costs:
    """Work a method adds on top of plain LoRA training, counted in tokens (records carry it)."""

    general_tokens: int = 0  # general-text tokens trained on (replay, KL on general batches)
    replaced_tokens: int = 0  # of the stage's own data, the tokens whose place those took (replay)
    extra_forward_tokens: int = 0  # tokens run through forward passes beyond the training step's own
    extra: dict = field(default_factory=dict)  # e.g. seconds of an importance or a Fisher pass

    def as_dict(self) -> dict:
        return {"general_tokens": self.general_tokens, "replaced_tokens": self.replaced_tokens,
                "extra_forward_tokens": self.extra_forward_tokens, **self.extra}


class Method:
    """Base class with neutral hooks: plain LoRA. Subclasses override what they change."""

    config_class: ClassVar[type] = MethodConfig
    stages: ClassVar[tuple[str, ...]] = ("domain",)  # the stages this method can run in
    # Known ends of this method's front: {swept value: "base" | "source"} (WiSE-FT: α=0 is the base model,
    # α=1 the trained adapter it scales). Records carry them so that a report can draw the whole front.
    front_ends: ClassVar[dict] = {}
    # The config field holding the method's strength (φ, λ, β, ρ) that a forgetting-budget controller
    # (budget/dual.py) may steer during training, and the range it may take; "" = the method has none.
    coefficient: ClassVar[str] = ""
    coefficient_range: ClassVar[tuple[float, float]] = (0.0, float("inf"))
    # Whether the penalty pulls toward the weights the stage starts from (HLoRA: ΔW^ν; EWC: θ at the start) rather
    # than toward the base model: then no coefficient brings a distance to the base model below the start's own.
    anchored_at_start: ClassVar[bool] = False
    # Whether `hlora tune --method auto` tries the method unless the user lists the candidates (`tune.allow`).
    tune_by_default: ClassVar[bool] = True
    # The files the method writes into a run directory beside adapter/, {file name: kind}; a stage-ν method's
    # first one is the importance a row starting from "nu" continues with (its records carry the kind).
    writes: ClassVar[dict[str, str]] = {}
    # Whether records of the method's cells also say what a full-model Fisher would cost (its own importance is a
    # Fisher on the LoRA targets: the report sets the two side by side).
    compare_full_fisher: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig, ctx: StageContext):
        self.cfg, self.ctx = cfg, ctx
        self.costs = Costs()

    # ------------------------------------------------------------------ before training
    def attach(self, base: nn.Module) -> nn.Module:
        """Base model -> PeftModel: continue `run.init_adapter` if set, else a fresh LoRA adapter."""
        from ..model import attach_lora, load_adapter

        run = self.ctx.run
        if run.init_adapter:
            return load_adapter(base, run.init_adapter, trainable=True)
        return attach_lora(base, run.lora)

    def setup(self, model: nn.Module) -> None:
        """Called once the adapter is attached (build penalties, recorders, reference passes)."""

    def train_dataset(self, dataset):
        """The stage's training data (packed sequences) -> what the Trainer reads. A dataset with
        `ordered = True` is read in order (its order is the method's, e.g. a mix fixed per step)."""
        return dataset

    # ------------------------------------------------------------------ during training
    def loss(self, model: nn.Module, inputs: dict, outputs: Any) -> torch.Tensor | None:
        """A term added to the task loss of one micro-batch (None = nothing). It is scaled like the task
        loss, so gradient accumulation and DDP count a per-step term once per optimizer step."""
        return None

    def callbacks(self) -> list:
        """transformers TrainerCallbacks the method needs."""
        return []

    def set_coefficient(self, value: float) -> None:
        """Change the method's strength mid-training; the next steps use it. Default: the config field, which
        such a method reads at every step (a method that copied it somewhere at setup overrides this)."""
        if not self.coefficient:
            raise ValueError(f"method {self.cfg.name!r} has no coefficient to steer")
        setattr(self.cfg, self.coefficient, float(value))

    # ------------------------------------------------------------------ after training
    def save(self, model: nn.Module, out: Path, summary: dict) -> dict:
        """Write the adapter (PEFT format, atomically) and the method's files into the run directory;
        `summary` holds the run's steps, tokens and data description. Returns what the run summary should
        add about the files written."""
        from ..files import atomic_dir

        with atomic_dir(out / "adapter") as tmp:
            model.save_pretrained(str(tmp))
        return {}

    # ------------------------------------------------------------------ hlora bench
    def bench_variant(self, model: nn.Module, omega: dict, domain: dict, general: dict) -> dict | None:
        """What `hlora bench` times of this method's per-step work on `model` (LoRA attached; `omega`: a random
        importance per LoRA module; `domain`, `general`: one batch each; this method built for stage μ with its
        default config and the bench's context). Returns {"extra": fn(model, batch, outputs) -> the loss term,
        "batch": the batch a step trains on instead of `domain`, "held": an object whose bytes the memory plan
        counts (as "<method>_penalty")}, any of them; None: no per-step work beyond a plain LoRA step."""
        return None

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module):
        """Context in which `model` (base + this method's trained adapter) is evaluated."""
        yield model
