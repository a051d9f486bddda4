"""EWC-LoRA: hook-based per-sample Fisher, the penalty, the registry factory and the cost report."""
from __future__ import annotations

import pytest
import torch

from hlora.config import LoraConfig, RunConfig, method_config
from hlora.lora import lora_modules
from hlora.methods import StageContext, build_method
from hlora.methods import fisher as ewc_math  # EWC's Fisher and penalty (the method: hlora.methods.ewc)
from hlora.methods.fisher import full_fisher_cost
from hlora.methods.ewc import EWCPenalty, fisher_diagonal
from hlora.model import attach_lora
from hlora.tiny import TINY_TARGETS, tiny_model

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]


def _peft(arch: str):
    return attach_lora(tiny_model(arch), LoraConfig(targets=TINY_TARGETS[arch], dropout=0.0))


def _samples(vocab: int, seed: int = 0, lengths=(7, 12, 5, 9, 3, 11)):
    """Unpadded sequences of mixed lengths; some have a label-masked prompt (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        if i % 2 == 1:
            labels[: n // 2] = -100
        out.append((ids, labels))
    return out


def _batches(samples, batch_size: int = 3, pad_id: int = 0, side: str = "right", pad_label: int = -100):
    """Padded batches: pads have attention_mask 0 and labels `pad_label` (-100, or a token id to
    check that the attention mask alone excludes them). Left padding comes with position_ids."""
    out = []
    for s in range(0, len(samples), batch_size):
        chunk = samples[s : s + batch_size]
        T = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        lab = torch.full((len(chunk), T), pad_label, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (i, l) in enumerate(chunk):
            sl = slice(0, len(i)) if side == "right" else slice(T - len(i), T)
            ids[b, sl] = i
            lab[b, sl] = l
            mask[b, sl] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": lab}
        if side == "left":
            batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        out.append(batch)
    return out


def _reference_fisher(model, samples):
    """Batch-of-one loop of plain autograd on each unpadded sequence, loss = HF's mean token CE."""
    refs = lora_modules(model)
    weights = [r.module.get_base_layer().weight for r in refs]
    acc = [torch.zeros_like(w) for w in weights]
    n = 0
    model.eval()
    saved = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        with model.disable_adapter():
            for ids, labels in samples:
                if (labels[1:] != -100).sum() == 0:
                    continue
                loss = model(input_ids=ids[None], labels=labels[None]).loss
                grads = torch.autograd.grad(loss, weights)
                for a, g in zip(acc, grads):
                    a += g.pow(2)
                n += 1
    finally:
        for w, f in zip(weights, saved):
            w.requires_grad_(f)
    return {r.name: a / n for r, a in zip(refs, acc)}


class _Pool(list):
    """A general pool as the method sees it: indexable rows (padded to one length) with a description."""

    def __init__(self, batches, description=None):
        super().__init__({k: b[k][i] for k in b} for b in batches for i in range(b["input_ids"].shape[0]))
        self.description = description or {"data": "test-pool", "tokens": 60, "seq_len": 12}


def _pad_all(samples):
    return _batches(samples, batch_size=len(samples))  # one padded length for every row


def _build(cfg, model, pool, fisher_file="", cache_dir=""):
    """build_method + setup, as train.py does for `--method ewc`; returns the EWCPenalty it set up."""
    cfg.fisher_file = str(fisher_file) if fisher_file else ""
    method = build_method(cfg, StageContext(stage="domain", run=RunConfig(cache_dir=str(cache_dir)),
                                            general_pool=lambda: pool))
    method.setup(model)
    assert method.callbacks() == []
    return method.penalty


def _vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side,pad_label", [("right", -100), ("right", 5), ("left", -100)])
def test_fisher_matches_batch_of_one_reference(arch, side, pad_label):
    model = _peft(arch)
    samples = _samples(_vocab(model))
    fisher = fisher_diagonal(model, _batches(samples, 4, side=side, pad_label=pad_label), labels="empirical")
    ref = _reference_fisher(model, samples)
    assert set(fisher) == set(ref) == {r.name for r in lora_modules(model)}
    for name in ref:
        w = dict(model.named_modules())[name].get_base_layer().weight
        assert fisher[name].shape == w.shape  # base weight layout (in x out for GPT-2 Conv1D)
        assert fisher[name].abs().max() > 0
        torch.testing.assert_close(fisher[name], ref[name], rtol=1e-5, atol=1e-6 * ref[name].abs().max().item())


