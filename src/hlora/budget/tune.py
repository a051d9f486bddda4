"""`hlora tune`: the most domain-accurate model whose measured forgetting is within a budget.

Candidates (`tune.method`):
- `none`: plain LoRA on the domain, then the WiSE-FT scale α searched post hoc (alpha.py);
- `hlora` | `kl_general` | `ewc` | `replay`: the method with its coefficient (φ, β, λ, ρ) steered toward the budget
  during training (dual.py; `tune.dual=false` keeps it fixed), then the same α search on its adapter (α = 1 is
  tried first, so a run that met the budget costs one evaluation);
- `auto`: `none` and every method of `tune.allow`, each as above; the winner is the candidate with the highest
  domain validation accuracy among those within the budget.
HLoRA needs a stage-ν adapter and importance: `init_adapter` / `importance_file`, or tune trains stage ν itself
(on `general_data`, `tune.general_steps` steps) and counts its steps in the cost.

OUT/ gets runs/<candidate>/ (each a run directory, dual.jsonl with the controller's trace), adapter/ (the winner,
its ΔW scaled by the chosen α: loadable with PeftModel.from_pretrained as it stands) and tune.json (written
atomically, last): the budget, the slices, every candidate's training cost, controller trace and α points, the
winner with its validation and test measures, and the total cost in training steps and evaluations. A candidate
run already finished (DONE) under OUT/runs is reused, so an interrupted tune continues where it stopped. With
`tune.runs_dir`, a steered run whose coefficient was kept throughout serves the other budget levels it would have
run identically under (_kept_run); its record says so (dual.shared_from_limit, dual.shared_from_margin).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, method_config, to_dict
from ..files import atomic_dir, write_json
from ..methods import needs_general_run, steerable
from ..util import digest, plus_minus
from .alpha import AlphaSearchConfig, search_alpha
from .dual import DualConfig, DualController, kept_note, make_proxy
from .cache import PointCache
from .measure import Budget, BudgetError, Measurer, Point, SliceConfig, domain_slices, mcq_slices, text_slices


@dataclass
class TuneOptions:
    method: str = "auto"  # none | a method with a steerable coefficient (hlora, kl_general, ewc, replay, ...) | auto
    allow: list[str] = field(default_factory=lambda: steerable(default_only=True))  # the regularisers `auto` tries
    dual: bool = True  # steer the method's coefficient during training (false: train at its config value)
    general_steps: int = 0  # hlora without importance_file: stage-ν steps (0 = train.max_steps)
    runs_dir: str = ""  # "" = OUT/runs; else a folder shared by several tunes, each run named by what determines it,
    # so that tunes with other budgets reuse what does not depend on the budget (plain LoRA, HLoRA's stage ν)
    lr: dict[str, float] = field(default_factory=dict)  # a candidate's own stage-μ learning rate ({none: 1e-3, kl_general: 3e-3};
    # "none" is plain LoRA), else train.lr: each method at the lr an lr sweep picked for it
    start: dict[str, float] = field(default_factory=dict)  # steered coefficient's start per method ({hlora: 1, ewc: 50});
    # else dual.start, else the method's config value


@dataclass
class TuneConfig(RunConfig):
    """A domain stage's settings (RunConfig) plus the budget and how to meet it."""

    data: str = "sciq"  # the domain task (multiple choice: its validation accuracy is maximised)
    budget: Budget = field(default_factory=Budget)
    tune: TuneOptions = field(default_factory=TuneOptions)
    search: AlphaSearchConfig = field(default_factory=AlphaSearchConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    slices: SliceConfig = field(default_factory=SliceConfig)
    out: str = "runs/tune"


def _check(cfg: TuneConfig) -> None:
    cfg.budget.check()
    cfg.search.check()
    cfg.dual.check()
    steer = steerable()  # the methods say which coefficient a budget may steer (Method.coefficient)
    if cfg.tune.method not in ("none", *steer, "auto"):
        raise ConfigError(f"tune.method: {cfg.tune.method!r} is not one of {', '.join(('none', *steer, 'auto'))}")
    unknown = [m for m in cfg.tune.lr if m not in ("none", *steer)]
    if unknown:
        raise ConfigError(f"tune.lr: {unknown[0]!r} is not a candidate; candidates: none, {', '.join(steer)}")
    # Checked here, not when a candidate reaches them after others have trained (the config typed them as numbers).
    for where, values, ok, what in (("tune.lr", cfg.tune.lr, lambda x: x > 0, "a positive learning rate"),
                                    ("tune.start", cfg.tune.start, lambda x: x >= 0, "a coefficient >= 0")):
        for m, v in values.items():
            if not ok(v):
                raise ConfigError(f"{where}.{m}: {v:g} is not {what}")
    bad = [m for m in [*cfg.tune.allow, *cfg.tune.start] if m not in steer]
    if bad:
        raise ConfigError(f"tune.allow / tune.start: {bad[0]!r} cannot be steered; steerable: {', '.join(steer)}")


def _candidates(cfg: TuneConfig) -> list[tuple[str, str, bool]]:
    """(label, method, steered) per candidate."""
    m = cfg.tune.method
    if m == "none":
        return [("none", "none", False)]
    if m != "auto":
        return [(m, m, cfg.tune.dual)]
    return [("none", "none", False)] + [(a, a, cfg.tune.dual) for a in dict.fromkeys(cfg.tune.allow)]


def _run_config(cfg: TuneConfig, **changes) -> RunConfig:
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{**base, **changes})


