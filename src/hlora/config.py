"""Typed configs. The dataclass signatures are the schema; YAML and `key=value` overrides fill them.

Every default carries its reason: most follow the paper (arXiv 2501.13669) and its public reference code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .methods.spec import MethodConfig  # the base of the methods' configs (methods/ never imports this module)


class ConfigError(ValueError):
    """A config value, file or override that cannot be used; the message names it."""


@dataclass
class ModelConfig:
    # Registry name, local HF directory, local .gguf file, or HF hub id (see assets.py).
    name: str = "smollm2-135m"
    dtype: str = "float32"  # CPU training and lm-eval parity both want fp32
    device: str = "auto"  # auto = cuda if available else cpu


@dataclass
class LoraConfig:
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # paper / reference code
    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    rslora: bool = False  # s = alpha/sqrt(r) instead of alpha/r


@dataclass
class TrainConfig:
    lr: float = 8e-4  # reference code
    schedule: str = "linear"  # any transformers SchedulerType name
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    seq_len: int = 128
    seed: int = 0
    max_examples: int = 0  # 0 = all training examples of the split
    logging_steps: int = 1
    save_steps: int = 0  # 0 = no intermediate checkpoints (resume then restarts the stage)
    snapshot_steps: list[int] = field(default_factory=list)  # keep the adapter at these steps (snapshots/step-N/)
    shuffle: bool = True  # false = data in order (reproducible global batches, e.g. DDP checks)
    max_grad_norm: float = 1.0  # transformers default; SI reads the gradient before clipping (docs/design.md §3.1)


def method_config(name: str = "hlora", **fields_) -> MethodConfig:
    """The typed config of method `name` with its defaults (and `fields_` set)."""
    return from_dict(MethodConfig, {"name": name, **fields_}, where="method")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["sciq", "wikitext"])
    limit: int = 0  # 0 = all items
    batch_size: int = 8
    ppl_window: int = 512  # perplexity: lm-eval rolling windows of this many tokens (its max_length)
    ppl_max_tokens: int = 0  # 0 = whole split
    kl: bool = False  # also KL(p_base ‖ p_model) per token on the text tasks (one more forward per window)
    transfer_limit: int = 0  # items of each task a model was not tuned on (experiments); 0 = `limit`
    task_limits: dict[str, int] = field(default_factory=dict)  # items per task (a group names all its tasks)


@dataclass
class RunConfig:
    """One stage (general / domain) or one evaluation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=method_config)  # hlora: records Ω in stage ν, penalises in μ
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: str = "wikitext"  # training task: general text (stage nu) or domain task (stage mu)
    general_data: str = "wikitext"  # the general-text pool of stage ν (replay, KL, Fisher and CorDA draw on it)
    general_seq_len: int = 0  # sequence length of that pool; 0 = train.seq_len
    init_adapter: str = ""  # stage mu: continue this (nu) adapter; "" = fresh adapter
    importance_file: str = ""  # stage mu: importance of the nu stage
    cache_dir: str = ""  # where methods may cache what cells share (the EWC Fisher); "" = no cache
    out: str = "runs/run"


# ---------------------------------------------------------------- generic (de)serialisation


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/override value to the annotated type, or raise ConfigError naming `where`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if is_dataclass(tp):
        if is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if origin is not dict:
            return dict(value)
        k_tp, v_tp = typing.get_args(tp)  # keys and values typed too: YAML reads 1e-3 (no dot) as text
        return {_coerce(k, k_tp, where): _coerce(v, v_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            out = tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, where: str = "config"):
    if "resolve" in vars(cls):  # a polymorphic section (method:): its `name` picks the concrete class
        try:
            cls = cls.resolve(data)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{where}: {e.args[0] if e.args else e}") from None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        from .util import did_you_mean

        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{did_you_mean(unknown[0], names)}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg, overrides: list[str]):
    """Apply dotted `a.b=value` overrides to a dataclass config, returning a new config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node, obj = data, cfg
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"override {item!r}: unknown section {p!r}")
            node, obj = node[p], getattr(obj, p, None)
        if not isinstance(node, dict) or parts[-1] not in node:
            known = f" (known: {', '.join(node)})" if isinstance(node, dict) else ""
            raise ConfigError(f"override {item!r}: unknown key {key!r}{known}")
        value = _parse_scalar(raw)
        if parts[-1] == "name" and isinstance(obj, MethodConfig) and value != node["name"]:
            # another method: its own fields and defaults replace the old method's
            node.clear()
            node.update(to_dict(method_config(str(value))))
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return data


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None):
    data = dict(base or {})
    if path:
        data.update(load_yaml(path))
    cfg = from_dict(cls, data, where=str(path) if path else "config")
    return apply_overrides(cfg, overrides or [])


def explicit_keys(path: str | Path | None = None, overrides: list[str] | None = None) -> set[str]:
    """The dotted keys a YAML file and `key=value` overrides set (what the user chose, not a default)."""

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                keys.add(f"{prefix}{k}")

    keys: set[str] = set()
    if path:
        walk(load_yaml(path), "")
    for item in overrides or []:
        keys.add(item.split("=", 1)[0].strip())
    return keys


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
