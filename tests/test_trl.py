"""Drop-in with TRL: PenaltyMixin on TRL's SFTTrainer carries HLoRA's penalty and the KL-to-base method."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")  # the test extras install it; a bare install of hlora does not need it
pytestmark = pytest.mark.slow  # TRL imports datasets and its trainers: the slow tier

from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hlora import HLoRACallback, HLoRAPenalty, PenaltyMixin, SIRecorder  # noqa: E402
from hlora.config import method_config  # noqa: E402
from hlora.lora import lora_modules  # noqa: E402
from hlora.methods import StageContext, build_method  # noqa: E402
from hlora.model import attach_lora  # noqa: E402
from hlora.config import LoraConfig  # noqa: E402
from hlora.tiny import tiny_model, tiny_tokenizer  # noqa: E402


class PenaltySFTTrainer(PenaltyMixin, SFTTrainer):
    pass


def _args(tmp_path, name):
    return SFTConfig(output_dir=str(tmp_path / name), max_length=32, per_device_train_batch_size=2, max_steps=3,
                     learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                     disable_tqdm=True, dataset_text_field="text", packing=False, seed=0)


def _data(text):
    return Dataset.from_dict({"text": [text] * 12})


def test_sft_trainer_with_hlora_penalty_and_kl(tmp_path):
    tok = tiny_tokenizer()
    model = attach_lora(tiny_model("tiny-llama"), LoraConfig(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0))
    # Stage ν with TRL: record importance through the callback.
    cb = HLoRACallback(SIRecorder(model))
    SFTTrainer(model=model, args=_args(tmp_path, "nu"), train_dataset=_data("Water boils at one hundred degrees."),
               processing_class=tok, callbacks=[cb]).train()
    assert int(cb.importance.metadata["steps"]) == 3 and any(v.sum() > 0 for v in cb.importance.omega.values())
    # Stage μ: the penalty enters the loss (logged apart) and holds ΔW near ΔW^ν.
    penalty = HLoRAPenalty(model, cb.importance, phi=10.0)
    t = PenaltySFTTrainer(model=model, args=_args(tmp_path, "mu"), train_dataset=_data("Mercury Venus Earth Mars."),
                          processing_class=tok, penalty_fn=penalty.penalty)
    t.train()
    assert t.state.global_step == 3 and penalty.penalty().item() > 0
    # KL-to-base as a method: its loss(model, inputs, outputs) is what the mixin adds.
    kl = build_method(method_config("kl_domain", beta=0.5), StageContext(stage="domain"))
    before = [r.B.detach().clone() for r in lora_modules(model)]
    t = PenaltySFTTrainer(model=model, args=_args(tmp_path, "kl"), train_dataset=_data("Photosynthesis makes energy."),
                          processing_class=tok, loss_fn=kl.loss)
    t.train()
    assert t.stats is not None and kl.costs.extra_forward_tokens > 0
    assert any(not torch.equal(b, r.B) for b, r in zip(before, lora_modules(model)))
