"""Run one stage with the transformers Trainer, driven by the stage's method (methods/base.py).

Stage ν (`general`) and stage μ (`domain`) are the same code: the method attaches the adapter, may change
the training data, adds its loss term and callbacks, and saves what it produced (HLoRA: the importance file
in stage ν, the penalty in stage μ). Nothing here branches on a method's name or on the stage.

Run directory (docs/design.md section 7.2): config.yaml, adapter/, the method's files (importance.safetensors),
log.jsonl, summary.json, checkpoints/ (when train.save_steps > 0), DONE last. Every file is written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .config import ConfigError, RunConfig, dump_yaml
from .data import get_task
from .data.packing import general_pool, pack
from .files import append_jsonl, atomic_dir, write_text
from .methods import StageContext, build_method
from .model import load_model, model_fingerprint
from .util import progress_enabled


class TrainingError(RuntimeError):
    """Training cannot continue (NaN loss, incompatible run directory); the message says why."""


@dataclass
class StepStats:
    """Per-optimizer-step numbers, filled by the Trainer's compute_loss and read by the log callback."""

    task_loss: float = 0.0
    penalty: float = 0.0
    tokens: int = 0
    extra: dict = field(default_factory=dict)

    def reset(self):
        self.task_loss, self.penalty, self.tokens = 0.0, 0.0, 0


class PenaltyMixin:
    """Adds a term to a transformers Trainer's loss; task loss and the term are logged apart.

    Mix it into any Trainer subclass (TRL's SFTTrainer too): `class T(PenaltyMixin, SFTTrainer)`.
    `loss_fn(model, inputs, outputs)` sees the micro-batch and the model's outputs (a method's `loss`);
    `penalty_fn()` is the zero-argument form (e.g. `HLoRAPenalty(...).penalty`). The term is scaled like
    the CE, so that after gradient accumulation (and DDP averaging) a per-step penalty enters each
    optimizer step exactly once and a per-batch term is averaged over the step's micro-batches.
    """

    def __init__(self, *args, penalty_fn=None, loss_fn=None, stats: StepStats | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if penalty_fn is not None and loss_fn is not None:
            raise ValueError("give penalty_fn or loss_fn, not both")
        self.loss_fn = loss_fn if loss_fn is not None else (
            (lambda model, inputs, outputs: penalty_fn()) if penalty_fn is not None else None)
        self.stats = stats or StepStats()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            self.compute_loss_func is not None
        )
        ga = self.current_gradient_accumulation_steps if model.training else 1
        share = 1.0 / ga if scaled_for_ga else 1.0  # Trainer divides by GA itself when not scaled
        task = loss.detach().float().item()
        if not math.isfinite(task):
            raise TrainingError(f"task loss is {task} at step {self.state.global_step + 1}: lower train.lr or check the data")
        # Per-step mean CE for the log (a micro-loss is a fraction of the step's loss when scaled for GA).
        self.stats.task_loss += task if scaled_for_ga else task / ga
        self.stats.tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
        if self.loss_fn is not None and model.training:
            pen = self.loss_fn(model, inputs, outputs)
            if pen is not None:
                p = pen.detach().float().item()
                if not math.isfinite(p):
                    raise TrainingError(f"penalty is {p} at step {self.state.global_step + 1}")
                self.stats.penalty += p / ga
                loss = loss + pen * share
        return (loss, outputs) if return_outputs else loss


class PenaltyTrainer(PenaltyMixin, Trainer):
    """`Trainer` with `penalty_fn=` (e.g. `HLoRAPenalty(...).penalty`) added to the loss."""


