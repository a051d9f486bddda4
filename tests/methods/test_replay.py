"""Replay: the share of general sequences in every optimizer step, counted from what the Trainer fed the model."""
from __future__ import annotations

import json

import pytest
import torch

from hlora.config import RunConfig, apply_overrides
from hlora.data import get_task
from hlora.data.packing import general_pool
from hlora.methods.replay import Replay, mix_order, plain_steps
from hlora.tiny import tiny_tokenizer
from hlora.train import run_stage

TINY = ["model.name=tiny-llama", "lora.r=4", "lora.alpha=16", "train.seq_len=32", "train.lr=0.01", "data=sciq"]


def test_mix_order_per_step_share_and_no_repeats():
    order = mix_order(n_domain=10, n_general=7, steps=5, global_batch=4, k=1, seed=0)
    assert len(order) == 20
    for s in range(5):
        assert sum(src for src, _ in order[4 * s:4 * s + 4]) == 1  # exactly k general per step
    gen = [j for src, j in order if src == 1]
    assert sorted(gen) == sorted(set(gen))  # 5 draws from a pool of 7: no repeat within a pass
    dom = [j for src, j in order if src == 0]
    assert sorted(dom[:10]) == list(range(10))  # the domain data is used up before it repeats


@pytest.mark.parametrize("batch,accum,rho,k", [(4, 1, 0.5, 2), (2, 2, 0.25, 1), (4, 1, 0.0, 0)])
def test_trainer_sees_the_share_of_general_sequences_each_step(tmp_path, embedded_data, monkeypatch, batch, accum,
                                                               rho, k):
    seen: list[torch.Tensor] = []
    real = Replay.loss

    def spy(self, model, inputs, outputs):
        seen.append(inputs["input_ids"].detach().clone())
        return real(self, model, inputs, outputs)

    monkeypatch.setattr(Replay, "loss", spy)
    cfg = apply_overrides(RunConfig(), [*TINY, "method.name=replay", f"method.rho={rho}", "train.max_steps=3",
                                        f"train.batch_size={batch}", f"train.grad_accum={accum}", f"out={tmp_path / 'r'}"])
    out = run_stage(cfg, "domain")
    pool = {tuple(r["input_ids"].tolist()) for r in general_pool(tiny_tokenizer(), "wikitext", 32)}
    rows = [tuple(r.tolist()) for b in seen for r in b]
    G = batch * accum
    assert len(rows) == 3 * G
    per_step = [sum(r in pool for r in rows[s * G:(s + 1) * G]) for s in range(3)]
    assert per_step == [k, k, k]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["costs"]["general_tokens"] == 3 * k * 32
    assert summary["costs"]["domain_tokens"] == 3 * (G - k) * 32
    assert summary["steps"] == 3


def test_plain_steps_follows_the_trainer_count():
    class T:
        max_steps, batch_size, grad_accum, epochs = -1, 4, 2, 1.0

    assert plain_steps(33, T) == 4  # ceil(33 / 4) = 9 micro-batches -> 4 optimizer steps
    T.max_steps = 7
    assert plain_steps(33, T) == 7


def test_rho_out_of_range_is_an_error(tmp_path, embedded_data):
    cfg = apply_overrides(RunConfig(), [*TINY, "method.name=replay", "method.rho=1.5", "train.max_steps=1",
                                        f"out={tmp_path / 'bad'}"])
    with pytest.raises(ValueError, match="rho must be in"):
        run_stage(cfg, "domain")
    assert not (tmp_path / "bad").exists()
    assert get_task("sciq").kind == "mcq"
