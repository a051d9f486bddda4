"""CorDA-KPM: the model is unchanged at initialisation, and the converted adapter on the *pretrained* weights
reproduces the trained model (which lives on CorDA's rewritten residual weights)."""
from __future__ import annotations

import torch

from hlora.config import LoraConfig, RunConfig, apply_overrides, method_config
from hlora.data.packing import general_pool
from hlora.methods import StageContext, build_method
from hlora.model import load_adapter
from hlora.tiny import tiny_model, tiny_tokenizer


def test_corda_init_preserves_the_model_and_conversion_reproduces_training(tmp_path, embedded_data):
    torch.manual_seed(0)
    run = RunConfig(lora=LoraConfig(targets=["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0))
    pool = general_pool(tiny_tokenizer(), "wikitext", 32)
    method = build_method(method_config("corda_kpm", covariance_examples=8),
                          StageContext(stage="domain", run=run, out=tmp_path, general_pool=lambda: pool))
    ids = pool[3]["input_ids"][None]
    before = tiny_model("tiny-llama").eval()(input_ids=ids).logits
    model = method.attach(tiny_model("tiny-llama"))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-4)  # W − ΔW_init + ΔW_init = W
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for i in range(3):
        batch = pool[i]["input_ids"][None]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    assert not torch.allclose(trained, before, atol=1e-3)
    method.save(model, tmp_path, {})
    assert not any(p.name.startswith("corda_init") for p in tmp_path.iterdir())  # the initial adapter is gone
    restored = load_adapter(tiny_model("tiny-llama"), tmp_path / "adapter").eval()  # the pretrained weights
    assert restored.peft_config["default"].r == 8  # rank 2r: ΔW_final − ΔW_init
    with torch.no_grad():
        assert torch.allclose(restored(input_ids=ids).logits, trained, atol=1e-4)
    cfg = apply_overrides(run, ["init_adapter=x"])
    try:
        build_method(method_config("corda_kpm"), StageContext(stage="domain", run=cfg)).attach(tiny_model("tiny-llama"))
    except ValueError as e:
        assert "cannot continue init_adapter" in str(e)
    else:
        raise AssertionError("corda_kpm must refuse init_adapter")
