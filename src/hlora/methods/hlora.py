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

Modules of equal shape are stacked into groups (as in the SI recorder), and each group's term is a
custom autograd function that keeps nothing ΔW-sized between forward and backward: the forward forms
D = s·B·A − ΔW^ν once to reduce Σ w·⟨Ω, D²⟩, the backward forms it again and returns
dA = s·Bᵀ·(2wΩ⊙D), dB = s·(2wΩ⊙D)·Aᵀ: a handful of batched kernels per group, not per module.
Ω and ΔW^ν are stacked buffers in the out x in layout, on the modules' device, in fp32.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .spec import MethodConfig, Row
from ..importance import Importance
from ..lora import DriftPenalty, adapter_fingerprint, stacked, to_weight_layout
from .base import Method

WEIGHTINGS = ("softmax", "uniform")
GROUPS = ("module", "block")
NORMS = ("none", "mean")
IMPORTANCE_FILE = "importance.safetensors"


def _parse_layer_scale(layer_scale):
    if isinstance(layer_scale, str):
        if layer_scale.strip().lower() == "auto":
            return "auto"
        try:
            layer_scale = float(layer_scale)
        except ValueError:
            raise ValueError(f"layer_scale must be a number or 'auto', got {layer_scale!r}") from None
    layer_scale = float(layer_scale)
    if not math.isfinite(layer_scale) or layer_scale < 0:
        raise ValueError(f"layer_scale must be a finite number >= 0 or 'auto', got {layer_scale!r}")
    return layer_scale


