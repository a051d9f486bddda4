"""HLoRA's stage-μ penalty (the method, its config and rows: methods/hlora.py; the formula: its docstring).

Modules of equal shape are stacked into groups (as in the SI recorder), and each group's term is a
custom autograd function that keeps nothing ΔW-sized between forward and backward: the forward forms
D = s·B·A − ΔW^ν once to reduce Σ w·⟨Ω, D²⟩, the backward forms it again and returns
dA = s·Bᵀ·(2wΩ⊙D), dB = s·(2wΩ⊙D)·Aᵀ: a handful of batched kernels per group, not per module.
Ω and ΔW^ν are stacked buffers in the out x in layout, on the modules' device, in fp32.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..importance import Importance
from ..lora import DriftPenalty, adapter_fingerprint, stacked, to_weight_layout

WEIGHTINGS = ("softmax", "uniform")
GROUPS = ("module", "block")
NORMS = ("none", "mean")


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
