"""The experiment: rows (methods) × tasks × seeds, each row's sweep a front; resumable from committed records.

A row of ROWS names everything about a method in one line: its label, where stage μ starts (`fresh`
adapter, the stage-`nu` adapter, `none` = no training, or another row's id = evaluate that row's trained
adapter, as WiSE-FT does), its method config and the field its front sweeps. One code path runs them all;
nothing here asks for a method's name.

Layout: OUT/ (work, never committed: run directories, adapters, caches) holds seed<S>/general/ (stage ν,
shared by the rows that start from it), cache/ (e.g. the EWC Fisher, shared by seeds), runs/<task>-s<seed>-
<settings hash>/ (stage μ: cells that train alike share a run) and evals/ (one evaluation per adapter and
evaluation setting).
RECORDS/<cell>.json (default OUT/records) holds one small record per finished cell: a cell with a record
is done, so a grid whose records are committed resumes on a fresh machine from the repository alone.
results.json (all records, config order) and report/ are written next to RECORDS.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import (
    ConfigError,
    EvalConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    method_config,
    to_dict,
)
from .files import write_json
from .methods import method_class
from .util import did_you_mean


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    start: str  # "none" | "fresh" | "nu" | "nu_adapter" (the stage-ν adapter itself, no stage μ) | the id of the
    # row whose trained adapter this row evaluates
    method: tuple = (("name", "none"),)  # method config fields (a tuple of pairs: rows are immutable)
    lora: tuple[str, ...] = ()  # LoRA overrides, e.g. ("rslora=true",)
    sweep: str = ""  # the method field the row's front varies


_R = Row
ROWS: dict[str, Row] = {r.id: r for r in [
    _R("base", "Base", "none"),
    _R("lora_nu", "LoRA(ν) only", "nu_adapter"),  # stage ν alone: how far the general-text adapter itself moves
    _R("lora_mu", "LoRA(μ)", "fresh"),
    _R("lora_nu_mu", "LoRA(ν+μ)", "nu"),
    _R("rslora", "rsLoRA", "fresh", lora=("rslora=true",)),
    _R("ewc_lora", "EWC-LoRA", "fresh", (("name", "ewc"),), sweep="lam"),
    _R("hlora", "HLoRA", "nu", (("name", "hlora"),), sweep="phi"),
    _R("hlora_auto", "HLoRA (layer_scale=auto)", "nu", (("name", "hlora"), ("layer_scale", "auto")), sweep="phi"),
    # Beyond the paper: Ω/mean (scale-free φ) capped at 10× the mean (SI's tail: methods/hlora.py).
    _R("hlora_norm", "HLoRA (Ω/mean, cap 10)", "nu", (("name", "hlora"), ("omega_norm", "mean"), ("omega_clip", 10.0)),
       sweep="phi"),
    _R("hlora_no_layer", "HLoRA −layer", "nu", (("name", "hlora"), ("layer_weighting", "uniform")), sweep="phi"),
    # The paper's "-layer,element" ablation: ν then μ with no penalty (same configuration as LoRA(ν+μ)).
    _R("hlora_no_layer_element", "HLoRA −layer,element", "nu"),
    _R("replay", "Replay", "fresh", (("name", "replay"),), sweep="rho"),
    _R("kl_general", "KL-to-base (general)", "fresh", (("name", "kl_general"),), sweep="beta"),
    _R("kl_domain", "KL-to-base (domain)", "fresh", (("name", "kl_domain"),), sweep="beta"),
    _R("corda_kpm", "CorDA-KPM", "fresh", (("name", "corda_kpm"),)),
    _R("wise_lora_mu", "WiSE-FT of LoRA(μ)", "lora_mu", (("name", "wise"),), sweep="alpha"),
    _R("wise_lora_nu_mu", "WiSE-FT of LoRA(ν+μ)", "lora_nu_mu", (("name", "wise"),), sweep="alpha"),
    _R("wise_hlora", "WiSE-FT of HLoRA", "hlora", (("name", "wise"),), sweep="alpha"),
]}
METHODS = ROWS  # the rows are the experiment's methods


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    general: TrainConfig = field(default_factory=TrainConfig)  # stage ν training
    domain: TrainConfig = field(default_factory=TrainConfig)  # stage μ training (every row alike)
    general_method: MethodConfig = field(default_factory=method_config)  # stage ν: HLoRA's recording settings
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: ["base", "lora_mu", "hlora"])  # row ids
    options: dict[str, dict] = field(default_factory=dict)  # row id -> method fields (the row's main point)
    sweeps: dict[str, dict] = field(default_factory=dict)  # row id -> {field: [values]} (its front)
    per_task: dict[str, dict] = field(default_factory=dict)  # task -> {methods, seeds, sweeps} (thinning)
    tasks: list[str] = field(default_factory=lambda: ["sciq"])
    seeds: list[int] = field(default_factory=lambda: [0])
    transfer: str = "none"  # evaluate on the other tasks too (cross-task retention): none | main (cells) | all
    general_data: str = "wikitext"  # stage ν's text: the general pool of every method
    general_eval: str = "wikitext"  # held-out general text: the record's general_ppl / general_kl
    texts: list[str] = field(default_factory=list)  # more general text recorded beside it (e.g. stage ν's own)
    battery: list[str] = field(default_factory=list)  # zero-shot tasks (or groups) no row tunes on: general ability
    battery_limit: int = 0  # items per battery task; 0 = eval.limit
    data_root: str = ""  # "" = default data search; "embedded" = the subset shipped in the package
    full_fisher_examples: int = 2  # samples timed for the full-model Fisher cost estimate
    out: str = "runs/experiment"  # work directory: run dirs, adapters, caches (never commit it)
    records: str = ""  # one JSON per finished cell (commit these); "" = OUT/records


@dataclass(frozen=True)
class Cell:
    row: Row
    task: str
    seed: int
    method: MethodConfig
    point: Any = None  # the swept field's value (None: the row has no front)
    main: bool = True  # the row's own setting (only main cells enter the fixed tables)
    param: str = ""  # the swept field: the row's `sweep`, or "lr" (stage μ's learning rate)
    lr: float | None = None  # stage μ's lr when it differs from domain.lr (a row option or an lr sweep)

    @property
    def name(self) -> str:
        safe = self.task.replace(":", "_").replace("/", "_")
        sweep = f"-{self.param or self.row.sweep}{self.point:g}" if self.point is not None and not self.main else ""
        return f"{self.row.id}-{safe}-s{self.seed}{sweep}"


# ----------------------------------------------------------------------------- the plan


TRAIN_FIELDS = ("lr",)  # stage-μ fields a row may set in `options` or sweep, beside its method's own


def _row_method(cfg: ExperimentConfig, row: Row, **fields_) -> MethodConfig:
    data = {**dict(row.method), **cfg.options.get(row.id, {}), **fields_}
    data = {k: v for k, v in data.items() if k not in TRAIN_FIELDS}
    return from_dict(MethodConfig, data, where=f"method of row {row.id!r}")


def _row_lr(cfg: ExperimentConfig, row: Row) -> float:
    """The row's own stage-μ learning rate: `options.<row>.lr`, else domain.lr."""
    return float(cfg.options.get(row.id, {}).get("lr", cfg.domain.lr))


