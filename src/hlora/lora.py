"""Pure helpers over PEFT LoRA modules: which modules, their scale s, and ΔW = s·B·A.

Shared by the SI recorder, the penalties and the Fisher code so that "a LoRA module" and
"its update" mean exactly one thing in the whole package.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
from torch import nn

# Max ΔW elements per group of stacked modules. On accelerators kernel launches dominate, so stack many
# modules (each temporary stays ≤ 128 MiB fp32); on CPU one module at a time is faster (it stays in cache).
CHUNK_ELEMENTS = 1 << 25
CPU_CHUNK_ELEMENTS = 1

_BLOCK_RE = re.compile(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA-wrapped module of the active adapter."""

    name: str  # PEFT module path, e.g. base_model.model.model.layers.3.self_attn.v_proj
    module: nn.Module
    adapter: str

    @property
    def A(self) -> nn.Parameter:  # r x in
        return self.module.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # out x r
        return self.module.lora_B[self.adapter].weight

    @property
    def scale(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.module, "fan_in_fan_out", False))

    @property
    def base_weight(self) -> torch.Tensor:
        return self.module.get_base_layer().weight

    @property
    def block(self) -> int:
        return block_index(self.name)


def block_index(name: str) -> int:
    """Transformer block number of a module path (-1 if it sits outside the block stack)."""
    m = _BLOCK_RE.search(name + ".")
    return int(m.group(1)) if m else -1


def lora_modules(model: nn.Module, adapter: str | None = None) -> list[LoraRef]:
    """All LoRA-wrapped modules of `adapter` (default: the active one), in model order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            ad = adapter or (mod.active_adapters[0] if mod.active_adapters else "default")
            if ad in getattr(mod, "lora_A", {}):
                out.append(LoraRef(name, mod, ad))
    if not out:
        raise ValueError("model has no LoRA modules: attach an adapter first (hlora.model.attach_lora)")
    return out


def delta_w(ref: LoraRef, A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW = s·B·A in the base weight's layout (transposed for fan_in_fan_out, e.g. GPT-2 Conv1D)."""
    A = ref.A if A is None else A
    B = ref.B if B is None else B
    d = ref.scale * (B @ A)
    return d.T if ref.fan_in_fan_out else d


def to_weight_layout(ref: LoraRef, m: torch.Tensor) -> torch.Tensor:
    """Map an (out x in) matrix to the base weight's layout (identity unless fan_in_fan_out)."""
    return m.T if ref.fan_in_fan_out else m


# ----------------------------------------------------------------------- stacked (batched) helpers
# The SI recorder and the penalties form ΔW of many equally shaped modules at once with these, so that
# all of them compute "ΔW of a module" the same way.


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