class JsonlLogger(TrainerCallback):
    """Writes one log.jsonl line per optimizer step: step, lr, task loss, penalty, tokens/s."""

    def __init__(self, path: Path, stats: StepStats):
        self.path, self.stats = path, stats
        self._t = time.perf_counter()
        self._lr = 0.0

    def on_train_begin(self, args, state, control, **kw):
        # On resume, drop lines of steps after the checkpoint: they are recomputed.
        if state.is_world_process_zero and self.path.exists():
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= state.global_step]
            write_text(self.path, "".join(l + "\n" for l in keep))
        self.stats.reset()
        self._t = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        if optimizer is not None:
            self._lr = float(optimizer.param_groups[0]["lr"])

    def on_step_end(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            self.stats.reset()
            return
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        rec = {"step": state.global_step, "lr": self._lr, "loss": round(self.stats.task_loss, 6),
               "penalty": self.stats.penalty, "tokens_per_s": round(self.stats.tokens / max(dt, 1e-9), 1),
               "epoch": round(state.epoch or 0.0, 4)}
        append_jsonl(self.path, rec)
        self.stats.reset()


class Snapshots(TrainerCallback):
    """Keeps the adapter (PEFT format) at chosen steps in snapshots/step-<N>/: a forgetting curve over steps
    is then one training run and an evaluation per snapshot."""

    def __init__(self, out: Path, steps: list[int]):
        self.out, self.steps = out, set(steps)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in self.steps and state.is_world_process_zero:
            with atomic_dir(self.out / "snapshots" / f"step-{state.global_step}") as tmp:
                model.save_pretrained(str(tmp))


class TrainClock(TrainerCallback):
    """Training seconds over interruptions: each checkpoint keeps the time trained up to it (clock.json), and a
    resumed run starts from the time of the checkpoint it resumes, so summary.json's train_seconds is the whole
    stage's (the time lost after the last checkpoint is not counted: its steps are re-run and timed then)."""

    FILE = "clock.json"

    def __init__(self, resume_from: str | None):
        self.before = 0.0
        if resume_from and (Path(resume_from) / self.FILE).is_file():
            self.before = float(json.loads((Path(resume_from) / self.FILE).read_text())["train_seconds"])
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def on_save(self, args, state, control, **kw):
        ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ck.is_dir():
            write_text(ck / self.FILE, json.dumps({"train_seconds": self.seconds()}))


def _training_args(cfg: RunConfig, out: Path, dataset) -> TrainingArguments:
    t = cfg.train
    ordered = bool(getattr(dataset, "ordered", False))  # a method fixed the order (e.g. replay's mix per step)
    steps = getattr(dataset, "steps", None)  # ... and then the number of steps it laid out
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=steps if steps else t.max_steps,
        max_grad_norm=t.max_grad_norm,
        train_sampling_strategy="random" if t.shuffle and not ordered else "sequential",
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_only_model=False,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available() or cfg.model.device == "cpu",
        disable_tqdm=not progress_enabled(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
    )


def _latest_checkpoint(out: Path) -> str | None:
    ck = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ck[-1]) if ck else None


def prepare_run_dir(out: Path, resume: bool, cfg: RunConfig) -> bool:
    """Check the run directory; returns True if it is new (so a failure may remove it)."""
    if (out / "DONE").exists():
        raise TrainingError(f"{out} is already a finished run (DONE exists); choose another out=")
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise TrainingError(f"{out} holds an unfinished run: add --resume to continue it, or choose another out=")
        old = (out / "config.yaml").read_text() if (out / "config.yaml").exists() else None
        if old is not None and old != dump_yaml(cfg):
            raise TrainingError(f"{out}/config.yaml differs from this command's config: resume with the same settings")
        return False
    out.mkdir(parents=True, exist_ok=True)
    return True


def stage_context(cfg: RunConfig, stage: str, tokenizer, out: Path | None) -> StageContext:
    """What a method sees of a stage: its config, the tokenizer, the run directory and the general pool
    (stage ν's text and sequence length, built once, on first use)."""
    pool = []

    def general():
        if not pool:
            pool.append(general_pool(tokenizer, cfg.general_data, cfg.general_seq_len or cfg.train.seq_len))
        return pool[0]

    return StageContext(stage=stage, run=cfg, tokenizer=tokenizer, out=out, general_pool=general,
                        model_name=cfg.model.name)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# LoraConfig field -> the key of PEFT's adapter_config.json that a continued adapter keeps
