"""Small helpers shared across the package: one copy each."""
from __future__ import annotations

import contextlib
import difflib
import math
import os
import time
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # torch is imported where it is used: `import hlora.config` stays torch-free
    import torch
    from torch import nn


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, or ''."""
    hint = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def digest(obj, length: int = 12) -> str:
    """A short, stable name for a JSON-able object: the first `length` hex digits of the SHA-256 of its canonical
    JSON (sorted keys; anything else as str). Run directories, record hashes and cache keys are named by it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def plus_minus(se: float | None) -> str:
    """"± s.e." for a number, "± n/a" where a slice cannot give one (a test slice of a single document: nan)."""
    return f"± {se:.2g}" if se is not None and math.isfinite(se) else "± n/a"


def lazy_exports(owner: str, module: str, names: Iterable[str]):
    """A module `__getattr__` for module `owner` that serves `names` from its sibling `module`, imported on first use (a method's
    declaration stays torch-free while its math keeps answering at the old address)."""
    import importlib

    wanted = frozenset(names)

    def __getattr__(name: str):
        if name in wanted:
            return getattr(importlib.import_module(f"{owner.rpartition('.')[0]}.{module}"), name)
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")

    return __getattr__


def progress_enabled() -> bool:
    """Progress bars (evaluation's and the Trainer's) are on unless $HLORA_PROGRESS is 0 / false / no / off."""
    return os.environ.get("HLORA_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    import torch

    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode (no dropout) for the block; every module's own train/eval flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in flags:
            m.training = t


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """The pretrained model: PeftModel.disable_adapter() where there is one, else the model as it is."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@contextlib.contextmanager
def requires_grad(params: Iterable[torch.Tensor]):
    """Temporarily make `params` require grad (so outputs depending on them carry a graph)."""
    saved = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in saved:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class DeviceClock:
    """Time spent in blocks of code (`with clock(device): ...`; total in `.seconds`): perf_counter on CPU; CUDA
    events on a GPU, where kernels run after the Python call returns (events time them without stalling the
    stream to synchronise). The SI recorder reports its cost on top of training with one."""

    def __init__(self):
        self._cpu = 0.0
        self._events: list = []

    @contextlib.contextmanager
    def __call__(self, device: torch.device):
        if device.type == "cuda":
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t = time.perf_counter()
            try:
                yield
            finally:
                self._cpu += time.perf_counter() - t

    @property
    def seconds(self) -> float:
        for start, end in self._events:  # resolve lazily: waits only for the recorded kernels
            end.synchronize()
            self._cpu += start.elapsed_time(end) / 1000.0
        self._events.clear()
        return self._cpu
