"""`hlora` command line. Every subcommand takes --config FILE.yaml and dotted key=value overrides."""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

# Flags that are shorthands for dotted overrides (the override wins if both are given). The method's own flags
# (--phi, --lam, ...) are generated from the registered methods' config classes (`method_flags`).
RUN_FLAGS = {
    "--model": "model.name", "--data": "data", "--general-data": "general_data", "--out": "out",
    "--init-adapter": "init_adapter", "--importance": "importance_file",
    # the method first: its fields are checked against the config class it selects
    "--method": "method.name",
    "--targets": "lora.targets", "--r": "lora.r", "--alpha": "lora.alpha", "--lora-dropout": "lora.dropout",
    "--rslora": "lora.rslora",
    "--lr": "train.lr", "--schedule": "train.schedule", "--batch-size": "train.batch_size",
    "--grad-accum": "train.grad_accum", "--epochs": "train.epochs", "--max-steps": "train.max_steps",
    "--seq-len": "train.seq_len", "--seed": "train.seed", "--max-examples": "train.max_examples",
    "--save-steps": "train.save_steps",
}


class CLIError(Exception):
    pass


def method_flags(taken: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """--field-name -> (method.field_name, help) for every field of every registered method's config class
    (registry order; a field several methods share is one flag). A flag in `taken` (e.g. --alpha, LoRA's) is left
    out: that field is still `method.<field>=V`."""
    import dataclasses

    from .methods import config_classes

    out: dict[str, tuple[str, str]] = {}
    owners: dict[str, list[str]] = {}
    for name, cls in config_classes().items():
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "name" or flag in taken:
                continue
            owners.setdefault(flag, []).append(name)
            out[flag] = (f"method.{f.name}", "")
    return {flag: (key, f"same as {key}=V (method {', '.join(owners[flag])})") for flag, (key, _) in out.items()}


def run_flags() -> dict[str, tuple[str, str]]:
    """The flags of `hlora general` / `domain` / `tune`: RUN_FLAGS and the methods' own, flag -> (key, help)."""
    out = {flag: (key, f"same as {key}=V") for flag, key in RUN_FLAGS.items()}
    from .methods import REGISTRY

    out["--method"] = ("method.name", f"same as method.name=V: {' | '.join(REGISTRY)}")
    return {**out, **method_flags(taken=out)}


def _add_eval_method_flags(p: argparse.ArgumentParser) -> None:
    """The flags methods that change evaluation declare on their config class (`eval_flags`: {flag: (field,
    help)}, e.g. WiSE-FT's --scale for its α)."""
    from .methods import config_classes

    for name, cls in config_classes().items():
        for flag, (field, help_) in getattr(cls, "eval_flags", {}).items():
            p.add_argument(flag, dest=f"evalmethod:{name}:{field}", metavar="V", help=f"{help_} (method.{field} of {name})")


def _add_common(p: argparse.ArgumentParser, flags: dict[str, tuple[str, str]] | None = None):
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    for flag, (key, help_) in (flags or {}).items():
        p.add_argument(flag, dest="flag:" + key, metavar="V", help=help_)


def _overrides(args) -> list[str]:
    out = [f"{k[5:]}={v}" for k, v in vars(args).items() if k.startswith("flag:") and v is not None]
    return out + list(args.overrides or [])


def _run_config(args):
    from .config import RunConfig, load_config

    return load_config(RunConfig, args.config, _overrides(args))


# ------------------------------------------------------------------------------ subcommands


def _train(args, stage: str):
    from .config import explicit_keys
    from .train import run_stage

    cfg = _run_config(args)
    t = time.perf_counter()
    out = run_stage(cfg, stage, resume=args.resume, explicit=explicit_keys(args.config, _overrides(args)))
    files = ", ".join(sorted(p.name for p in out.iterdir() if p.name not in ("DONE", "config.yaml")))
    print(f"stage {'ν' if stage == 'general' else 'μ'} ({cfg.method.name}) done in {time.perf_counter() - t:.1f} s "
          f"-> {out}: {files}")


def cmd_general(args):
    _train(args, "general")


def cmd_domain(args):
    _train(args, "domain")


def format_eval_table(result: dict) -> str:
    rows = ["| task | metric | value | n | seconds |", "|---|---|---:|---:|---:|"]
    for name, r in result["tasks"].items():
        keys = r.get("metrics", ["acc", "acc_norm"]) if "acc" in r else ["token_ppl", "word_ppl", "bits_per_byte"] + (
            ["kl"] if r.get("kl") is not None else [])
        for k in keys:
            rows.append(f"| {name} | {k} | {r[k]:.4f} | {r.get('n', r.get('n_tokens', ''))} | {r.get('seconds', 0):.1f} |")
    for name, g in result.get("groups", {}).items():  # e.g. the battery: unweighted mean over its tasks
        for k in ("acc", "acc_norm"):
            if k in g:
                rows.append(f"| {name} (mean) | {k} | {g[k]:.4f} | {g['n']} | |")
    return "\n".join(rows)


def cmd_eval(args):
    from .config import EvalConfig, ModelConfig, load_config
    from .eval_recipe import evaluate_checkpoint

    # `eval.kl=true` and `kl=true` both name EvalConfig's field (the experiment config spells it eval.*).
    over = [o[len("eval."):] if o.startswith("eval.") else o for o in _overrides(args)]
    ecfg = load_config(EvalConfig, args.config, over)
    if args.tasks:
        ecfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None:
        ecfg.limit = args.limit
    method = None
    chosen: dict[str, dict] = {}  # a method that changes evaluation (WiSE-FT's --scale), by its declared flags
    for dest, v in vars(args).items():
        if dest.startswith("evalmethod:") and v is not None:
            _, name, field = dest.split(":")
            chosen.setdefault(name, {})[field] = v
    if len(chosen) > 1:
        raise CLIError(f"flags of several methods given ({', '.join(chosen)}): evaluation takes one")
    if chosen:
        from .config import method_config
        from .methods import StageContext, build_method

        (name, fields_), = chosen.items()
        method = build_method(method_config(name, **fields_), StageContext(stage="domain"))
    res = evaluate_checkpoint(ModelConfig(name=args.model, dtype=args.dtype), args.adapter, ecfg.tasks, ecfg,
                              out=args.out, method=method)
    print(format_eval_table(res))
    if args.out:
        print(f"wrote {args.out}")


def cmd_run(args):
    from .experiment import ExperimentConfig, run_experiment

    from .config import load_config

    cfg = load_config(ExperimentConfig, args.config or args.config_pos, _overrides(args))
    out = run_experiment(cfg, collect_only=args.collect)
    print(f"results: {out / 'results.json'}; report: {out / 'report'}")


def cmd_report(args):
    from .report import write_report

    out = args.out or str(Path(args.results).parent / "report")
    written = write_report(args.results, out, tuned=args.tune or ())
    print(f"wrote {len(written['files'])} files to {out}")
    for png, why in written.get("skipped", {}).items():
        print(f"  skipped {png}: {why}")


def cmd_inspect(args):
    from .importance import Importance
    from .report import inspect_importance

    imp = Importance.load(args.file)
    out = args.out or str(Path(args.file).with_suffix("")) + "_inspect"
    summary = inspect_importance({k: float(v) for k, v in imp.layer_norms().items()}, out)
    print(summary)


def cmd_bench(args):
    from .bench import main as bench_main

    bench_main(args)


def cmd_demo(args):
    from .experiment import demo

    demo(out=args.out, overrides=_overrides(args), config=args.config)


def cmd_tune(args):
    from .budget.tune import main as tune_main

    tune_main(args, _overrides(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hlora", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    flags = run_flags()
    g = sub.add_parser("general", help="stage ν: LoRA on general text, recording SI importance")
    _add_common(g, flags)
    g.add_argument("--resume", action="store_true", help="continue an interrupted run directory")
    g.set_defaults(fn=cmd_general)

    d = sub.add_parser("domain", help="stage μ: LoRA on a task with a method (--method, one of the registered methods)")
    _add_common(d, flags)
    d.add_argument("--resume", action="store_true", help="continue an interrupted run directory")
    d.set_defaults(fn=cmd_domain)

    e = sub.add_parser("eval", help="evaluate a base model or base+adapter on tasks")
    _add_common(e)
    e.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a HF directory, a .gguf file or a hub id")
    e.add_argument("--adapter", help="PEFT adapter directory")
    e.add_argument("--tasks", help="comma list: sciq,piqa,medmcqa,wikitext,c4, battery (= arc_challenge,boolq,commonsense_qa,"
                   "siqa,copa,winogrande), text:FILE, mcq:FILE")
    e.add_argument("--limit", type=int, help="first N items of each MCQ task")
    e.add_argument("--dtype", default="float32")
    _add_eval_method_flags(e)
    e.add_argument("--out", help="write metrics and per-item scores here (JSON)")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("run", help="experiment grid methods x tasks x seeds -> results.json + report")
    r.add_argument("config_pos", nargs="?", metavar="CONFIG")
    r.add_argument("--collect", action="store_true",
                   help="run nothing: results.json and the report from the records already there (a grid in progress)")
    _add_common(r)
    r.set_defaults(fn=cmd_run)

    rp = sub.add_parser("report", help="tables and figures from a results.json")
    rp.add_argument("results")
    rp.add_argument("--out", help="report folder (default: report/ beside the results)")
    rp.add_argument("--tune", nargs="+", metavar="TUNE_JSON", help="`hlora tune` results: each budget's line and the "
                    "model it returned on the fronts figures, and their table")
    rp.set_defaults(fn=cmd_report)

    i = sub.add_parser("inspect", help="summarise an importance file; heatmap of log ||Ω_l||")
    i.add_argument("file")
    i.add_argument("--out", help="folder for the heatmap (default: beside the file)")
    i.set_defaults(fn=cmd_inspect)

    b = sub.add_parser("bench", help="performance benchmarks, printing measured ratios")
    b.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a HF dir / .gguf / hub id, tiny-llama")
    b.add_argument("--steps", type=int, default=20, help="timed steps per variant (spread over the rounds)")
    b.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the median is reported)")
    b.add_argument("--no-lmeval", action="store_true", help="skip the comparison with lm-evaluation-harness")
    b.add_argument("--lmeval-limit", type=int, default=100, help="items per task for the lm-eval comparison")
    b.add_argument("--json", "--out", dest="json", help="write the numbers here (JSON)")
    b.add_argument("--table", metavar="JSON", help="print the markdown table of a bench JSON (measures nothing)")
    b.add_argument("--setting", choices=("paper", "all-linear", "both"), default="both",
                   help="LoRA setting(s): paper (q,v r=8), all-linear (every linear module of the blocks, r=16)")
    b.add_argument("--targets", help="a custom setting instead: comma list of LoRA targets (with --r, default 8)")
    b.add_argument("--r", type=int, help="LoRA rank of the custom setting")
    b.add_argument("--memory-plan", action="store_true",
                   help="print the memory plan from the model's config alone (no weights; measures nothing)")
    b.add_argument("--model-config", metavar="NAMES", help="--memory-plan: comma list of smollm2-135m, llama-3-8b, "
                   "qwen2.5-7b, a config JSON, a model dir or .gguf (default: --model)")
    b.add_argument("--dtype", help="--memory-plan: dtype of the model's weights (default bfloat16)")
    b.set_defaults(fn=cmd_bench)

    dm = sub.add_parser("demo", help="the main job: Base, LoRA(μ), HLoRA on SciQ with SmolLM2 (embedded data)")
    _add_common(dm)
    dm.add_argument("--out", default="runs/demo")
    dm.set_defaults(fn=cmd_demo)

    from .methods import steerable

    tu = sub.add_parser("tune", help="the most domain-accurate model within a forgetting budget (--budget c4_kl=0.05)")
    _add_common(tu, {k: v for k, v in flags.items() if k != "--method"})
    tu.add_argument("--method", help=f"none (α search), {'|'.join(steerable())} (steered, then α), auto (default)")
    tu.add_argument("--budget", help="MEASURE=LIMIT: c4_kl=0.05, c4_ppl_rise_pct=2, battery_drop_pts=1, "
                                     "wikitext_ppl_rise_pct=2, text:FILE_kl=...")
    tu.add_argument("--allow", help="auto: the regularisers to try (default: "
                                     f"{','.join(steerable(default_only=True))})")
    tu.set_defaults(fn=cmd_tune)
    return p


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line; `key=value` overrides may stand anywhere among the flags (argparse takes one run of
    positionals only, and its intermixed parsing does not support subcommands)."""
    parser = parser or build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    from .assets import AssetError
    from .config import ConfigError
    from .data import DataError

    known = (CLIError, ConfigError, AssetError, DataError, FileNotFoundError)
    try:
        from .train import TrainingError

        known = known + (TrainingError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        args.fn(args)
    except known as e:
        print(f"hlora {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # checks of importance files, LoRA targets, method names
        print(f"hlora {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hlora {args.cmd}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
