"""Running one cell: its stage ν (shared per seed), its stage μ (shared by cells that train alike: runs are named
by their settings) and its evaluation (cached per adapter and evaluation setting)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, EvalConfig, MethodConfig, RunConfig, TrainConfig, apply_overrides, to_dict
from ..files import write_json
from ..util import digest
from .plan import ROWS, Cell, ExperimentConfig, _battery_tasks, _domain_train, _row_lr, _row_method


def _stage_config(cfg: ExperimentConfig, train: TrainConfig, seed: int, method: MethodConfig, **kw) -> RunConfig:
    return RunConfig(model=cfg.model, lora=cfg.lora, train=dataclasses.replace(train, seed=seed), method=method,
                     eval=cfg.eval, general_data=cfg.general_data, general_seq_len=cfg.general.seq_len,
                     cache_dir=str(Path(cfg.out) / "cache"), **kw)


def _run_or_resume(rc: RunConfig, stage: str) -> Path:
    from ..train import run_stage

    out = Path(rc.out)
    if (out / "DONE").exists():
        return out
    return run_stage(rc, stage, resume=out.exists())


def _nu_run(cfg: ExperimentConfig, seed: int) -> Path:
    out = Path(cfg.out) / f"seed{seed}" / "general"
    return _run_or_resume(_stage_config(cfg, cfg.general, seed, cfg.general_method, data=cfg.general_data,
                                        out=str(out)), "general")


def _trained(cfg: ExperimentConfig, cell: Cell) -> tuple[Path | None, dict]:
    """Train the cell's stage μ (or reuse it); returns (adapter dir or None, what the record adds)."""
    row = cell.row
    if row.start == "none":
        return None, {"train_seconds": 0.0, "cost": {"steps": 0, "domain_tokens": 0, "general_tokens": 0,
                                                     "extra_forward_tokens": 0, "train_seconds": 0.0}}
    if row.start in ROWS:  # evaluate another row's trained adapter (its main cell)
        src_row = ROWS[row.start]
        src_lr = _row_lr(cfg, src_row)
        src = Cell(src_row, cell.task, cell.seed, _row_method(cfg, src_row),
                   lr=src_lr if src_lr != cfg.domain.lr else None)
        adapter, info = _trained(cfg, src)
        return adapter, {**info, "source": src.name}
    extra: dict = {}
    init, importance, nu_cost = "", "", {}
    imp_file, imp_kind = _importance_output(cfg)
    if row.start == "nu_adapter":
        nu = _nu_run(cfg, cell.seed)
        s = json.loads((nu / "summary.json").read_text())
        c = s["costs"]
        cost = {"steps": 0, "train_seconds": 0.0, "domain_tokens": 0, "general_tokens": c["general_tokens"],
                "extra_forward_tokens": 0, "nu_steps": s["steps"], "nu_train_seconds": s["train_seconds"]}
        return nu / "adapter", {"train_seconds": 0.0, "cost": cost, "curve": _curve(nu),
                                "layer_norms": _layer_norms(nu / imp_file) if imp_file else None}
    if row.start == "nu":
        nu = _nu_run(cfg, cell.seed)
        init, importance = str(nu / "adapter"), str(nu / imp_file) if imp_file else ""
        nu_sum = json.loads((nu / "summary.json").read_text())
        nu_cost = nu_sum["costs"] | {"train_seconds": nu_sum["train_seconds"], "steps": nu_sum["steps"]}
        extra.update({k: nu_sum[k] for k in ("importance_seconds", "importance_bytes") if k in nu_sum},
                     importance_kind=imp_kind, layer_norms=_layer_norms(Path(importance)) if importance else None)
    rc = _stage_config(cfg, _domain_train(cfg, cell), cell.seed, cell.method, data=cell.task, init_adapter=init,
                       importance_file=importance)
    rc = apply_overrides(rc, [f"lora.{o}" for o in row.lora])
    rc.out = str(Path(cfg.out) / "runs" / _run_name(rc))
    t = time.perf_counter()
    run = _run_or_resume(rc, "domain")
    s = json.loads((run / "summary.json").read_text())
    c = s["costs"]
    cost = {"steps": s["steps"], "train_seconds": s["train_seconds"], "wall_seconds": time.perf_counter() - t,
            "domain_tokens": c["domain_tokens"], "general_tokens": c["general_tokens"] + nu_cost.get("general_tokens", 0),
            "extra_forward_tokens": c["extra_forward_tokens"],
            "nu_steps": nu_cost.get("steps", 0), "nu_train_seconds": nu_cost.get("train_seconds", 0.0)}
    for k in ("importance_seconds", "importance_bytes", "importance_kind"):
        if k in s:
            extra[k] = s[k]
    return run / "adapter", {**extra, "train_seconds": s["train_seconds"], "cost": cost, "curve": _curve(run),
                             "config": dataclasses.asdict(rc), "lr": rc.train.lr}


def _importance_output(cfg: ExperimentConfig) -> tuple[str, str | None]:
    """(file name, kind) of the importance stage ν's method writes (its first declared file); ("", None): none."""
    from ..methods import method_class

    writes = method_class(cfg.general_method.name).writes
    return next(iter(writes.items()), ("", None))


