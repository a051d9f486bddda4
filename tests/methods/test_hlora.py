"""HLoRAPenalty (paper eqs. 14–16): value and gradients against an independent formula, layer weights."""
from __future__ import annotations

import math

import pytest
import torch

import hlora.lora as lora
from hlora.config import ConfigError, LoraConfig, RunConfig, method_config
from hlora.importance import Importance
from hlora.lora import block_index, lora_modules
from hlora.methods import REGISTRY, StageContext, build_method
from hlora.methods.hlora import HLoRAConfig, HLoRAPenalty
from hlora.model import attach_lora
from hlora.si import SIRecorder
from hlora.tiny import TINY_TARGETS, tiny_model

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]
N_BLOCKS = 2  # tiny models have two transformer blocks


def make_model(arch: str, seed: int = 0):
    model = attach_lora(tiny_model(arch, seed=seed), LoraConfig(targets=TINY_TARGETS[arch], r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for ref in lora_modules(model):
            ref.B.copy_(torch.randn(ref.B.shape, generator=g) * 0.05)
    return model.eval()


def recorded(model, steps: int = 3) -> Importance:
    """A real SI importance from a few AdamW steps on random tokens."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rec = SIRecorder(model)
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 12), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    return rec.consolidate()


def synthetic(model, seed: int = 0, spread: float = 1.0) -> Importance:
    """Random positive Ω (per-module magnitudes spread over `spread` decades) and a random reference."""
    g = torch.Generator().manual_seed(seed)
    omega, ref = {}, {}
    for i, r in enumerate(lora_modules(model)):
        shape = r.base_weight.shape
        omega[r.name] = torch.rand(shape, generator=g) * 10 ** (spread * i / 4)
        ref[r.name] = torch.randn(shape, generator=g) * 0.01
    return Importance(omega, ref, {"kind": "si"})


@pytest.fixture(params=["per-module", "stacked"])
def grouping(request, monkeypatch):
    """One module per group (the CPU default) and equal shapes stacked (the GPU default)."""
    if request.param == "stacked":
        monkeypatch.setattr(lora, "CPU_CHUNK_ELEMENTS", lora.CHUNK_ELEMENTS)
    return request.param


def independent_penalty(model, imp: Importance, weights: dict[str, float], phi: float) -> torch.Tensor:
    """φ Σ_l w_l Σ_i Ω (ΔW − ΔW^ν)², written directly with autograd in the base weight layout."""
    total = 0.0
    for r in lora_modules(model):
        dw = r.scale * (r.B @ r.A)
        if r.fan_in_fan_out:
            dw = dw.T
        total = total + weights[r.name] * (imp.omega[r.name] * (dw - imp.reference[r.name]) ** 2).sum()
    return phi * total


def softmax_weights(model, imp: Importance, scale: float, group: str) -> dict[str, float]:
    refs = lora_modules(model)
    if group == "module":
        norms = {r.name: math.sqrt(float((imp.omega[r.name].double() ** 2).sum())) for r in refs}
        z = sum(math.exp(v * scale) for v in norms.values())
        return {n: math.exp(v * scale) / z for n, v in norms.items()}
    sq: dict[int, float] = {}
    for r in refs:
        sq[block_index(r.name)] = sq.get(block_index(r.name), 0.0) + float((imp.omega[r.name].double() ** 2).sum())
    z = sum(math.exp(math.sqrt(v) * scale) for v in sq.values())
    return {r.name: math.exp(math.sqrt(sq[block_index(r.name)]) * scale) / z for r in refs}


@pytest.mark.parametrize("arch", ARCHS)
def test_penalty_is_zero_at_reference(arch, grouping):
    model = make_model(arch)
    imp = recorded(model)
    pen = HLoRAPenalty(model, imp, phi=1.0, layer_scale="auto")
    assert pen.penalty().item() == 0.0
    model.zero_grad(set_to_none=True)
    pen.penalty().backward()
    for r in lora_modules(model):
        assert float(r.A.grad.abs().max()) == 0.0 and float(r.B.grad.abs().max()) == 0.0
    with torch.no_grad():
        lora_modules(model)[0].B.add_(0.01)
    assert pen.penalty().item() > 0.0
    # reference="current" means "ΔW now"
    assert HLoRAPenalty(model, imp, reference="current").penalty().item() == 0.0


def test_missing_reference_must_be_the_recorded_adapter():
    """Without ΔW^ν in the file the adapter as it stands is the reference: it must be the adapter the
    importance was recorded against (adapter_hash); another one (a forgotten --init-adapter) is refused."""
    model = make_model("tiny-llama")
    imp = recorded(model)
    no_ref = Importance(imp.omega, None, imp.metadata)
    assert HLoRAPenalty(model, no_ref).penalty().item() == 0.0
    with torch.no_grad():
        lora_modules(model)[0].B.add_(0.01)
    with pytest.raises(ValueError, match=f"recorded against adapter {imp.metadata['adapter_hash']}, but the model's "
                                         "adapter is [0-9a-f]{16}"):
        HLoRAPenalty(model, no_ref)
    fresh = attach_lora(tiny_model("tiny-llama"), LoraConfig(targets=TINY_TARGETS["tiny-llama"], r=4, alpha=8))
    with pytest.raises(ValueError, match="--init-adapter"):
        HLoRAPenalty(fresh, no_ref)


@pytest.mark.parametrize(
    "weighting,scale,group",
    [("softmax", "auto", "module"), ("softmax", "auto", "block"), ("softmax", 1e-8, "module"), ("uniform", 1e-8, "module")],
)
@pytest.mark.parametrize("arch", ARCHS)
def test_penalty_value_and_gradients_match_independent_formula(arch, weighting, scale, group,
                                                                 grouping):
    model = make_model(arch)
    imp = synthetic(model, spread=1.0)
    phi = 0.37
    pen = HLoRAPenalty(model, imp, phi=phi, layer_weighting=weighting, layer_scale=scale, layer_group=group)
    if weighting == "uniform":
        weights = {r.name: 1.0 / len(lora_modules(model)) for r in lora_modules(model)}
    else:
        norms = [math.sqrt(float((t.double() ** 2).sum())) for t in imp.omega.values()]
        if group == "block":
            per_block: dict[int, float] = {}
            for n, t in imp.omega.items():
                per_block[block_index(n)] = per_block.get(block_index(n), 0.0) + float((t.double() ** 2).sum())
            norms = [math.sqrt(v) for v in per_block.values()]
        s = 1.0 / (sum(norms) / len(norms)) if scale == "auto" else scale
        weights = softmax_weights(model, imp, s, group)
    got_w = pen.layer_weights()
    for n, w in weights.items():
        assert got_w[n] == pytest.approx(w, rel=1e-9)

    params = [p for r in lora_modules(model) for p in (r.A, r.B)]
    val = pen.penalty()
    got = torch.autograd.grad(val, params)
    want_val = independent_penalty(model, imp, weights, phi)
    want = torch.autograd.grad(want_val, params)
    assert val.item() == pytest.approx(want_val.item(), rel=1e-5)
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) < 1e-5


def test_penalty_with_recorded_importance_matches_formula():
    """Same check on real SI Ω (wide dynamic range) after the adapter has moved away from ΔW^ν."""
    model = make_model("tiny-gpt2")
    imp = recorded(model)
    with torch.no_grad():
        for r in lora_modules(model):
            r.A.mul_(1.01)
    pen = HLoRAPenalty(model, imp, phi=1e-3, layer_scale=1e-8)
    weights = pen.layer_weights()
    params = [p for r in lora_modules(model) for p in (r.A, r.B)]
    val = pen.penalty()
    got = torch.autograd.grad(val, params)
    want_val = independent_penalty(model, imp, weights, 1e-3)
    want = torch.autograd.grad(want_val, params)
    assert val.item() > 0 and val.item() == pytest.approx(want_val.item(), rel=1e-5)
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_weights(arch):
    model = make_model(arch)
    imp = synthetic(model, spread=2.0)
    names = [r.name for r in lora_modules(model)]
    per_block = len(names) // N_BLOCKS

    w = HLoRAPenalty(model, imp, layer_scale="auto").layer_weights()
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert max(w.values()) > 1.5 * min(w.values())  # "auto" is scale-free: Ω norms spread -> weights differ
    w = HLoRAPenalty(model, imp, layer_scale=1e-8).layer_weights()  # reference code's scale: ~uniform here
    assert sum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert max(w.values()) == pytest.approx(1.0 / len(names), rel=1e-5)

    wb = HLoRAPenalty(model, imp, layer_scale="auto", layer_group="block").layer_weights()
    blocks = {block_index(n): wb[n] for n in names}
    assert sum(blocks.values()) == pytest.approx(1.0, abs=1e-12)
    for n in names:
        assert wb[n] == blocks[block_index(n)]

    # the "-layer" ablation: equal weights that sum to 1 like the softmax's (1/M over the M weighted modules;
    # the reference code's 1/L per module would sum to the modules per block and scale φ by it)
    wu = HLoRAPenalty(model, imp, layer_weighting="uniform").layer_weights()
    assert all(v == 1.0 / len(names) for v in wu.values())
    assert sum(wu.values()) == pytest.approx(1.0)
    wub = HLoRAPenalty(model, imp, layer_weighting="uniform", layer_group="block").layer_weights()
    assert all(v == 1.0 / N_BLOCKS for v in wub.values()) and per_block * N_BLOCKS == len(names)


def test_penalty_pulls_back_to_reference():
    model = make_model("tiny-llama")
    imp = recorded(model)
    with torch.no_grad():
        for r in lora_modules(model):
            r.B.add_(0.02)
    pen = HLoRAPenalty(model, imp, phi=1.0, layer_scale="auto")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    start = pen.penalty().item()
    for _ in range(5):
        opt.zero_grad()
        pen.penalty().backward()
        opt.step()
    assert pen.penalty().item() < start


def test_registry_build(tmp_path):
    model = make_model("tiny-llama")
    path = tmp_path / "importance.safetensors"
    recorded(model).save(path)
    assert "hlora" in REGISTRY
    cfg = method_config("hlora", phi=0.5, layer_weighting="softmax", layer_scale="auto", layer_group="block")
    assert isinstance(cfg, HLoRAConfig)

    def build(c, m=model, f=str(path)):
        method = build_method(c, StageContext(stage="domain", run=RunConfig(importance_file=f)))
        method.setup(m)
        return method

    method = build(cfg)
    assert method.callbacks() == []
    assert method.penalty.phi == 0.5 and method.penalty.layer_group == "block"
    assert method.loss(model, {}, None).item() == 0.0  # the file's reference is the adapter as it stands
    with pytest.raises(ValueError, match="importance_file"):
        build(cfg, f="")
    other = make_model("tiny-gpt2")
    with pytest.raises(ValueError, match="importance"):
        build(cfg, m=other)
    with pytest.raises(ValueError, match="layer_scale"):
        build(method_config("hlora", layer_scale="big"))
    with pytest.raises(ValueError, match="layer_weighting"):
        build(method_config("hlora", layer_weighting="max"))
    with pytest.raises(ConfigError, match="unknown key 'lam'"):
        method_config("hlora", lam=1.0)  # another method's field is an error, not ignored


def test_stage_nu_records_importance_and_stage_mu_penalises(tmp_path):
    """HLoRA's two halves are one method: in stage ν it brings the recorder's callback and saves the importance
    beside the adapter; in stage μ its loss is the penalty."""
    model = make_model("tiny-llama")
    run = RunConfig(lora=LoraConfig(targets=TINY_TARGETS["tiny-llama"], r=4, alpha=8))
    nu = build_method(method_config("hlora"), StageContext(stage="general", run=run, model_name="tiny-llama"))
    nu.setup(model)
    (cb,) = nu.callbacks()
    assert nu.loss(model, {}, None) is None
    cb.importance = recorded(model)
    info = nu.save(model, tmp_path, {"steps": 3, "tokens": 96, "data": {"data": "x"}})
    imp = Importance.load(tmp_path / "importance.safetensors")
    assert info["importance_bytes"] == (tmp_path / "importance.safetensors").stat().st_size
    assert imp.metadata["steps"] == "3" and imp.metadata["base_model"] == "tiny-llama" and not imp.reference
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    mu = build_method(method_config("hlora", phi=2.0), StageContext(
        stage="domain", run=RunConfig(importance_file=str(tmp_path / "importance.safetensors"))))
    mu.setup(model)
    with torch.no_grad():
        lora_modules(model)[0].B.add_(0.01)
    assert mu.callbacks() == [] and mu.loss(model, {}, None).item() > 0


def test_mean_normalised_omega_is_scale_free():
    """omega_norm="mean": Ω / mean(Ω) over every element, so scaling Ω by any factor leaves the penalty alone."""
    model = make_model("tiny-llama")
    imp = synthetic(model, spread=1.0)
    big = Importance({k: v * 1e6 for k, v in imp.omega.items()}, imp.reference, imp.metadata)
    with torch.no_grad():
        lora_modules(model)[1].B.add_(0.01)
    a = HLoRAPenalty(model, imp, phi=0.3, omega_norm="mean").penalty()
    b = HLoRAPenalty(model, big, phi=0.3, omega_norm="mean").penalty()
    mean = sum(float(v.double().sum()) for v in imp.omega.values()) / sum(v.numel() for v in imp.omega.values())
    plain = HLoRAPenalty(model, imp, phi=0.3 / mean).penalty()
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and a.item() == pytest.approx(plain.item(), rel=1e-5)


def test_penalty_buffers_follow_the_model(tmp_path):
    """Built on one device, the penalty follows the adapter when the model moves (a DDP rank's GPU); the meta
    device stands in for a second device on a CPU-only machine."""
    model = make_model("tiny-llama")
    pen = HLoRAPenalty(model, synthetic(model), phi=1.0)
    model.to("meta")
    val = pen.penalty()
    assert val.device.type == "meta" and pen.omega_0.device.type == "meta"


def test_clipped_omega_caps_the_tail_and_weights_follow_it():
    """omega_clip caps Ω (after mean normalisation); the layer weights come from the Ω the penalty uses."""
    model = make_model("tiny-llama")
    imp = synthetic(model, spread=2.0)
    with torch.no_grad():
        lora_modules(model)[2].B.add_(0.01)
    mean = sum(float(v.double().sum()) for v in imp.omega.values()) / sum(v.numel() for v in imp.omega.values())
    capped = Importance({k: (v / mean).clamp(max=1.5) for k, v in imp.omega.items()}, imp.reference, imp.metadata)
    pen = HLoRAPenalty(model, imp, phi=0.7, omega_norm="mean", omega_clip=1.5, layer_scale="auto")
    want = HLoRAPenalty(model, capped, phi=0.7, layer_scale="auto")
    assert pen.penalty().item() == pytest.approx(want.penalty().item(), rel=1e-5)
    for n, w in want.layer_weights().items():
        assert pen.layer_weights()[n] == pytest.approx(w, rel=1e-6)
    with pytest.raises(ValueError, match="omega_clip"):
        HLoRAPenalty(model, imp, omega_clip=-1)


def test_kept_buffers_give_the_same_gradients_when_graphs_overlap():
    """D and G live across steps (lora.WorkBuffers); a second penalty() before the first one's backward must
    not overwrite the G that backward needs, and a later step reuses the kept memory."""
    model = make_model("tiny-llama")
    imp = synthetic(model)
    with torch.no_grad():
        for r in lora_modules(model):
            r.A.mul_(1.3)
    pen = HLoRAPenalty(model, imp, phi=0.5)
    params = [p for r in lora_modules(model) for p in (r.A, r.B)]
    want_val = independent_penalty(model, imp, pen.layer_weights(), 0.5)
    want = torch.autograd.grad(want_val, params)
    first = pen.penalty()
    with torch.no_grad():  # move the adapter: the second graph's G differs from the first's
        for r in lora_modules(model):
            r.B.mul_(0.5)
    want2 = torch.autograd.grad(independent_penalty(model, imp, pen.layer_weights(), 0.5), params)
    second = pen.penalty()  # both graphs alive: the second gets its own G
    got = torch.autograd.grad(first + second, params)
    for g, w, w2 in zip(got, want, want2):
        assert float((g - w - w2).norm() / (w + w2).norm()) < 1e-5
    want_val = independent_penalty(model, imp, pen.layer_weights(), 0.5)
    want = want2
    kept = pen._work._bufs[("G", 0)].data_ptr()
    for _ in range(2):  # one graph at a time (a training step): the kept G is reused, values stay right
        val = pen.penalty()
        got = torch.autograd.grad(val, params)
        assert val.item() == pytest.approx(want_val.item(), rel=1e-5)
        assert pen._work._bufs[("G", 0)].data_ptr() == kept
        for g, w in zip(got, want):
            assert float((g - w).norm() / w.norm()) < 1e-5