def test_fisher_max_examples_and_batching_do_not_matter():
    model = _peft("tiny-llama")
    samples = _samples(_vocab(model))
    a = fisher_diagonal(model, _batches(samples, batch_size=4), max_examples=5)
    b = fisher_diagonal(model, _batches(samples[:5], batch_size=2))
    ref = _reference_fisher(model, samples[:5])
    for name in ref:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6 * ref[name].abs().max().item())
        torch.testing.assert_close(a[name], ref[name], rtol=1e-5, atol=1e-6 * ref[name].abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_fisher_is_seeded_and_differs_from_empirical(arch):
    model = _peft(arch)
    batches = _batches(_samples(_vocab(model)))
    s1 = fisher_diagonal(model, batches, labels="sampled", seed=3)
    s2 = fisher_diagonal(model, batches, labels="sampled", seed=3)
    s3 = fisher_diagonal(model, batches, labels="sampled", seed=4)
    emp = fisher_diagonal(model, batches, labels="empirical")
    for name in emp:
        assert torch.equal(s1[name], s2[name])
        assert s1[name].abs().max() > 0
        assert not torch.allclose(s1[name], emp[name])
        assert not torch.allclose(s1[name], s3[name])
    with pytest.raises(ValueError, match="empirical"):
        fisher_diagonal(model, batches, labels="true")


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_model_left_exactly_as_it_was(arch):
    model = _peft(arch)
    model.train()  # the Fisher runs in eval mode; the caller's mode must come back
    with torch.no_grad():
        for r in lora_modules(model):
            r.B.normal_()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hooks(model)
    fisher_diagonal(model, _batches(_samples(_vocab(model))), labels="sampled")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert _hooks(model) == hooks
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert all(not m.disable_adapters for m in (r.module for r in lora_modules(model)))  # adapter active again


def test_model_restored_when_the_data_fails():
    model = _peft("tiny-llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = _hooks(model)
    good = _batches(_samples(_vocab(model)))[0]

    def broken():
        yield good
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        fisher_diagonal(model, broken())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _hooks(model) == hooks and all(p.grad is None for p in model.parameters())
    assert all(not m.disable_adapters for m in (r.module for r in lora_modules(model)))


@pytest.mark.parametrize("arch", ARCHS)
def test_penalty_zero_for_fresh_adapter_and_gradients_match_formula(arch):
    model = _peft(arch)
    refs = lora_modules(model)
    g = torch.Generator().manual_seed(1)
    fisher = {r.name: torch.rand(r.base_weight.shape, generator=g) for r in refs}
    pen = EWCPenalty(model, fisher, lam=0.7)
    assert pen.penalty().item() == 0.0  # PEFT initialises B = 0, so ΔW = 0
    with torch.no_grad():
        for r in refs:
            r.B.normal_(generator=g)
    params = [p for r in refs for p in (r.A, r.B)]
    got = pen.penalty()
    got_grads = torch.autograd.grad(got, params)
    # Independent formula: PEFT's own ΔW (already in the base weight's layout).
    want = 0.7 * sum((fisher[r.name] * r.module.get_delta_weight(r.adapter).pow(2)).sum() for r in refs)
    want_grads = torch.autograd.grad(want, params)
    assert got.item() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    for a, b in zip(got_grads, want_grads):
        # fp32 products summed in another order (stacked modules, dP/dA = 2λs·Bᵀ(F⊙ΔW)): per tensor to 1e-5 of
        # its norm, as the HLoRA penalty's check (single elements that cancel differ by up to ~2e-5 relative)
        assert float((a - b).norm() / b.norm()) < 1e-5


def test_penalty_buffers_follow_the_model():
    """The Fisher buffers move with the adapter (meta stands in for a second device), as HLoRA's do."""
    model = _peft("tiny-llama")
    pen = EWCPenalty(model, {r.name: torch.ones(r.base_weight.shape) for r in lora_modules(model)})
    model.to("meta")
    assert pen.penalty().device.type == "meta" and pen.fisher_0.device.type == "meta"


def test_penalty_rejects_fisher_for_another_model():
    model = _peft("tiny-llama")
    refs = lora_modules(model)
    fisher = {r.name: torch.ones(r.base_weight.shape) for r in refs}
    with pytest.raises(ValueError, match=refs[0].name):
        EWCPenalty(model, {k: v for k, v in fisher.items() if k != refs[0].name})
    bad = dict(fisher)
    bad[refs[1].name] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="shape"):
        EWCPenalty(model, bad)


def test_registry_computes_saves_and_reloads_fisher(tmp_path, monkeypatch):
    from hlora.importance import Importance

    model = _peft("tiny-gpt2")
    pool = _Pool(_pad_all(_samples(_vocab(model))))
    calls = []
    real = ewc_math.fisher_diagonal

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ewc_math, "fisher_diagonal", counting)
    path = tmp_path / "fisher.safetensors"
    cfg = method_config("ewc", lam=0.5, fisher="empirical", fisher_examples=4)

    first = _build(cfg, model, pool, fisher_file=path)
    assert len(calls) == 1 and path.is_file()
    imp = Importance.load(path)
    assert imp.kind == "fisher" and imp.metadata["fisher"] == "empirical"
    assert float(imp.metadata["seconds"]) > 0 and imp.metadata["examples"] == "4"
    imp.check_against(model)
    direct = real(model, _batches(_samples(_vocab(model))), max_examples=4)
    for r in lora_modules(model):
        torch.testing.assert_close(first.fisher()[r.name], direct[r.name], rtol=1e-5, atol=1e-9)

    second = _build(cfg, model, pool, fisher_file=path)
    assert len(calls) == 1  # loaded from the file, not recomputed
    for name, f in first.fisher().items():
        torch.testing.assert_close(second.fisher()[name], f.to(second.fisher()[name].dtype), rtol=1e-3, atol=0)

    with torch.no_grad():
        for r in lora_modules(model):
            r.B.normal_()
    torch.testing.assert_close(second.penalty(), first.penalty(), rtol=1e-3, atol=0)

    # Another label mode is another Fisher: recompute rather than reuse the cached one.
    _build(method_config("ewc", fisher="sampled", fisher_examples=4), model, pool, fisher_file=path)
    assert len(calls) == 2 and Importance.load(path).metadata["fisher"] == "sampled"

    # The cache is shared by a fresh adapter with another init (another seed): still reused.
    other = _peft("tiny-gpt2")
    with torch.no_grad():
        for r in lora_modules(other):
            r.A.normal_()
    _build(method_config("ewc", fisher="sampled", fisher_examples=4), other, pool, fisher_file=path)
    assert len(calls) == 2

    # Other general data, or the same data cut into other sequences, is another Fisher (the cache used to be
    # keyed by label mode and sample count only, and reused a Fisher of other text).
    for desc in ({"data": "other-text", "tokens": 60, "seq_len": 12}, {"data": "test-pool", "tokens": 60, "seq_len": 6}):
        _build(method_config("ewc", fisher="sampled", fisher_examples=4), other, _Pool(_pad_all(_samples(
            _vocab(model))), desc), fisher_file=path)
    assert len(calls) == 4 and Importance.load(path).metadata["seq_len"] == "6"

    # In a run with a cache folder (an experiment's OUT/cache) the Fisher lands there without a fisher_file.
    _build(method_config("ewc", fisher_examples=4), model, pool, cache_dir=tmp_path / "cache")
    assert (tmp_path / "cache" / "fisher.safetensors").is_file()


