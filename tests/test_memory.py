"""The memory plan (hlora.memory) against reality: parameter counts and module shapes of models built from the same
configs, and the bytes the tensors of a real SI recorder, HLoRA penalty and EWC penalty hold on the tiny models."""
import json
import struct

import pytest
import torch

from hlora import lora
from hlora.config import LoraConfig
from hlora.importance import Importance
from hlora.memory import KNOWN_CONFIGS, arch, held_bytes, load_config, plan, plans, setting
from hlora.model import attach_lora
from hlora.tiny import tiny_model

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]


def _meta_model(cfg: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))


# Small configs of every architecture the plan computes by hand, with the options that change the count.
SMALL = [
    {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False,
     "attention_bias": True, "mlp_bias": True},
    {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100},
    {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True},
    {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 100},
    {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
     "num_attention_heads": 4, "vocab_size": 100},
    {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 40, "vocab_size": 100},
]


@pytest.mark.parametrize("cfg", [*KNOWN_CONFIGS.values(), *SMALL], ids=[*KNOWN_CONFIGS, *(c["model_type"] for c in SMALL)])
def test_parameters_and_linear_shapes_match_the_model_built_from_the_config(cfg):
    model = _meta_model(cfg)
    a = arch(cfg)
    assert a.params == sum(p.numel() for p in model.parameters())
    # every linear of the blocks, by name: ΔW elements (out x in) per target as the plan counts them
    real: dict[str, int] = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if lora.block_index(name) >= 0 and w is not None and w.dim() == 2:
            real[name.rsplit(".", 1)[-1]] = real.get(name.rsplit(".", 1)[-1], 0) + w.numel()
    assert set(real) == set(a.linear_names())
    for t in a.linear_names():
        assert plan(cfg, [t], 4)["delta_w_elements"] == real[t], t