def _domain_train(cfg: ExperimentConfig, cell: "Cell") -> TrainConfig:
    return dataclasses.replace(cfg.domain, lr=cell.lr) if cell.lr is not None else cfg.domain


def plan(cfg: ExperimentConfig) -> list[Cell]:
    """Every cell, task-major (a task's seeds land before the next task starts: the first task's fronts over
    seeds come first), then seed, then row."""
    for m in cfg.methods:
        if m not in ROWS:
            raise ConfigError(f"methods: unknown method {m!r}{did_you_mean(m, ROWS)}; known: {', '.join(ROWS)}")
    for where in (cfg.options, cfg.sweeps):
        for m in where:
            if m not in ROWS:
                raise ConfigError(f"unknown method {m!r} in options/sweeps{did_you_mean(m, ROWS)}")
    if not cfg.tasks or not cfg.seeds:
        raise ConfigError("tasks and seeds must not be empty")
    _battery_tasks(cfg)  # a battery task that is also tuned: fail before any training
    for t in cfg.per_task:
        if t not in cfg.tasks:
            raise ConfigError(f"per_task: {t!r} is not one of the tasks {cfg.tasks}")
    cells = []
    for task in cfg.tasks:
        pt = cfg.per_task.get(task, {})
        for seed in pt.get("seeds", cfg.seeds):
            for rid in pt.get("methods", cfg.methods):
                cells.extend(_row_cells(cfg, ROWS[rid], task, seed, pt.get("sweeps", cfg.sweeps).get(rid, {})))
    return cells