def test_registry_refuses_to_overwrite_si_importance(tmp_path):
    from hlora.importance import Importance

    model = _peft("tiny-llama")
    path = tmp_path / "importance.safetensors"
    Importance({r.name: torch.ones(r.base_weight.shape) for r in lora_modules(model)},
               metadata={"kind": "si"}).save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="kind 'si'"):
        _build(method_config("ewc"), model, _Pool(_pad_all(_samples(_vocab(model)))), fisher_file=path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_full_fisher_cost(arch):
    n_params = sum(p.numel() for p in tiny_model(arch).parameters())
    model = _peft(arch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = _batches(_samples(_vocab(model)))
    cost = full_fisher_cost(model, batches, n_examples=2, fisher_examples=64)
    assert cost["n_params"] == n_params
    assert cost["full_bytes"] == 4 * n_params
    targeted = sum(r.base_weight.numel() for r in lora_modules(model))
    assert cost["targeted_bytes"] == 4 * targeted < cost["full_bytes"]
    assert cost["targeted_fraction"] == pytest.approx(targeted / n_params)
    assert cost["examples_timed"] == 2 and cost["seconds_per_example"] > 0
    assert cost["full_seconds"] == pytest.approx(64 * cost["seconds_per_example"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # A plain model (no adapter), as the experiment runner passes it: targets by module name.
    plain = full_fisher_cost(tiny_model(arch), batches, n_examples=1, targets=TINY_TARGETS[arch])
    assert plain["full_bytes"] == 4 * n_params and plain["targeted_bytes"] == 4 * targeted