# Bumped when hlora.evaluate changes what it computes: cached evaluations of an older evaluator are not reused.
EVALUATOR_VERSION = 2  # 2: lm-eval rolling windows for perplexity


_NOT_RESULTS = ("save_steps", "logging_steps", "snapshot_steps")  # train fields that do not change a result


def _canonical(cfg) -> Any:
    """A config as the fields that differ from their defaults (and its class): a field added later with a
    default that keeps the old behaviour leaves the hashes of finished runs and records unchanged."""
    if dataclasses.is_dataclass(cfg):
        out = {"class": type(cfg).__name__}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if v != default:
                out[f.name] = _canonical(v)
        return out
    return cfg


def _run_name(rc: RunConfig) -> str:
    """A training run is named by its settings, so cells that train alike share it: a WiSE row evaluates its
    source's run, and the "-layer,element" ablation is LoRA(ν+μ)'s run."""
    rc = dataclasses.replace(rc, out="", eval=EvalConfig(),  # where it runs, how it is evaluated: not training
                             train=dataclasses.replace(rc.train, **{k: getattr(TrainConfig(), k) for k in _NOT_RESULTS}))
    key = _canonical(rc)
    return f"{rc.data.replace(':', '_').replace('/', '_')}-s{rc.train.seed}-{digest(key)}"


def _layer_norms(path: Path) -> dict | None:
    from ..importance import Importance

    return {k: float(v) for k, v in Importance.load(path).layer_norms().items()} if path.is_file() else None


def _curve(run: Path) -> dict | None:
    log = run / "log.jsonl"
    if not log.exists():
        return None
    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    return {"step": [r["step"] for r in recs], "loss": [r["loss"] for r in recs],
            "penalty": [r["penalty"] for r in recs]}


def _transfer_tasks(cfg: ExperimentConfig, cell: Cell) -> list[str]:
    if cfg.transfer not in ("none", "main", "all"):
        raise ConfigError(f"transfer must be none, main or all; got {cfg.transfer!r}")
    wanted = cfg.transfer == "all" or (cfg.transfer == "main" and cell.main)
    return list(dict.fromkeys(t for t in [*cfg.tasks, *cfg.transfer_tasks] if t != cell.task)) if wanted else []


def _adapter_id(cfg: ExperimentConfig, adapter: Path | None) -> str | None:
    """The adapter's place in the work directory (seed0/general/adapter, runs/<name>/adapter): its run
    directory's name alone is "general" for the ν adapter of every seed, which once let seed 1's LoRA(ν)
    row reuse seed 0's evaluation."""
    if adapter is None:
        return None
    try:
        return Path(adapter).resolve().relative_to(Path(cfg.out).resolve()).as_posix()
    except ValueError:
        return str(Path(adapter).resolve())


def _evaluate(cfg: ExperimentConfig, cell: Cell, adapter: Path | None) -> dict:
    """The cell's task, (with cfg.transfer) the other tasks, and the held-out general text."""
    from ..eval_recipe import evaluate_checkpoint
    from ..methods import StageContext, build_method

    from ..methods.base import Method

    others = _transfer_tasks(cfg, cell)
    limits = {t: cfg.eval.transfer_limit for t in others if cfg.eval.transfer_limit}
    battery = _battery_tasks(cfg)
    limits.update({t: cfg.battery_limit for t in battery if cfg.battery_limit})
    tasks = [cell.task, *others, cfg.general_eval, *[t for t in cfg.texts if t != cfg.general_eval], *battery]
    method = build_method(cell.method, StageContext(stage="domain")) if adapter is not None else None
    # Same adapter, same evaluation: computed once (the "-layer,element" ablation is LoRA(ν+μ)). The method
    # enters the key only if it changes evaluation (WiSE-FT's α).
    changes_eval = method is not None and type(method).evaluation is not Method.evaluation
    key = digest({"model": to_dict(cfg.model), "adapter": _adapter_id(cfg, adapter), "evaluator": EVALUATOR_VERSION,
                   "method": to_dict(cell.method) if changes_eval else None, "eval": _canonical(cfg.eval),
                   "tasks": tasks, "limits": limits})
    cache = Path(cfg.out) / "evals" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["tasks"]
    return evaluate_checkpoint(cfg.model, adapter, tasks, cfg.eval, out=cache, method=method, limits=limits)["tasks"]


def _full_fisher(cfg: ExperimentConfig) -> dict:
    """What a full-model Fisher would cost (bytes, seconds), measured once and cached in OUT."""
    from ..methods.fisher import full_fisher_cost
    from ..data.packing import batches, general_pool
    from ..model import load_model

    path = Path(cfg.out) / "cache" / "full_fisher.json"
    if path.exists():
        return json.loads(path.read_text())
    model, tok, _ = load_model(cfg.model)
    pool = general_pool(tok, cfg.general_data, cfg.general.seq_len)
    cost = full_fisher_cost(model, batches(pool, 1, limit=cfg.full_fisher_examples),
                            n_examples=cfg.full_fisher_examples, targets=cfg.lora.targets)
    write_json(path, cost)
    return cost