def _row_cells(cfg, row: Row, task: str, seed: int, sweep: dict) -> list[Cell]:
    main = _row_method(cfg, row)
    own_lr = _row_lr(cfg, row)
    lr = own_lr if own_lr != cfg.domain.lr else None
    unknown = [k for k in sweep if k not in (row.sweep, *TRAIN_FIELDS) or not k]
    if unknown:
        raise ConfigError(f"sweeps.{row.id}: row {row.id!r} sweeps {row.sweep or 'nothing'!r} (or lr), "
                          f"not {unknown[0]!r}")
    if "lr" in sweep:  # a learning-rate front: the row's main setting at several stage-μ lrs
        if row.start in ("none", "nu_adapter") or row.start in ROWS:
            raise ConfigError(f"sweeps.{row.id}: row {row.id!r} trains nothing itself; it has no lr to sweep")
        values = sorted({float(v) for v in sweep["lr"]} | {own_lr})
        return [Cell(row, task, seed, main, v, v == own_lr, "lr", v if v != cfg.domain.lr else None) for v in values]
    if not row.sweep:
        return [Cell(row, task, seed, main, lr=lr)]
    own = getattr(main, row.sweep)
    values = sorted({float(v) for v in sweep.get(row.sweep, [])} | {float(own)})
    return [Cell(row, task, seed, _row_method(cfg, row, **{row.sweep: v}), v, v == float(own), row.sweep, lr)
            for v in values]


# ----------------------------------------------------------------------------- running one cell


def _stage_config(cfg: ExperimentConfig, train: TrainConfig, seed: int, method: MethodConfig, **kw) -> RunConfig:
    return RunConfig(model=cfg.model, lora=cfg.lora, train=dataclasses.replace(train, seed=seed), method=method,
                     eval=cfg.eval, general_data=cfg.general_data, general_seq_len=cfg.general.seq_len,
                     cache_dir=str(Path(cfg.out) / "cache"), **kw)


def _run_or_resume(rc: RunConfig, stage: str) -> Path:
    from .train import run_stage

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
    if row.start == "nu_adapter":
        nu = _nu_run(cfg, cell.seed)
        s = json.loads((nu / "summary.json").read_text())
        c = s["costs"]
        cost = {"steps": 0, "train_seconds": 0.0, "domain_tokens": 0, "general_tokens": c["general_tokens"],
                "extra_forward_tokens": 0, "nu_steps": s["steps"], "nu_train_seconds": s["train_seconds"]}
        return nu / "adapter", {"train_seconds": 0.0, "cost": cost, "curve": _curve(nu),
                                "layer_norms": _layer_norms(nu / "importance.safetensors")}
    if row.start == "nu":
        nu = _nu_run(cfg, cell.seed)
        init, importance = str(nu / "adapter"), str(nu / "importance.safetensors")
        nu_sum = json.loads((nu / "summary.json").read_text())
        nu_cost = nu_sum["costs"] | {"train_seconds": nu_sum["train_seconds"], "steps": nu_sum["steps"]}
        extra.update({k: nu_sum[k] for k in ("importance_seconds", "importance_bytes") if k in nu_sum},
                     importance_kind="si", layer_norms=_layer_norms(Path(importance)))
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


# Bumped when evaluate.py changes what it computes: cached evaluations of an older evaluator are not reused.
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


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _run_name(rc: RunConfig) -> str:
    """A training run is named by its settings, so cells that train alike share it: a WiSE row evaluates its
    source's run, and the "-layer,element" ablation is LoRA(ν+μ)'s run."""
    rc = dataclasses.replace(rc, out="", eval=EvalConfig(),  # where it runs, how it is evaluated: not training
                             train=dataclasses.replace(rc.train, **{k: getattr(TrainConfig(), k) for k in _NOT_RESULTS}))
    key = _canonical(rc)
    return f"{rc.data.replace(':', '_').replace('/', '_')}-s{rc.train.seed}-{_digest(key)}"


def _layer_norms(path: Path) -> dict | None:
    from .importance import Importance

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
    return [t for t in cfg.tasks if t != cell.task] if wanted else []


