"""WiSE-FT: evaluating with the adapter's ΔW scaled by α equals a model whose B is scaled by α."""
from __future__ import annotations

import copy

import pytest
import torch

from hlora.config import LoraConfig, method_config
from hlora.lora import lora_modules
from hlora.methods import StageContext, build_method
from hlora.model import attach_lora
from hlora.tiny import TINY_TARGETS, tiny_model


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_scaled_adapter_equals_scaled_update(arch):
    model = attach_lora(tiny_model(arch), LoraConfig(targets=TINY_TARGETS[arch], r=4, alpha=8, dropout=0.0)).eval()
    with torch.no_grad():
        for r in lora_modules(model):
            r.B.normal_(0, 0.3)
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for r in lora_modules(scaled):
            r.B.mul_(0.25)
    method = build_method(method_config("wise", alpha=0.25), StageContext(stage="domain"))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with method.evaluation(model) as m:
            got = m(input_ids=ids).logits
        want = scaled(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, full, atol=1e-3)
        assert torch.equal(model(input_ids=ids).logits, full)  # the scale is restored afterwards
        with build_method(method_config("wise", alpha=0.0), StageContext(stage="domain")).evaluation(model) as m:
            with model.disable_adapter():
                base = model(input_ids=ids).logits
            assert torch.allclose(m(input_ids=ids).logits, base, atol=1e-6)


def test_alpha_out_of_range():
    model = attach_lora(tiny_model("tiny-llama"), LoraConfig(targets=["q_proj"], r=2, alpha=2))
    with pytest.raises(ValueError, match="alpha must be in"):
        with build_method(method_config("wise", alpha=1.5), StageContext(stage="domain")).evaluation(model):
            pass
