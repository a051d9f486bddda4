"""A cell's record: the small JSON a finished cell writes (commit these), and the settings hash that says
whether a record still belongs to a config's cell."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

from ..config import ConfigError, EvalConfig, TrainConfig
from ..files import write_json
from ..methods import method_class
from ..record import RECORD_VERSION, default_family, normalize_record
from ..util import digest
from .plan import ROWS, Cell, ExperimentConfig, _battery_tasks, _domain_train, _row_lr, _row_method
from .run import _NOT_RESULTS, _canonical, _evaluate, _full_fisher, _trained, _transfer_tasks


def settings_hash(cfg: ExperimentConfig, cell: Cell) -> str:
    """What determines a cell's result (not where it runs, how fast, or what else the grid holds)."""
    ev = dataclasses.replace(cfg.eval, batch_size=EvalConfig().batch_size)
    quiet = {k: getattr(TrainConfig(), k) for k in _NOT_RESULTS}
    key = {"model": _canonical(cfg.model), "lora": _canonical(cfg.lora),
           "general": _canonical(dataclasses.replace(cfg.general, **quiet)),
           "domain": _canonical(dataclasses.replace(cfg.domain, **quiet)),
           "general_method": _canonical(cfg.general_method), "eval": _canonical(ev),
           "row": cell.row.settings(), "method": _canonical(cell.method), "task": cell.task, "seed": cell.seed,
           "transfer": _transfer_tasks(cfg, cell),
           "general_data": cfg.general_data, "general_eval": cfg.general_eval}
    # Fields added later enter the key only when set, so that the records of older grids keep their hash.
    if cell.lr is not None:
        key["domain"] = _canonical(dataclasses.replace(_domain_train(cfg, cell), **quiet))
    src = ROWS.get(cell.row.start)
    if src is not None and _row_lr(cfg, src) != cfg.domain.lr:  # a WiSE cell of a source with its own lr: the
        # source's settings determine it (older grids, all at domain.lr, keep their hash)
        key["source"] = {"lr": _row_lr(cfg, src), "method": _canonical(_row_method(cfg, src))}
    if cfg.texts:
        key["texts"] = list(cfg.texts)
    if cfg.battery:
        key["battery"], key["battery_limit"] = _battery_tasks(cfg), cfg.battery_limit
    return digest(key, 16)


def _result(ev: dict, spec: str) -> dict:
    """A task's result in an evaluation: results are keyed by the task's name, a cell by what the config wrote
    ("sciq:validation" is task sciq scored on its validation split)."""
    if spec in ev:
        return ev[spec]
    from ..data.tasks import get_task

    return ev[get_task(spec).name]


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
    t_res, g_res = _result(ev, cell.task), _result(ev, cfg.general_eval)
    cost = {**info.pop("cost"), "eval_seconds": sum(r.get("seconds", 0.0) for r in ev.values())}
    cost["wall_seconds"] = time.perf_counter() - t0
    # Training or evaluation of this cell that came from an earlier process (a resumed grid) still counts; another
    # row's adapter that a cell evaluates (WiSE-FT) is counted where it was trained.
    parts = (0.0 if cell.row.start in ROWS else cost.get("train_seconds", 0.0)) + cost["eval_seconds"]
    if cost["wall_seconds"] < parts:
        cost.update(wall_seconds=parts, process_seconds=cost["wall_seconds"])
    rec = {
        "cell": cell.name, "method": cell.row.id, "label": cell.row.label, "regularizer": cell.method.name,
        # the row's place in the report, as its method declares it
        "family": cell.row.family or default_family(cell.row.id, cell.method.name), "role": cell.row.role or None,
        "ablation": cell.row.ablation,
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
                     for t in _transfer_tasks(cfg, cell) for r in [_result(ev, t)]},
        "cost": cost, "train_seconds": info.pop("train_seconds"),
        "importance_seconds": None, "importance_bytes": None, "importance_kind": None,
        "full_fisher_bytes": None, "full_fisher_seconds": None, "curve": None, "layer_norms": None,
        **info,
        "config": info.get("config") or {"model": dataclasses.asdict(cfg.model)},
        "settings_hash": want, "git_commit": _git_commit(), "versions": _versions(),
    }
    cls = method_class(cell.method.name)
    ends = cls.front_ends
    if ends and cell.point is not None:  # cells that stand for the ends of this row's front
        base_row = next(r for r in ROWS.values() if r.start == "none")  # the untrained model's row
        base = Cell(base_row, cell.task, cell.seed, _row_method(cfg, base_row)).name
        rec["front_ends"] = {f"{v:g}": base if who == "base" else info.get("source") for v, who in ends.items()}
    if cls.compare_full_fisher:  # next to a Fisher: what one of the whole model would cost
        ff = _full_fisher(cfg)
        rec.update(full_fisher_bytes=ff["full_bytes"], full_fisher_seconds=ff["full_seconds"])
    rec.update(_general_measures(cfg, ev, adapter))
    normalize_record(rec, where=str(path))  # the schema the report reads: a writer bug fails here, not there
    write_json(path, rec)
    return rec


def _general_measures(cfg: ExperimentConfig, ev: dict, adapter) -> dict:
    """What a record says about general ability beyond general_ppl / general_kl: every general text by name
    (perplexity, bits per byte, KL to the base) and the battery (mean accuracy, per task, per item)."""
    from ..data.tasks import mean_accuracy

    texts = {}
    for t in dict.fromkeys([cfg.general_eval, *cfg.texts]):
        r = _result(ev, t)
        texts[t] = {"ppl": r["token_ppl"], "word_ppl": r["word_ppl"], "bpb": r["bits_per_byte"],
                    "kl": r.get("kl", 0.0 if adapter is None else None), "n_tokens": r["n_tokens"],
                    "stage_nu_text": t == cfg.general_data}
    out: dict = {"record_version": RECORD_VERSION, "general_eval": cfg.general_eval, "texts": texts}
    names = _battery_tasks(cfg)
    if names:
        res = {t: _result(ev, t) for t in names}
        mean, se = mean_accuracy(list(res.values()))
        out["battery"] = {
            "acc": mean, "acc_stderr": se,
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


