"""The plan of an experiment: rows (declared by the methods, hlora.methods.rows), its typed config, and the cells
it runs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any

from ..config import ConfigError, EvalConfig, LoraConfig, MethodConfig, ModelConfig, TrainConfig, from_dict, method_config
from ..methods import rows
from ..methods.spec import Row
from ..util import did_you_mean


class _Rows(Mapping):
    """Every row the methods declare (hlora.methods.rows: each method file's ROWS, registry order), read from the
    registry when used, so that a method registered later (a test's toy method) is a row too."""

    def __getitem__(self, rid: str) -> Row:
        return rows()[rid]

    def __iter__(self) -> Iterator[str]:
        return iter(rows())

    def __len__(self) -> int:
        return len(rows())


ROWS: Mapping[str, Row] = _Rows()


def default_rows() -> list[str]:
    """The smallest comparison: the untrained model's row, the plain reference and the reference (Base, LoRA(μ),
    HLoRA), as the rows declare them."""
    rows_ = list(ROWS.values())
    picks = [next((r.id for r in rows_ if ok(r)), None) for ok in
             (lambda r: r.start == "none", lambda r: r.role == "plain", lambda r: r.role == "reference")]
    return [p for p in dict.fromkeys(picks) if p is not None]


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    general: TrainConfig = field(default_factory=TrainConfig)  # stage ν training
    domain: TrainConfig = field(default_factory=TrainConfig)  # stage μ training (every row alike)
    general_method: MethodConfig = field(default_factory=method_config)  # stage ν: HLoRA's recording settings
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: default_rows())  # row ids
    options: dict[str, dict] = field(default_factory=dict)  # row id -> method fields (the row's main point)
    sweeps: dict[str, dict] = field(default_factory=dict)  # row id -> {field: [values]} (its front)
    per_task: dict[str, dict] = field(default_factory=dict)  # task -> {methods, seeds, sweeps} (thinning)
    tasks: list[str] = field(default_factory=lambda: ["sciq"])
    seeds: list[int] = field(default_factory=lambda: [0])
    transfer: str = "none"  # evaluate on the other tasks too (cross-task retention): none | main (cells) | all
    transfer_tasks: list[str] = field(default_factory=list)  # with `transfer`: tasks scored beside the grid's other
    # tasks though no cell tunes on them (an lr sweep on SciQ that also watches MedMCQA and PIQA)
    general_data: str = "wikitext"  # stage ν's text: the general pool of every method
    general_eval: str = "wikitext"  # held-out general text: the record's general_ppl / general_kl
    texts: list[str] = field(default_factory=list)  # more general text recorded beside it (e.g. stage ν's own)
    battery: list[str] = field(default_factory=list)  # zero-shot tasks (or groups) no row tunes on: general ability
    battery_limit: int = 0  # items per battery task; 0 = eval.limit
    data_root: str = ""  # "" = default data search; "embedded" = the subset shipped in the package
    full_fisher_examples: int = 2  # samples timed for the full-model Fisher cost estimate
    out: str = "runs/experiment"  # work directory: run dirs, adapters, caches (never commit it)
    records: str = ""  # one JSON per finished cell (commit these); "" = OUT/records
    first: list[str] = field(default_factory=list)  # rows (or `row@point` cells) run before the others in each
    # task, over all its seeds (what a headline needs lands first in a grid that takes several sessions); order
    # only, never a result


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


def run_order(cfg: ExperimentConfig, cells: list[Cell]) -> list[Cell]:
    """The order the runner trains cells in: the plan's, except that within each task the cells named in `first`
    (every seed) come before the rest. An entry is a row (all its cells) or `row@point` (the row's cell at that
    swept value: `kl_general@10`). results.json keeps the plan's order."""
    wanted = []  # (row id, point or None)
    for entry in cfg.first:
        rid, _, point = str(entry).partition("@")
        if rid not in cfg.methods:
            raise ConfigError(f"first: {rid!r} is not one of the grid's methods{did_you_mean(rid, cfg.methods)}")
        try:
            value = float(point) if point else None
        except ValueError:
            raise ConfigError(f"first: {entry!r}: the point after '@' must be a number") from None
        if value is not None and not any(c.row.id == rid and _same(c.point, value) for c in cells):
            points = sorted({c.point for c in cells if c.row.id == rid and c.point is not None})
            raise ConfigError(f"first: {entry!r} matches no cell; {rid}'s points: "
                              f"{', '.join(f'{p:g}' for p in points) or 'none (it has no front)'}")
        wanted.append((rid, value))

    def early(c: Cell) -> bool:
        return any(c.row.id == rid and (value is None or _same(c.point, value)) for rid, value in wanted)

    tasks = list(dict.fromkeys(c.task for c in cells))
    return [c for t in tasks for first in (True, False) for c in cells if c.task == t and early(c) == first]


def _same(point, value: float) -> bool:
    return point is not None and math.isclose(float(point), value, rel_tol=1e-9, abs_tol=1e-9)


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



def _battery_tasks(cfg: ExperimentConfig) -> list[str]:
    from ..data.tasks import expand_tasks

    battery = expand_tasks(cfg.battery)
    tuned = [t for t in battery if t in cfg.tasks]
    if tuned:
        raise ConfigError(f"battery: {tuned[0]!r} is also a tuned task; the battery measures what no row tunes on")
    return battery