class HLoRAPenalty(DriftPenalty):
    """The hierarchical (layer-wise × element-wise) penalty of stage μ; `penalty()` is added to the loss.

    importance: an Importance or the path of an importance file (checked against `model`).
    reference: ΔW^ν per module (mapping name -> tensor in the base weight's layout), or "current" for the
        ΔW at construction; default: the importance file's references, else the ΔW at construction, which
        must then be the adapter the importance was recorded against (its `adapter_hash`): starting stage μ
        from another adapter (a fresh one, another run's) would pull toward the wrong ΔW^ν, so it is refused.
    omega_norm: "none" (the paper's Ω) or "mean" (Ω divided by its mean over all elements: scale-free φ).
    omega_clip: 0 (none) or a cap on Ω after normalisation.
    """

    def __init__(self, model: nn.Module, importance: Importance | str | Path, reference=None, phi: float = 1e-3,
                 layer_weighting: str = "softmax", layer_scale=1e-8, layer_group: str = "module",
                 omega_norm: str = "none", omega_clip: float = 0.0):
        super().__init__(model)
        if omega_norm not in NORMS:
            raise ValueError(f"omega_norm must be one of {', '.join(NORMS)}; got {omega_norm!r}")
        omega_clip = float(omega_clip)
        if not math.isfinite(omega_clip) or omega_clip < 0:
            raise ValueError(f"omega_clip must be a finite number >= 0 (0 = no cap), got {omega_clip!r}")
        if layer_weighting not in WEIGHTINGS:
            raise ValueError(f"layer_weighting must be one of {', '.join(WEIGHTINGS)}; got {layer_weighting!r}")
        if layer_group not in GROUPS:
            raise ValueError(f"layer_group must be one of {', '.join(GROUPS)}; got {layer_group!r}")
        phi = float(phi)
        if not math.isfinite(phi) or phi < 0:
            raise ValueError(f"phi must be a finite number >= 0, got {phi!r}")
        if not isinstance(importance, Importance):
            importance = Importance.load(importance)
        importance.check_against(model)
        self.phi = phi
        self.layer_weighting, self.layer_group, self.omega_norm = layer_weighting, layer_group, omega_norm
        self.omega_clip = omega_clip
        self.layer_scale = _parse_layer_scale(layer_scale)
        self.importance_metadata = dict(importance.metadata)
        refs = self._refs

        if reference is None:
            if importance.reference:
                reference = importance.reference
            else:
                _check_reference_adapter(importance, model)
                reference = "current"
        if isinstance(reference, Importance):
            reference = reference.reference
        if isinstance(reference, str):
            if reference != "current":
                raise ValueError(f"reference must be a mapping, an Importance, 'current' or None; got {reference!r}")
            reference = None
        elif not isinstance(reference, Mapping):
            raise ValueError("reference must be a mapping, an Importance, 'current' or None; "
                             f"got {type(reference).__name__}")

        with torch.no_grad():
            if reference is not None:  # else ΔW^ν is the adapter as it stands: kept as its factors below
                for r in refs:
                    if r.name not in reference:
                        raise ValueError(f"reference has no tensor for module {r.name}")
                    want = tuple(r.base_weight.shape)
                    if tuple(reference[r.name].shape) != want:
                        have = tuple(reference[r.name].shape)
                        raise ValueError(f"reference for module {r.name}: shape {have} != {want}")
            self.omega_mean = _omega_mean(importance) if omega_norm == "mean" else 1.0
            for gi in range(len(self._groups)):
                rs = self._group_refs(gi)
                dev = rs[0].A.device
                # to_weight_layout is its own inverse: base layout -> out x in
                om = torch.stack([to_weight_layout(r, importance.omega[r.name]).to(device=dev, dtype=torch.float32)
                                  for r in rs])
                if omega_norm == "mean":
                    om.div_(self.omega_mean)
                if omega_clip > 0:
                    om.clamp_(max=omega_clip)
                scale = self._scales(rs)
                if reference is None:  # factors of the current ΔW: s·B^ν and A^ν (rank r, no Ω-sized copy)
                    ref = None
                    ref_b = stacked([r.B for r in rs], torch.float32).mul_(scale)
                    ref_a = stacked([r.A for r in rs], torch.float32)
                else:
                    ref_b = ref_a = None
                    ref = torch.stack([to_weight_layout(r, reference[r.name].detach()).to(dev, torch.float32)
                                       for r in rs])
                self.register_buffer(f"omega_{gi}", om, persistent=False)
                self.register_buffer(f"ref_{gi}", ref, persistent=False)
                self.register_buffer(f"refb_{gi}", ref_b, persistent=False)
                self.register_buffer(f"refa_{gi}", ref_a, persistent=False)
                self.register_buffer(f"scale_{gi}", scale, persistent=False)
        self._weights = self._compute_weights()
        for gi, idx in enumerate(self._groups):
            w = torch.tensor([self._weights[i] for i in idx], dtype=torch.float32, device=refs[idx[0]].A.device)
            w = w.view(-1, 1, 1)
            self.register_buffer(f"weight_{gi}", w, persistent=False)

    # ------------------------------------------------------------------ layer weights

    def _compute_weights(self) -> list[float]:
        """w_l from the norms of the Ω the penalty uses (after omega_norm and omega_clip)."""
        refs = self._refs
        blocks = [r.block for r in refs]
        if self.layer_weighting == "uniform":
            # 1/M over the M weighted groups, summing to 1 like the softmax (the reference code's 1/L per
            # module sums to 2 with q and v targeted: the "-layer" ablation would double φ)
            M = len(refs) if self.layer_group == "module" else len(set(blocks))
            return [1.0 / M] * len(refs)
        sq = [0.0] * len(refs)  # ‖Ω_l‖² per module
        for gi, idx in enumerate(self._groups):
            om = getattr(self, f"omega_{gi}")
            for k, i in enumerate(idx):
                sq[i] = float(om[k].double().square().sum())
        if self.layer_group == "module":
            norms, idx = [math.sqrt(v) for v in sq], list(range(len(refs)))
        else:  # ‖Ω‖ over all modules of a block
            keys = sorted(set(blocks))
            norms = [math.sqrt(sum(v for v, b in zip(sq, blocks) if b == key)) for key in keys]
            idx = [keys.index(b) for b in blocks]
        t = torch.tensor(norms, dtype=torch.float64)
        if self.layer_scale == "auto":
            mean = float(t.mean())
            scale = 1.0 / mean if mean > 0 else 0.0
        else:
            scale = self.layer_scale
        w = torch.softmax(t * scale, dim=0).tolist()
        return [w[j] for j in idx]

    def layer_weights(self) -> dict[str, float]:
        """w_l of every module (with layer_group="block", each module carries its block's weight)."""
        return {r.name: w for r, w in zip(self._refs, self._weights)}

    # ------------------------------------------------------------------ the penalty

    def penalty(self) -> torch.Tensor:
        """φ · Σ_l w_l · Σ_i Ω_{l,i} (ΔW_{l,i} − ΔW^ν_{l,i})², differentiable w.r.t. every A and B."""
        return self.drift("omega") * self.phi

    def extra_repr(self) -> str:
        return (f"modules={len(self._refs)}, phi={self.phi}, layer_weighting={self.layer_weighting}, "
                f"layer_scale={self.layer_scale}, layer_group={self.layer_group}, omega_norm={self.omega_norm}")


