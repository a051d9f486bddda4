"""Importance: the safetensors file format, checks against a model, norms and accumulation."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from hlora.config import LoraConfig
from hlora.importance import FORMAT_VERSION, Importance
from hlora.lora import block_index, lora_modules
from hlora.model import attach_lora
from hlora.si import SIRecorder
from hlora.tiny import TINY_TARGETS, tiny_model

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]


def make_model(arch: str, targets=None):
    return attach_lora(tiny_model(arch), LoraConfig(targets=targets or TINY_TARGETS[arch], r=4, alpha=8, dropout=0.0))


def recorded(model, steps: int = 2) -> Importance:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for r in lora_modules(model):
            r.B.copy_(torch.randn(r.B.shape, generator=g) * 0.05)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rec = SIRecorder(model)
    vocab = model.get_base_model().config.vocab_size
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 10), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    return rec.consolidate({"data": "random tokens"})


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_fp32(arch, tmp_path):
    model = make_model(arch)
    imp = recorded(model)
    path = imp.save(tmp_path / "importance.safetensors")
    back = Importance.load(path)
    assert back.names == imp.names
    for n in imp.names:
        assert back.omega[n].dtype == torch.float32
        assert torch.equal(back.omega[n], imp.omega[n])
        assert torch.equal(back.reference[n], imp.reference[n])
        assert tuple(back.omega[n].shape) == tuple(dict((r.name, r.base_weight.shape) for r in lora_modules(model))[n])
    m = back.metadata
    assert m["version"] == FORMAT_VERSION and m["kind"] == "si" and m["dtype"] == "float32"
    assert m["xi"] == repr(1e-9) and m["clamp"] == "step" and m["grad"] == "paper" and m["steps"] == "2"
    assert m["r"] == "4" and m["alpha"] == "8" and m["rslora"] == "False" and m["data"] == "random tokens"
    assert set(m["targets"].split(",")) == set(TINY_TARGETS[arch])
    assert m["model_hash"] and "base_model" in m
    back.check_against(model)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_half(tmp_path, dtype):
    model = make_model("tiny-llama")
    imp = recorded(model)
    name = imp.names[0]
    imp.omega[name] = imp.omega[name] * 1e6  # beyond fp16's range (65504): stored rescaled
    assert float(imp.omega[name].max()) > 7e4
    path = imp.save(tmp_path / "half.safetensors", dtype=dtype)
    back = Importance.load(path)
    assert back.metadata["dtype"] == dtype
    for n in imp.names:
        assert back.omega[n].dtype == torch.float32
        assert torch.isfinite(back.omega[n]).all()
        tol = 1e-3 if dtype == "float16" else 8e-3
        assert torch.allclose(back.omega[n], imp.omega[n], rtol=tol, atol=1e-6 * float(imp.omega[n].max()))
        assert torch.equal(back.reference[n], imp.reference[n])  # references stay fp32
    fp32 = imp.save(tmp_path / "full.safetensors")
    omega_bytes = sum(t.numel() for t in imp.omega.values())
    ref_bytes = sum(t.numel() * 4 for t in imp.reference.values())
    assert path.stat().st_size < fp32.stat().st_size - omega_bytes * 2 + 4096
    assert imp.nbytes == omega_bytes * 4 + ref_bytes
    small = Importance({"a": torch.rand(3, 3), "b": torch.rand(3, 3) * 1e9})
    kept = Importance.load(small.save(tmp_path / "s.safetensors", dtype=dtype), dtype=None)
    assert kept.omega["a"].dtype == getattr(torch, dtype)  # as stored ...
    assert kept.omega["b"].dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)  # ... unless rescaled
    assert torch.allclose(kept.omega["b"].float(), small.omega["b"], rtol=8e-3)


def _bigger_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return attach_lora(LlamaForCausalLM(cfg), LoraConfig(targets=["q_proj", "v_proj"], r=4, dropout=0.0))


def test_other_models_importance_names_module_and_shapes(tmp_path):
    path = recorded(make_model("tiny-llama")).save(tmp_path / "importance.safetensors")
    imp = Importance.load(path)
    with pytest.raises(ValueError) as e:
        imp.check_against(_bigger_llama())
    msg = str(e.value)
    assert "base_model.model.model.layers.0.self_attn.q_proj" in msg
    assert "(64, 64)" in msg and "(32, 32)" in msg and "importance.safetensors" in msg


def test_missing_and_extra_modules(tmp_path):
    imp = recorded(make_model("tiny-llama"))  # q_proj and v_proj
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.v_proj.*not a LoRA module"):
        imp.check_against(make_model("tiny-llama", targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.k_proj.*no importance tensor"):
        imp.check_against(make_model("tiny-llama", targets=["q_proj", "k_proj", "v_proj"]))
    with pytest.raises(ValueError, match="no importance tensor"):
        imp.check_against(make_model("tiny-gpt2"))
    imp.check_against(make_model("tiny-llama"))
    with pytest.raises(ValueError, match="model_hash|recorded on model"):
        imp.check_against(make_model("tiny-llama"), model_hash="0000")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Importance.load(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        Importance.load(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(plain))
    with pytest.raises(ValueError, match="not an hlora importance file"):
        Importance.load(plain)
    future = tmp_path / "future.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(future), metadata={"format": "hlora-importance", "version": "99"})
    with pytest.raises(ValueError, match="version 99"):
        Importance.load(future)
    orphan = tmp_path / "orphan.safetensors"
    save_file({"w::reference": torch.zeros(2, 2)}, str(orphan), metadata={"format": "hlora-importance", "version": "1"})
    with pytest.raises(ValueError, match="reference"):
        Importance.load(orphan)
    with pytest.raises(ValueError, match="dtype"):
        Importance({"w": torch.ones(2)}).save(tmp_path / "x.safetensors", dtype="int8")
    with pytest.raises(ValueError, match="shape"):
        Importance({"w": torch.ones(2)}, {"w": torch.ones(3)})


def test_layer_norms():
    omega = {
        "base_model.model.model.layers.0.self_attn.q_proj": torch.full((2, 2), 1.0),
        "base_model.model.model.layers.0.self_attn.v_proj": torch.full((1, 4), 2.0),
        "base_model.model.model.layers.1.self_attn.q_proj": torch.full((3, 3), 3.0),
    }
    imp = Importance(omega)
    mod = imp.layer_norms()
    assert mod == pytest.approx({n: float(t.norm()) for n, t in omega.items()})
    blk = imp.layer_norms("block")
    assert set(blk) == {0, 1}
    assert blk[0] == pytest.approx(math.sqrt(4 * 1 + 4 * 4))
    assert blk[1] == pytest.approx(9.0)
    assert all(block_index(n) in blk for n in omega)
    with pytest.raises(ValueError):
        imp.layer_norms("layer")


def test_accumulate_sums_general_stages(tmp_path):
    model = make_model("tiny-gpt-neox")
    a = recorded(model)
    b = recorded(model, steps=3)
    want = {n: a.omega[n] + b.omega[n] for n in a.names}
    a.accumulate(b)
    for n in a.names:
        assert torch.allclose(a.omega[n], want[n])
        assert torch.equal(a.reference[n], b.reference[n])  # the later stage's ΔW
    assert a.metadata["steps"] == "5" and a.metadata["stages"] == "2"
    back = Importance.load(a.save(tmp_path / "sum.safetensors"))
    assert back.metadata["stages"] == "2"
    with pytest.raises(ValueError, match="different modules"):
        a.accumulate(recorded(make_model("tiny-llama")))
    fisher = Importance(a.omega, None, {"kind": "fisher"})
    with pytest.raises(ValueError, match="fisher"):
        a.accumulate(fisher)


def test_metadata_is_strings_only(tmp_path):
    imp = Importance({"m": torch.ones(2, 2)}, None, {"steps": 3, "tokens": 100, "note": json.dumps({"a": 1})})
    back = Importance.load(imp.save(tmp_path / "m.safetensors", dtype=torch.float16))
    assert back.metadata["steps"] == "3" and back.metadata["tokens"] == "100"
    assert json.loads(back.metadata["note"]) == {"a": 1}
    assert back.metadata["dtype"] == "float16"
