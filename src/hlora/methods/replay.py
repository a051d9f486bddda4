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

from .spec import MethodConfig, Row
from .base import Method


@dataclass
class ReplayConfig(MethodConfig):
    name: str = "replay"
    rho: float = 0.25  # share of each step's sequences drawn from the general pool


class MixedDataset:  # a map-style dataset (len, getitem): what the Trainer's DataLoader reads
    """Sequences of two packed datasets, laid out step by step (`order[i] = (source, index)`) and read in order.

    The layout of a step is made when the Trainer first reads it, with the number of general sequences from the
    current `rho`: round(ρ·G) while ρ is fixed, or error diffusion once a controller steers ρ (`steered`; the
    shares of consecutive steps then average ρ·G). With a fixed ρ the layout equals `mix_order`'s."""

    ordered = True

    def __init__(self, domain, general, steps: int, global_batch: int, rho: float, seed: int, description: dict,
                 steered: bool = False):
        self.sources, self.steps, self.G, self.rho, self.steered = (domain, general), steps, global_batch, rho, steered
        self.description = description
        self.order: list[tuple[int, int]] = []
        self.general_sequences = 0
        self._carry = 0.0
        self._layout = _mix_steps(len(domain), len(general), global_batch, self._k, seed)

    def _k(self) -> int:
        if not self.steered:
            return round(self.rho * self.G)
        want = self.rho * self.G + self._carry
        k = min(max(int(math.floor(want + 1e-9)), 0), self.G)
        self._carry = want - k
        return k

    def __len__(self) -> int:
        return self.steps * self.G

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        while len(self.order) <= i:
            step = next(self._layout)
            self.general_sequences += sum(src for src, _ in step)
            self.order.extend(step)
        src, j = self.order[i]
        return self.sources[src][j]


def plain_steps(n_sequences: int, train, world: int = 1) -> int:
    """Optimizer steps of a plain run over `n_sequences` (the Trainer's count for these settings)."""
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = max(math.ceil(n_sequences / (train.batch_size * world)) // train.grad_accum, 1)
    return math.ceil(train.epochs * per_epoch)


def _mix_steps(n_domain: int, n_general: int, global_batch: int, k_of_step, seed: int):
    """Endless steps: per step k_of_step() general and global_batch − k domain sequences, each source cycled
    through its own seeded permutations (no repeat before the pool is used up), shuffled within the step."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def stream(n):
        while True:
            yield from torch.randperm(n, generator=g).tolist()

    dom, gen = stream(n_domain), stream(n_general)
    while True:
        k = k_of_step()
        step = [(1, next(gen)) for _ in range(k)] + [(0, next(dom)) for _ in range(global_batch - k)]
        perm = torch.randperm(global_batch, generator=g).tolist()
        yield [step[p] for p in perm]


def mix_order(n_domain: int, n_general: int, steps: int, global_batch: int, k: int, seed: int):
    """The layout of `steps` steps with k general sequences each (see `_mix_steps`)."""
    layout = _mix_steps(n_domain, n_general, global_batch, lambda: k, seed)
    return [pair for _ in range(steps) for pair in next(layout)]


ROWS = [Row("replay", "Replay", "fresh", (("name", "replay"),), sweep="rho")]


class Replay(Method):
    config_class = ReplayConfig
    coefficient, coefficient_range = "rho", (0.0, 0.9)  # at most 0.9: a step keeps some domain data
    _mixed: MixedDataset | None = None
    _steered = False

    def set_coefficient(self, value: float) -> None:
        super().set_coefficient(value)
        self._steered = True
        if self._mixed is not None:  # steps laid out from now on take the new share
            self._mixed.rho, self._mixed.steered = float(value), True

    def bench_variant(self, model, omega, domain, general):
        # a share ρ of the batch from the general pool: the same work as a plain step
        import torch

        k = int(domain["input_ids"].shape[0] * self.cfg.rho)
        return {"batch": {key: torch.cat([general[key][:k], domain[key][k:]]) for key in domain}}

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
        self.seq_len = int(dataset[0]["input_ids"].shape[0])
        self.costs.general_tokens = self.costs.replaced_tokens = steps * k * self.seq_len
        desc = {"data": "replay", "domain": dataset.description, "general": pool.description, "rho": rho,
                "general_per_step": k, "global_batch": G, "steps": steps}
        if self._steered:
            desc["rho_steered"] = True
        self._mixed = MixedDataset(dataset, pool, steps, G, rho, seed=t.seed, description=desc, steered=self._steered)
        return self._mixed

    def save(self, model, out, summary: dict) -> dict:
        if self._steered and self._mixed is not None:  # the share varied: count what was laid out
            self.costs.general_tokens = self.costs.replaced_tokens = self._mixed.general_sequences * self.seq_len
        return super().save(model, out, summary)
