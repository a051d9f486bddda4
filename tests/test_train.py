"""The stage runner end to end on a tiny model: run directory, resume, accumulation, DDP, NaN, effect."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hlora.config import RunConfig, apply_overrides
from hlora.importance import Importance
from hlora.train import TrainingError, run_stage

TINY = ["model.name=tiny-llama", "lora.r=4", "lora.alpha=16", "train.seq_len=32", "train.lr=0.01"]


def cfg_for(out, *extra):
    return apply_overrides(RunConfig(), [*TINY, f"out={out}", *extra])


def adapter_tensors(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def assert_same_run(a: Path, b: Path, tol=1e-5):
    """Ω and adapter agree per module in relative Frobenius norm. (Ω = ω/(Δ²+ξ) amplifies fp32 rounding
    wherever Δ is tiny, so an element-wise rtol would test the rounding, not the method.)"""
    ia, ib = Importance.load(a / "importance.safetensors"), Importance.load(b / "importance.safetensors")
    assert set(ia.omega) == set(ib.omega)
    for k in ia.omega:
        assert rel(ia.omega[k], ib.omega[k]) < tol, (k, rel(ia.omega[k], ib.omega[k]))
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    for k in ta:
        assert rel(ta[k], tb[k]) < tol, (k, rel(ta[k], tb[k]))


def test_general_stage_writes_run_directory(tmp_path, embedded_data):
    out = run_stage(cfg_for(tmp_path / "g", "train.max_steps=3", "train.batch_size=2"), "general")
    for f in ("config.yaml", "adapter/adapter_config.json", "importance.safetensors", "log.jsonl", "DONE"):
        assert (out / f).exists(), f
    assert not (out / "checkpoints").exists()
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"lr", "loss", "penalty", "tokens_per_s"} <= set(r) for r in log)
    imp = Importance.load(out / "importance.safetensors")
    assert imp.metadata["kind"] == "si" and imp.metadata["steps"] == "3"
    assert all(v.min() >= 0 for v in imp.omega.values())  # clamp="step"
    assert any(v.abs().sum() > 0 for v in imp.omega.values())
    # a finished run is not overwritten; an unfinished one needs --resume
    with pytest.raises(TrainingError, match="already a finished run"):
        run_stage(cfg_for(out, "train.max_steps=3"), "general")


def test_grad_accumulation_matches_big_batch(tmp_path, embedded_data):
    common = ["train.max_steps=3", "train.shuffle=false", "lora.dropout=0.0", "train.max_grad_norm=0"]
    a = run_stage(cfg_for(tmp_path / "a", *common, "train.batch_size=8", "train.grad_accum=1"), "general")
    b = run_stage(cfg_for(tmp_path / "b", *common, "train.batch_size=2", "train.grad_accum=4"), "general")
    assert_same_run(a, b, tol=2e-4)


class Crash(TrainerCallback):
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_resume_gives_uninterrupted_result(tmp_path, embedded_data):
    common = ["train.max_steps=6", "train.save_steps=2", "train.batch_size=2", "lora.dropout=0.1"]
    full = run_stage(cfg_for(tmp_path / "full", *common), "general")
    cfg = cfg_for(tmp_path / "cut", *common)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "general", extra_callbacks=[Crash(5)])
    assert not (tmp_path / "cut" / "DONE").exists() and (tmp_path / "cut" / "checkpoints").exists()
    with pytest.raises(TrainingError, match="--resume"):
        run_stage(cfg, "general")
    clock = tmp_path / "cut" / "checkpoints" / "checkpoint-4" / "clock.json"
    assert json.loads(clock.read_text())["train_seconds"] > 0
    clock.write_text(json.dumps({"train_seconds": 1000.0}))  # as if the 4 steps before the cut took 1000 s
    resumed = run_stage(cfg, "general", resume=True)
    assert_same_run(full, resumed, tol=1e-5)
    # the summary's train time is the whole stage's: the steps before the cut, then the resumed ones
    assert 1000.0 < json.loads((resumed / "summary.json").read_text())["train_seconds"] < 1000.0 + 60
    steps = [json.loads(l)["step"] for l in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


class Poison(TrainerCallback):
    """Make the adapter NaN after step 2 (a diverged run, deterministically: an absurd lr overflows to inf/NaN
    on some CPUs and saturates to a finite loss on others)."""

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 2:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_A" in n:
                        p.fill_(float("nan"))


def test_nan_loss_fails_cleanly(tmp_path, embedded_data):
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="loss is nan at step 3"):
        run_stage(cfg_for(out, "train.max_steps=5", "train.batch_size=2"), "general", extra_callbacks=[Poison()])
    assert not out.exists()  # no partial output


def test_hlora_keeps_general_loss_lower_than_plain_nu_mu(tmp_path):
    """In miniature the effect exists: after stage μ, HLoRA keeps the stage-ν loss lower than LoRA(ν+μ).

    Stage ν and μ texts contradict each other, so plain μ training forgets what ν learned. μ uses a small
    lr: with Adam, a stiff penalty (Ω is heavy-tailed) at a large lr makes the adapter oscillate around
    the ν solution, which costs more than the drift it prevents.
    """
    import random

    from hlora.data import get_task
    from hlora.data.packing import batches, pack
    from hlora.model import load_adapter, load_model

    r = random.Random(0)
    nu_s = ["the cell is the basic unit of life .", "water boils at one hundred degrees .", "heat makes metal expand ."]
    mu_s = ["the cell is the energy of mars .", "water boils at venus and jupiter .", "heat makes gravity ."]
    (tmp_path / "nu.txt").write_text(" ".join(r.choice(nu_s) for _ in range(3000)))
    (tmp_path / "mu.txt").write_text(" ".join(r.choice(mu_s) for _ in range(3000)))
    common = [*TINY, "lora.r=8", "lora.dropout=0.0", "train.batch_size=4", "train.max_steps=60",
              "lora.targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
    nu = run_stage(apply_overrides(RunConfig(), [*common, "train.lr=0.05", f"data=text:{tmp_path / 'nu.txt'}",
                                                  f"out={tmp_path / 'nu'}"]), "general")
    runs = {}
    for name, extra in {"plain": ["method.name=none"], "hlora": ["method.name=hlora", "method.phi=1"]}.items():
        runs[name] = run_stage(apply_overrides(RunConfig(), [
            *common, "train.lr=0.003", f"data=text:{tmp_path / 'mu.txt'}", f"out={tmp_path / name}",
            f"init_adapter={nu / 'adapter'}", f"importance_file={nu / 'importance.safetensors'}", *extra]), "domain")

    def nu_loss(run):
        model, tok, _ = load_model("tiny-llama")
        model = load_adapter(model, run / "adapter")
        ds = pack(tok, get_task(f"text:{tmp_path / 'nu.txt'}").train_texts(), 32)
        with torch.no_grad():
            return sum(model(**b).loss.item() for b in batches(ds, 8, limit=64)) / 8

    l_nu, l_plain, l_h = nu_loss(nu), nu_loss(runs["plain"]), nu_loss(runs["hlora"])
    assert l_h < l_plain, (l_nu, l_plain, l_h)
    assert abs(l_h - l_nu) < 0.5 * abs(l_plain - l_nu), (l_nu, l_plain, l_h)
    pen = [json.loads(l)["penalty"] for l in (runs["hlora"] / "log.jsonl").read_text().splitlines()]
    assert pen[0] == 0.0 and max(pen) > 0  # zero at the reference, then positive


DDP_SCRIPT = r"""
import sys
from hlora.config import RunConfig, apply_overrides
from hlora.train import run_stage
cfg = apply_overrides(RunConfig(), sys.argv[1:])
run_stage(cfg, "general")
"""


def _free_port() -> int:
    """A port no one listens on now (a fixed one collides with another run of the suite on the same machine)."""
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path, embedded_data):
    common = [*TINY, "train.max_steps=3", "train.shuffle=false", "lora.dropout=0.0", "train.max_grad_norm=0"]
    one = run_stage(apply_overrides(RunConfig(), [*common, "train.batch_size=4", f"out={tmp_path / 'one'}"]), "general")
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script),
           *common, "train.batch_size=2", f"out={tmp_path / 'two'}"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(one, tmp_path / "two", tol=2e-4)


# ------------------------------------------------------------------ a continued adapter keeps its LoRA settings


def _saved_adapter(path: Path, targets=("q_proj", "v_proj"), r=4, alpha=16.0) -> Path:
    """A PEFT adapter on the tiny model, saved as `hlora general` would (no training needed)."""
    from hlora.config import LoraConfig
    from hlora.model import attach_lora
    from hlora.tiny import tiny_model

    attach_lora(tiny_model("tiny-llama"), LoraConfig(targets=list(targets), r=r, alpha=alpha)).save_pretrained(str(path))
    return path


def test_cli_init_adapter_refuses_lora_settings_it_cannot_honour(tmp_path, embedded_data, capsys):
    """`--targets q_proj,k_proj --init-adapter <q,v adapter>` would train q,v and record q,k: an error naming both."""
    from hlora.cli import main

    adapter = _saved_adapter(tmp_path / "nu")
    base = ["domain", "--model", "tiny-llama", "--data", "sciq", "--method", "none", "--max-steps", "1",
            "--init-adapter", str(adapter)]
    for flags, values in [(["--targets", "q_proj,k_proj", "--r", "4"], ("q_proj,k_proj", "q_proj,v_proj")),
                          (["--r", "8"], ("lora.r=8", "r 4")), (["--r", "4", "lora.alpha=64"], ("alpha=64", "16")),
                          (["--r", "4", "lora.rslora=true"], ("rslora=True", "rslora False"))]:
        out = tmp_path / "mu"
        assert main([*base, *flags, f"out={out}"]) == 2
        err = capsys.readouterr().err
        assert all(v in err for v in values) and "init_adapter" in err, err
        assert not out.exists()


def test_init_adapter_settings_apply_when_not_set_and_config_records_them(tmp_path, embedded_data, capsys):
    adapter = _saved_adapter(tmp_path / "nu", targets=("q_proj", "k_proj"), r=2, alpha=8.0)
    cfg = apply_overrides(RunConfig(), ["model.name=tiny-llama", "train.seq_len=32", "train.batch_size=2",
                                        "train.max_steps=1", "data=sciq", "method.name=none",
                                        f"init_adapter={adapter}", f"out={tmp_path / 'mu'}"])
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.r == 8  # the defaults
    with pytest.raises(ValueError, match="lora.targets=q_proj,v_proj"):  # from code, every field counts as set
        run_stage(cfg, "domain")
    out = run_stage(cfg, "domain", explicit={"model.name", "data", "init_adapter", "lora.dropout"})
    assert "lora.targets=k_proj,q_proj" in capsys.readouterr().err  # a printed notice
    import yaml

    ran = yaml.safe_load((out / "config.yaml").read_text())["lora"]
    assert sorted(ran["targets"]) == ["k_proj", "q_proj"] and ran["r"] == 2 and ran["alpha"] == 8.0
    trained = {k.split(".")[-3] for k in adapter_tensors(out)}  # ...<module>.lora_A.weight
    assert trained == {"q_proj", "k_proj"}


def test_explicit_keys_are_what_yaml_and_overrides_set(tmp_path):
    from hlora.config import explicit_keys

    f = tmp_path / "c.yaml"
    f.write_text("lora: {r: 4}\ndata: sciq\n")
    assert explicit_keys(f, ["lora.targets=q_proj", "train.lr=1"]) == {"lora.r", "data", "lora.targets", "train.lr"}


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("yes", True), ("0", False), ("false", False),
                                      ("OFF", False), ("no", False)])
def test_progress_bars_follow_one_switch(monkeypatch, tmp_path, value, on):
    """$HLORA_PROGRESS turns the Trainer's bars and evaluation's bars on or off by one rule (util.progress_enabled)."""
    from hlora.config import RunConfig
    from hlora.evaluate import engine
    from hlora.train import _training_args

    if value is None:
        monkeypatch.delenv("HLORA_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("HLORA_PROGRESS", value)
    assert _training_args(RunConfig(), tmp_path, None).disable_tqdm is (not on)
    bar = engine._progress(1, "test", True)
    assert bar.disable is (not on)
    bar.close()