_ADAPTER_KEYS = {"targets": "target_modules", "r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                 "rslora": "use_rslora"}


def _adapter_lora(adapter_dir: Path) -> dict | None:
    """The LoRA settings (our field names) a saved PEFT adapter trains with, or None without adapter_config.json."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return None  # attach() reports the missing adapter
    pc = json.loads(path.read_text())
    targets = pc.get("target_modules") or []
    return {"targets": [targets] if isinstance(targets, str) else sorted(targets), "r": int(pc.get("r", 8)),
            "alpha": float(pc.get("lora_alpha", 8)), "dropout": float(pc.get("lora_dropout", 0.0)),
            "rslora": bool(pc.get("use_rslora", False))}


def _same(name: str, a, b) -> bool:
    if name == "targets":
        return set(a) == set(b)
    if name in ("alpha", "dropout"):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def honour_init_adapter(cfg: RunConfig, explicit: set[str] | None = None) -> tuple[RunConfig, list[str]]:
    """A stage that continues `cfg.init_adapter` trains that adapter as saved: its targets, r, alpha, dropout
    and rsLoRA scale, whatever `cfg.lora` says. So a `lora.*` value the user set (`explicit`: the dotted keys
    of the command's YAML and overrides; None = every field, as for a config built in code) that differs from
    the adapter's is an error naming both; one left at its default is replaced by the adapter's value, so the
    run's config.yaml records what ran. Returns (the config to run, notices about replaced values)."""
    if not cfg.init_adapter:
        return cfg, []
    have = _adapter_lora(Path(cfg.init_adapter))
    if have is None:
        return cfg, []
    lora, notes = dataclasses.replace(cfg.lora), []
    for name in _ADAPTER_KEYS:
        mine, theirs = getattr(lora, name), have[name]
        if _same(name, mine, theirs):
            continue
        show = (lambda v: ",".join(v)) if name == "targets" else str
        if explicit is None or "lora" in explicit or f"lora.{name}" in explicit:
            raise ConfigError(
                f"lora.{name}={show(mine)}, but init_adapter {cfg.init_adapter} was trained with {name} "
                f"{show(theirs)} (adapter_config.json {_ADAPTER_KEYS[name]}): a continued adapter keeps its own "
                f"LoRA settings. Drop lora.{name} (or set it to {show(theirs)}), or train a fresh adapter without "
                "init_adapter")
        setattr(lora, name, theirs)
        notes.append(f"lora.{name}={show(theirs)} (from {cfg.init_adapter}; the default was {show(mine)})")
    return (dataclasses.replace(cfg, lora=lora) if notes else cfg), notes


def run_stage(cfg: RunConfig, stage: str, resume: bool = False, extra_callbacks: list | None = None,
              explicit: set[str] | None = None) -> Path:
    """Run stage `general` (ν) or `domain` (μ) into cfg.out; returns the run directory. `explicit`: the
    config keys the user set (see honour_init_adapter; None = all of them)."""
    if stage not in ("general", "domain"):
        raise ValueError(f"stage must be 'general' or 'domain', got {stage!r}")
    cfg, notes = honour_init_adapter(cfg, explicit)
    if notes and _rank() == 0:
        print("hlora: the init adapter's LoRA settings apply: " + "; ".join(notes), file=sys.stderr)
    out = Path(cfg.out)
    if _rank() != 0:  # under torchrun only rank 0 owns the run directory; the others train alongside
        return _run(cfg, stage, out, resume, extra_callbacks or [])
    fresh = prepare_run_dir(out, resume, cfg)
    try:
        return _run(cfg, stage, out, resume, extra_callbacks or [])
    except KeyboardInterrupt:
        raise  # interrupted, not failed: the run directory stays for --resume
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)  # a failed fresh run leaves nothing behind
        raise


def _run(cfg: RunConfig, stage: str, out: Path, resume: bool, extra_callbacks: list) -> Path:
    if _rank() == 0:
        write_text(out / "config.yaml", dump_yaml(cfg))
    base, tok, _ = load_model(cfg.model)
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    method = build_method(cfg.method, stage_context(cfg, stage, tok, out))
    model = method.attach(base)
    method.setup(model)
    for cb in extra_callbacks:  # a callback that steers the method (budget.dual.DualController) binds to it
        if hasattr(cb, "bind"):
            cb.bind(method, model, tok, out)
    task = get_task(cfg.data)
    ds = method.train_dataset(pack(tok, task.train_texts(cfg.train.max_examples), cfg.train.seq_len, cfg.data))
    setup_seconds = time.perf_counter() - t0

    stats = StepStats()
    model.train()
    resume_from = _latest_checkpoint(out) if resume else None
    clock = TrainClock(resume_from)
    trainer = PenaltyTrainer(
        model=model, args=_training_args(cfg, out, ds), train_dataset=ds,
        callbacks=[JsonlLogger(out / "log.jsonl", stats), Snapshots(out, cfg.train.snapshot_steps),
                   *method.callbacks(), *extra_callbacks, clock],
        loss_fn=method.loss, stats=stats,
    )
    trainer.remove_callback(PrinterCallback)  # log.jsonl has the per-step numbers; no dicts on stdout
    clock.t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = clock.seconds()

    if not trainer.is_world_process_zero():
        return out
    t = cfg.train
    steps = trainer.state.global_step
    summary = {"stage": stage, "method": cfg.method.name, "steps": steps, "train_seconds": train_seconds,
               "setup_seconds": setup_seconds,
               "tokens": steps * t.batch_size * t.grad_accum * t.seq_len * max(1, trainer.args.world_size),
               "data": ds.description, "base_model": cfg.model.name, "model_hash": model_fingerprint(model)}
    summary.update(method.save(model, out, summary))
    # Tokens by kind: the stage's own data is general text (a `text` task) or domain data; a method adds the
    # general tokens it mixed in (replay: they take part of each batch) or trained on besides (kl_general).
    own = summary["tokens"] - method.costs.replaced_tokens
    summary["costs"] = {**method.costs.as_dict(),
                        "domain_tokens": 0 if task.kind == "text" else own,
                        "general_tokens": method.costs.general_tokens + (own if task.kind == "text" else 0)}
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: checkpoints are no longer needed
    write_text(out / "DONE", "")
    return out
