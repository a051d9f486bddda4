"""SIRecorder and HLoRACallback: the recorded quantities against direct computations (docs/design.md section 3)."""
from __future__ import annotations

import copy

import pytest
import torch

import hlora.lora as lora
from hlora.config import LoraConfig
from hlora.lora import delta_w, lora_modules
from hlora.model import attach_lora
from hlora.si import HLoRACallback, SIRecorder
from hlora.tiny import TINY_TARGETS, tiny_model

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]


def make_model(arch: str, seed: int = 0, r: int = 4):
    """Tiny model + LoRA (no dropout) with a random non-zero B (PEFT starts B at zero)."""
    model = attach_lora(tiny_model(arch, seed=seed), LoraConfig(targets=TINY_TARGETS[arch], r=r, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for ref in lora_modules(model):
            ref.B.copy_(torch.randn(ref.B.shape, generator=g) * 0.05)
    model.eval()  # deterministic forward (GPT-2 has dropout in its config)
    return model


def vocab(model) -> int:
    return model.get_base_model().config.vocab_size


def make_batch(model, n: int = 8, T: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab(model), (n, T), generator=g)


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lora_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(params=["per-module", "stacked"])
def grouping(request, monkeypatch):
    """Run a test with one module per group (the CPU default) and with equal shapes stacked (the GPU default)."""
    if request.param == "stacked":
        monkeypatch.setattr(lora, "CPU_CHUNK_ELEMENTS", lora.CHUNK_ELEMENTS)
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
def test_pseudo_grad_and_delta_match_direct_computation(arch, grouping):
    model = make_model(arch)
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2, weight_decay=0.01)
    rec = SIRecorder(model, clamp="none")
    shapes = {tuple(r.base_weight.shape) for r in lora_modules(model)}
    assert len(rec._groups) == (len(rec.names) if grouping == "per-module" else len(shapes))
    ids = make_batch(model)
    loss_of(model, ids).backward()
    before = {r.name: (r.A.detach().clone(), r.B.detach().clone(), r.A.grad.clone(), r.B.grad.clone())
              for r in lora_modules(model)}
    rec.before_step(opt)
    opt.step()
    rec.after_step()
    eta = 1e-2
    for ref in lora_modules(model):
        A, B, gA, gB = before[ref.name]
        s = ref.scale
        g_direct = s * (gB @ A + B @ gA - eta * gB @ gA)
        d_direct = s * (ref.B.detach() @ ref.A.detach()) - s * (B @ A)
        if ref.fan_in_fan_out:
            g_direct, d_direct = g_direct.T, d_direct.T
        g, d = rec.last_terms(ref.name)
        assert g.shape == ref.base_weight.shape == d.shape
        assert rel(g, g_direct) < 1e-5
        assert rel(d, d_direct) < 1e-4  # d_direct subtracts two nearly equal products: its own rounding
        assert torch.allclose(rec.omega(ref.name), -g * d, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_sgd_change_is_minus_lr_times_pseudo_gradient(arch):
    model = make_model(arch)
    lr = 0.05
    opt = torch.optim.SGD(lora_params(model), lr=lr)
    rec = SIRecorder(model)
    for step in range(2):
        opt.zero_grad()
        # A scaled loss makes the step large against fp32 rounding of A and B (|A|·2^-24 per element):
        # with the plain loss the step is ~1e-5·|A| and rounding alone leaves ~1e-3 relative error.
        (1000 * loss_of(model, make_batch(model, seed=step))).backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
        for ref in lora_modules(model):
            g, d = rec.last_terms(ref.name)
            assert g.norm() > 0
            assert rel(d, -lr * g) < 1e-5
            assert (rec.omega(ref.name) >= 0).all()  # clamp="step"


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_gradient_path_integral_equals_loss_decrease(arch, grouping):
    model = make_model(arch)
    ids = make_batch(model, n=8, T=16)
    opt = torch.optim.SGD(lora_params(model), lr=0.25)  # small: ~1 % second-order error
    rec = SIRecorder(model, grad="exact", clamp="none")
    with torch.no_grad():
        l0 = float(loss_of(model, ids))
    for _ in range(20):
        opt.zero_grad()
        loss_of(model, ids).backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    with torch.no_grad():
        l1 = float(loss_of(model, ids))
    total = sum(float(rec.omega(n).sum()) for n in rec.names)
    assert l0 - l1 > 1e-3  # the test is meaningful: the loss moved
    assert abs(total - (l0 - l1)) < 0.05 * (l0 - l1), (total, l0 - l1)


def test_exact_gradient_is_dloss_dDeltaW():
    """grad="exact": the hook gradient equals autograd's dL/dΔW through a differentiable ΔW."""
    model = make_model("tiny-gpt2")  # fan_in_fan_out: checks the layout too
    rec = SIRecorder(model, grad="exact")
    ids = make_batch(model)
    loss_of(model, ids).backward()
    # Independent: dL/dB = s·G·Aᵀ with G = dL/dΔW (out x in); check against the recorded G.
    for ref in lora_modules(model):
        G = rec.exact_grad(ref.name)
        assert G.shape == ref.base_weight.shape
        G = G.T if ref.fan_in_fan_out else G  # out x in
        gB = ref.scale * G @ ref.A.detach().T
        gA = ref.scale * ref.B.detach().T @ G
        assert rel(gB, ref.B.grad) < 1e-5
        assert rel(gA, ref.A.grad) < 1e-5


def _run_accum(arch, grad, micro, accum, steps=3):
    # fp64: the summation order of 2x4 vs 1x8 changes fp32 gradients by ~3e-7, and eq. 13 amplifies that
    # where Δ² ~ ξ (up to ~1e-4 in Ω, more under Adam's normalisation); fp64 isolates the recorder's logic.
    model = make_model(arch).double()
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    rec = SIRecorder(model, grad=grad)
    for step in range(steps):
        full = make_batch(model, n=8, seed=100 + step)
        opt.zero_grad()
        for k in range(accum):
            (loss_of(model, full[k * micro:(k + 1) * micro]) / accum).backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    return rec.consolidate()


@pytest.mark.parametrize("grad", ["paper", "exact"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_accumulation_gives_same_importance(arch, grad, grouping):
    a = _run_accum(arch, grad, micro=4, accum=2)
    b = _run_accum(arch, grad, micro=8, accum=1)
    for n in a.names:
        assert b.omega[n].norm() > 0
        assert rel(a.omega[n], b.omega[n]) < 1e-5, n


@pytest.mark.parametrize("arch", ARCHS)
def test_consolidate_follows_eq13(arch, grouping):
    model = make_model(arch)
    xi = 1e-9
    start = {r.name: delta_w(r).detach().clone() for r in lora_modules(model)}
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    rec = SIRecorder(model, xi=xi, clamp="end")
    for step in range(3):
        opt.zero_grad()
        loss_of(model, make_batch(model, seed=step)).backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    omega = {n: rec.omega(n).clone() for n in rec.names}
    assert any((o < 0).any() for o in omega.values())  # clamp="end" leaves ω signed until consolidation
    imp = rec.consolidate()
    assert int(imp.metadata["steps"]) == 3 and imp.metadata["clamp"] == "end" and imp.metadata["kind"] == "si"
    for ref in lora_modules(model):
        end = delta_w(ref).detach()
        want = omega[ref.name].clamp(min=0) / ((end - start[ref.name]) ** 2 + xi)
        assert rel(imp.omega[ref.name], want) < 1e-4
        assert torch.equal(imp.reference[ref.name], end.contiguous())
        assert (rec.omega(ref.name) == 0).all()
    # a second stage adds up, with Δ measured from the last consolidation
    start2 = {r.name: delta_w(r).detach().clone() for r in lora_modules(model)}
    for step in range(2):
        opt.zero_grad()
        loss_of(model, make_batch(model, seed=10 + step)).backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    omega2 = {n: rec.omega(n).clamp(min=0) for n in rec.names}
    imp2 = rec.consolidate()
    for ref in lora_modules(model):
        d = delta_w(ref).detach() - start2[ref.name]
        want = imp.omega[ref.name] + omega2[ref.name] / (d**2 + xi)
        assert rel(imp2.omega[ref.name], want) < 1e-4


def _train(model, opt, rec, seeds):
    for s in seeds:
        opt.zero_grad()
        loss_of(model, make_batch(model, seed=s)).backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()


@pytest.mark.parametrize("grad", ["paper", "exact"])
def test_state_dict_resume_gives_same_importance(grad, grouping):
    model = make_model("tiny-llama")
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    rec = SIRecorder(model, grad=grad)
    _train(model, opt, rec, [0, 1, 2])
    rec.consolidate()  # Ω so far travels in the state as well
    _train(model, opt, rec, [3])
    snap_model = copy.deepcopy(model.state_dict())
    snap_opt = copy.deepcopy(opt.state_dict())
    snap_rec = rec.state_dict()
    _train(model, opt, rec, [4, 5])
    full = rec.consolidate()

    model2 = make_model("tiny-llama", seed=7)  # different start: everything comes from the state
    model2.load_state_dict(snap_model)
    opt2 = torch.optim.AdamW(lora_params(model2), lr=1e-2)
    opt2.load_state_dict(snap_opt)
    rec2 = SIRecorder(model2, grad=grad)
    rec2.load_state_dict(snap_rec)
    _train(model2, opt2, rec2, [4, 5])
    resumed = rec2.consolidate()
    assert int(resumed.metadata["steps"]) == 6
    for n in full.names:
        assert torch.allclose(resumed.omega[n], full.omega[n], rtol=1e-6, atol=0), n


def test_state_dict_rejects_other_model():
    rec = SIRecorder(make_model("tiny-llama"))
    other = SIRecorder(make_model("tiny-gpt2"))
    with pytest.raises(ValueError, match="lacks|has module"):
        other.load_state_dict(rec.state_dict())


def test_invalid_settings():
    model = make_model("tiny-llama")
    with pytest.raises(ValueError, match="clamp"):
        SIRecorder(model, clamp="always")
    with pytest.raises(ValueError, match="grad"):
        SIRecorder(model, grad="true")
    with pytest.raises(ValueError, match="consolidate"):
        HLoRACallback(SIRecorder(model), consolidate="never")


# ---------------------------------------------------------------------------- inside a real Trainer


class _Batches(torch.utils.data.IterableDataset):
    """Fixed sequence of examples (an iterable dataset: the Trainer does not shuffle it)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __iter__(self):
        for row in self.ids:
            yield {"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)}


def _sched(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.1 * s)  # lr changes each step


def _trainer(model, ids, out_dir, callback, max_steps, micro, accum, clip, save_steps=0):
    from transformers import Trainer, TrainingArguments

    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        max_steps=max_steps, max_grad_norm=clip, report_to=[], use_cpu=True, logging_strategy="no",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, seed=0,
    )
    return Trainer(model=model, args=args, train_dataset=_Batches(ids), callbacks=[callback],
                   optimizers=(opt, _sched(opt)))


def _manual(model, ids, steps, micro, accum, clip, grad):
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    sched = _sched(opt)
    rec = SIRecorder(model, grad=grad)
    model.train()
    per_step = micro * accum
    for step in range(steps):
        chunk = ids[step * per_step:(step + 1) * per_step]
        for k in range(accum):
            b = chunk[k * micro:(k + 1) * micro]
            (loss_of(model, b) / accum).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        rec.before_step(opt)
        opt.step()
        rec.after_step()
        sched.step()
        opt.zero_grad()
    return rec.consolidate()


@pytest.mark.parametrize("grad,clip", [("paper", 0.0), ("paper", 0.05), ("exact", 0.05)])
def test_callback_in_trainer_matches_manual_recorder(tmp_path, grad, clip, grouping):
    steps, micro, accum = 3, 2, 2
    ref_model = make_model("tiny-llama")
    ids = make_batch(ref_model, n=steps * micro * accum, T=12, seed=5)
    model = make_model("tiny-llama")
    cb = HLoRACallback(SIRecorder(model, grad=grad))
    _trainer(model, ids, tmp_path / "out", cb, steps, micro, accum, clip).train()
    want = _manual(ref_model, ids, steps, micro, accum, clip, grad)
    got = cb.importance
    assert got is not None and int(got.metadata["steps"]) == steps
    for n in want.names:
        assert want.omega[n].norm() > 0
        assert rel(got.omega[n], want.omega[n]) < 1e-4, n
        assert torch.allclose(got.reference[n], want.reference[n], rtol=1e-5, atol=1e-7)


def test_callback_resume_from_checkpoint_gives_same_importance(tmp_path):
    steps, micro, accum = 4, 2, 1
    ids = make_batch(make_model("tiny-llama"), n=steps * micro, T=12, seed=6)
    out = tmp_path / "out"
    model = make_model("tiny-llama")
    cb = HLoRACallback(SIRecorder(model))
    _trainer(model, ids, out, cb, steps, micro, accum, 0.0, save_steps=2).train()
    assert (out / "checkpoint-2" / "si_state.safetensors").is_file()
    full = cb.importance

    model2 = make_model("tiny-llama")
    cb2 = HLoRACallback(SIRecorder(model2))
    _trainer(model2, ids, out, cb2, steps, micro, accum, 0.0, save_steps=2).train(
        resume_from_checkpoint=str(out / "checkpoint-2"))
    assert cb2.recorder.steps == steps
    for n in full.names:
        assert rel(cb2.importance.omega[n], full.omega[n]) < 1e-5, n


def test_callback_resume_without_state_fails(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    cb = HLoRACallback(SIRecorder(make_model("tiny-llama")))
    state = TrainerState()
    state.global_step = 3
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(FileNotFoundError, match="checkpoint-3"):
        cb.on_train_begin(args, state, TrainerControl())


def test_callback_consolidates_each_epoch(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_model("tiny-llama")
    ids = make_batch(model, n=4, T=12, seed=8)
    data = [{"input_ids": r, "labels": r.clone(), "attention_mask": torch.ones_like(r)} for r in ids]
    cb = HLoRACallback(SIRecorder(model), consolidate="epoch")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, num_train_epochs=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert cb.recorder.steps == 4 and cb.recorder.consolidations == 2
    assert cb.importance.metadata["consolidations"] == "2" and cb.importance.metadata["steps"] == "4"
    assert all(cb.importance.omega[n].sum() > 0 for n in cb.importance.names)


# ---------------------------------------------------------------------------- DDP (gloo, 2 processes)


def _ddp_steps(model, forward, rank: int, world: int, grad: str):
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    rec = SIRecorder(model, grad=grad)
    per = 8 // world
    for step in range(3):
        ids = make_batch(model, n=8, seed=step)[rank * per:(rank + 1) * per]
        opt.zero_grad()
        forward(input_ids=ids, labels=ids).loss.backward()
        rec.before_step(opt)
        opt.step()
        rec.after_step()
    return rec.consolidate()


def _ddp_worker(rank, world, out_dir, init):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for grad in ("paper", "exact"):
            model = make_model("tiny-llama").double()
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            imp = _ddp_steps(model, ddp, rank, world, grad)
            if rank == 0:
                imp.save(f"{out_dir}/{grad}.safetensors")
            del ddp, model  # a DDP reducer outliving its process group can hang at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gives_same_importance_as_one_process(tmp_path):
    """Two gloo processes, 4 rows each, give the Ω of one process on the 8 rows (fp64 to compare tightly)."""
    import torch.multiprocessing as mp

    from hlora.importance import Importance

    import time

    ctx = mp.spawn(_ddp_worker, args=(2, str(tmp_path), f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:  # only the two workers this test started
                proc.kill()
            pytest.fail("DDP workers did not finish within 240 s")
    for grad in ("paper", "exact"):
        model = make_model("tiny-llama").double()
        want = _ddp_steps(model, model, 0, 1, grad)
        got = Importance.load(tmp_path / f"{grad}.safetensors")
        for n in want.names:
            assert want.omega[n].norm() > 0
            assert rel(got.omega[n].double(), want.omega[n]) < 1e-6, (grad, n)


# ------------------------------------------------------------- the gradient Ω is built from (docs/design.md §3.1)


def _reference_omega(model, ids, steps, clip, lr=1e-2, xi=1e-9):
    """SI written out per module: g̃ from the gradient *before* clipping, δ the real change, clamp each step."""
    opt = torch.optim.AdamW(lora_params(model), lr=lr)
    refs = lora_modules(model)
    start = {r.name: delta_w(r).detach().clone() for r in refs}
    omega = {r.name: torch.zeros_like(start[r.name]) for r in refs}
    for step in range(steps):
        loss_of(model, ids[4 * step:4 * step + 4]).backward()
        g = {r.name: (r.A.grad.clone(), r.B.grad.clone(), r.A.detach().clone(), r.B.detach().clone()) for r in refs}
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        before = {r.name: delta_w(r).detach().clone() for r in refs}
        opt.step()
        opt.zero_grad()
        for r in refs:
            gA, gB, A, B = g[r.name]
            gt = r.scale * (gB @ A + B @ gA - lr * gB @ gA)
            gt = gt.T if r.fan_in_fan_out else gt
            omega[r.name] = (omega[r.name] - gt * (delta_w(r).detach() - before[r.name])).clamp(min=0)
    return {n: omega[n] / ((delta_w(r).detach() - start[n]) ** 2 + xi) for r in refs for n in [r.name]}


def _recorded(model, ids, steps, clip, unclipped):
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    rec = SIRecorder(model) if unclipped is None else SIRecorder(model, unclipped=unclipped)
    for step in range(steps):
        loss_of(model, ids[4 * step:4 * step + 4]).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # the Trainer clips before its hooks
        rec.before_step(opt)
        opt.step()
        rec.after_step()
        opt.zero_grad()
    return rec.consolidate().omega


@pytest.mark.parametrize("arch", ARCHS)
def test_omega_uses_the_gradient_before_clipping(arch):
    """With clipping, the default recorder's Ω is the path integral of the task-loss gradient (clipping would
    scale each step's ω by its clip factor); unclipped=False keeps the clipped reading; without clipping both
    readings agree."""
    ids = make_batch(make_model(arch), n=12, T=10, seed=3)
    want = _reference_omega(make_model(arch), ids, 3, clip=0.01)
    got = _recorded(make_model(arch), ids, 3, clip=0.01, unclipped=None)
    clipped = _recorded(make_model(arch), ids, 3, clip=0.01, unclipped=False)
    for n in want:
        assert want[n].norm() > 0
        assert rel(got[n], want[n]) < 1e-4, n
        assert rel(clipped[n], want[n]) > 0.5, n  # the gradient norm here is far above 0.01
    a = _recorded(make_model(arch), ids, 3, clip=0.0, unclipped=True)
    b = _recorded(make_model(arch), ids, 3, clip=0.0, unclipped=False)
    for n in a:
        assert rel(a[n], b[n]) < 1e-6


class _Scaler:
    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


class _ScaledOptimizer:
    """Stands in for accelerate's optimizer wrapper under fp16: `.scaler` is the GradScaler of the step."""

    def __init__(self, opt, scale):
        self.opt, self.scaler = opt, _Scaler(scale)
        self.param_groups = opt.param_groups

    def step(self):
        self.opt.step()


@pytest.mark.parametrize("grad", ["paper", "exact"])
def test_hook_read_gradients_are_unscaled_under_loss_scaling(grad):
    """fp16 mixed precision scales the loss by S before backward: hook-read gradients are S times too large
    until divided by the scaler's scale (the Trainer unscales .grad itself before the optimizer hooks)."""
    ids = make_batch(make_model("tiny-llama"), n=8, T=10, seed=1)
    out = {}
    for scale in (1.0, 1024.0):
        model = make_model("tiny-llama")
        opt = torch.optim.SGD(lora_params(model), lr=0.05)
        wrapped = _ScaledOptimizer(opt, scale)
        rec = SIRecorder(model, grad=grad)
        for step in range(2):
            (loss_of(model, ids[4 * step:4 * step + 4]) * scale).backward()
            for p in lora_params(model):
                p.grad.div_(scale)  # what the Trainer's unscale does to .grad
            rec.before_step(wrapped)
            wrapped.step()
            rec.after_step()
            opt.zero_grad()
        assert rec.last_grad_scale == scale
        out[scale] = rec.consolidate().omega
    for n in out[1.0]:
        assert rel(out[1024.0][n], out[1.0][n]) < 1e-4, n


@pytest.mark.parametrize("grad", ["paper", "exact"])
def test_recorder_time_includes_its_hooks(grad):
    """The cost of recording is everything the recorder does, its backward hooks included."""
    model = make_model("tiny-llama")
    rec = SIRecorder(model, grad=grad)
    t0 = rec.seconds
    loss_of(model, make_batch(model, n=4, T=10)).backward()
    assert rec.seconds > t0  # only the hooks have run so far


def test_callback_checks_the_trainer_hook_order():
    """A training loop that calls the hooks out of order (after zero_grad, or before the optimizer moved the
    adapter) fails loudly instead of recording a wrong Ω."""
    model = make_model("tiny-llama")
    opt = torch.optim.AdamW(lora_params(model), lr=1e-2)
    cb = HLoRACallback(SIRecorder(model))
    with pytest.raises(RuntimeError, match="no LoRA gradient"):
        cb.on_pre_optimizer_step(None, None, None, optimizer=opt)
    loss_of(model, make_batch(model, n=4, T=10)).backward()
    cb.on_pre_optimizer_step(None, None, None, optimizer=opt)
    with pytest.raises(RuntimeError, match="before the optimizer moved"):
        cb.on_optimizer_step(None, None, None)  # opt.step() never ran


def test_recorder_state_follows_the_model_device():
    """Built before a Trainer or DDP moves the model, the recorder moves its state with the adapter (the meta
    device stands in for another GPU on a CPU machine)."""
    model = make_model("tiny-llama")
    rec = SIRecorder(model)
    model.to("meta")
    rec._follow_device()
    assert all(t.device.type == "meta" for g in rec._groups for t in (g.omega, g.A0, g.B0, g.rawA, g.rawB, g.scale))


def test_each_rank_gets_its_own_gpu(monkeypatch):
    from hlora.model import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    assert pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("cpu") == torch.device("cpu")
