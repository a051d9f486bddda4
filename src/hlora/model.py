"""Load a base model (registry name, HF dir, GGUF, hub id) and attach / save / load PEFT LoRA."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .assets import AssetError, ModelSource, resolve_model
from .config import LoraConfig, ModelConfig


def pick_device(device: str = "auto") -> torch.device:
    """"auto": this process's GPU if there is one, else the CPU. Under torchrun / accelerate each rank takes
    the GPU of its LOCAL_RANK (all ranks on cuda:0 would put every replica, recorder and penalty there)."""
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    if src.kind == "tiny":
        from .tiny import tiny_tokenizer

        return tiny_tokenizer()
    kw = {"gguf_file": src.gguf_file} if src.kind == "gguf" else {}
    tok = AutoTokenizer.from_pretrained(src.path, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


_CACHE: dict = {}


def load_model(cfg: ModelConfig | str):
    """Return (model, tokenizer, source): a fresh copy each call (fp32 by default, eval mode, on cfg.device).

    The first load of a name is kept in memory: a GGUF takes ~30 s to dequantise and an experiment
    loads the same base model for every cell.
    """
    import copy

    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    key = (cfg.name, cfg.dtype, cfg.device)
    if key not in _CACHE:
        _CACHE.clear()  # keep one base model at most
        _CACHE[key] = _load_model(cfg)
    model, tok, src = _CACHE[key]
    return copy.deepcopy(model), tok, src


def _load_model(cfg: ModelConfig):
    src = resolve_model(cfg.name)
    dtype = getattr(torch, cfg.dtype)
    from transformers import AutoModelForCausalLM

    try:
        if src.kind == "tiny":
            from .tiny import tiny_model

            model = tiny_model(src.path, seed=0).to(dtype)  # the "pretrained" model never depends on the run's seed
        elif src.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=dtype)
            _forget_gguf_quantization(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)
        tok = load_tokenizer(src)
    except (OSError, ValueError) as e:
        if src.kind == "hub":
            raise AssetError(
                f"model {cfg.name!r} is not a local path and could not be loaded from the HF hub: "
                f"{str(e).splitlines()[0]}"
            ) from None
        raise
    model.to(pick_device(cfg.device))
    model.eval()
    return model, tok, src


def _forget_gguf_quantization(model) -> None:
    """A GGUF is dequantised on load (real fp32/bf16 weights), but transformers still tags the model as
    GGUF-quantized, and Trainer refuses to train such a model. The tag no longer describes the weights."""
    model.is_quantized = False
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def model_fingerprint(model: nn.Module) -> str:
    """Short hash of the architecture and a sample of weights: an importance file names its model by it."""
    h = hashlib.sha256()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    h.update(type(inner).__name__.encode())
    # Base weights only, with PEFT's prefixes removed: the same base model hashes the same with or
    # without an adapter, whatever the adapter's initialisation.
    base = [(n.replace("base_model.model.", "").replace(".base_layer", ""), p)
            for n, p in model.named_parameters() if "lora_" not in n]
    for name, p in base[:4]:
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def peft_lora_config(model: nn.Module, cfg: LoraConfig, **extra):
    """PEFT's LoraConfig for our typed one, checked against `model`'s module names."""
    from peft import LoraConfig as PeftLoraConfig

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.targets if t not in present]
    if missing:
        raise ValueError(
            f"LoRA target module {missing[0]!r} not found in {type(model).__name__}; "
            f"modules that exist include: {', '.join(sorted(present)[:20])}"
        )
    fan_in_fan_out = type(model).__name__.startswith("GPT2")  # GPT-2 uses Conv1D (in x out weights)
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        use_rslora=cfg.rslora,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
        **extra,
    )


def attach_lora(model: nn.Module, cfg: LoraConfig):
    """Wrap `model` with a fresh PEFT LoRA adapter (PeftModel)."""
    from peft import get_peft_model

    return get_peft_model(model, peft_lora_config(model, cfg))


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """Base model + saved PEFT adapter (PeftModel)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AssetError(f"adapter directory {adapter_dir} has no adapter_config.json")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
