"""Synaptic-Intelligence importance of the LoRA update ΔW (paper section 4.1, docs/design.md section 3).

Per LoRA module (ΔW = s·B·A, kept internally in the out x in layout; exported in the base weight's
layout) and per optimizer step t:

    g̃  = s·(gB·A + B·gA − η·gB·gA)      grad="paper" (eq. 11)   |  dL/dΔW from hooks: grad="exact"
    δ   = ΔW(t+1) − ΔW(t)                 the real change made by the real optimizer
    ω  += −g̃ ⊙ δ                          (eq. 12; clamp="step" keeps ω ≥ 0 after every step)

and at consolidation  Ω += ω / (Δ² + ξ),  Δ = ΔW(now) − ΔW(start or last consolidation)  (eq. 13).

Cost. Modules of equal shape (every q_proj, every v_proj, ...) are stacked into groups, so a step costs a
dozen batched kernels per group, not per module (kernel launches dominate on a GPU). Before the optimizer
step only rank-r copies (A, B, gA, gB) are taken; after it, g̃ and δ are two batched rank-r products and
ω += −g̃⊙δ is one fused multiply-add. The only ΔW-sized temporaries are g̃ and δ of one group, and a
group holds at most CHUNK_ELEMENTS elements (on CPU, one module: there cache locality beats batching).

Inside transformers' Trainer, callback.HLoRACallback drives a recorder (also importable from here).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .files import atomic_path
from .importance import Importance
from .lora import (LoraRef, WorkBuffers, adapter_fingerprint, batched_delta_w, group_modules, lora_modules, stacked,
                   to_weight_layout, update_delta_w)
from .util import DeviceClock

CLAMPS = ("step", "end", "none")
GRADS = ("paper", "exact")
STATE_FILE = "si_state.safetensors"


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 (bf16/fp16/fp32 adapters) or fp64 (fp64 adapters)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class _Group:
    """Recorder state of modules of one shape, stacked ([n, ...]; out x in layout; fp32, fp64 for fp64 adapters)."""

    refs: list[LoraRef]
    scale: torch.Tensor  # [n, 1, 1]
    omega: torch.Tensor  # ω, the running path integral
    A0: torch.Tensor  # factors at the start of the stage / the last consolidation
    B0: torch.Tensor
    Omega: torch.Tensor | None = None  # Ω, allocated at the first consolidation
    G: torch.Tensor | None = None  # exact mode: dL/dΔW summed over the micro-batches of one step
    # taken by before_step, used by after_step (rank-r sized)
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    gA: torch.Tensor | None = None
    gB: torch.Tensor | None = None
    lr: float | torch.Tensor = 0.0
    x: list = field(default_factory=list, repr=False)  # exact mode: lora_A's input of the current forward
    # paper mode, unclipped: the accumulated gradients of A and B as backward left them (before clipping)
    rawA: torch.Tensor | None = None
    rawB: torch.Tensor | None = None

    def to(self, device: torch.device) -> None:
        """Move the state to `device` (the adapter moved after the recorder was built, e.g. by a Trainer)."""
        for name in ("scale", "omega", "A0", "B0", "Omega", "G", "rawA", "rawB"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))

    @property
    def dtype(self) -> torch.dtype:
        return self.omega.dtype

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked([r.A for r in self.refs], self.dtype), stacked([r.B for r in self.refs], self.dtype)


def base_model_hash(model: nn.Module) -> str:
    """Hash of the frozen base model; stable while the adapter trains (see model.model_fingerprint)."""
    from .model import model_fingerprint

    return model_fingerprint(model)


def _loss_scale(optimizer) -> float:
    """The fp16 loss scale of the coming step (accelerate's optimizer wrapper holds the GradScaler), or 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        return float(scaler.get_scale())
    return 1.0


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average hook-read gradients over processes, as DDP averages parameter gradients."""
    import torch.distributed as dist

    if tensors and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)


def _timed(fn):
    """Count a recorder method's time in `self.seconds` (the recording cost reported by experiments)."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._clock(self._device):
            return fn(self, *args, **kwargs)

    return wrapper


class SIRecorder:
    """Records SI importance of every element of every LoRA module's ΔW while the adapter trains.

    Drive it around each optimizer step::

        loss.backward()                      # (all micro-batches of the step)
        recorder.before_step(optimizer)      # before optimizer.step() (before or after clipping)
        optimizer.step()
        recorder.after_step()
        optimizer.zero_grad()
        ...
        importance = recorder.consolidate()  # end of the stage (or of each epoch)

    grad="paper": g̃ from the accumulated gradients of A and B. With `unclipped=True` (default) they are
    copied by post-accumulate-grad hooks as backward leaves them, i.e. the task-loss gradient *before*
    any clipping (clipping would scale each step's ω by that step's clip factor: docs/design.md section 3.1);
    `unclipped=False` reads `.grad` in before_step (what the optimizer applies, after clipping).
    grad="exact": dL/dΔW from hooks on lora_A (input) and lora_B (output gradient) of every module.
    Hook-read gradients are summed over the micro-batches of the step and averaged over processes like
    DDP averages gradients; under fp16 loss scaling they are divided by the scaler's scale (found on an
    accelerate optimizer's `.scaler`, or given to before_step as `grad_scale`).
    """

    def __init__(self, model: nn.Module, xi: float = 1e-9, clamp: str = "step", grad: str = "paper",
                 metadata: dict | None = None, unclipped: bool = True):
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {', '.join(CLAMPS)}; got {clamp!r}")
        if grad not in GRADS:
            raise ValueError(f"grad must be one of {', '.join(GRADS)}; got {grad!r}")
        if not (xi > 0 and math.isfinite(xi)):
            raise ValueError(f"xi must be a positive number, got {xi!r}")
        self.model = model
        self.xi, self.clamp, self.grad = float(xi), clamp, grad
        self.unclipped = bool(unclipped)
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self._clock = DeviceClock()  # time spent inside the recorder (its cost on top of training): .seconds
        self.steps = 0  # optimizer steps recorded in total
        self.steps_since = 0  # ... since the last consolidation
        self.consolidations = 0
        self.last_grad_scale = 1.0  # the loss scale divided out of hook-read gradients at the last step
        self._pending = False
        self._optimizer = None
        self._lr_of: dict[int, dict] = {}
        self._lr_optimizer = None
        self._hooks: list = []
        self._work = WorkBuffers()  # δ and g̃ of each step, kept across steps (see WorkBuffers)
        refs = lora_modules(model)
        for ref in refs:
            if ref.adapter in getattr(ref.module, "lora_variant", {}):
                raise ValueError(f"module {ref.name}: LoRA variants (DoRA, ...) are not supported by SI recording")
        self._device = refs[0].A.device
        self._groups: list[_Group] = []
        self._where: dict[str, tuple[_Group, int]] = {}
        raw = grad == "paper" and self.unclipped
        with torch.no_grad():
            for idx in group_modules(refs):
                rs = [refs[i] for i in idx]
                dt = _acc_dtype(rs[0].A)
                dev = rs[0].A.device
                n, out_f, in_f = len(rs), rs[0].B.shape[0], rs[0].A.shape[1]
                g = _Group(
                    refs=rs, scale=torch.tensor([r.scale for r in rs], dtype=dt, device=dev).view(n, 1, 1),
                    omega=torch.zeros(n, out_f, in_f, dtype=dt, device=dev),
                    A0=stacked([r.A for r in rs], dt), B0=stacked([r.B for r in rs], dt),
                    G=torch.zeros(n, out_f, in_f, dtype=dt, device=dev) if grad == "exact" else None,
                    rawA=torch.zeros((n, *rs[0].A.shape), dtype=dt, device=dev) if raw else None,
                    rawB=torch.zeros((n, *rs[0].B.shape), dtype=dt, device=dev) if raw else None,
                )
                self._groups.append(g)
                for k, r in enumerate(rs):
                    self._where[r.name] = (g, k)
        self._names = [r.name for r in refs]
        if grad == "exact":
            self._install_hooks()
        elif raw:
            self._install_grad_copies()

    @property
    def seconds(self) -> float:
        """Seconds spent recording (hooks, before/after the step, consolidation): SI's cost over training."""
        return self._clock.seconds

    @property
    def names(self) -> list[str]:
        return list(self._names)

    # ------------------------------------------------------------------ exact gradients

    def _install_hooks(self) -> None:
        for g in self._groups:
            g.x = [None] * len(g.refs)
            for k, ref in enumerate(g.refs):
                mod = ref.module
                la, lb = mod.lora_A[ref.adapter], mod.lora_B[ref.adapter]
                self._hooks.append(la.register_forward_pre_hook(self._make_input_hook(g, k)))
                self._hooks.append(lb.register_forward_hook(self._make_output_hook(g, k)))

    def _install_grad_copies(self) -> None:
        for g in self._groups:
            for k, ref in enumerate(g.refs):
                self._hooks.append(ref.A.register_post_accumulate_grad_hook(self._make_copy_hook(g, "rawA", k)))
                self._hooks.append(ref.B.register_post_accumulate_grad_hook(self._make_copy_hook(g, "rawB", k)))

    def _make_copy_hook(self, g: _Group, buf: str, k: int):
        def hook(p):
            # Called after each micro-batch's backward adds to p.grad: after the step's last one the copy is
            # the step's summed task gradient, before the Trainer clips p.grad in place.
            with self._clock(self._device), torch.no_grad():
                getattr(g, buf)[k].copy_(p.grad)

        return hook

    def _make_input_hook(self, g: _Group, k: int):
        def hook(module, args):
            # PEFT calls lora_B(lora_A(dropout(x))) * s: args[0] is the dropped-out input x_d.
            g.x[k] = args[0] if torch.is_grad_enabled() else None

        return hook

    def _make_output_hook(self, g: _Group, k: int):
        inv_s = 1.0 / g.refs[k].scale
        clock, device = self._clock, self._device

        def hook(module, args, out):
            x, g.x[k] = g.x[k], None
            if x is None or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return  # no-grad forward (evaluation, the first pass of reentrant checkpointing)

            def grad_hook(g_h):
                # out h = B·A·x_d and y = s·h, so dL/dΔW = Σ_tokens g_y x_dᵀ = (1/s) Σ g_h x_dᵀ.
                with clock(device), torch.no_grad():
                    G = g.G[k]
                    gh = g_h.reshape(-1, g_h.shape[-1]).to(G.dtype)
                    xx = x.reshape(-1, x.shape[-1]).to(G.dtype)
                    G.addmm_(gh.T, xx, alpha=inv_s)

            out.register_hook(grad_hook)

        return hook

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the recorder can no longer record afterwards, but with unclipped=False)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    close = remove_hooks

    # ------------------------------------------------------------------ the step

    def _lr(self, optimizer, p: torch.Tensor) -> float:
        if self._lr_optimizer is not optimizer:
            self._lr_of = {id(q): grp for grp in optimizer.param_groups for q in grp["params"]}
            self._lr_optimizer = optimizer
        grp = self._lr_of.get(id(p))
        if grp is None:
            raise ValueError("a LoRA parameter is not in the optimizer's param groups: build the optimizer "
                             "from the model the recorder watches")
        return float(grp["lr"])

    @torch.no_grad()
    @_timed
    def before_step(self, optimizer, grad_scale: float | None = None) -> None:
        """Read what the coming optimizer step uses: the gradients (see the class doc), the learning rate η of
        lora_A's param group, and the pre-step factors A, B. Call before optimizer.step(). `grad_scale`: the
        loss scale of the step's backward under fp16 (default: the scale of `optimizer.scaler`, if any)."""
        self._follow_device()
        scale = float(grad_scale) if grad_scale is not None else _loss_scale(optimizer)
        self.last_grad_scale = scale
        hooked = [t for g in self._groups for t in (g.G, g.rawA, g.rawB) if t is not None]
        _all_reduce_mean(hooked)
        if scale != 1.0:
            for t in hooked:
                t.div_(scale)
        for g in self._groups:
            g.A, g.B = g.current()
            lrs = [self._lr(optimizer, r.A) for r in g.refs]
            g.lr = lrs[0] if all(v == lrs[0] for v in lrs) else torch.tensor(
                lrs, dtype=g.dtype, device=g.omega.device).view(-1, 1, 1)
            if g.rawA is not None:
                g.gA, g.gB = g.rawA.clone(), g.rawB.clone()
            elif self.grad == "paper":
                g.gA = stacked([r.A.grad if r.A.grad is not None else torch.zeros_like(r.A) for r in g.refs], g.dtype)
                g.gB = stacked([r.B.grad if r.B.grad is not None else torch.zeros_like(r.B) for r in g.refs], g.dtype)
        self._optimizer = optimizer
        self._pending = True

    def _follow_device(self) -> None:
        dev = self._groups[0].refs[0].A.device
        if dev != self._device:
            for g in self._groups:
                g.to(dev)
            self._device = dev

    @staticmethod
    def _pseudo_grad(g: _Group, out: torch.Tensor | None = None) -> torch.Tensor:
        """g̃ = s·(gB·A + B·gA − η·gB·gA) = s·(gB·(A − η·gA) + B·gA), [n, out, in]: one batched matmul of
        the factors side by side (the ΔW-sized result written once, see lora.update_delta_w)."""
        left = torch.cat((g.gB * g.scale, g.B * g.scale), dim=-1)
        return torch.bmm(left, torch.cat((g.A - g.lr * g.gA, g.gA), dim=-2), out=out)

    @torch.no_grad()
    @_timed
    def after_step(self) -> None:
        """ω += −g̃ ⊙ δ for every module, δ = ΔW(t+1) − ΔW(t) from the parameters the optimizer just wrote."""
        if not self._pending:
            return  # no before_step for this step (e.g. the recorder joined mid-step)
        self._pending = False
        skipped = bool(getattr(self._optimizer, "step_was_skipped", False))  # fp16 overflow: nothing moved
        for g in self._groups:
            if not skipped:
                A1, B1 = g.current()
                shape, dt, dev = g.omega.shape, g.omega.dtype, g.omega.device
                delta = update_delta_w(g.scale, g.A, g.B, A1, B1, out=self._work.get(("delta", shape), shape, dt, dev))
                grad = g.G if self.grad == "exact" else self._pseudo_grad(
                    g, out=self._work.get(("grad", shape), shape, dt, dev))
                g.omega.addcmul_(grad, delta, value=-1.0)
                del delta, grad
                if self.clamp == "step":
                    g.omega.clamp_(min=0.0)
            for t in (g.G, g.rawA, g.rawB):
                if t is not None:
                    t.zero_()
        if not skipped:
            self.steps += 1
            self.steps_since += 1

    @torch.no_grad()
    def last_terms(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(g̃, δ) of the last recorded step for module `name`, in the base weight's layout (for checks;
        valid between after_step and the next before_step). Paper mode only."""
        g, k = self._slot(name)
        if g.A is None:
            raise RuntimeError("no step recorded yet")
        if self.grad == "exact":
            raise RuntimeError("exact mode does not keep the gradient after the step")
        A1, B1 = g.current()
        return (to_weight_layout(g.refs[k], self._pseudo_grad(g)[k]),
                to_weight_layout(g.refs[k], update_delta_w(g.scale, g.A, g.B, A1, B1)[k]))

    @torch.no_grad()
    def step_moved(self) -> bool | None:
        """Between before_step and after_step: did the optimizer change any factor? (None: nothing pending,
        or the step was skipped.) A cheap check of the order in which a training loop calls the recorder."""
        if not self._pending or bool(getattr(self._optimizer, "step_was_skipped", False)):
            return None
        if all(isinstance(g.lr, float) and g.lr == 0.0 for g in self._groups):
            return None  # lr 0 (warm-up start): nothing may move
        return any(not torch.equal(g.A, A1) or not torch.equal(g.B, B1) for g in self._groups
                   for A1, B1 in [g.current()])

    def _slot(self, name: str) -> tuple[_Group, int]:
        if name not in self._where:
            raise KeyError(f"no LoRA module {name!r}; modules: {', '.join(self._names[:4])}...")
        return self._where[name]

    def exact_grad(self, name: str) -> torch.Tensor:
        """grad="exact": dL/dΔW accumulated since the last step (base weight layout; a view)."""
        g, k = self._slot(name)
        if g.G is None:
            raise RuntimeError("exact_grad needs grad='exact'")
        return to_weight_layout(g.refs[k], g.G[k])

    def omega(self, name: str) -> torch.Tensor:
        """The running ω of one module (base weight layout; a view, do not modify)."""
        g, k = self._slot(name)
        return to_weight_layout(g.refs[k], g.omega[k])

    # ------------------------------------------------------------------ consolidation

    @torch.no_grad()
    @_timed
    def consolidate(self, metadata: dict | None = None) -> Importance:
        """Ω += ω / (Δ² + ξ) with Δ the change of ΔW since the stage start / last consolidation; ω ← 0;
        the reference ΔW^ν becomes the current ΔW. Returns a snapshot (CPU) of Ω so far."""
        for g in self._groups:
            A1, B1 = g.current()
            if g.Omega is None:
                g.Omega = torch.zeros_like(g.omega)
            if self.steps_since > 0:
                if self.clamp == "end":
                    g.omega.clamp_(min=0.0)
                den = update_delta_w(g.scale, g.A0, g.B0, A1, B1)
                den.square_().add_(self.xi)
                g.Omega.addcdiv_(g.omega, den)
                del den
                g.omega.zero_()
            g.A0.copy_(A1)
            g.B0.copy_(B1)
        if self.steps_since > 0:
            self.consolidations += 1
        self.steps_since = 0
        return self.importance(metadata)

    @torch.no_grad()
    def importance(self, metadata: dict | None = None) -> Importance:
        """Snapshot of Ω as consolidated so far (zeros before the first consolidation), with the current ΔW
        as reference and the recording settings as metadata."""
        omega, ref = {}, {}
        for g in self._groups:
            A1, B1 = g.current()
            dw = batched_delta_w(B1, A1, g.scale)
            O = g.Omega if g.Omega is not None else torch.zeros_like(g.omega)
            for k, r in enumerate(g.refs):
                omega[r.name] = to_weight_layout(r, O[k]).to("cpu", copy=True).contiguous()
                ref[r.name] = to_weight_layout(r, dw[k]).to("cpu", copy=True).contiguous()
        omega = {n: omega[n] for n in self._names}  # model order
        ref = {n: ref[n] for n in self._names}
        meta = self._default_metadata()
        meta.update(self.metadata)
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        return Importance(omega, ref, meta)

    def _default_metadata(self) -> dict[str, str]:
        m = self.model
        meta = {"kind": "si", "xi": repr(self.xi), "clamp": self.clamp, "grad": self.grad,
                "unclipped": str(self.unclipped), "steps": str(self.steps), "consolidations": str(self.consolidations),
                "adapter_hash": adapter_fingerprint(m)}
        adapter = self._groups[0].refs[0].adapter
        pc = getattr(m, "peft_config", {}).get(adapter) if hasattr(m, "peft_config") else None
        if pc is not None:
            t = pc.target_modules
            meta["targets"] = ",".join(sorted(t)) if isinstance(t, (set, list, tuple)) else str(t)
            meta.update(r=str(pc.r), alpha=str(pc.lora_alpha), rslora=str(bool(pc.use_rslora)))
            if pc.base_model_name_or_path:
                meta["base_model"] = str(pc.base_model_name_or_path)
        if "base_model" not in meta:
            cfg = getattr(m, "config", None)
            meta["base_model"] = str(getattr(cfg, "_name_or_path", "") or type(m).__name__)
        meta["model_hash"] = base_model_hash(m)
        return meta

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as CPU tensors (safetensors-ready): per module ω (`<module>::omega`),
        Ω so far (`::Omega`, once consolidated), the factors at the stage start / last consolidation (`::A0`,
        `::B0`; ΔW there is s·B0·A0), and the step counters. Matrices are in the out x in layout."""
        sd: dict[str, torch.Tensor] = {}
        for name in self._names:
            g, k = self._where[name]
            sd[f"{name}::omega"] = g.omega[k].to("cpu", copy=True)
            sd[f"{name}::A0"] = g.A0[k].to("cpu", copy=True)
            sd[f"{name}::B0"] = g.B0[k].to("cpu", copy=True)
            if g.Omega is not None:
                sd[f"{name}::Omega"] = g.Omega[k].to("cpu", copy=True)
        sd["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        sd["steps_since"] = torch.tensor(self.steps_since, dtype=torch.int64)
        sd["consolidations"] = torch.tensor(self.consolidations, dtype=torch.int64)
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for key in ("steps", "steps_since", "consolidations"):
            if key not in sd:
                raise ValueError(f"SI recorder state has no {key!r}")
        for k in sd:
            if "::" in k and k.rsplit("::", 1)[0] not in self._where:
                raise ValueError(f"SI recorder state has module {k.rsplit('::', 1)[0]!r} that this model lacks")
        has_omega = {f"{n}::Omega" in sd for n in self._names}
        if len(has_omega) > 1:
            raise ValueError("SI recorder state has Ω for some modules only")
        for name in self._names:
            g, k = self._where[name]
            for part in ("omega", "A0", "B0") + (("Omega",) if True in has_omega else ()):
                key = f"{name}::{part}"
                if key not in sd:
                    raise ValueError(f"SI recorder state lacks {key!r}")
                if part == "Omega" and g.Omega is None:
                    g.Omega = torch.zeros_like(g.omega)
                dst = getattr(g, part)[k]
                if tuple(sd[key].shape) != tuple(dst.shape):
                    raise ValueError(f"SI recorder state {key}: shape {tuple(sd[key].shape)} != {tuple(dst.shape)}")
                dst.copy_(sd[key])
        if True not in has_omega:
            for g in self._groups:
                g.Omega = None
        for g in self._groups:
            if g.G is not None:
                g.G.zero_()
        self.steps = int(sd["steps"])
        self.steps_since = int(sd["steps_since"])
        self.consolidations = int(sd["consolidations"])
        self._pending = False

    def save_state(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"format": "hlora-si-state", "version": "1"})

    def load_state(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SI recorder state not found: {path}")
        self.load_state_dict(load_file(str(path)))


def __getattr__(name: str):
    """`hlora.si.HLoRACallback` is `hlora.callback.HLoRACallback` (imported on use: the recorder needs no transformers)."""
    if name == "HLoRACallback":
        from .callback import HLoRACallback

        return HLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