def _battery_tasks(cfg: ExperimentConfig) -> list[str]:
    from .data.tasks import expand_tasks

    battery = expand_tasks(cfg.battery)
    tuned = [t for t in battery if t in cfg.tasks]
    if tuned:
        raise ConfigError(f"battery: {tuned[0]!r} is also a tuned task; the battery measures what no row tunes on")
    return battery


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
    from .eval_recipe import evaluate_checkpoint
    from .methods import StageContext, build_method

    from .methods.base import Method

    others = _transfer_tasks(cfg, cell)
    limits = {t: cfg.eval.transfer_limit for t in others if cfg.eval.transfer_limit}
    battery = _battery_tasks(cfg)
    limits.update({t: cfg.battery_limit for t in battery if cfg.battery_limit})
    tasks = [cell.task, *others, cfg.general_eval, *[t for t in cfg.texts if t != cfg.general_eval], *battery]
    method = build_method(cell.method, StageContext(stage="domain")) if adapter is not None else None
    # Same adapter, same evaluation: computed once (the "-layer,element" ablation is LoRA(ν+μ)). The method
    # enters the key only if it changes evaluation (WiSE-FT's α).
    changes_eval = method is not None and type(method).evaluation is not Method.evaluation
    key = _digest({"model": to_dict(cfg.model), "adapter": _adapter_id(cfg, adapter), "evaluator": EVALUATOR_VERSION,
                   "method": to_dict(cell.method) if changes_eval else None, "eval": to_dict(cfg.eval),
                   "tasks": tasks, "limits": limits})
    cache = Path(cfg.out) / "evals" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["tasks"]
    return evaluate_checkpoint(cfg.model, adapter, tasks, cfg.eval, out=cache, method=method, limits=limits)["tasks"]


def _full_fisher(cfg: ExperimentConfig) -> dict:
    """What a full-model Fisher would cost (bytes, seconds), measured once and cached in OUT."""
    from .bench import full_fisher_cost
    from .data.packing import batches, general_pool
    from .model import load_model

    path = Path(cfg.out) / "cache" / "full_fisher.json"
    if path.exists():
        return json.loads(path.read_text())
    model, tok, _ = load_model(cfg.model)
    pool = general_pool(tok, cfg.general_data, cfg.general.seq_len)
    cost = full_fisher_cost(model, batches(pool, 1, limit=cfg.full_fisher_examples),
                            n_examples=cfg.full_fisher_examples, targets=cfg.lora.targets)
    write_json(path, cost)
    return cost


