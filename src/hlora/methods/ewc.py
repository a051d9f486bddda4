"""EWC-LoRA baseline (Xiang et al. 2023): diagonal Fisher of the pretrained model, penalty λ·Σ F ⊙ ΔW².

The method (its config, rows and hooks); the Fisher and the penalty, with the choices they make, are in
methods/fisher.py (imported by the hooks: declaring the method imports no torch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..util import lazy_exports
from .base import Method
from .spec import MethodConfig, Row

if TYPE_CHECKING:
    from torch import nn

# The math, where it was before it moved to methods/fisher.py (imported on first use).
__getattr__ = lazy_exports(__name__, "fisher", ("EWCPenalty", "fisher_diagonal", "full_fisher_cost", "forward_inputs",
                                                  "masked_labels", "per_sample_loss", "_CHUNK_ELEMENTS"))


@dataclass
class EWCConfig(MethodConfig):
    name: str = "ewc"
    lam: float = 0.5  # EWC-LoRA's λ (on the sample-normalised Fisher)
    fisher: str = "empirical"  # empirical (labels = the data, EWC-LoRA's code) | sampled (labels from the model)
    fisher_examples: int = 64  # sequences of the general pool the Fisher is estimated on
    fisher_batch_size: int = 8  # sequences per forward pass (does not change the Fisher, only its speed)
    fisher_file: str = ""  # cache, reused when made with the same settings; "" = <cache_dir>/fisher.safetensors


def _cache_key(model: nn.Module, cfg: EWCConfig, pool) -> dict:
    """Everything that changes the Fisher: the pretrained weights, the targeted modules, the general data and
    how it is cut, the label mode, the sample count. (Not the run's seed: the Fisher belongs to the pretrained
    model, so every seed of an experiment shares it; "sampled" draws its labels with a fixed seed.)"""
    from ..lora import lora_modules
    from ..model import model_fingerprint

    d = getattr(pool, "description", {}) or {}
    return {"base_hash": model_fingerprint(model), "modules": str(len(lora_modules(model))),
            "targets": ",".join(dict.fromkeys(r.name.rsplit(".", 1)[-1] for r in lora_modules(model))),
            "data": str(d.get("data", "")), "data_tokens": str(d.get("tokens", "")), "seq_len": str(d.get("seq_len", "")),
            "fisher": cfg.fisher, "fisher_examples": str(cfg.fisher_examples)}


# EWC-LoRA is the report's rival: the reference (HLoRA) is compared with it item by item, and its Fisher with SI.
ROWS = [Row("ewc_lora", "EWC-LoRA", "fresh", (("name", "ewc"),), sweep="lam", role="rival")]


class EWC(Method):
    """EWC-LoRA for stage μ: a fresh adapter, λ·Σ F ⊙ ΔW² with F the pretrained model's Fisher on the general
    pool (stage ν's data and sequence length). With `fisher_file`, the Fisher is cached there and reused by
    every cell made with the same settings (`_cache_key`); a file of another kind is never overwritten."""

    config_class = EWCConfig
    compare_full_fisher = True
    coefficient, coefficient_range = "lam", (1e-6, 1e10)
    anchored_at_start = True

    def bench_variant(self, model, omega, domain, general):
        from .fisher import EWCPenalty

        ewc = EWCPenalty(model, omega, lam=0.5)
        return {"extra": lambda m, b, o: ewc.penalty(), "held": ewc}

    def setup(self, model: nn.Module) -> None:
        from ..data.packing import batches
        from ..importance import Importance
        from .fisher import EWCPenalty, fisher_diagonal

        c = self.cfg
        if c.fisher not in ("empirical", "sampled"):
            raise ValueError(f"fisher must be 'empirical' or 'sampled', got {c.fisher!r}")
        if self.ctx.general_pool is None:
            raise ValueError("method 'ewc' needs general text to compute its Fisher (no general pool given)")
        pool = self.ctx.general_pool()
        key = _cache_key(model, c, pool)
        cache = self.ctx.run.cache_dir if self.ctx.run is not None else ""
        path = Path(c.fisher_file) if c.fisher_file else (Path(cache) / "fisher.safetensors" if cache else None)
        self.fisher_path, self.fisher_seconds = path, 0.0
        if path is not None and path.is_file():
            imp = Importance.load(path)
            if imp.kind != "fisher":
                raise ValueError(
                    f"{path}: is an importance file of kind {imp.kind!r}, not a Fisher; method 'ewc' needs "
                    "kind 'fisher' (give it another fisher_file to cache its Fisher in)")
            if all(imp.metadata.get(k) == v for k, v in key.items()):
                imp.check_against(model)
                self.fisher_seconds = float(imp.metadata.get("seconds", "nan"))
                self.penalty = EWCPenalty(model, imp.omega, lam=c.lam)
                return
        stats: dict = {}
        t0 = time.perf_counter()
        fisher = fisher_diagonal(model, batches(pool, c.fisher_batch_size, limit=c.fisher_examples), labels=c.fisher,
                                 max_examples=c.fisher_examples or None, seed=0, stats=stats)
        self.fisher_seconds = time.perf_counter() - t0
        self.costs.extra_forward_tokens += stats["tokens"]  # one forward+backward per Fisher sequence
        if path is not None:
            meta = {"kind": "fisher", **key, "examples": str(stats["examples"]), "tokens": str(stats["tokens"]),
                    "loss": "mean token cross-entropy per sequence; F normalised by the number of sequences",
                    "seconds": f"{self.fisher_seconds:.6f}"}
            Importance({k: v.detach().cpu() for k, v in fisher.items()}, metadata=meta).save(path)
        self.penalty = EWCPenalty(model, fisher, lam=c.lam)

    def loss(self, model, inputs, outputs):
        return self.penalty.penalty()

    def set_coefficient(self, value: float) -> None:
        super().set_coefficient(value)
        if getattr(self, "penalty", None) is not None:  # penalty() reads λ at every call
            self.penalty.lam = float(value)

    def save(self, model: nn.Module, out: Path, summary: dict) -> dict:
        info = super().save(model, out, summary)
        info.update(importance_seconds=self.fisher_seconds, importance_kind="fisher",
                    importance_bytes=self.fisher_path.stat().st_size if self.fisher_path and self.fisher_path.is_file()
                    else 4 * sum(f.numel() for f in self.penalty.fisher().values()))
        return info
