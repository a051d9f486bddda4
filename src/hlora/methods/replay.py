"""Replay: a share ρ of every optimizer step's sequences comes from the general pool of stage ν.

What practitioners do first against forgetting (LLaMA-Factory's `mix_strategy`/`interleave_probs`). The
mix is fixed per step, not only in expectation: the method lays out the stage's data as consecutive global
batches (per-device batch × gradient accumulation × processes) of which round(ρ·G) sequences are general,
and the Trainer reads them in that order. Steps and batch size stay those of the plain run, so replay trains
on fewer domain sequences per step, not on more steps.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from ..config import MethodConfig
from .base import Method


@dataclass
class ReplayConfig(MethodConfig):
    name: str = "replay"
    rho: float = 0.25  # share of each step's sequences drawn from the general pool


class MixedDataset(Dataset):
    """Sequences of two packed datasets in a fixed order: `order[i] = (source, index)`; read in order."""

    ordered = True

    def __init__(self, domain, general, order: list[tuple[int, int]], steps: int, description: dict):
        self.sources, self.order, self.steps, self.description = (domain, general), order, steps, description

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        src, j = self.order[i]
        return self.sources[src][j]


def plain_steps(n_sequences: int, train, world: int = 1) -> int:
    """Optimizer steps of a plain run over `n_sequences` (the Trainer's count for these settings)."""
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = max(math.ceil(n_sequences / (train.batch_size * world)) // train.grad_accum, 1)
    return math.ceil(train.epochs * per_epoch)


def mix_order(n_domain: int, n_general: int, steps: int, global_batch: int, k: int, seed: int):
    """Per step: k general and global_batch − k domain sequences, each source cycled through its own seeded
    permutations (no repeat before the pool is used up), shuffled within the step."""
    g = torch.Generator().manual_seed(seed)

    def stream(n):
        while True:
            yield from torch.randperm(n, generator=g).tolist()

    dom, gen = stream(n_domain), stream(n_general)
    order = []
    for _ in range(steps):
        step = [(1, next(gen)) for _ in range(k)] + [(0, next(dom)) for _ in range(global_batch - k)]
        perm = torch.randperm(global_batch, generator=g).tolist()
        order.extend(step[p] for p in perm)
    return order


class Replay(Method):
    config_class = ReplayConfig

    def train_dataset(self, dataset):
        rho = float(self.cfg.rho)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"replay: rho must be in [0, 1], got {rho}")
        if self.ctx.general_pool is None:
            raise ValueError("method 'replay' needs the general pool of stage ν (general_data)")
        t = self.ctx.run.train
        world = int(os.environ.get("WORLD_SIZE", "1"))
        G = t.batch_size * t.grad_accum * world
        steps = plain_steps(len(dataset), t, world)
        k = round(rho * G)
        pool = self.ctx.general_pool()
        order = mix_order(len(dataset), len(pool), steps, G, k, seed=t.seed)
        seq_len = int(dataset[0]["input_ids"].shape[0])
        self.costs.general_tokens = self.costs.replaced_tokens = steps * k * seq_len
        desc = {"data": "replay", "domain": dataset.description, "general": pool.description, "rho": rho,
                "general_per_step": k, "global_batch": G, "steps": steps}
        return MixedDataset(dataset, pool, order, steps, desc)