def _omega_mean(importance: Importance) -> float:
    total = sum(float(t.double().sum()) for t in importance.omega.values())
    mean = total / max(importance.numel, 1)
    if not mean > 0:
        raise ValueError(f"{importance._where()}: Ω is all zero; omega_norm='mean' needs a recorded importance")
    return mean


def _check_reference_adapter(importance: Importance, model: nn.Module) -> None:
    """The importance holds no ΔW^ν, so the adapter as it stands is the reference: refuse an adapter other than
    the one the importance was recorded against (a forgotten --init-adapter pulls toward ΔW = 0)."""
    want = importance.metadata.get("adapter_hash")
    have = adapter_fingerprint(model)
    where = importance._where()
    if not want:
        warnings.warn(f"{where} names no adapter (written before hlora recorded adapter_hash): cannot check that "
                      "the model's adapter is the stage-ν adapter it belongs to", stacklevel=3)
    elif want != have:
        raise ValueError(
            f"{where} was recorded against adapter {want}, but the model's adapter is {have}: stage μ must start "
            "from the stage-ν adapter saved beside that importance file (hlora domain --init-adapter <ν run>/adapter)"
        )


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
    Row("hlora", "HLoRA", "nu", _H, sweep="phi", family="hlora", role="reference"),
    Row("hlora_auto", "HLoRA (layer_scale=auto)", "nu", (*_H, ("layer_scale", "auto")), sweep="phi", family="hlora"),
    # Beyond the paper: Ω/mean (scale-free φ) capped at 10× the mean (SI's tail, above).
    Row("hlora_norm", "HLoRA (Ω/mean, cap 10)", "nu", (*_H, ("omega_norm", "mean"), ("omega_clip", 10.0)), sweep="phi",
        family="hlora"),
    Row("hlora_no_layer", "HLoRA −layer", "nu", (*_H, ("layer_weighting", "uniform")), sweep="phi", family="hlora"),
    # The paper's "-layer,element" ablation: ν then μ with no penalty (same configuration as LoRA(ν+μ)).
    Row("hlora_no_layer_element", "HLoRA −layer,element", "nu", family="hlora"),
]


class HLoRA(Method):
    config_class = HLoRAConfig
    stages = ("general", "domain")
    writes = {IMPORTANCE_FILE: "si"}  # stage ν: SI importance Ω (and ΔW^ν) beside the adapter

    def bench_variant(self, model, omega, domain, general):
        hl = HLoRAPenalty(model, Importance(omega, metadata={"kind": "si"}), reference="current", phi=1e-3)
        return {"extra": lambda m, b, o: hl.penalty(), "held": hl}
    coefficient, coefficient_range = "phi", (1e-8, 1e8)

    def setup(self, model: nn.Module) -> None:
        from ..callback import HLoRACallback
        from ..si import SIRecorder

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
