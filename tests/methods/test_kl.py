"""KL-to-base: the term against an independent formula (separate base model, explicit sums), padding excluded."""
from __future__ import annotations

import json

import pytest
import torch

from hlora.config import LoraConfig, RunConfig, apply_overrides, method_config
from hlora.lora import lora_modules
from hlora.methods import StageContext, build_method
from hlora.methods.kl import kl_to_reference
from hlora.model import attach_lora
from hlora.tiny import TINY_TARGETS, tiny_model
from hlora.train import run_stage

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]


def _peft(arch):
    model = attach_lora(tiny_model(arch), LoraConfig(targets=TINY_TARGETS[arch], r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for r in lora_modules(model):
            r.B.copy_(torch.randn(r.B.shape, generator=g) * 0.2)
    return model


def _explicit_kl(p_logits, q_logits, mask):
    """Σ over masked positions of Σ_v p_v (log p_v − log q_v), / their count: written out, in float64."""
    total, n = 0.0, 0
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            if mask[b, t]:
                lp = torch.log_softmax(p_logits[b, t].double(), -1)
                lq = torch.log_softmax(q_logits[b, t].double(), -1)
                total += float((lp.exp() * (lp - lq)).sum())
                n += 1
    return total / n


def test_kl_to_reference_matches_explicit_sum():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert kl_to_reference(p, q, mask).item() == pytest.approx(_explicit_kl(p, q, mask), rel=1e-5)
    assert kl_to_reference(p, p, mask).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_kl_domain_term_is_beta_times_kl_to_a_separate_base_model(arch):
    model = _peft(arch)
    base = tiny_model(arch).eval()  # the same pretrained weights, a separate copy
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding in the first row: excluded
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    method = build_method(method_config("kl_domain", beta=0.3), StageContext(stage="domain"))
    method.setup(model)
    model.train()
    outputs = model(**inputs)
    term = method.loss(model, inputs, outputs)
    with torch.no_grad():
        want = 0.3 * _explicit_kl(base(input_ids=ids, attention_mask=mask).logits, outputs.logits, mask)
    assert term.item() == pytest.approx(want, rel=1e-4)
    assert model.training  # the base pass ran in eval mode and left the model as it was
    term.backward()
    assert all(r.B.grad is not None and r.B.grad.abs().sum() > 0 for r in lora_modules(model))
    assert method.costs.extra_forward_tokens == int(mask.sum())


def test_kl_needs_a_peft_model():
    method = build_method(method_config("kl_domain"), StageContext(stage="domain"))
    plain = tiny_model("tiny-llama")
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="PEFT model"):
        method.loss(plain, {"input_ids": ids}, plain(input_ids=ids))


@pytest.mark.parametrize("name", ["kl_general", "kl_domain"])
def test_kl_methods_train_end_to_end_and_count_their_cost(tmp_path, embedded_data, name):
    cfg = apply_overrides(RunConfig(), ["model.name=tiny-llama", "lora.r=4", "lora.alpha=16", "train.seq_len=32",
                                        "data=sciq", f"method.name={name}", "method.beta=1.0", "train.max_steps=2",
                                        "train.batch_size=2", f"out={tmp_path / name}"])
    out = run_stage(cfg, "domain")
    s = json.loads((out / "summary.json").read_text())
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["penalty"] > 0  # the KL is logged apart from the task loss
    general = 2 * 2 * 32 if name == "kl_general" else 0
    assert s["costs"]["general_tokens"] == general and s["costs"]["domain_tokens"] == 2 * 2 * 32
    assert s["costs"]["extra_forward_tokens"] == 2 * 2 * 32 * (2 if name == "kl_general" else 1)
