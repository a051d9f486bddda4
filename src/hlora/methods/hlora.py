"""HLoRA (paper sections 4–5, docs/design.md sections 3–4): one method, two stages.

Stage ν (`general`): plain LoRA on general text while an SIRecorder (si.py) records the element-wise
importance Ω of ΔW; the run directory gets `importance.safetensors` beside the adapter (ΔW^ν).
Stage μ (`domain`): the same adapter continues on domain data with

    penalty = φ · Σ_l w_l · Σ_i Ω_{l,i} · (ΔW_{l,i} − ΔW^ν_{l,i})²
    w = softmax_l(‖Ω_l‖_F · layer_scale)      (layer_weighting="softmax")
    w_l = 1/M over the M weighted groups      (layer_weighting="uniform": the "-layer" ablation; the
                                               weights sum to 1 like the softmax's, so φ means the same)

`omega_norm="mean"` (beyond the paper) divides Ω by its mean over all elements of all modules before
use: the penalty is then φ times an Ω-weighted squared drift in ΔW's own units, so the useful φ no longer
depends on the model and the run (raw Ω spans 1e3–1e5 per module on SmolLM2 and ~1e-2 on tiny models).
`omega_clip=c` (beyond the paper) caps Ω at c (in units of the mean with omega_norm="mean"): SI's Ω is
heavy-tailed because eq. 13 divides by Δ², tiny for elements that moved back and forth. On SmolLM2
(all-linear r=16, 60 ν steps) 2 % of the elements hold 59 % of ΣΩ, so an unclipped penalty mostly pins a
few elements whose Δ happened to end near zero; a cap of 10× the mean spreads it over the elements
stage ν actually used (the cap keeps 62 % of the mass there).

The penalty's implementation (stacked groups, a custom autograd function per group) is in
methods/hlora_penalty.py, imported by the hooks: declaring the method imports no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..util import lazy_exports
from .base import Method
from .spec import MethodConfig, Row

if TYPE_CHECKING:
    from torch import nn

IMPORTANCE_FILE = "importance.safetensors"
# The penalty, where it was before it moved to methods/hlora_penalty.py (imported on first use).
__getattr__ = lazy_exports(__name__, "hlora_penalty", ("HLoRAPenalty", "WEIGHTINGS", "GROUPS", "NORMS",
                                                         "_parse_layer_scale", "_omega_mean", "_check_reference_adapter"))


# ------------------------------------------------------------------------------------- the method


@dataclass
class HLoRAConfig(MethodConfig):
    name: str = "hlora"
    # stage μ: the penalty
    phi: float = 1e-3  # paper's regularization coefficient
    layer_weighting: str = "softmax"  # softmax | uniform (ablation "-layer")
    layer_scale: Any = 1e-8  # float (reference code) or "auto" = 1/mean_l ||Omega_l||
    layer_group: str = "module"  # module | block
    omega_norm: str = "none"  # none (paper) | mean (scale-free φ; beyond the paper)
    omega_clip: float = 0.0  # cap on Ω after omega_norm (0 = none; beyond the paper)
    # stage ν: the importance recording
    xi: float = 1e-9  # paper eq. 13 damping
    clamp: str = "step"  # step (reference code) | end (SI original) | none
    grad: str = "paper"  # paper (eq. 11 pseudo-gradient) | exact
    unclipped: bool = True  # Ω from the task-loss gradient before clipping (false: the clipped one)
    consolidate: str = "end"  # end | epoch
    importance_dtype: str = "float32"  # on-disk dtype of Omega: float32 | float16 | bfloat16


_H = (("name", "hlora"),)
# HLoRA is the report's reference: the row the others are matched against.
ROWS = [
    Row("hlora", "HLoRA", "nu", _H, sweep="phi", family="hlora", role="reference", ablation=True),
    Row("hlora_auto", "HLoRA (layer_scale=auto)", "nu", (*_H, ("layer_scale", "auto")), sweep="phi", family="hlora"),
    # Beyond the paper: Ω/mean (scale-free φ) capped at 10× the mean (SI's tail, above).
    Row("hlora_norm", "HLoRA (Ω/mean, cap 10)", "nu", (*_H, ("omega_norm", "mean"), ("omega_clip", 10.0)), sweep="phi",
        family="hlora"),
    Row("hlora_no_layer", "HLoRA −layer", "nu", (*_H, ("layer_weighting", "uniform")), sweep="phi", family="hlora",
        ablation=True),
    # The paper's "-layer,element" ablation: ν then μ with no penalty (same configuration as LoRA(ν+μ)).
    Row("hlora_no_layer_element", "HLoRA −layer,element", "nu", family="hlora", ablation=True),
]


class HLoRA(Method):
    config_class = HLoRAConfig
    stages = ("general", "domain")
    writes = {IMPORTANCE_FILE: "si"}  # stage ν: SI importance Ω (and ΔW^ν) beside the adapter
    coefficient, coefficient_range = "phi", (1e-8, 1e8)
    anchored_at_start = True

    def bench_variant(self, model, omega, domain, general):
        from ..importance import Importance
        from .hlora_penalty import HLoRAPenalty

        hl = HLoRAPenalty(model, Importance(omega, metadata={"kind": "si"}), reference="current", phi=1e-3)
        return {"extra": lambda m, b, o: hl.penalty(), "held": hl}

    def setup(self, model: nn.Module) -> None:
        from ..callback import HLoRACallback
        from ..importance import Importance
        from ..si import SIRecorder
        from .hlora_penalty import HLoRAPenalty

        c = self.cfg
        self.penalty = self.recorder = self.callback = None
        if self.ctx.stage == "general":
            self.recorder = SIRecorder(model, xi=c.xi, clamp=c.clamp, grad=c.grad, unclipped=c.unclipped)
            self.callback = HLoRACallback(self.recorder, consolidate=c.consolidate)
            return
        path = self.ctx.run.importance_file if self.ctx.run is not None else ""
        if not path:
            raise ValueError("method 'hlora' needs importance_file: the importance.safetensors written by `hlora general`")
        self.penalty = HLoRAPenalty(model, Importance.load(path), phi=c.phi, layer_weighting=c.layer_weighting,
                                    layer_scale=c.layer_scale, layer_group=c.layer_group, omega_norm=c.omega_norm,
                                    omega_clip=c.omega_clip)

    def loss(self, model, inputs, outputs):
        return self.penalty.penalty() if self.penalty is not None else None

    def callbacks(self) -> list:
        return [self.callback] if self.callback is not None else []

    def set_coefficient(self, value: float) -> None:
        super().set_coefficient(value)
        if self.penalty is not None:  # penalty() reads φ at every call
            self.penalty.phi = float(value)

    def save(self, model: nn.Module, out: Path, summary: dict) -> dict:
        info = super().save(model, out, summary)
        if self.recorder is None:
            return info
        run, c = self.ctx.run, self.cfg
        imp = self.callback.importance
        imp.metadata.update({
            "base_model": self.ctx.model_name or imp.metadata.get("base_model", ""),
            "targets": ",".join(run.lora.targets), "r": str(run.lora.r), "alpha": str(run.lora.alpha),
            "rslora": str(run.lora.rslora), "steps": str(summary["steps"]), "tokens": str(summary["tokens"]),
            "data": json.dumps(summary["data"]), "seconds": f"{self.recorder.seconds:.4f}",
        })
        # ΔW^ν is the adapter saved beside it (stage μ starts from it, checked by adapter_hash): not stored twice.
        path = imp.save(out / IMPORTANCE_FILE, dtype=c.importance_dtype, reference=False)
        self.costs.extra["importance_seconds"] = self.recorder.seconds
        return {**info, "importance_seconds": self.recorder.seconds, "importance_bytes": path.stat().st_size}
