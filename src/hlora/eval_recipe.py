"""The evaluation recipe, one place for the CLI (`hlora eval`) and the experiment runner: resolve the tasks
(and fail on bad names or files before a model is loaded), load the base model and adapter, evaluate inside
the method's evaluation context (WiSE-FT's scaling), write the JSON atomically."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

from .assets import AssetError
from .config import EvalConfig, ModelConfig
from .data.tasks import TASK_GROUPS, expand_tasks, get_task, group_results
from .files import write_json


def expand_limits(limits: dict[str, int]) -> dict[str, int]:
    """Items per task, a group's limit applying to each of its tasks (a task's own entry wins)."""
    out = {t: int(n) for g, n in limits.items() if g in TASK_GROUPS for t in TASK_GROUPS[g]}
    out.update({t: int(n) for t, n in limits.items() if t not in TASK_GROUPS})
    return out


def evaluate_checkpoint(model: ModelConfig | str, adapter: str | Path | None, tasks: list[str],
                        cfg: EvalConfig | None = None, out: str | Path | None = None, method=None,
                        limits: dict[str, int] | None = None) -> dict:
    """Evaluate base model `model` (+ `adapter`) on `tasks`; returns evaluate()'s result plus what was run.

    `method`: a Method whose `evaluation(model)` context wraps the evaluation (None: as trained).
    `tasks` may name groups (`battery`): each stands for its tasks, and the result gains "groups" with their
    mean accuracy. `limits`: items per MCQ task (or group) name, over cfg.task_limits and cfg.limit.
    With cfg.kl, text tasks also report KL(p_base ‖ p_model) (0 without an adapter, not computed)."""
    from .evaluate import evaluate
    from .model import load_adapter, load_model

    cfg = cfg or EvalConfig()
    limits = {**expand_limits(cfg.task_limits), **expand_limits(limits or {})}
    resolved = [get_task(t) for t in expand_tasks(tasks)]
    for t in resolved:  # read each file now: a bad line fails before minutes of model loading
        t.eval_items(1) if t.kind == "mcq" else t.eval_texts()
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise AssetError(f"adapter directory {adapter} has no adapter_config.json")
    t0 = time.perf_counter()
    m, tok, _ = load_model(model if isinstance(model, ModelConfig) else ModelConfig(name=model))
    if adapter:
        m = load_adapter(m, adapter)
    load_s = time.perf_counter() - t0
    ctx = method.evaluation(m) if method is not None else contextlib.nullcontext()
    res: dict = {"tasks": {}}
    with ctx:
        for task in resolved:  # one call per task: each MCQ task may have its own item limit
            limit = limits.get(task.name, cfg.limit)
            r = evaluate(m, tok, [task], limit=limit, batch_size=cfg.batch_size, ppl_window=cfg.ppl_window,
                         ppl_max_tokens=cfg.ppl_max_tokens, kl_reference="base" if cfg.kl and adapter else None)
            res["tasks"].update(r["tasks"])
    groups = group_results(res["tasks"])
    if groups:
        res["groups"] = groups
    res.update(model=model.name if isinstance(model, ModelConfig) else model, adapter=str(adapter) if adapter else None,
               load_seconds=load_s)
    if out:
        write_json(out, res)
    return res
