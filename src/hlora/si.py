"""Synaptic-Intelligence importance of the LoRA update ΔW (paper section 4.1, DESIGN section 2).

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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .files import atomic_path
from .importance import Importance
from .lora import LoraRef, lora_modules, to_weight_layout

CLAMPS = ("step", "end", "none")
GRADS = ("paper", "exact")
STATE_FILE = "si_state.safetensors"
# Max ΔW elements per group. On accelerators kernel launches dominate, so stack many modules (each
# temporary stays ≤ 128 MiB fp32); on CPU one module at a time is faster (its temporaries stay in cache).
CHUNK_ELEMENTS = 1 << 25
CPU_CHUNK_ELEMENTS = 1


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 (bf16/fp16/fp32 adapters) or fp64 (fp64 adapters)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_modules(refs: list[LoraRef], max_elements: int | None = None) -> list[list[int]]:
    """Indices of `refs` grouped by (out, in, r, dtype, device), in model order, each group ≤ max_elements
    ΔW elements (default: CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS on CPU), at least one module. Shared by the
    recorder and the penalty so both form ΔW identically."""
    groups: dict[tuple, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, r in enumerate(refs):
        A, B = r.A, r.B
        key = (B.shape[0], A.shape[1], A.shape[0], A.dtype, A.device)
        chunks = groups.setdefault(key, [])
        size = B.shape[0] * A.shape[1]
        limit = max_elements if max_elements is not None else (
            CPU_CHUNK_ELEMENTS if A.device.type == "cpu" else CHUNK_ELEMENTS)
        if not chunks or (len(chunks[-1]) + 1) * size > limit:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(i)
    return order


def stacked(tensors, dtype: torch.dtype) -> torch.Tensor:
    """torch.stack of detached tensors in `dtype` (always a new tensor)."""
    out = torch.stack([t.detach() for t in tensors])
    return out if out.dtype == dtype else out.to(dtype)


def batched_delta_w(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ΔW = s·B·A for stacked factors ([n, out, r] x [n, r, in] -> [n, out, in]; `scale` is [n, 1, 1])."""
    return torch.bmm(B, A).mul_(scale)


def _update(s: torch.Tensor, A0, B0, A1, B1) -> torch.Tensor:
    """s·(B1·A1 − B0·A0) = s·((B1 − B0)·A1 + B0·(A1 − A0)), without forming either product alone."""
    d = torch.bmm((B1 - B0).mul_(s), A1)
    return d.baddbmm_(B0 * s, A1 - A0)


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

    @property
    def dtype(self) -> torch.dtype:
        return self.omega.dtype

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked([r.A for r in self.refs], self.dtype), stacked([r.B for r in self.refs], self.dtype)


def base_model_hash(model: nn.Module) -> str:
    """Hash of the frozen base model; stable while the adapter trains (see model.model_fingerprint)."""
    from .model import model_fingerprint

    return model_fingerprint(model)


def _timed(fn):
    """Add the wall time of a recorder method to `self.seconds` (the recording cost reported by experiments)."""
    import functools
    import time

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t

    return wrapper


