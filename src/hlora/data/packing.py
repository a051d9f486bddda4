"""Training sequences: texts tokenized, joined with EOS and cut into fixed-length blocks.

Packing wastes no compute on padding and makes every block carry the same number of loss tokens,
which keeps the loss of one process equal to that of several (DDP) on the same global batch.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .base import DataError


class PackedDataset(Dataset):
    def __init__(self, blocks: torch.Tensor, description: dict | None = None):
        self.blocks = blocks
        self.description = description or {}

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    @property
    def n_tokens(self) -> int:
        return int(self.blocks.numel())


def pack(tokenizer, texts: list[str], seq_len: int, name: str = "data") -> PackedDataset:
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("tokenizer has no EOS token to separate packed documents")
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(
            f"{name}: {len(stream)} tokens is less than one training sequence of {seq_len} tokens; "
            "use more data or a smaller train.seq_len"
        )
    blocks = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return PackedDataset(blocks, {"data": name, "texts": len(texts), "sequences": n, "seq_len": seq_len,
                                  "tokens": n * seq_len, "dropped_tokens": len(stream) - n * seq_len})


def batches(ds: PackedDataset, batch_size: int, limit: int = 0):
    """Plain in-order batches (Fisher estimation): dicts of stacked tensors."""
    n = len(ds) if not limit else min(limit, len(ds))
    for i in range(0, n, batch_size):
        rows = [ds[j] for j in range(i, min(i + batch_size, n))]
        yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def general_pool(tokenizer, task: str, seq_len: int, limit: int = 0) -> PackedDataset:
    """The general-text pool of stage ν: the training texts of `task` (e.g. "wikitext") packed into
    `seq_len`-token sequences. Stage ν trains on it; replay, KL-to-base, the EWC Fisher and CorDA's
    covariance draw on the same pool, so every method sees the same general data."""
    from .tasks import get_task

    return pack(tokenizer, get_task(task).train_texts(limit), seq_len, task)


def shuffled_batches(ds: PackedDataset, batch_size: int, seed: int):
    """Endless batches of `batch_size` sequences: a seeded permutation per pass, no sequence repeated
    within a pass (a method drawing general batches during training)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(ds), generator=g).tolist()
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            rows = [ds[j] for j in order[i:i + batch_size]]
            yield {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
