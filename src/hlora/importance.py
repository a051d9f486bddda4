"""Importance: per-module element-wise importance Ω (SI or Fisher) plus metadata, as one safetensors file.

File format (docs/design.md section 7.1), version 1:

- one tensor per LoRA-targeted module, named by its PEFT module path
  (e.g. ``base_model.model.model.layers.3.self_attn.v_proj``), shaped like the module's base weight
  (so GPT-2 Conv1D modules hold in x out tensors);
- optionally ``<module>::reference``: ΔW^ν, the LoRA update at the end of the general stage, always fp32;
- header metadata, all strings: ``format``, ``version``, ``kind`` (si | fisher), ``base_model``,
  ``model_hash``, ``targets``, ``r``, ``alpha``, ``rslora``, ``xi``, ``clamp``, ``grad``, ``steps``,
  ``tokens``, ``data``, ``dtype`` (on-disk dtype of Ω) and, for fp16 files whose Ω exceeds the fp16
  range, ``omega_scales``: a JSON map module -> power-of-two factor the stored tensor was divided by.

No pickle: tensors and strings only. Loading returns fp32 Ω by default.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .files import atomic_path
from .lora import block_index

FORMAT = "hlora-importance"
FORMAT_VERSION = "1"
REFERENCE_SUFFIX = "::reference"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_FP16_SAFE_MAX = 2.0**15  # fp16 tops out at 65504: scale larger tensors down by a power of two (exact)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"importance dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"importance dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return _DTYPES[key]


def _shape(t) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


class Importance:
    """Element-wise importance Ω per LoRA module, the optional reference ΔW^ν, and string metadata.

    `omega` and `reference` map PEFT module paths to tensors in the base weight's layout.
    Ω from several general stages adds up (paper eq. 13, the sum over ν): see `accumulate`.
    """

    def __init__(
        self,
        omega: Mapping[str, torch.Tensor],
        reference: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, object] | None = None,
    ):
        self.omega: dict[str, torch.Tensor] = dict(omega)
        self.reference: dict[str, torch.Tensor] = dict(reference or {})
        extra = [n for n in self.reference if n not in self.omega]
        if extra:
            raise ValueError(f"reference given for module {extra[0]!r} that has no importance tensor")
        for n, r in self.reference.items():
            if _shape(r) != _shape(self.omega[n]):
                raise ValueError(f"module {n}: reference shape {_shape(r)} != importance shape {_shape(self.omega[n])}")
        self.metadata: dict[str, str] = {"format": FORMAT, "version": FORMAT_VERSION, "kind": "si"}
        self.metadata.update({k: str(v) for k, v in (metadata or {}).items()})
        self.path: str | None = None  # set by load(): error messages name the file

    # ------------------------------------------------------------------ basics

    @property
    def meta(self) -> dict[str, str]:
        """Alias of `metadata`."""
        return self.metadata

    @property
    def kind(self) -> str:
        return self.metadata.get("kind", "si")

    @property
    def names(self) -> list[str]:
        return list(self.omega)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by Ω and the references (as currently typed)."""
        return sum(t.numel() * t.element_size() for t in [*self.omega.values(), *self.reference.values()])

    @property
    def numel(self) -> int:
        """Number of importance elements (Ω only)."""
        return sum(t.numel() for t in self.omega.values())

    def to(self, device=None, dtype=None) -> Importance:
        """Move Ω (and references, never below fp32) in place; returns self."""
        for n, t in self.omega.items():
            self.omega[n] = t.to(device=device, dtype=dtype)
        for n, t in self.reference.items():
            self.reference[n] = t.to(device=device)
        return self

    def __repr__(self) -> str:
        return (f"Importance(kind={self.kind!r}, modules={len(self.omega)}, elements={self.numel}, "
                f"reference={'yes' if self.reference else 'no'}, bytes={self.nbytes})")

    def _where(self) -> str:
        return f"importance file {self.path}" if self.path else "importance"

    # ------------------------------------------------------------------ file I/O

    def save(self, path: str | Path, dtype=None, reference: bool = True) -> Path:
        """Write the safetensors file atomically. `dtype`: on-disk dtype of Ω (float32 | float16 | bfloat16);
        default keeps Ω's dtype. References are always stored in fp32 (a half-precision ΔW^ν would make the
        penalty non-zero at the ν solution). `reference=False` leaves them out: ΔW^ν is then the adapter the
        domain stage starts from, and the file is half the size."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        scales: dict[str, float] = {}
        stored = None
        for n, t in self.omega.items():
            if REFERENCE_SUFFIX in n:
                raise ValueError(f"module name {n!r} contains the reserved suffix {REFERENCE_SUFFIX!r}")
            dt = t.dtype if dtype is None else _as_dtype(dtype)
            if dt == torch.float64:
                dt = torch.float32
            x = t.detach().to("cpu", torch.float32)
            if dt == torch.float16:
                m = float(x.abs().max()) if x.numel() else 0.0
                if not math.isfinite(m):
                    raise ValueError(f"module {n}: importance has non-finite values; refusing to save")
                if m > _FP16_SAFE_MAX:
                    scale = 2.0 ** math.ceil(math.log2(m / _FP16_SAFE_MAX))
                    x = x / scale
                    scales[n] = scale
            tensors[n] = x.to(dt).contiguous()
            stored = dt if stored is None or stored == dt else "mixed"
        for n, r in (self.reference.items() if reference else ()):
            tensors[n + REFERENCE_SUFFIX] = r.detach().to("cpu", torch.float32).contiguous()
        meta = dict(self.metadata)
        meta["format"], meta["version"] = FORMAT, FORMAT_VERSION
        meta["dtype"] = str(stored).removeprefix("torch.") if stored is not None else "float32"
        meta.pop("omega_scales", None)
        if scales:
            meta["omega_scales"] = json.dumps(scales)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, dtype=torch.float32, device="cpu") -> Importance:
        """Read an importance file (no pickle). Ω is returned as `dtype` (None = as stored, except fp16
        tensors that were stored rescaled, which come back in fp32)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"importance file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors importance file ({e})") from None
        if meta.get("format") != FORMAT or "version" not in meta:
            raise ValueError(f"{path}: not an hlora importance file (header has no format={FORMAT!r} and version)")
        _check_version(meta["version"], str(path))
        scales = json.loads(meta.pop("omega_scales", "{}") or "{}")
        omega, ref = {}, {}
        for k, t in raw.items():
            if k.endswith(REFERENCE_SUFFIX):
                ref[k[: -len(REFERENCE_SUFFIX)]] = t.to(device=device, dtype=torch.float32)
            else:
                if k in scales:  # fp16 tensor stored divided by a power of two: undo in fp32
                    t = t.to(torch.float32) * float(scales[k])
                omega[k] = t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
        missing = [n for n in ref if n not in omega]
        if missing:
            raise ValueError(f"{path}: reference tensor for {missing[0]!r} has no importance tensor")
        imp = cls(omega, ref, meta)
        imp.path = str(path)
        return imp

    # ------------------------------------------------------------------ checks

    def check_against(self, model, model_hash: str | None = None) -> None:
        """Raise ValueError naming the first mismatch between this importance and `model`'s LoRA modules:
        format version, a module of the model missing here, a shape that differs, a module here that the
        model does not have. `model_hash`, if given, must equal the file's `model_hash` (when it has one)."""
        from .lora import lora_modules

        where = self._where()
        _check_version(self.metadata.get("version", ""), where)
        refs = lora_modules(model)
        model_names = {r.name for r in refs}
        for r in refs:
            expected = _shape(r.base_weight)
            if r.name not in self.omega:
                raise ValueError(
                    f"{where}: model module {r.name} (shape {expected}) has no importance tensor; "
                    f"the file covers {len(self.omega)} modules, e.g. {next(iter(self.omega), '(none)')}"
                    " -- was it recorded with other LoRA targets or another model?"
                )
            found = _shape(self.omega[r.name])
            if found != expected:
                raise ValueError(
                    f"{where}: module {r.name}: the model's base weight has shape {expected}, "
                    f"the importance tensor has shape {found} -- importance recorded on another model?"
                )
            if r.name in self.reference and _shape(self.reference[r.name]) != expected:
                raise ValueError(
                    f"{where}: module {r.name}: the model's base weight has shape {expected}, "
                    f"the reference ΔW has shape {_shape(self.reference[r.name])}"
                )
        extra = [n for n in self.omega if n not in model_names]
        if extra:
            raise ValueError(
                f"{where}: module {extra[0]} has importance but is not a LoRA module of the model "
                f"({len(extra)} such modules) -- recorded with other LoRA targets or another model?"
            )
        have = self.metadata.get("model_hash")
        if model_hash and have and have != model_hash:
            raise ValueError(f"{where}: recorded on model {have}, this model is {model_hash}")

    # ------------------------------------------------------------------ analysis

    def layer_norms(self, group: str = "module") -> dict:
        """Frobenius norm ‖Ω_l‖_F per module (keys: module paths) or per transformer block (group="block";
        keys: block index, -1 for modules outside the block stack; norm over all modules of the block)."""
        norms = {n: float(torch.linalg.vector_norm(t.detach().double())) for n, t in self.omega.items()}
        if group == "module":
            return norms
        if group != "block":
            raise ValueError(f"group must be 'module' or 'block', got {group!r}")
        sq: dict[int, float] = {}
        for n, v in norms.items():
            b = block_index(n)
            sq[b] = sq.get(b, 0.0) + v * v
        return {b: math.sqrt(v) for b, v in sorted(sq.items())}

    def accumulate(self, other: Importance) -> Importance:
        """Ω ← Ω + Ω_other (eq. 13's sum over general stages ν); the reference becomes the later stage's
        (other's, if it has one). Steps and tokens add up. Returns self."""
        if other.kind != self.kind:
            raise ValueError(f"cannot add {other.kind!r} importance to {self.kind!r} importance")
        if set(other.omega) != set(self.omega):
            a = sorted(set(self.omega) ^ set(other.omega))[0]
            raise ValueError(f"cannot accumulate importance over different modules (e.g. {a})")
        for n, t in other.omega.items():
            if _shape(t) != _shape(self.omega[n]):
                raise ValueError(f"module {n}: shapes {_shape(self.omega[n])} and {_shape(t)} differ")
        for n, t in other.omega.items():
            mine = self.omega[n]
            acc = mine.float() if mine.dtype != torch.float32 else mine
            acc = acc + t.to(device=mine.device, dtype=torch.float32)
            self.omega[n] = acc
        if other.reference:
            self.reference = {n: r.clone() for n, r in other.reference.items()}
        m, o = self.metadata, other.metadata
        for key in ("steps", "tokens"):
            try:
                m[key] = str(int(m.get(key, "0") or 0) + int(o.get(key, "0") or 0))
            except ValueError:
                pass
        m["stages"] = str(int(m.get("stages", "1") or 1) + int(o.get("stages", "1") or 1))
        if o.get("data"):
            m["data"] = f"{m['data']} + {o['data']}" if m.get("data") else o["data"]
        return self


def _check_version(version: str, where: str) -> None:
    try:
        v = int(version)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: unreadable format version {version!r}") from None
    if v > int(FORMAT_VERSION) or v < 1:
        raise ValueError(
            f"{where}: format version {v} is not supported by this hlora (reads version {FORMAT_VERSION}); "
            "upgrade hlora or re-record the importance"
        )