def settings_hash(cfg: ExperimentConfig, cell: Cell) -> str:
    """What determines a cell's result (not where it runs, how fast, or what else the grid holds)."""
    ev = dataclasses.replace(cfg.eval, batch_size=EvalConfig().batch_size)
    quiet = {k: getattr(TrainConfig(), k) for k in _NOT_RESULTS}
    key = {"model": _canonical(cfg.model), "lora": _canonical(cfg.lora),
           "general": _canonical(dataclasses.replace(cfg.general, **quiet)),
           "domain": _canonical(dataclasses.replace(cfg.domain, **quiet)),
           "general_method": _canonical(cfg.general_method), "eval": _canonical(ev),
           "row": dataclasses.asdict(cell.row), "method": _canonical(cell.method), "task": cell.task, "seed": cell.seed,
           "transfer": _transfer_tasks(cfg, cell),
           "general_data": cfg.general_data, "general_eval": cfg.general_eval}
    # Fields added later enter the key only when set, so that the records of older grids keep their hash.
    if cell.lr is not None:
        key["domain"] = _canonical(dataclasses.replace(_domain_train(cfg, cell), **quiet))
    if cfg.texts:
        key["texts"] = list(cfg.texts)
    if cfg.battery:
        key["battery"], key["battery_limit"] = _battery_tasks(cfg), cfg.battery_limit
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cell(cfg: ExperimentConfig, cell: Cell, records: Path) -> dict:
    path = records / f"{cell.name}.json"
    want = settings_hash(cfg, cell)
    if path.exists():
        rec = json.loads(path.read_text())
        if rec.get("settings_hash") != want:
            raise ConfigError(f"{path} was made with other settings than this config's cell {cell.name}: "
                              "delete it to recompute it, or point `records` at another folder")
        return rec
    t0 = time.perf_counter()
    adapter, info = _trained(cfg, cell)
    ev = _evaluate(cfg, cell, adapter)
    t_res, g_res = ev[cell.task], ev[cfg.general_eval]
    cost = {**info.pop("cost"), "eval_seconds": sum(r.get("seconds", 0.0) for r in ev.values())}
    cost["wall_seconds"] = time.perf_counter() - t0
    rec = {
        "cell": cell.name, "method": cell.row.id, "label": cell.row.label, "regularizer": cell.method.name,
        "task": cell.task, "seed": cell.seed, "main": cell.main,
        "sweep": {"param": cell.param or cell.row.sweep, "value": cell.point} if cell.point is not None else None,
        "lr": info.pop("lr", None),
        "general_ppl": g_res["token_ppl"], "general_word_ppl": g_res["word_ppl"], "general_bpb": g_res["bits_per_byte"],
        "general_kl": g_res.get("kl", 0.0 if adapter is None else None),
        "acc": t_res["acc"], "acc_norm": t_res["acc_norm"],
        "per_item": {k: t_res["per_item"][k] for k in ("acc", "acc_norm", "ll_gold", "pred", "gold", "ll")
                     if k in t_res["per_item"]},
        "transfer": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"], "pred": r["per_item"]["pred"],
                         "gold": r["per_item"]["gold"], "ll": r["per_item"]["ll"]}
                     for t, r in ev.items() if t in _transfer_tasks(cfg, cell)},
        "cost": cost, "train_seconds": info.pop("train_seconds"),
        "importance_seconds": None, "importance_bytes": None, "importance_kind": None,
        "full_fisher_bytes": None, "full_fisher_seconds": None, "curve": None, "layer_norms": None,
        **info,
        "config": info.get("config") or {"model": dataclasses.asdict(cfg.model)},
        "settings_hash": want, "git_commit": _git_commit(), "versions": _versions(),
    }
    ends = method_class(cell.method.name).front_ends
    if ends and cell.point is not None:  # cells that stand for the ends of this row's front
        base = Cell(ROWS["base"], cell.task, cell.seed, _row_method(cfg, ROWS["base"])).name
        rec["front_ends"] = {f"{v:g}": base if who == "base" else info.get("source") for v, who in ends.items()}
    if rec["importance_kind"] == "fisher":  # next to a Fisher: what one of the whole model would cost
        ff = _full_fisher(cfg)
        rec.update(full_fisher_bytes=ff["full_bytes"], full_fisher_seconds=ff["full_seconds"])
    rec.update(_general_measures(cfg, ev, adapter))
    write_json(path, rec)
    return rec


RECORD_VERSION = 2  # 2: general_eval, texts and battery (records without record_version are 1)