def _method_cfg(cfg: TuneConfig, name: str):
    """The user's method config when it is this method's (its settings and starting coefficient), else defaults."""
    return dataclasses.replace(cfg.method) if cfg.method.name == name else method_config(name)


def _placed(cfg: TuneConfig, rc: RunConfig, label: str, steer: dict | None = None) -> RunConfig:
    """rc with its run directory: OUT/runs/<label>, or with `tune.runs_dir` <runs_dir>/<label>-<digest of everything
    that determines the run> (for a steered run that includes the budget, the controller and the slices)."""
    if not cfg.tune.runs_dir:
        return rc
    return dataclasses.replace(rc, out=str(Path(cfg.tune.runs_dir) / _run_name(rc, label, steer)))


def _run_name(rc: RunConfig, label: str, steer: dict | None) -> str:
    """<label>-<digest of the run's settings and, for a steered run, its steering> (rc.out left out)."""
    return f"{label}-{digest({'run': to_dict(dataclasses.replace(rc, out='')), 'steer': steer})}"


def pick_winner(candidates: list[dict]) -> dict | None:
    """The most domain-accurate candidate on validation among those the α search resolved (else among those it
    resolved with a warning). A tie goes to the larger α (less of the adapter given up), then to the lower validation
    forgetting; only a tie on all three goes to the candidate order (at a few hundred items equal accuracies are
    common). Each candidate carries its search result as `_result`."""
    ok = [r for r in candidates if "error" not in r and "warning" not in r] or [r for r in candidates if "error" not in r]
    return max(ok, key=lambda r: (r["_result"].chosen.domain_acc, r["_result"].chosen.alpha,
                                  -r["_result"].chosen.forgetting), default=None)


def _steering(b: Budget, dcfg: DualConfig, slices: SliceConfig, window: int) -> dict:
    """What names a steered run besides its settings: the budget, the controller, the slices and the window the
    proxy scores pieces in."""
    # dual.smooth came later: off, it stays out of the digest, so runs named before it keep their names
    dual = {k: v for k, v in to_dict(dcfg).items() if k != "smooth" or v}
    return {"budget": to_dict(b), "dual": dual, "slices": to_dict(slices), "window": window}


def _kept_run(cfg: TuneConfig, rc: RunConfig, label: str, steer: dict,
              target: float) -> tuple[Path, float, float] | None:
    """A finished run of `tune.runs_dir` that this steered run would repeat step for step, and the limit and
    dual.margin it ran under; else None. A controller that keeps its coefficient (the run starts beyond its
    target, dual.py) and is never thawed trains exactly as the fixed coefficient does, and so would any controller
    whose target is at or below every proxy value that run measured: its training does not depend on the budget
    level. Only the level and dual.margin (the target they make together) may differ: the rest of what names the
    run (config, measure, slices, controller) must give the same digest."""
    for d in sorted(Path(cfg.tune.runs_dir).glob(f"{label}-*")):
        trace = _read_trace(d) if (d / "DONE").exists() else []
        kept = kept_note(trace)
        if not kept or "thawed_at" in kept:
            continue
        limit = trace[0].get("limit")
        margin = round(trace[0]["target"] / limit, 12) if trace[0].get("target") and limit else steer["dual"]["margin"]
        other = {**steer, "budget": {**steer["budget"], "limit": limit}, "dual": {**steer["dual"], "margin": margin}}
        if d.name == _run_name(rc, label, other) and min(r["proxy"] for r in trace) >= target:
            return d, float(limit), float(margin)
    return None