def batched_delta_w(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """ΔW = s·B·A for stacked factors ([n, out, r] x [n, r, in] -> [n, out, in]; `scale` is [n, 1, 1])."""
    return torch.bmm(B, A, out=out).mul_(scale)


def update_delta_w(s: torch.Tensor, A0, B0, A1, B1, out: torch.Tensor | None = None) -> torch.Tensor:
    """s·(B1·A1 − B0·A0) = s·((B1 − B0)·A1 + B0·(A1 − A0)), without forming either product alone: one
    batched matmul of the factors side by side ([out, 2r] @ [2r, in]), so the ΔW-sized result is written
    once (a bmm + baddbmm pair writes it and then reads and rewrites it)."""
    left = torch.cat(((B1 - B0).mul_(s), B0 * s), dim=-1)
    return torch.bmm(left, torch.cat((A1, A1 - A0), dim=-2), out=out)


class WorkBuffers:
    """ΔW-sized scratch tensors that live across training steps, one per key.

    Why: on CPU a fresh tensor of tens of MB comes from the OS as untouched pages, and faulting them in
    costs more than the arithmetic done in them (SmolLM2's 30 stacked q_proj ΔW, 40 MB: `torch.bmm`
    8.5 ms into a new tensor, 1.1 ms into a kept one). The SI recorder and the HLoRA and EWC penalties
    write their per-step ΔW-sized results here instead of allocating them each step."""

    def __init__(self):
        self._bufs: dict = {}
        self._holders: dict = {}

    def get(self, key, shape, dtype: torch.dtype, device) -> torch.Tensor:
        t = self._bufs.get(key)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != torch.device(device):
            t = torch.empty(shape, dtype=dtype, device=device)
            self._bufs[key] = t
        return t

    def take(self, key, shape, dtype: torch.dtype, device, holder) -> torch.Tensor:
        """`get` for a tensor that outlives the call (saved for backward by `holder`): the kept one, unless
        the previous holder (weakly referenced: it dies with its autograd graph) still holds it."""
        prev = self._holders.get(key)
        if prev is not None and prev() is not None:
            return torch.empty(shape, dtype=dtype, device=device)
        self._holders[key] = weakref.ref(holder)
        return self.get(key, shape, dtype, device)


def adapter_fingerprint(model: nn.Module) -> str:
    """Short hash of the adapter's factors A and B (every LoRA module, model order): the importance file of
    stage ν names the ΔW^ν it was recorded against by it, and stage μ refuses another adapter. The values
    are rounded to bf16 first, so the same adapter loaded in fp32, fp16 or bf16 hashes the same."""
    import hashlib

    h = hashlib.sha256()
    for r in lora_modules(model):
        h.update(r.name.encode())
        for t in (r.A, r.B):
            h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


class WeightedSquaredDrift(torch.autograd.Function):
    """Σ_k w_k Σ Ω_k ⊙ (s_k·B_k·A_k − R_k)² over a group of equally shaped modules (stacked [n, out, in]).

    HLoRA's penalty (Ω = SI importance, R = ΔW^ν) and EWC-LoRA's (Ω = Fisher, R = 0, w = 1) are both this.
    R is stored whole (`ref`, [n, out, in]), as its factors (`ref_b` = s·B^ν [n, out, r], `ref_a` = A^ν
    [n, r, in]: then ΔW^ν costs no memory traffic, D = s·B·A − s·B^ν·A^ν, two rank-r products, exactly 0 at
    ΔW^ν), or absent (all three None: R = 0). Forward keeps G = Ω ⊙ D for backward (dP/dA = 2ws·Bᵀ·G,
    dP/dB = 2ws·G·Aᵀ): recomputing D there would cost three more passes over Ω-sized memory and a product.
    D (scratch, shared by the groups of one shape) and G (this group's, key `key`) live in `work`
    (lora.WorkBuffers) across steps; a second penalty() before the first one's backward gets a fresh G."""

    @staticmethod
    def forward(ctx, work, key, weight, scale, omega, ref, ref_b, ref_a, n: int, *params):
        As, Bs = params[:n], params[n:]
        A, B = stacked(As, omega.dtype), stacked(Bs, omega.dtype)
        shape, dt, dev = omega.shape, omega.dtype, omega.device
        D = work.get(("D", tuple(shape)), shape, dt, dev)
        if ref_b is not None:
            torch.bmm(B * scale, A, out=D).baddbmm_(ref_b, ref_a, alpha=-1.0)  # exactly 0 at ΔW^ν
        else:
            batched_delta_w(B, A, scale, out=D)
            if ref is not None:
                D.sub_(ref)
        G = torch.mul(D, omega, out=work.take(("G", key), shape, dt, dev, holder=ctx))
        dots = D.mul_(G).flatten(1).sum(1)  # Σ Ω D² per module; D is scratch from here on
        val = (dots * weight.view(-1)).sum()
        ctx.save_for_backward(weight, scale, G, A, B)
        ctx.n = n
        ctx.dtypes = [p.dtype for p in params]
        return val

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale, G, A, B = ctx.saved_tensors
        n = ctx.n
        coef = weight * scale * (2.0 * grad_out.to(G.dtype))  # [n, 1, 1]: applied to the small results
        gA = torch.bmm(B.transpose(1, 2), G).mul_(coef)
        gB = torch.bmm(G, A.transpose(1, 2)).mul_(coef)
        grads = [gA[k].to(ctx.dtypes[k]) for k in range(n)] + [gB[k].to(ctx.dtypes[n + k]) for k in range(n)]
        return (None, None, None, None, None, None, None, None, None, *grads)


class DriftPenalty(nn.Module):
    """Base of the penalties that are a sum of `WeightedSquaredDrift` over the model's same-shape LoRA
    groups (HLoRA's and EWC-LoRA's): the modules, their groups, the kept work buffers, and per-group
    buffers `<part>_<gi>` (weight, scale, the Ω-like tensor, optionally ref / refb / refa) that follow the
    modules' device. Subclasses register those buffers (every buffer is a group's) and scale `drift()`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        refs = lora_modules(model)
        object.__setattr__(self, "_refs", refs)  # plain attribute: not a submodule of the penalty
        self._groups: list[list[int]] = group_modules(refs)
        object.__setattr__(self, "_work", WorkBuffers())  # D per shape, G per group, kept across steps

    def _group_refs(self, gi: int) -> list[LoraRef]:
        return [self._refs[i] for i in self._groups[gi]]

    @staticmethod
    def _scales(rs: list[LoraRef]) -> torch.Tensor:
        return torch.tensor([r.scale for r in rs], dtype=torch.float32, device=rs[0].A.device).view(-1, 1, 1)

    def _part(self, part: str, gi: int) -> torch.Tensor | None:
        return getattr(self, f"{part}_{gi}", None)

    def _follow_device(self) -> None:
        """Keep each group's buffers where its modules are (the Trainer may move the model after this was
        built, e.g. each DDP rank to its own GPU)."""
        for name, t in list(self._buffers.items()):
            if t is not None:
                dev = self._refs[self._groups[int(name.rsplit("_", 1)[1])][0]].A.device
                if t.device != dev:
                    setattr(self, name, t.to(dev))

    def drift(self, omega: str) -> torch.Tensor:
        """Σ_groups Σ_k w_k Σ Ω_k ⊙ (ΔW_k − R_k)², Ω from the buffers named `omega`, differentiable in A, B."""
        self._follow_device()
        total = None
        for gi in range(len(self._groups)):
            rs = self._group_refs(gi)
            term = WeightedSquaredDrift.apply(
                self._work, gi, self._part("weight", gi), self._part("scale", gi), self._part(omega, gi),
                self._part("ref", gi), self._part("refb", gi), self._part("refa", gi), len(rs),
                *[r.A for r in rs], *[r.B for r in rs])  # fmt: skip
            total = term if total is None else total + term.to(total.device)
        return total

    def forward(self) -> torch.Tensor:
        return self.penalty()