def _general_measures(cfg: ExperimentConfig, ev: dict, adapter) -> dict:
    """What a record says about general ability beyond general_ppl / general_kl: every general text by name
    (perplexity, bits per byte, KL to the base) and the battery (mean accuracy, per task, per item)."""
    from .data.tasks import group_results

    texts = {}
    for t in dict.fromkeys([cfg.general_eval, *cfg.texts]):
        r = ev[t]
        texts[t] = {"ppl": r["token_ppl"], "word_ppl": r["word_ppl"], "bpb": r["bits_per_byte"],
                    "kl": r.get("kl", 0.0 if adapter is None else None), "n_tokens": r["n_tokens"],
                    "stage_nu_text": t == cfg.general_data}
    out: dict = {"record_version": RECORD_VERSION, "general_eval": cfg.general_eval, "texts": texts}
    names = _battery_tasks(cfg)
    if names:
        res = {t: ev[t] for t in names}
        groups = group_results(res)
        mean = sum(r["acc"] for r in res.values()) / len(res)
        out["battery"] = {
            "acc": mean, "acc_stderr": (groups.get("battery") or {}).get("acc_stderr"),
            "tasks": {t: {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"], "metrics": r.get("metrics")}
                      for t, r in res.items()},
            "per_item": {t: r["per_item"]["acc"] for t, r in res.items()},
        }
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - no git is not an error
        return "unknown"


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("hlora", "torch", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


class _DataRoot:
    """Point task lookups at cfg.data_root for the duration of the experiment (demo: embedded data)."""

    def __init__(self, root: str):
        self.root, self.old = root, None

    def __enter__(self):
        import os

        if self.root:
            self.old = os.environ.get("HLORA_DATA")
            os.environ["HLORA_DATA"] = self.root

    def __exit__(self, *exc):
        import os

        if self.root:
            if self.old is None:
                os.environ.pop("HLORA_DATA", None)
            else:
                os.environ["HLORA_DATA"] = self.old


def records_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.records) if cfg.records else Path(cfg.out) / "records"


def run_experiment(cfg: ExperimentConfig, progress=print, report: bool = True, collect_only: bool = False) -> Path:
    """Run every cell without a record; rewrite results.json after each; write the report.
    `collect_only`: run nothing, gather the cells that have a record (checked against this config).
    Returns the folder holding results.json (the records' parent)."""
    from .report import write_report

    cells = plan(cfg)
    if cfg.data_root == "embedded":  # the subset shipped inside the package
        from .assets import EMBEDDED_DATA

        cfg = dataclasses.replace(cfg, data_root=str(EMBEDDED_DATA))
    records = records_dir(cfg)
    records.mkdir(parents=True, exist_ok=True)
    home = records.parent
    results = []
    with _DataRoot(cfg.data_root):
        for i, cell in enumerate(cells, 1):
            tag = f"[{i}/{len(cells)}] {cell.name}"
            done = (records / f"{cell.name}.json").exists()
            if collect_only and not done:
                continue
            t0 = time.perf_counter()
            if not done:
                progress(f"{tag} ...")
            rec = run_cell(cfg, cell, records)
            gc.collect()  # a cell's model, trainer and penalty sit in reference cycles: free them before the next
            if not done:
                progress(f"{tag}: acc {rec['acc']:.3f}, general ppl {rec['general_ppl']:.2f} "
                         f"({time.perf_counter() - t0:.0f} s)")
            results.append(rec)
            if not collect_only:
                write_json(home / "results.json", results)
    if collect_only:
        progress(f"{len(results)} of {len(cells)} cells have a record")
        write_json(home / "results.json", results)
    if report:
        write_report(home / "results.json", home / "report")
    return home


def summary_table(results: list[dict]) -> str:
    """One line per cell: domain accuracy and, per general text, perplexity and KL to the base model (the text
    stage ν trains on is marked: it favours the rows that train on it)."""
    texts = list(dict.fromkeys(t for r in results for t in (r.get("texts") or {"general": None})))
    nu = {t for r in results for t, v in (r.get("texts") or {}).items() if v.get("stage_nu_text")}
    head = ["method", "task", "seed", "acc", "acc_norm"]
    for t in texts:
        name = f"{t} (stage ν's text)" if t in nu else t
        head += [f"{name} ppl ↓", f"{name} KL ↓"]
    rows = ["| " + " | ".join(head + ["train s"]) + " |", "|---|---|---:|" + "---:|" * (len(head) - 2)]
    for r in results:
        point = f" ({r['sweep']['param']}={r['sweep']['value']:g})" if r.get("sweep") else ""
        cells = [f"{r['label']}{point}", r["task"], str(r["seed"]), f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}"]
        for t in texts:
            v = (r.get("texts") or {}).get(t) or {"ppl": r["general_ppl"], "kl": r.get("general_kl")}
            cells += [f"{v['ppl']:.2f}", "—" if v.get("kl") is None else f"{v['kl']:.3f}"]
        rows.append("| " + " | ".join(cells + [f"{r['train_seconds']:.0f}"]) + " |")
    return "\n".join(rows)


def demo(out: str = "runs/demo", overrides: list[str] | None = None, config: str | None = None) -> Path:
    """The main job: SmolLM2 from the wheel + the data subset shipped in the package."""
    from .assets import PACKAGE_DIR
    from .config import load_config

    cfg = load_config(ExperimentConfig, config or PACKAGE_DIR / "configs" / "demo.yaml",
                      [f"out={out}", *(overrides or [])])
    t = time.perf_counter()
    home = run_experiment(cfg)
    results = json.loads((home / "results.json").read_text())
    print()
    print(summary_table(results))
    print(f"\ndemo finished in {time.perf_counter() - t:.0f} s; report: {home / 'report' / 'report.md'}")
    return home
