"""`hlora bench`: the performance targets of docs/design.md (sections 9 and 11), measured as ratios within one run,
in both LoRA settings.

    hlora bench --model smollm2-135m --json benchmarks/results/bench-smollm2-cpu.json      # both settings
    hlora bench --memory-plan --model-config smollm2-135m,llama-3-8b,qwen2.5-7b           # memory from configs

Settings (`--setting paper|all-linear|both`, default both; `--targets/--r` for another): "paper" is the paper's q,v
at r=8, "all-linear" every linear module of the blocks at r=16 (what the comparisons train). Every ratio compares
variants measured in the same process on the same batches. Training variants are interleaved round by round (plain
step, +SI recording, +each method's per-step work) and summarised by the median, so a noisy machine slows all of
them alike; overheads are ratios to the plain PEFT LoRA step of the same setting (1.0 = no overhead). Nothing here
asserts a threshold: it prints what it measured beside the target.

Keys of the JSON: settings {<setting>: {lora_targets, r, si_overhead {paper, exact}, penalty_overhead {method: ratio}
(every method that declares a bench variant: hlora, ewc, kl_*, replay), fisher_over_si, storage_ratio_fp32, storage_ratio_half (Ω in bf16),
train_tokens_per_s, matmul_peak_fraction {train}, memory {plan, measured}, details}}; and once (no adapter):
eval_speedup_vs_lmeval {sciq, piqa} (from benchmarks/lmeval_parity.py, which runs lm-evaluation-harness in its
own venv), eval_tokens_per_s, matmul_peak_fraction {eval}. Older JSONs (one setting, q,v r=8, keys at the top)
still render with --table.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .config import LoraConfig, ModelConfig, RunConfig, TrainConfig, method_config
from .lora import lora_modules
from .util import model_device

from .bench_table import TARGETS, markdown_table, summary


def _targets(model_name: str) -> list[str]:
    from .tiny import TINY_TARGETS

    return TINY_TARGETS.get(model_name, ["q_proj", "v_proj"])


SETTINGS = ("paper", "all-linear")


def _all_linear(model: nn.Module) -> list[str]:
    """Names (last component) of every linear module inside the transformer blocks, in model order."""
    from .lora import block_index

    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if block_index(n) >= 0 and "lora_" not in n and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    return list(dict.fromkeys(names))


def lora_settings(model_name: str, setting: str = "both", targets: list[str] | None = None,
                  r: int | None = None) -> dict[str, tuple[list[str], int]]:
    """{setting: (LoRA targets, r)}: 'paper' (q,v r=8; a tiny model's attention projection), 'all-linear' (every
    linear module of the blocks, r=16), both; or one 'custom' setting from `targets` / `r`."""
    if targets or r:
        return {"custom": (list(targets or _targets(model_name)), int(r or 8))}
    names = SETTINGS if setting in (None, "both") else (setting,)
    out = {}
    for name in names:
        if name == "paper":
            out[name] = (_targets(model_name), 8)
        elif name == "all-linear":
            from .model import load_model

            out[name] = (_all_linear(load_model(ModelConfig(name=model_name))[0]), 16)
        else:
            raise ValueError(f"setting must be paper, all-linear or both; got {name!r}")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ training steps


class _Variant:
    """One kind of training step: the plain LoRA step plus a method's per-step work. `enter` builds what the
    variant needs (an SI recorder installs hooks that would slow every other variant) and `exit` removes it."""

    def __init__(self, name, extra=None, make_recorder=None):
        self.name, self.extra, self.make_recorder = name, extra, make_recorder
        self.recorder = None
        self.recorder_seconds: list[float] = []

    @contextlib.contextmanager
    def active(self, model, warm_up=None):
        """`warm_up()` runs one untimed step after a recorder is built: a recorder lives through a whole
        stage, and its first step touches ω's fresh pages and allocates its kept buffers (~10 ms per 50 MB
        on CPU), a cost that a 4-step round would otherwise charge to every step."""
        start = 0.0
        if self.make_recorder is not None:
            self.recorder = self.make_recorder(model)
            if warm_up is not None:
                warm_up()
            start = self.recorder.seconds
        try:
            yield
        finally:
            if self.recorder is not None:
                self.recorder_seconds.append(self.recorder.seconds - start)
                self.recorder.close()
                self.recorder = None


def _step(model, opt, batch, variant: _Variant, clip: float = 1.0):
    """What transformers' Trainer does per optimizer step (one micro-batch), with the variant's work added."""
    out = model(**batch)
    loss = out.loss
    if variant.extra is not None:
        loss = loss + variant.extra(model, batch, out)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    if variant.recorder is not None:
        variant.recorder.before_step(opt)
    opt.step()
    if variant.recorder is not None:
        variant.recorder.after_step()
    opt.zero_grad(set_to_none=True)


def _batches(model_name: str, tok, batch_size: int, seq_len: int, vocab: int, device) -> tuple[dict, dict]:
    """A domain batch and a general batch of real text (random tokens when the data is not found)."""
    from .data.packing import general_pool, pack
    from .data import get_task

    def first(ds):
        rows = [ds[i] for i in range(batch_size)]
        return {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}

    try:
        return (first(pack(tok, get_task("sciq").train_texts(200), seq_len, "sciq")),
                first(general_pool(tok, "wikitext", seq_len)))
    except Exception:  # noqa: BLE001 - no data here: the cost does not depend on the text
        ids = torch.randint(0, vocab, (2, batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
        return tuple({"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids)


def method_variants(model: nn.Module, ctx, omega: dict, domain: dict, general: dict) -> dict[str, dict]:
    """{method: what the bench times of its per-step work (Method.bench_variant)} for every registered method that
    declares some, registry order."""
    from .methods import REGISTRY, build_method

    out = {}
    for name in REGISTRY:
        v = build_method(method_config(name), ctx).bench_variant(model, omega, domain, general)
        if v is not None:
            out[name] = v
    return out


def bench_training(model_name: str, steps: int = 20, batch_size: int = 4, seq_len: int = 128, rounds: int = 5,
                   fisher_examples: int = 64, targets: list[str] | None = None, r: int = 8) -> dict:
    """Seconds per training step of each variant (median over interleaved rounds) with LoRA on `targets` at rank
    `r`, the SI recorder's own time, the EWC Fisher pass on the tokens of `fisher_examples` sequences, and the bytes
    the recorder and the penalties hold (memory.held_bytes) beside the memory plan's count."""
    from .memory import held_bytes
    from .memory import plan as memory_plan
    from .methods import StageContext
    from .methods.fisher import fisher_diagonal
    from .model import attach_lora, load_model
    from .si import SIRecorder

    base, tok, _ = load_model(ModelConfig(name=model_name))
    targets = list(targets or _targets(model_name))
    model = attach_lora(base, LoraConfig(targets=targets, r=r))
    model.train()
    dev = model_device(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    domain, general = _batches(model_name, tok, batch_size, seq_len, vocab, dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.no_grad():  # nonzero B so that ΔW and the penalties are not trivially zero
        for ref in lora_modules(model):
            ref.B.normal_(0, 1e-3)
    g = torch.Generator().manual_seed(0)
    omega = {ref.name: torch.rand(ref.base_weight.shape, generator=g) for ref in lora_modules(model)}
    run = RunConfig(train=TrainConfig(batch_size=batch_size, seq_len=seq_len))
    pool = [{k: v[i].cpu() for k, v in general.items()} for i in range(batch_size)]
    ctx = StageContext(stage="domain", run=run, general_pool=lambda: pool)
    per_method = method_variants(model, ctx, omega, domain, general)
    variants = [
        _Variant("lora"),
        _Variant("si_paper", make_recorder=lambda m: SIRecorder(m, grad="paper")),
        _Variant("si_exact", make_recorder=lambda m: SIRecorder(m, grad="exact")),
        *(_Variant(name, extra=v.get("extra")) for name, v in per_method.items()),
    ]
    batch_of = {name: v["batch"] for name, v in per_method.items() if v.get("batch") is not None}
    per_round = max(1, steps // rounds)
    for v in variants:  # warm-up
        with v.active(model):
            _step(model, opt, batch_of.get(v.name, domain), v)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    recorder_per_step: dict[str, list[float]] = {"si_paper": [], "si_exact": []}
    for _ in range(rounds):
        for v in variants:
            b = batch_of.get(v.name, domain)
            with v.active(model, warm_up=lambda: _step(model, opt, b, v)):
                _sync(dev)
                t = time.perf_counter()
                for _ in range(per_round):
                    _step(model, opt, batch_of.get(v.name, domain), v)
                _sync(dev)
                times[v.name].append((time.perf_counter() - t) / per_round)
            if v.name in recorder_per_step:
                recorder_per_step[v.name].append(v.recorder_seconds[-1] / per_round)
    med = {k: statistics.median(x) for k, x in times.items()}
    rec_step = {k: statistics.median(x) for k, x in recorder_per_step.items()}

    # What the recorder (after two steps) and the penalties (after the timed steps) hold, against the plan.
    measured = {f"{name}_penalty": held_bytes(v["held"]) for name, v in per_method.items() if v.get("held") is not None}
    for grad in ("paper", "exact"):
        v = _Variant(f"si_{grad}", make_recorder=lambda m, grad=grad: SIRecorder(m, grad=grad))
        with v.active(model):
            for _ in range(2):
                _step(model, opt, domain, v)
            measured[f"recorder_{grad}"] = held_bytes(v.recorder)
    wdt = str(next(base.parameters()).dtype).removeprefix("torch.")
    try:
        plans = {grad: memory_plan(base.config, targets, r, dtype=wdt, grad=grad, device=dev.type)
                 for grad in ("paper", "exact")}
        planned = {"recorder_paper": plans["paper"]["recorder"]["held_bytes"],
                   "recorder_exact": plans["exact"]["recorder"]["held_bytes"],
                   **{k: (plans["paper"].get(k) or {}).get("held_bytes") for k in measured if k.endswith("_penalty")}}
    except ValueError as e:  # an architecture the plan does not know
        plans, planned = {"paper": {"error": str(e)}}, {k: None for k in measured}

    # The Fisher EWC-LoRA needs, on the tokens of `fisher_examples` sequences, against the recorder's time over
    # a stage ν on the same tokens (fisher_examples / batch_size steps).
    fisher_batches = [general] * max(1, math.ceil(fisher_examples / batch_size))
    _sync(dev)
    t = time.perf_counter()
    fisher_diagonal(model, fisher_batches, max_examples=fisher_examples)
    _sync(dev)
    fisher_s = time.perf_counter() - t
    nu_steps = fisher_examples / batch_size
    si_added = {k: v * nu_steps for k, v in rec_step.items()}
    return {
        "model": model_name, "lora_targets": targets, "r": r, "device": str(dev), "batch_size": batch_size,
        "seq_len": seq_len, "rounds": rounds, "steps_per_round": per_round, "step_seconds": med,
        "si_overhead": {"paper": med["si_paper"] / med["lora"], "exact": med["si_exact"] / med["lora"]},
        "penalty_overhead": {k: med[k] / med["lora"] for k in per_method},
        "si_recorder_seconds_per_step": rec_step,
        "fisher_seconds": fisher_s, "fisher_examples": fisher_examples, "si_added_seconds_same_tokens": si_added,
        "fisher_over_si": {k.removeprefix("si_"): fisher_s / v if v > 0 else math.inf for k, v in si_added.items()},
        "train_tokens_per_s": batch_size * seq_len / med["lora"],
        "memory": {"measured": measured, "planned": planned, "plan": plans["paper"]},
    }


# ------------------------------------------------------------------------------------------- storage


def bench_storage(model_name: str, targets: list[str] | None = None, r: int = 8) -> dict:
    """Bytes of the importance file as `hlora general` writes it (no ΔW^ν copy: it is the adapter) with Ω in fp32
    and in bf16, against a diagonal Fisher of the whole model in fp32; and the largest relative change bf16 makes
    to an Ω spanning e^±40 (bound: 2⁻⁸, round to nearest with 8 significant bits, fp32's exponent range)."""
    from .importance import Importance
    from .model import attach_lora, load_model

    base, _, _ = load_model(ModelConfig(name=model_name))
    n_params = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraConfig(targets=list(targets or _targets(model_name)), r=r))
    g = torch.Generator().manual_seed(0)
    omega = {ref.name: torch.randn(ref.base_weight.shape, generator=g).mul_(8.0).exp_() for ref in lora_modules(model)}
    imp = Importance(omega, metadata={"kind": "si"})
    out = {"model": model_name, "full_fisher_bytes": 4 * n_params, "half_dtype": "bfloat16",
           "omega_elements": sum(t.numel() for t in omega.values())}
    with tempfile.TemporaryDirectory() as d:
        for dt in ("float32", "bfloat16"):
            p = Path(d) / f"imp-{dt}.safetensors"
            imp.save(p, dtype=dt, reference=False)
            out[f"importance_bytes_{dt}"] = p.stat().st_size
        back = Importance.load(Path(d) / "imp-bfloat16.safetensors")
        out["bf16_max_relative_error"] = max(float(((back.omega[n] - t).abs() / t).max()) for n, t in omega.items())
    out["bf16_error_bound"] = 2.0**-8
    out["storage_ratio_fp32"] = out["importance_bytes_float32"] / out["full_fisher_bytes"]
    out["storage_ratio_half"] = out["importance_bytes_bfloat16"] / out["full_fisher_bytes"]
    return out


# ---------------------------------------------------------------------- throughput against matmul peak


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every matmul weight a token passes through: the base Linear layers and the LM head."""
    shapes = []
    for name, m in model.named_modules():
        if "lora_" in name:
            continue
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and w is not None:
            shapes.append((w.shape[1], w.shape[0]))
        elif type(m).__name__ == "Conv1D" and w is not None:  # GPT-2: weight is in x out
            shapes.append((w.shape[0], w.shape[1]))
    return shapes


def _attention_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """QKᵀ and A·V per token and layer: 2·2·T·d (the full T×T is computed under a causal mask)."""
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    return 4.0 * seq_len * d * layers


def _mm_rate(shapes: list[tuple[int, int]], rows: int, device, repeats: int = 3) -> float:
    """FLOP/s of plain torch.mm on the model's weight shapes with `rows` token rows, in one pass over the layers
    (the same mix of shapes a forward pass runs), best of `repeats`."""
    xs = {i: torch.randn(rows, i, device=device) for i in {s[0] for s in shapes}}
    ws = [torch.randn(i, o, device=device) for i, o in shapes]
    flops = sum(2.0 * rows * i * o for i, o in shapes)
    best = math.inf
    for _ in range(repeats + 1):  # the first pass warms up
        _sync(device)
        t = time.perf_counter()
        for (i, _), w in zip(shapes, ws):
            torch.mm(xs[i], w)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return flops / best


def bench_throughput(model_name: str, train_step_seconds: dict[str, float], batch_size: int, seq_len: int,
                     eval_batch: int = 8, eval_len: int = 512) -> dict:
    """Training (per setting: {setting: seconds of its plain LoRA step}) and evaluation FLOP/s (matmul FLOPs of the
    model's shapes) over plain torch.mm's FLOP/s on the same shapes in this run. A LoRA step on frozen weights runs
    each base matmul twice (forward, and backward for the input gradient; no weight gradient) and attention three
    times; evaluation runs them once. The adapter's own (rank-r) FLOPs are not counted."""
    from .model import load_model

    model, _, _ = load_model(ModelConfig(name=model_name))
    dev = model_device(model)
    shapes = _linear_shapes(model)
    lin = sum(2.0 * i * o for i, o in shapes)  # per token, forward
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (eval_batch, eval_len),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.inference_mode():
        model(input_ids=ids[:1, :16])  # warm-up
        times = []
        for _ in range(3):
            _sync(dev)
            t = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            _sync(dev)
            times.append(time.perf_counter() - t)
    eval_s = statistics.median(times)
    eval_flops = eval_batch * eval_len * (lin + _attention_flops_per_token(model, eval_len))
    train_flops = batch_size * seq_len * (2 * lin + 3 * _attention_flops_per_token(model, seq_len))
    mm_train = _mm_rate(shapes, batch_size * seq_len, dev)
    mm_eval = _mm_rate(shapes, eval_batch * eval_len, dev)
    return {
        "eval_tokens_per_s": eval_batch * eval_len / eval_s,
        "train_flops_per_s": {k: train_flops / v for k, v in train_step_seconds.items()},
        "eval_flops_per_s": eval_flops / eval_s,
        "mm_flops_per_s": {"train_shapes": mm_train, "eval_shapes": mm_eval},
        "matmul_peak_fraction": {"train": {k: train_flops / v / mm_train for k, v in train_step_seconds.items()},
                                 "eval": eval_flops / eval_s / mm_eval},
        "flops_per_token": {"linear_forward": lin, "train": train_flops / (batch_size * seq_len),
                            "eval": eval_flops / (eval_batch * eval_len)},
    }


# ------------------------------------------------------------------------------- evaluation vs lm-eval


def bench_eval_vs_lmeval(tasks=("sciq", "piqa"), limit: int = 100, repeats: int = 2) -> dict:
    """hlora's evaluation against lm-evaluation-harness's HFLM on the same model and items, through
    benchmarks/lmeval_parity.py (which keeps lm-eval in its own venv, .venv-lmeval)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "lmeval_parity.py"
    if not script.is_file():
        return {t: {"skipped": "benchmarks/lmeval_parity.py is not here (run from a checkout)"} for t in tasks}
    out = {}
    for task in tasks:
        with tempfile.TemporaryDirectory() as d:
            res_path = Path(d) / "parity.json"
            r = subprocess.run([sys.executable, str(script), "--task", task, "--limit", str(limit), "--repeats",
                                str(repeats), "--out", str(res_path)], capture_output=True, text=True)
            if r.returncode != 0 or not res_path.is_file():
                out[task] = {"skipped": f"lmeval_parity.py failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}"}
                continue
            res = json.loads(res_path.read_text())
        out[task] = {"ratio": res["speedup"], "acc": res.get("acc"), "acc_norm": res.get("acc_norm"),
                     "items": res.get("items", limit), "seconds": res.get("seconds"),
                     "max_abs_ll_diff": res.get("max_abs_delta_ll"), "threads": res.get("threads")}
    return out


# --------------------------------------------------------------------------------------------- main


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version()}


def run(model_name: str, steps: int = 20, rounds: int = 5, lmeval: bool = True, lmeval_limit: int = 100,
        setting: str = "both", targets: list[str] | None = None, r: int | None = None) -> dict:
    t0 = time.perf_counter()
    per: dict[str, dict] = {}
    for name, (tg, rank) in lora_settings(model_name, setting, targets, r).items():
        tr = bench_training(model_name, steps=steps, rounds=rounds, targets=tg, r=rank)
        st = bench_storage(model_name, targets=tg, r=rank)
        mem = tr.pop("memory")
        per[name] = {
            "lora_targets": tg, "r": rank, "si_overhead": tr["si_overhead"], "penalty_overhead": tr["penalty_overhead"],
            "fisher_over_si": tr["fisher_over_si"],
            "storage_ratio_fp32": st["storage_ratio_fp32"], "storage_ratio_half": st["storage_ratio_half"],
            "train_tokens_per_s": tr["train_tokens_per_s"], "memory": mem,
            "details": {"training": tr, "storage": st},
        }
    first = next(iter(per.values()))["details"]["training"]
    th = bench_throughput(model_name, {k: v["details"]["training"]["step_seconds"]["lora"] for k, v in per.items()},
                          first["batch_size"], first["seq_len"])
    for k, v in per.items():
        v["matmul_peak_fraction"] = {"train": th["matmul_peak_fraction"]["train"][k]}
    ev = bench_eval_vs_lmeval(limit=lmeval_limit) if lmeval else {"skipped": "--no-lmeval"}
    res = {
        "model": model_name, "machine": _machine(), "targets": TARGETS, "settings": per,
        "eval_speedup_vs_lmeval": ev, "eval_tokens_per_s": th["eval_tokens_per_s"],
        "matmul_peak_fraction": {"eval": th["matmul_peak_fraction"]["eval"]},
        "details": {"throughput": th},
    }
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def main(args) -> dict:
    from .files import write_json

    if getattr(args, "memory_plan", False):  # from the model's config alone, measures nothing
        from .memory import main as plan_main

        return plan_main(args)
    if getattr(args, "table", None):  # render a committed JSON, measure nothing
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return {}

    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if getattr(args, "targets", None) else None
    res = run(args.model, steps=args.steps, rounds=args.rounds, lmeval=not args.no_lmeval,
              lmeval_limit=args.lmeval_limit, setting=getattr(args, "setting", "both"), targets=targets,
              r=getattr(args, "r", None))
    print(summary(res))
    if args.json:
        write_json(args.json, res)
        print(f"wrote {args.json}")
    return res
