"""The experiment: methods × tasks × seeds (+ an optional φ sweep), resumable, -> results.json.

Every method of the paper is a row of METHODS: which adapter stage μ starts from and which
overrides it applies. One code path runs them all. Per seed the stage-ν run is shared by the
methods that start from it; the EWC Fisher (of the pretrained model, seed-independent) is
computed once per experiment and shared.

Layout of OUT: seed<S>/general/ (stage ν), fisher.safetensors, cells/<method>-<task>-s<S>[-phi<φ>]/
(stage μ run dir + cell.json), results.json (all finished cells), report/.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import (
    EvalConfig,
    ImportanceConfig,
    LoraConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
)
from .files import write_json


@dataclass(frozen=True)
class MethodSpec:
    start: str  # "none" (no training), "fresh" (new adapter) or "nu" (continue the stage-ν adapter)
    overrides: tuple[str, ...] = ()
    label: str = ""


METHODS: dict[str, MethodSpec] = {
    "base": MethodSpec("none", (), "Base"),
    "lora_mu": MethodSpec("fresh", ("method.name=none",), "LoRA(μ)"),
    "lora_nu_mu": MethodSpec("nu", ("method.name=none",), "LoRA(ν+μ)"),
    "rslora": MethodSpec("fresh", ("method.name=none", "lora.rslora=true"), "rsLoRA"),
    "ewc_lora": MethodSpec("fresh", ("method.name=ewc",), "EWC-LoRA"),
    "hlora": MethodSpec("nu", ("method.name=hlora",), "HLoRA"),
    "hlora_no_layer": MethodSpec("nu", ("method.name=hlora", "method.layer_weighting=uniform"), "HLoRA −layer"),
    # The paper's "-layer,element" ablation: ν then μ with no penalty (same as LoRA(ν+μ)).
    "hlora_no_layer_element": MethodSpec("nu", ("method.name=none",), "HLoRA −layer,element"),
}


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    general: TrainConfig = field(default_factory=TrainConfig)  # stage ν training
    domain: TrainConfig = field(default_factory=TrainConfig)  # stage μ training
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    method: MethodConfig = field(default_factory=MethodConfig)  # φ, λ, ... shared by the methods
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: ["base", "lora_mu", "hlora"])
    tasks: list[str] = field(default_factory=lambda: ["sciq"])
    seeds: list[int] = field(default_factory=lambda: [0])
    phi_sweep: list[float] = field(default_factory=list)  # extra hlora cells (first task, first seed)
    general_data: str = "wikitext"  # stage-ν text and the EWC Fisher data
    general_eval: str = "wikitext"  # held-out perplexity task
    data_root: str = ""  # "" = default data search; the demo points it at the embedded subset
    full_fisher_examples: int = 2  # samples timed for the full-model Fisher cost estimate
    out: str = "runs/experiment"


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


def _check(cfg: ExperimentConfig):
    from .config import ConfigError

    for m in cfg.methods:
        if m not in METHODS:
            import difflib

            hint = difflib.get_close_matches(m, list(METHODS), n=1)
            raise ConfigError(f"methods: unknown method {m!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; known: {', '.join(METHODS)}")
    if not cfg.tasks or not cfg.seeds:
        raise ConfigError("tasks and seeds must not be empty")


def _stage_config(cfg: ExperimentConfig, train: TrainConfig, seed: int, **kw) -> RunConfig:
    return RunConfig(model=cfg.model, lora=cfg.lora, train=dataclasses.replace(train, seed=seed),
                     method=cfg.method, importance=cfg.importance, eval=cfg.eval,
                     general_data=cfg.general_data, **kw)


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


def _run_or_resume(rc: RunConfig, stage: str) -> Path:
    from .train import run_stage

    out = Path(rc.out)
    if (out / "DONE").exists():
        return out
    return run_stage(rc, stage, resume=out.exists())


def _evaluate(cfg: ExperimentConfig, task: str, adapter: Path | None) -> dict:
    from .data import get_task
    from .evaluate import evaluate
    from .model import load_adapter, load_model

    model, tok, _ = load_model(cfg.model)
    if adapter is not None:
        model = load_adapter(model, adapter)
    res = evaluate(model, tok, [get_task(task), get_task(cfg.general_eval)], limit=cfg.eval.limit,
                   batch_size=cfg.eval.batch_size, ppl_window=cfg.eval.ppl_window,
                   ppl_max_tokens=cfg.eval.ppl_max_tokens)
    return res["tasks"]


def _curve(run: Path) -> dict | None:
    log = run / "log.jsonl"
    if not log.exists():
        return None
    recs = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    return {"step": [r["step"] for r in recs], "loss": [r["loss"] for r in recs],
            "penalty": [r["penalty"] for r in recs]}


def _importance_info(path: Path) -> dict:
    from .importance import Importance

    imp = Importance.load(path)
    return {"importance_seconds": float(imp.metadata.get("seconds", "nan")),
            "importance_bytes": path.stat().st_size, "importance_kind": imp.metadata.get("kind"),
            "layer_norms": {k: float(v) for k, v in imp.layer_norms().items()}}


def _full_fisher(cfg: ExperimentConfig, out: Path) -> dict:
    """What a full-model Fisher would cost (bytes, seconds), measured once and cached in OUT."""
    from .methods.ewc import full_fisher_cost
    from .model import load_model
    from .train import _general_batches

    path = out / "full_fisher.json"
    if path.exists():
        return json.loads(path.read_text())
    model, tok, _ = load_model(cfg.model)
    rc = _stage_config(cfg, cfg.general, 0)
    rc.method = dataclasses.replace(rc.method, fisher_examples=max(1, cfg.method.fisher_examples))
    cost = full_fisher_cost(model, _general_batches(rc, tok)(), n_examples=cfg.full_fisher_examples,
                            fisher_examples=cfg.method.fisher_examples, targets=cfg.lora.targets)
    write_json(path, cost)
    return cost


def run_cell(cfg: ExperimentConfig, method: str, task: str, seed: int, phi: float | None, out: Path) -> dict:
    spec = METHODS[method]
    name = f"{method}-{task.replace(':', '_').replace('/', '_')}-s{seed}" + (f"-phi{phi:g}" if phi is not None else "")
    cell = out / "cells" / name
    done = cell / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    rec: dict = {"method": method, "task": task, "seed": seed, "phi": None, "sweep": phi is not None, "train_seconds": 0.0, "importance_seconds": None, "importance_bytes": None,
        "importance_kind": None, "full_fisher_bytes": None, "full_fisher_seconds": None,
        "curve": None, "layer_norms": None}
    adapter = None
    rc = None
    if spec.start != "none":
        init = ""
        importance = ""
        if spec.start == "nu":
            nu = _run_or_resume(_stage_config(cfg, cfg.general, seed, data=cfg.general_data,
                                              out=str(out / f"seed{seed}" / "general")), "general")
            init, importance = str(nu / "adapter"), str(nu / "importance.safetensors")
            rec.update(_importance_info(Path(importance)))
        rc = _stage_config(cfg, cfg.domain, seed, data=task, init_adapter=init, importance_file=importance,
                           out=str(cell / "run"))
        rc = apply_overrides(rc, list(spec.overrides) + ([f"method.phi={phi}"] if phi is not None else []))
        if rc.method.name == "hlora":
            rec["phi"] = rc.method.phi
        if rc.method.name == "ewc":
            rc.importance_file = str(out / "fisher.safetensors")
        t = time.perf_counter()
        run = _run_or_resume(rc, "domain")
        summary = json.loads((run / "summary.json").read_text())
        rec["train_seconds"] = summary["train_seconds"]
        rec["wall_seconds"] = time.perf_counter() - t
        rec["curve"] = _curve(run)
        if rc.method.name == "ewc":
            info = _importance_info(Path(rc.importance_file))
            cost = _full_fisher(cfg, out)
            rec.update(info, full_fisher_bytes=cost["full_bytes"], full_fisher_seconds=cost["full_seconds"])
        adapter = run / "adapter"
    ev = _evaluate(cfg, task, adapter)
    t_res, g_res = ev[task if task in ev else next(iter(ev))], ev[cfg.general_eval]
    rec.update(general_ppl=g_res["token_ppl"], general_word_ppl=g_res["word_ppl"], general_bpb=g_res["bits_per_byte"],
               acc=t_res["acc"], acc_norm=t_res["acc_norm"],
               per_item={k: t_res["per_item"][k] for k in ("acc", "acc_norm", "ll_gold") if k in t_res["per_item"]},
               eval_seconds=t_res.get("seconds", 0) + g_res.get("seconds", 0),
               config=dataclasses.asdict(rc) if rc else {"model": dataclasses.asdict(cfg.model)},
               git_commit=_git_commit(), versions=_versions())
    write_json(done, rec)
    return rec


def run_experiment(cfg: ExperimentConfig, progress=print) -> Path:
    """Run every unfinished cell; rewrite results.json after each; write the report."""
    from .report import write_report

    _check(cfg)
    if cfg.data_root == "embedded":  # the subset shipped inside the package
        from .assets import EMBEDDED_DATA

        cfg = dataclasses.replace(cfg, data_root=str(EMBEDDED_DATA))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = [(m, t, s, None) for s in cfg.seeds for t in cfg.tasks for m in cfg.methods]
    cells += [("hlora", cfg.tasks[0], cfg.seeds[0], float(p)) for p in cfg.phi_sweep]
    results = []
    with _DataRoot(cfg.data_root):
        for i, (m, t, s, phi) in enumerate(cells, 1):
            tag = f"[{i}/{len(cells)}] {METHODS[m].label or m} on {t}, seed {s}" + (f", φ={phi:g}" if phi is not None else "")
            progress(f"{tag} ...")
            t0 = time.perf_counter()
            rec = run_cell(cfg, m, t, s, phi, out)
            progress(f"{tag}: acc {rec['acc']:.3f}, general ppl {rec['general_ppl']:.2f} ({time.perf_counter() - t0:.0f} s)")
            results.append(rec)
            write_json(out / "results.json", results)
    write_report(out / "results.json", out / "report")
    return out


def summary_table(results: list[dict]) -> str:
    rows = ["| method | task | seed | general ppl | acc | acc_norm | train s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if r.get("sweep"):
            continue
        rows.append(f"| {METHODS.get(r['method'], MethodSpec('none', (), r['method'])).label or r['method']} | {r['task']} "
                    f"| {r['seed']} | {r['general_ppl']:.2f} | {r['acc']:.3f} | {r['acc_norm']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)


def demo(out: str = "runs/demo", overrides: list[str] | None = None, config: str | None = None) -> Path:
    """The main job: SmolLM2 from the wheel + the data subset shipped in the package."""
    from .assets import PACKAGE_DIR
    from .config import load_config

    cfg = load_config(ExperimentConfig, config or PACKAGE_DIR / "configs" / "demo.yaml",
                      [f"out={out}", *(overrides or [])])
    t = time.perf_counter()
    path = run_experiment(cfg)
    results = json.loads((path / "results.json").read_text())
    print()
    print(summary_table(results))
    print(f"\ndemo finished in {time.perf_counter() - t:.0f} s; report: {path / 'report' / 'report.md'}")
    return path