class SIRecorder:
    """Records SI importance of every element of every LoRA module's ΔW while the adapter trains.

    Drive it around each optimizer step::

        loss.backward()                      # (all micro-batches of the step)
        recorder.before_step(optimizer)      # after clipping, before optimizer.step()
        optimizer.step()
        recorder.after_step()
        optimizer.zero_grad()
        ...
        importance = recorder.consolidate()  # end of the stage (or of each epoch)

    grad="paper": g̃ from the (accumulated, possibly clipped) gradients of A and B read in before_step.
    With a GradScaler, unscale the gradients before before_step (transformers' Trainer always does).
    grad="exact": dL/dΔW from hooks on lora_A (input) and lora_B (output gradient) of every module,
    summed over the micro-batches of the step and averaged over processes like DDP gradients; it is
    the gradient of whatever is back-propagated through the LoRA branches (not clipped).
    """

    def __init__(self, model: nn.Module, xi: float = 1e-9, clamp: str = "step", grad: str = "paper",
                 metadata: dict | None = None):
        if clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {', '.join(CLAMPS)}; got {clamp!r}")
        if grad not in GRADS:
            raise ValueError(f"grad must be one of {', '.join(GRADS)}; got {grad!r}")
        if not (xi > 0 and math.isfinite(xi)):
            raise ValueError(f"xi must be a positive number, got {xi!r}")
        self.model = model
        self.xi, self.clamp, self.grad = float(xi), clamp, grad
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.seconds = 0.0  # wall time spent inside the recorder (its cost on top of training)
        self.steps = 0  # optimizer steps recorded in total
        self.steps_since = 0  # ... since the last consolidation
        self.consolidations = 0
        self._pending = False
        self._optimizer = None
        self._lr_of: dict[int, dict] = {}
        self._lr_optimizer = None
        self._hooks: list = []
        refs = lora_modules(model)
        for ref in refs:
            if ref.adapter in getattr(ref.module, "lora_variant", {}):
                raise ValueError(f"module {ref.name}: LoRA variants (DoRA, ...) are not supported by SI recording")
        self._groups: list[_Group] = []
        self._where: dict[str, tuple[_Group, int]] = {}
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
                )
                self._groups.append(g)
                for k, r in enumerate(rs):
                    self._where[r.name] = (g, k)
        self._names = [r.name for r in refs]
        if grad == "exact":
            self._install_hooks()

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

    @staticmethod
    def _make_input_hook(g: _Group, k: int):
        def hook(module, args):
            # PEFT calls lora_B(lora_A(dropout(x))) * s: args[0] is the dropped-out input x_d.
            g.x[k] = args[0] if torch.is_grad_enabled() else None

        return hook

    @staticmethod
    def _make_output_hook(g: _Group, k: int):
        inv_s = 1.0 / g.refs[k].scale

        def hook(module, args, out):
            x, g.x[k] = g.x[k], None
            if x is None or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return  # no-grad forward (evaluation, the first pass of reentrant checkpointing)

            def grad_hook(g_h):
                # out h = B·A·x_d and y = s·h, so dL/dΔW = Σ_tokens g_y x_dᵀ = (1/s) Σ g_h x_dᵀ.
                with torch.no_grad():
                    G = g.G[k]
                    gh = g_h.reshape(-1, g_h.shape[-1]).to(G.dtype)
                    xx = x.reshape(-1, x.shape[-1]).to(G.dtype)
                    G.addmm_(gh.T, xx, alpha=inv_s)

            out.register_hook(grad_hook)

        return hook

    def remove_hooks(self) -> None:
        """Detach the exact-gradient hooks (the recorder can no longer record afterwards in exact mode)."""
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
    def before_step(self, optimizer) -> None:
        """Read what the coming optimizer step uses: gradients of A and B (paper mode), the learning rate η of
        lora_A's param group, and the pre-step factors A, B. Call after clipping, before optimizer.step()."""
        if self.grad == "exact":
            self._all_reduce_exact()
        for g in self._groups:
            g.A, g.B = g.current()
            lrs = [self._lr(optimizer, r.A) for r in g.refs]
            g.lr = lrs[0] if all(v == lrs[0] for v in lrs) else torch.tensor(
                lrs, dtype=g.dtype, device=g.omega.device).view(-1, 1, 1)
            if self.grad == "paper":
                g.gA = stacked([r.A.grad if r.A.grad is not None else torch.zeros_like(r.A) for r in g.refs], g.dtype)
                g.gB = stacked([r.B.grad if r.B.grad is not None else torch.zeros_like(r.B) for r in g.refs], g.dtype)
        self._optimizer = optimizer
        self._pending = True

    def _all_reduce_exact(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            world = dist.get_world_size()
            for g in self._groups:  # average like DDP averages parameter gradients
                dist.all_reduce(g.G, op=dist.ReduceOp.SUM)
                g.G.div_(world)

    @staticmethod
    def _pseudo_grad(g: _Group) -> torch.Tensor:
        """g̃ = s·(gB·A + B·gA − η·gB·gA) = s·(gB·(A − η·gA) + B·gA), [n, out, in]."""
        out = torch.bmm(g.gB * g.scale, g.A - g.lr * g.gA)
        return out.baddbmm_(g.B * g.scale, g.gA)

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
                delta = _update(g.scale, g.A, g.B, A1, B1)
                grad = g.G if self.grad == "exact" else self._pseudo_grad(g)
                g.omega.addcmul_(grad, delta, value=-1.0)
                del delta, grad
                if self.clamp == "step":
                    g.omega.clamp_(min=0.0)
            if g.G is not None:
                g.G.zero_()
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
                to_weight_layout(g.refs[k], _update(g.scale, g.A, g.B, A1, B1)[k]))

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
                den = _update(g.scale, g.A0, g.B0, A1, B1)
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
                "steps": str(self.steps), "consolidations": str(self.consolidations)}
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


