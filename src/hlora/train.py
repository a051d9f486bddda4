"""Run one stage with the transformers Trainer.

Stage ν (`general`): plain LoRA on general text; an HLoRACallback records SI importance.
Stage μ (`domain`): LoRA on a task; the method from the registry adds its penalty to the loss.
Nothing here branches on a method's name: a method is `penalty()` + `callbacks()`.

Run directory (DESIGN section 5): config.yaml, adapter/, importance.safetensors (stage ν),
log.jsonl, checkpoints/ (when train.save_steps > 0), DONE last. Every file is written atomically.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .config import RunConfig, dump_yaml
from .data import get_task
from .data.packing import PackedDataset, batches, pack
from .files import append_jsonl, atomic_dir, write_text
from .methods import StageContext, build_method
from .model import attach_lora, load_adapter, load_model, model_fingerprint


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
    """Adds a penalty to a transformers Trainer's loss; task loss and penalty are tracked apart.

    Mix it into any Trainer subclass (TRL's SFTTrainer too): `class T(PenaltyMixin, SFTTrainer)`.
    The penalty is scaled like the CE so that after gradient accumulation (and DDP averaging)
    its gradient enters each optimizer step exactly once.
    """

    def __init__(self, *args, penalty_fn=None, stats: StepStats | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty_fn = penalty_fn
        self.stats = stats or StepStats()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = out[0] if return_outputs else out
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
        if self.penalty_fn is not None and model.training:
            pen = self.penalty_fn()
            if pen is not None:
                p = pen.detach().float().item()
                if not math.isfinite(p):
                    raise TrainingError(f"penalty is {p} at step {self.state.global_step + 1}")
                self.stats.penalty += p / ga
                loss = loss + pen * share
        return (loss, out[1]) if return_outputs else loss


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


def _training_args(cfg: RunConfig, out: Path, n_examples: int) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.schedule,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        train_sampling_strategy="random" if t.shuffle else "sequential",
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_only_model=False,
        seed=t.seed,
        data_seed=t.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available() or cfg.model.device == "cpu",
        disable_tqdm=not os.environ.get("HLORA_PROGRESS", "1") == "1",
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


def _general_batches(cfg: RunConfig, tokenizer):
    def make():
        ds = pack(tokenizer, get_task(cfg.general_data).train_texts(), cfg.train.seq_len, cfg.general_data)
        return batches(ds, cfg.train.batch_size, limit=cfg.method.fisher_examples)

    return make


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_stage(cfg: RunConfig, stage: str, resume: bool = False, extra_callbacks: list | None = None) -> Path:
    """Run stage `general` (ν) or `domain` (μ) into cfg.out; returns the run directory."""
    if stage not in ("general", "domain"):
        raise ValueError(f"stage must be 'general' or 'domain', got {stage!r}")
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
    from .si import HLoRACallback, SIRecorder

    if _rank() == 0:
        write_text(out / "config.yaml", dump_yaml(cfg))
    model, tok, src = load_model(cfg.model, seed=cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    if cfg.init_adapter:
        model = load_adapter(model, cfg.init_adapter, trainable=True)
    else:
        model = attach_lora(model, cfg.lora)
    task = get_task(cfg.data)
    ds: PackedDataset = pack(tok, task.train_texts(cfg.train.max_examples), cfg.train.seq_len, cfg.data)

    stats = StepStats()
    callbacks: list = [JsonlLogger(out / "log.jsonl", stats)]
    penalty_fn = None
    recorder = None
    t0 = time.perf_counter()
    if stage == "general":
        ic = cfg.importance
        recorder = SIRecorder(model, xi=ic.xi, clamp=ic.clamp, grad=ic.grad)
        callbacks.append(HLoRACallback(recorder, consolidate=ic.consolidate))
    else:
        ctx = StageContext(model=model, importance_file=cfg.importance_file,
                           general_batches=_general_batches(cfg, tok))
        method = build_method(cfg.method, ctx)
        penalty_fn = method.penalty
        callbacks.extend(method.callbacks())
    setup_seconds = time.perf_counter() - t0

    model.train()
    trainer = PenaltyTrainer(
        model=model, args=_training_args(cfg, out, len(ds)), train_dataset=ds,
        callbacks=callbacks + extra_callbacks, penalty_fn=penalty_fn, stats=stats,
    )
    t1 = time.perf_counter()
    trainer.train(resume_from_checkpoint=_latest_checkpoint(out) if resume else None)
    train_seconds = time.perf_counter() - t1

    if not trainer.is_world_process_zero():
        return out
    with atomic_dir(out / "adapter") as tmp:
        model.save_pretrained(str(tmp))
    summary = {"stage": stage, "steps": trainer.state.global_step, "train_seconds": train_seconds,
               "setup_seconds": setup_seconds, "tokens": trainer.state.global_step * cfg.train.batch_size
               * cfg.train.grad_accum * cfg.train.seq_len * max(1, trainer.args.world_size),
               "data": ds.description, "base_model": cfg.model.name, "model_hash": model_fingerprint(model)}
    if recorder is not None:
        cb = next(c for c in callbacks if isinstance(c, HLoRACallback))
        imp = cb.importance
        imp.metadata.update({
            "base_model": cfg.model.name,
            "targets": ",".join(cfg.lora.targets), "r": str(cfg.lora.r), "alpha": str(cfg.lora.alpha),
            "rslora": str(cfg.lora.rslora), "xi": str(cfg.importance.xi), "clamp": cfg.importance.clamp,
            "grad": cfg.importance.grad, "steps": str(summary["steps"]), "tokens": str(summary["tokens"]),
            "data": json.dumps(ds.description), "seconds": f"{recorder.seconds:.4f}",
            "train_seconds": f"{train_seconds:.3f}",
        })
        # ΔW^ν is the adapter saved beside it (the domain stage starts from it): not stored twice.
        imp.save(out / "importance.safetensors", dtype=cfg.importance.dtype, reference=False)
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: checkpoints are no longer needed
    write_text(out / "DONE", "")
    return out