def test_shipped_configs_are_the_public_ones():
    p = plans(KNOWN_CONFIGS["llama-3-8b"])
    assert p["paper"]["model"]["params"] == 8_030_261_248
    assert p["all-linear"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert plan(KNOWN_CONFIGS["qwen2.5-7b"], setting_name="paper")["model"]["params"] == 7_615_616_512
    sm = plans(KNOWN_CONFIGS["smollm2-135m"])
    # the bench's measured storage (benchmarks/results/bench-smollm2-cpu.json): 134,515,008 parameters; q,v Ω
    # 13,271,040 elements; all linear 106,168,320 (the 425 MB, 79 % of a full fp32 Fisher of the issue)
    assert sm["paper"]["full_fisher_fp32_bytes"] == 538_060_032
    assert sm["paper"]["delta_w_elements"] == 13_271_040
    assert sm["all-linear"]["delta_w_elements"] == 106_168_320
    assert round(sm["all-linear"]["storage_ratio"]["float32"], 3) == 0.789
    assert round(sm["all-linear"]["storage_ratio"]["bfloat16"], 3) == 0.395


def _one_step(model, rec=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    if rec is not None:
        rec.before_step(opt)
    opt.step()
    if rec is not None:
        rec.after_step()
    opt.zero_grad(set_to_none=True)
    return opt


def _lora_model(arch_name: str, name: str):
    base = tiny_model(arch_name)
    targets, r = setting(base.config, name)
    model = attach_lora(base, LoraConfig(targets=targets, r=r, dropout=0.0))
    with torch.no_grad():
        for ref in lora.lora_modules(model):
            ref.B.normal_(0, 1e-2)
    return model, base.config, targets, r


# CPU: one module per group (lora.CPU_CHUNK_ELEMENTS); 3100: the GPU's grouping at a scale the tiny models reach
# (several modules per group, e.g. tiny-llama's four 32 x 32 ΔW in groups of 3 and 1; the plan reads the same
# constant).
@pytest.fixture(params=["cpu-grouping", "gpu-grouping"])
def grouping(request, monkeypatch):
    if request.param == "gpu-grouping":
        monkeypatch.setattr(lora, "CPU_CHUNK_ELEMENTS", 3100)
    return request.param


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("name", ["paper", "all-linear"])
@pytest.mark.parametrize("grad,unclipped", [("paper", True), ("paper", False), ("exact", True)])
def test_recorder_holds_what_the_plan_says(arch_name, name, grad, unclipped, grouping):
    from hlora.si import SIRecorder

    model, cfg, targets, r = _lora_model(arch_name, name)
    rec = SIRecorder(model, grad=grad, unclipped=unclipped)
    _one_step(model, rec)
    _one_step(model, rec)
    p = plan(cfg, targets, r, grad=grad, unclipped=unclipped, device="cpu")
    assert held_bytes(rec) == p["recorder"]["held_bytes"]
    rec.consolidate()
    assert held_bytes(rec) == p["recorder"]["held_after_consolidation_bytes"]
    rec.close()


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("name", ["paper", "all-linear"])
def test_adapter_and_penalties_hold_what_the_plan_says(arch_name, name, grouping):
    from hlora.methods.ewc import EWCPenalty
    from hlora.methods.hlora import HLoRAPenalty

    model, cfg, targets, r = _lora_model(arch_name, name)
    refs = lora.lora_modules(model)
    opt = _one_step(model)
    p = plan(cfg, targets, r, device="cpu")
    lora_params = [q for q in model.parameters() if q.requires_grad]
    assert p["modules"] == len(refs) and p["adapter"]["params"] == sum(q.numel() for q in lora_params)
    assert p["adapter"]["bytes"] == sum(q.numel() * q.element_size() for q in lora_params)
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert p["adapter"]["grad_adamw_bytes"] == p["adapter"]["bytes"] + moments  # + the gradients, same size

    g = torch.Generator().manual_seed(0)
    omega = {ref.name: torch.rand(ref.base_weight.shape, generator=g) for ref in refs}
    for penalty, key, kw in [
        (HLoRAPenalty(model, Importance(omega), reference="current"), "hlora_penalty", {}),
        (HLoRAPenalty(model, Importance(omega, {n: lora.delta_w(ref) for n, ref in zip(omega, refs)})),
         "hlora_penalty", {"reference": "full"}),
        (EWCPenalty(model, omega), "ewc_penalty", {}),
    ]:
        for _ in range(2):
            penalty.penalty().backward()
        assert held_bytes(penalty) == plan(cfg, targets, r, device="cpu", **kw)[key]["held_bytes"], key


def _data_bytes(path) -> int:
    raw = path.read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("arch_name", ARCHS)
@pytest.mark.parametrize("name", ["paper", "all-linear"])
def test_importance_file_size(arch_name, name, tmp_path):
    from hlora.si import SIRecorder

    model, cfg, targets, r = _lora_model(arch_name, name)
    imp = SIRecorder(model).importance()
    p = plan(cfg, targets, r)
    full = sum(q.numel() for q in tiny_model(arch_name).parameters()) * 4
    assert p["full_fisher_fp32_bytes"] == full
    for dt, nbytes in (("float32", 4), ("bfloat16", 2)):
        path = imp.save(tmp_path / f"{dt}.safetensors", dtype=dt, reference=False)
        assert _data_bytes(path) == p["delta_w_elements"] * nbytes  # the header is the plan's estimate
        assert abs(path.stat().st_size - p["importance_file"][f"{dt}_bytes"]) < 4096


def test_omega_in_bf16_is_within_its_rounding_bound(tmp_path):
    """bf16 keeps fp32's exponent and 8 significant bits: round-to-nearest moves each Ω by at most 2⁻⁸ of itself,
    over the whole heavy-tailed range SI produces (no scaling, unlike fp16). The penalty is a sum of Ω_i·D_i² ≥ 0
    terms, so with uniform layer weights it moves by at most 2⁻⁸ of itself too."""
    from hlora.methods.hlora import HLoRAPenalty

    model, _, _, _ = _lora_model("tiny-llama", "all-linear")
    refs = lora.lora_modules(model)
    g = torch.Generator().manual_seed(1)
    omega = {ref.name: torch.exp(torch.randn(ref.base_weight.shape, generator=g) * 12.0) for ref in refs}  # e^±60
    path = Importance(omega).save(tmp_path / "bf16.safetensors", dtype="bfloat16", reference=False)
    back = Importance.load(path)
    rel = max(float(((back.omega[n] - t).abs() / t).max()) for n, t in omega.items())
    assert 0 < rel <= 2.0**-8
    _one_step(model)
    vals = [float(HLoRAPenalty(model, imp, reference={n: torch.zeros_like(t) for n, t in omega.items()},
                               layer_weighting="uniform").penalty().detach()) for imp in (Importance(omega), back)]
    assert abs(vals[1] - vals[0]) <= 2.0**-8 * vals[0]


def test_plan_options_and_errors():
    cfg = KNOWN_CONFIGS["llama-3-8b"]
    base = plan(cfg, setting_name="all-linear")
    exact = plan(cfg, setting_name="all-linear", grad="exact")
    dw4 = 4 * base["delta_w_elements"]
    assert base["recorder"]["Omega_bytes"] == base["recorder"]["omega_bytes"] == dw4
    assert exact["recorder"]["exact_G_bytes"] == dw4 and base["recorder"]["exact_G_bytes"] == 0
    assert plan(cfg, setting_name="paper", dtype="float32")["model"]["bytes"] == 4 * 8_030_261_248
    assert base["hlora_penalty"]["held_bytes"] > 2 * dw4  # Ω and the kept G
    with pytest.raises(ValueError, match="not a linear module"):
        plan(cfg, ["c_attn"], 8)
    with pytest.raises(ValueError, match="unsupported model_type"):
        plan({"model_type": "mamba"}, ["x"], 8)


def test_cli_memory_plan(tmp_path, capsys):
    from hlora.cli import main

    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(KNOWN_CONFIGS["qwen2.5-7b"]))
    out = tmp_path / "plan.json"
    assert main(["bench", "--memory-plan", "--model-config", f"smollm2-135m,llama-3-8b,{cfg_file}",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| llama-3-8b | q,v r=8 |" in table and "| llama-3-8b | all linear r=16 |" in table
    res = json.loads(out.read_text())
    assert set(res) == {"smollm2-135m", "llama-3-8b", str(cfg_file)}
    assert set(res["smollm2-135m"]) == {"paper", "all-linear"}
    assert res[str(cfg_file)]["paper"]["model"]["params"] == 7_615_616_512
    assert main(["bench", "--memory-plan", "--model-config", "tiny-llama", "--targets", "q_proj,k_proj", "--r", "4",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tiny-llama"]["custom"]["targets"] == ["q_proj", "k_proj"]
    assert main(["bench", "--memory-plan", "--model-config", "llama-3-8b", "--targets", "c_attn"]) == 2


@pytest.mark.slow
@pytest.mark.smoke
def test_smollm2_config_from_the_gguf_is_the_shipped_one():
    from hlora.assets import SMOLLM2_GGUF, smollm2_gguf_dir

    from_gguf = load_config(str(smollm2_gguf_dir() / SMOLLM2_GGUF))  # the config in the GGUF's metadata, no weights
    assert plans(from_gguf) == plans(load_config("smollm2-135m"))