class HLoRACallback(TrainerCallback):
    """Drives an SIRecorder from inside transformers' Trainer; `.importance` holds Ω after training.

    Order in transformers 5.23 `Trainer._inner_training_loop` / `_run_epoch`, per optimizer step:
    backward of every micro-batch -> clip_grad_norm_ (if max_grad_norm > 0; otherwise a norm with
    max=inf, which also unscales fp16 gradients) -> on_pre_optimizer_step -> optimizer.step() ->
    on_optimizer_step -> lr_scheduler.step() -> model.zero_grad() -> global_step += 1 -> on_step_end ->
    save (then on_save). So before_step runs in on_pre_optimizer_step: the gradients are the *clipped*
    ones the optimizer applies (grad="exact" is unaffected) and the param group's lr is this step's;
    after_step runs in on_optimizer_step (on_step_end would see zeroed gradients).
    On resume the trainer state (global_step, epoch) and the adapter weights are restored before
    on_train_begin, which is where the recorder state is loaded back from checkpoint-<global_step>/.
    """

    def __init__(self, recorder: SIRecorder, consolidate: str = "end", state_file: str = STATE_FILE,
                 resume_dir: str | Path | None = None):
        if consolidate not in ("end", "epoch"):
            raise ValueError(f"consolidate must be 'end' or 'epoch', got {consolidate!r}")
        self.recorder = recorder
        self.consolidate = consolidate
        self.state_file = state_file
        self.resume_dir = resume_dir  # where checkpoint-<step>/ folders are (default: args.output_dir)
        self.importance: Importance | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming from checkpoint-<global_step>
            ck = Path(self.resume_dir or args.output_dir) / f"checkpoint-{state.global_step}" / self.state_file
            if not ck.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {ck} is missing: the checkpoint was not written "
                    "with HLoRACallback, so the importance recorded so far is lost; restart the stage"
                )
            self.recorder.load_state(ck)
            # A checkpoint saved on an epoch's last step precedes that epoch's on_epoch_end.
            ep = state.epoch or 0.0
            if self.consolidate == "epoch" and self.recorder.steps_since > 0 and ep > 0 and abs(ep - round(ep)) < 1e-9:
                self.recorder.consolidate()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("HLoRACallback needs the optimizer in on_pre_optimizer_step")
        self.recorder.before_step(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.recorder.after_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.consolidate == "epoch":
            self.importance = self.recorder.consolidate()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.recorder.save_state(ck / self.state_file)

    def on_train_end(self, args, state, control, **kwargs):
        meta = {}
        if getattr(state, "num_input_tokens_seen", 0):
            meta["tokens"] = str(int(state.num_input_tokens_seen))
        self.importance = self.recorder.consolidate(meta)