def _stage(rc: RunConfig, stage: str, callbacks: list) -> tuple[Path, bool]:
    """Run a stage into rc.out, or reuse it when it finished before; (run dir, reused)."""
    from ..train import run_stage

    out = Path(rc.out)
    if (out / "DONE").exists():
        return out, True
    if out.exists():  # an interrupted candidate of this tune: its controller state is gone, start it again
        shutil.rmtree(out)
    return run_stage(rc, stage, extra_callbacks=callbacks), False


def _steps(run: Path) -> tuple[int, float]:
    s = json.loads((run / "summary.json").read_text())
    return int(s["steps"]), float(s["train_seconds"])


def _read_trace(run: Path) -> list[dict]:
    p = run / "dual.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def _scaled_adapter(model, alpha: float, dest: Path) -> None:
    """Save the PEFT adapter with ΔW = s·B·A scaled by α (B scaled), so that it loads as the chosen model."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".lora_embedding_B." in name:
                p.mul_(alpha)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))


def tune(cfg: TuneConfig | None = None, *, budget: str | Budget | None = None, overrides: list[str] | None = None,
         echo=print) -> dict:
    """Run the tune described by `cfg` (+ `key=value` overrides; `budget` as "c4_kl=0.05"); returns what tune.json
    holds. Raises BudgetError (after writing tune.json) if no candidate resolves the budget."""
    from ..evaluate.engine import reference_cache

    # Every KL measurement of the tune compares with the same base model on the same slice: its logits are kept
    # after the first (1.6 GB for 8,192 tokens), which halves what a KL point costs.
    with reference_cache():
        return _tune(cfg, budget, overrides, echo)


def _tune(cfg: TuneConfig | None, budget: str | Budget | None, overrides: list[str] | None, echo) -> dict:
    from ..config import apply_overrides
    from ..model import load_adapter, load_model

    t_start = time.perf_counter()
    cfg = cfg or TuneConfig()
    if overrides:
        cfg = apply_overrides(cfg, list(overrides))
    if budget is not None:
        cfg = dataclasses.replace(cfg, budget=Budget.parse(budget) if isinstance(budget, str) else budget)
    _check(cfg)
    b = cfg.budget
    out = Path(cfg.out)
    if (out / "tune.json").exists():
        raise ConfigError(f"{out} already holds a finished tune (tune.json); choose another out=")

    # Slices first: a bad task name or file fails before any training.
    _, tok, _ = load_model(cfg.model)
    if b.kind == "drop_pts":
        gen_val, gen_test = mcq_slices(b.task, cfg.slices)
    else:
        gen_val, gen_test = text_slices(b.task, tok, cfg.slices)
    dom_val, dom_test = domain_slices(cfg.data, cfg.slices)
    ecfg = cfg.eval
    base_cache: dict = {}
    measurer = Measurer(b, gen_val, dom_val, tok, batch_size=ecfg.batch_size, window=ecfg.ppl_window,
                        base_cache=base_cache)
    echo(f"hlora tune: budget {b}; candidates: {', '.join(c[0] for c in _candidates(cfg))}")

    nu = {"steps": 0, "train_seconds": 0.0}
    candidates, base_point = [], None
    for label, name, steered in _candidates(cfg):
        rec: dict = {"label": label, "method": name, "steered": steered}
        changes = {"method": _method_cfg(cfg, name), "out": str(out / "runs" / label)}
        if label in cfg.tune.lr:
            changes["train"] = dataclasses.replace(cfg.train, lr=cfg.tune.lr[label])
        needs = needs_general_run(name)  # a method whose domain stage continues its own general stage (HLoRA)
        if needs:
            if not (cfg.init_adapter and cfg.importance_file):
                nu_cfg = _run_config(cfg, data=cfg.general_data, method=_method_cfg(cfg, name),
                                     init_adapter="", importance_file="", out=str(out / "runs" / "nu"),
                                     train=dataclasses.replace(cfg.train, max_steps=cfg.tune.general_steps
                                                               or cfg.train.max_steps))
                nu_run, reused = _stage(_placed(cfg, nu_cfg, "nu"), "general", [])
                if not nu["steps"]:
                    nu["steps"], nu["train_seconds"] = _steps(nu_run)
                changes.update(init_adapter=str(nu_run / "adapter"), importance_file=str(nu_run / needs))
        elif cfg.init_adapter and cfg.tune.method == "auto":
            changes.update(init_adapter="", importance_file="")  # the others start fresh, as in the fronts
        dcfg = dataclasses.replace(cfg.dual, start=cfg.tune.start.get(name, cfg.dual.start))
        steer = _steering(b, dcfg, cfg.slices, ecfg.ppl_window) if steered else None
        rc = _placed(cfg, _run_config(cfg, **changes), label, steer)
        ctrl = DualController(make_proxy(b, gen_val, dcfg, ecfg.ppl_window), b.limit, dcfg) if steered else None
        kept = (_kept_run(cfg, rc, label, steer, dcfg.margin * b.limit)
                if steered and cfg.tune.runs_dir and not (Path(rc.out) / "DONE").exists() else None)
        if kept:
            run, reused = kept[0], True
            other = f"{kept[1]:g}" + (f" at dual.margin {kept[2]:g}" if kept[2] != dcfg.margin else "")
            echo(f"  [{label}] reusing {run}: its {name} run under the budget {other} kept the coefficient "
                 "throughout, as this budget would")
        else:
            echo(f"  [{label}] training ({name}{', coefficient steered' if steered else ''}) -> {rc.out}")
            run, reused = _stage(rc, "domain", [ctrl] if ctrl else [])
        steps, train_s = _steps(run)
        rec["run"] = str(run)
        rec["train"] = {"steps": steps, "train_seconds": train_s, "reused": reused}
        if steered:
            if reused:  # the controller ran in an earlier call: its trace is in the run directory
                trace = _read_trace(run)
                rec["dual"] = {"coefficient": trace[0]["coefficient"] if trace else "",
                               "final": trace[-1]["value"] if trace else None, "trace": trace, "reused": True,
                               **kept_note(trace),
                               **({"shared_from_limit": kept[1], "shared_from_margin": kept[2]} if kept else {})}
            else:
                rec["dual"] = ctrl.summary()
            if rec["dual"].get("frozen"):
                thawed = rec["dual"].get("thawed_at")
                src = f" (in the run it reuses, under the budget {other})" if kept else ""  # its target, not ours
                echo(f"  [{label}] not steered{src}: {rec['dual']['frozen']}"
                     + (f"; steered again from step {thawed}" if thawed is not None else ""))
        # α search on the trained adapter: the model is loaded once and rescaled in place for every α.
        model = load_adapter(load_model(cfg.model)[0], run / "adapter")
        measurer.attach(model)
        cache = PointCache(run, measurer)  # points this adapter was measured at before (another budget level)
        if base_point is None:
            t = time.perf_counter()
            acc, se = cache.domain(measurer.domain_at)(0.0)
            base_point = Point(alpha=0.0, forgetting=0.0, se=0.0, domain_acc=acc, domain_se=se,
                               seconds=time.perf_counter() - t, feasible=True, cached=cache.hits > 0)
        try:
            res = search_alpha(cache.forgetting(measurer.forgetting_at), b.limit, cfg.search,
                               base=dataclasses.replace(base_point), what=b.measure,
                               domain=cache.domain(measurer.domain_at))
            rec["search"] = res.as_dict()
        except BudgetError as e:
            res = e.result
            rec["search"], rec["error"] = res.as_dict(), str(e)
        if res is not None and res.warning:
            rec["warning"] = res.warning
        rec["cached_points"] = cache.hits
        c = res.chosen
        echo(f"  [{label}] α = {c.alpha:.4g}: domain acc {c.domain_acc:.4f} (validation), {b.measure} "
             f"{c.forgetting:.4g} ± {c.se:.2g} ({res.evaluations} evaluations"
             + (f", {cache.hits} read from {cache.path.name}" if cache.hits else "") + ")"
             + (f"  UNRESOLVED: {rec['error']}" if "error" in rec else "") + (f"  WARNING: {res.warning}" if res.warning else ""))
        rec["_result"] = res
        candidates.append(rec)
        del model

    winner = pick_winner(candidates)
    train_steps = sum(r["train"]["steps"] for r in candidates) + nu["steps"]
    evaluations = sum(r["_result"].evaluations for r in candidates) + 1  # + the base model's point
    record = {
        "budget": {"measure": b.measure, "task": b.task, "kind": b.kind, "limit": b.limit, "units": b.units},
        "method": cfg.tune.method,
        "slices": {"general_validation": [t.describe() for t in (gen_val if isinstance(gen_val, list) else [gen_val])],
                   "general_test": [t.describe() for t in (gen_test if isinstance(gen_test, list) else [gen_test])],
                   "domain_validation": dom_val.describe(), "domain_test": dom_test.describe()},
        "base": base_point.as_dict() if base_point else None,
        "candidates": [{k: v for k, v in r.items() if k != "_result"} for r in candidates],
        "winner": None,
    }
    test_seconds = 0.0
    if winner is not None:
        res = winner["_result"]
        alpha = res.chosen.alpha
        model = load_adapter(load_model(cfg.model)[0], Path(winner["run"]) / "adapter")
        tester = Measurer(b, gen_test, dom_test, tok, batch_size=ecfg.batch_size, window=ecfg.ppl_window).attach(model)
        test = tester.measure(alpha)
        evaluations, test_seconds = evaluations + 1, test.seconds
        _scaled_adapter(model, alpha, out / "adapter")
        record["winner"] = {"label": winner["label"], "method": winner["method"], "alpha": alpha,
                            "adapter": "adapter", "source_adapter": str(Path(winner["run"]) / "adapter"),
                            "coefficient": (winner.get("dual") or {}).get("final"),
                            "validation": res.chosen.as_dict(), "test": test.as_dict(),
                            **({"warning": res.warning} if res.warning else {})}
    seconds = time.perf_counter() - t_start
    train_seconds = sum(r["train"]["train_seconds"] for r in candidates) + nu["train_seconds"]
    one_run = max((r["train"]["steps"] for r in candidates), default=0)
    record["cost"] = {"training_steps": train_steps, "training_runs": len(candidates) + (1 if nu["steps"] else 0),
                      "nu_steps": nu["steps"], "one_run_steps": one_run,
                      "runs_equivalent": round(train_steps / one_run, 3) if one_run else None,
                      "evaluations": evaluations,
                      "evaluations_cached": sum(r["cached_points"] for r in candidates),
                      "dual_measurements": sum(len((r.get("dual") or {}).get("trace", [])) for r in candidates),
                      "train_seconds": round(train_seconds, 3),
                      "eval_seconds": round(sum(p.seconds for r in candidates for p in r["_result"].points[1:])
                                            + (base_point.seconds if base_point else 0.0) + test_seconds, 3),
                      "seconds": round(seconds, 3)}
    record["config"] = to_dict(cfg)
    write_json(out / "tune.json", record)
    if winner is None:
        errors = "; ".join(f"{r['label']}: {r['error']}" for r in candidates)
        raise BudgetError(f"no candidate meets the budget {b} resolvably ({errors}); the record is in {out / 'tune.json'}"
                          " (search.on_unresolvable=nearest returns the nearest model with a warning)", result=record)
    w = record["winner"]
    v, t = w["validation"], w["test"]
    echo(f"chosen: {w['label']} at α = {w['alpha']:.4g}"
         + (f" ({winner['dual']['coefficient']} steered to {w['coefficient']:.4g})" if w.get("coefficient") else "")
         + f": domain accuracy {v['domain_acc']:.4f} (validation) / {t['domain_acc']:.4f} (test); "
         f"{b.measure} {v['forgetting']:.4g} {plus_minus(v['se'])} (validation) / {t['forgetting']:.4g} {plus_minus(t['se'])} "
         f"(test), budget {b.limit:g}")
    if w.get("warning"):
        echo(f"WARNING: {w['warning']}")
    c = record["cost"]
    echo(f"cost: {c['training_steps']} training steps ({c['training_runs']} runs, {c['runs_equivalent']}× one run), "
         f"{c['evaluations']} evaluations, {c['dual_measurements']} proxy measurements, {c['seconds']:.1f} s")
    echo(f"wrote {out / 'tune.json'} and {out / 'adapter'}")
    return record


def config_from_args(args, overrides: list[str]) -> TuneConfig:
    """The TuneConfig `hlora tune` would run (checked): --method, --allow and --budget are read here, the rest are
    RunConfig flags and overrides."""
    from ..methods import REGISTRY

    pre = []
    if args.method:
        pre.append(f"tune.method={args.method}")
        if args.method in REGISTRY:
            pre.insert(0, f"method.name={args.method}")
    if args.allow:
        pre.append(f"tune.allow={args.allow}")
    cfg = load_config(TuneConfig, args.config, pre + list(overrides))
    if args.budget:
        cfg = dataclasses.replace(cfg, budget=Budget.parse(args.budget))
    _check(cfg)
    return cfg


def main(args, overrides: list[str]) -> dict:
    """`hlora tune` (cli.py)."""
    return tune(config_from_args(args, overrides))
