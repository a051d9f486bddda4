"""`HLoRACallback`: drives an `SIRecorder` (si.py) from inside transformers' Trainer, checks the order in which
the Trainer calls it, and saves / restores the recorder's state with the Trainer's checkpoints."""
from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .importance import Importance
from .lora import lora_modules
from .si import STATE_FILE, SIRecorder


def _order_error(what: str) -> str:
    import transformers

    return (f"HLoRACallback: {what}. The recorder relies on transformers 5.23's order (backward -> clip -> "
            f"on_pre_optimizer_step -> optimizer.step -> on_optimizer_step -> zero_grad); transformers "
            f"{transformers.__version__} differs. Install the tested versions (constraints.txt).")


class HLoRACallback(TrainerCallback):
    """Drives an SIRecorder from inside transformers' Trainer; `.importance` holds Ω after training.

    Order in transformers 5.23 `Trainer._inner_training_loop` / `_run_epoch`, per optimizer step:
    backward of every micro-batch -> clip_grad_norm_ (if max_grad_norm > 0; otherwise a norm with
    max=inf, which also unscales fp16 gradients) -> on_pre_optimizer_step -> optimizer.step() ->
    on_optimizer_step -> lr_scheduler.step() -> model.zero_grad() -> global_step += 1 -> on_step_end ->
    save (then on_save). So before_step runs in on_pre_optimizer_step, where the param group's lr is this
    step's and the gradients exist (the recorder's hooks copied them before clipping; with
    unclipped=False it reads the clipped ones the optimizer applies); after_step runs in on_optimizer_step
    (on_step_end would see zeroed gradients). The first step checks that order: a transformers release
    that calls these hooks elsewhere fails loudly instead of recording a wrong Ω.
    On resume the trainer state (global_step, epoch) and the adapter weights are restored before
    on_train_begin, which is where the recorder state is loaded back from checkpoint-<global_step>/.
    """

    def __init__(self, recorder: SIRecorder, consolidate: str = "end", state_file: str = STATE_FILE,
                 resume_dir: str | Path | None = None):
        if consolidate not in ("end", "epoch"):
            raise ValueError(f"consolidate must be 'end' or 'epoch', got {consolidate!r}")
        self.recorder = recorder
        self.consolidate = consolidate
        self.state_file = state_file
        self.resume_dir = resume_dir  # where checkpoint-<step>/ folders are (default: args.output_dir)
        self.importance: Importance | None = None
        self._order_checked = False

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # resuming from checkpoint-<global_step>
            ck = Path(self.resume_dir or args.output_dir) / f"checkpoint-{state.global_step}" / self.state_file
            if not ck.is_file():
                raise FileNotFoundError(
                    f"resuming at step {state.global_step} but {ck} is missing: the checkpoint was not written "
                    "with HLoRACallback, so the importance recorded so far is lost; restart the stage"
                )
            self.recorder.load_state(ck)
            # A checkpoint saved on an epoch's last step precedes that epoch's on_epoch_end.
            ep = state.epoch or 0.0
            if self.consolidate == "epoch" and self.recorder.steps_since > 0 and ep > 0 and abs(ep - round(ep)) < 1e-9:
                self.recorder.consolidate()

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("HLoRACallback needs the optimizer in on_pre_optimizer_step")
        if not self._order_checked and not any(p.grad is not None for r in lora_modules(self.recorder.model)
                                               for p in (r.A, r.B)):
            raise RuntimeError(_order_error("on_pre_optimizer_step saw no LoRA gradient"))
        self.recorder.before_step(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self._order_checked:
            moved = self.recorder.step_moved()
            self.recorder.after_step()
            if moved is False:
                raise RuntimeError(_order_error("on_optimizer_step came before the optimizer moved the adapter"))
            self._order_checked = moved is not None
        else:
            self.recorder.after_step()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.consolidate == "epoch":
            self.importance = self.recorder.consolidate()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.recorder.save_state(ck / self.state_file)

    def on_train_end(self, args, state, control, **kwargs):
        meta = {}
        if getattr(state, "num_input_tokens_seen", 0):
            meta["tokens"] = str(int(state.num_input_tokens_seen))
        self.importance = self.recorder.consolidate(meta)
