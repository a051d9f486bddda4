"""α points kept beside the adapter they measure, so that they are measured once.

Tunes with other budget levels on the same measure train the same plain-LoRA adapter (with `tune.runs_dir` they
share its run) and then search α over largely the same grid (1, 0.75, 0.5, ...); an interrupted tune searches
again from the start. A point is a pure function of the adapter, the scale α, the slice's content and the
evaluation settings, so it is read back instead: the file lives in the adapter's run directory (it goes when the
run goes) and each entry is keyed by a digest of everything else that determines it.

Cached points are flagged (`cached: true` in tune.json) and take no seconds in this tune; the evaluation counts
stay those of a tune run on its own, as the training steps of a reused run do.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..files import write_json
from ..util import digest
from .measure import Measurer, Point

FILE = "alpha_points.json"
VERSION = 1


def _slice_id(task) -> dict:
    """A slice by its content (texts or items), not its name: a changed slice config changes the key."""
    return {"name": task.name, "kind": task.kind, "max_tokens": task.max_tokens,
            "content": digest(task.texts if task.kind == "text" else [repr(i) for i in task.items], 16)}


def measurer_keys(m: Measurer) -> tuple[str, str]:
    """(forgetting key, domain key) of what a Measurer's points depend on besides the adapter and α."""
    from ..experiment.run import EVALUATOR_VERSION

    common = {"evaluator": EVALUATOR_VERSION, "batch_size": m.batch_size, "window": m.window, "version": VERSION}
    forgetting = {**common, "task": m.budget.task, "kind": m.budget.kind, "general": [_slice_id(t) for t in m.general]}
    domain = {**common, "domain": _slice_id(m.domain) if m.domain is not None else None}
    return digest(forgetting, 16), digest(domain, 16)


class PointCache:
    """The α points of one adapter: `forgetting(fn)` and `domain(fn)` wrap a Measurer's `forgetting_at` and
    `domain_at`, reading a point from the file when it is there and writing it (atomically) when it is new."""

    def __init__(self, run_dir: str | Path, measurer: Measurer):
        self.path = Path(run_dir) / FILE
        self.fkey, self.dkey = measurer_keys(measurer)
        self.data = {"version": VERSION, "forgetting": {}, "domain": {}}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:  # written atomically, so only a hand edit gets here: measure again
                data = {}
            if data.get("version") == VERSION:
                self.data = {"version": VERSION, "forgetting": data.get("forgetting", {}),
                             "domain": data.get("domain", {})}
        self.hits = 0

    @staticmethod
    def _a(alpha: float) -> str:
        return repr(round(float(alpha), 12))

    def _save(self) -> None:
        write_json(self.path, self.data)

    def forgetting(self, fn: Callable[[float], Point]) -> Callable[[float], Point]:
        def at(alpha: float) -> Point:
            table = self.data["forgetting"].setdefault(self.fkey, {})
            hit = table.get(self._a(alpha))
            if hit is not None:
                self.hits += 1
                return Point(alpha=alpha, forgetting=hit["forgetting"], se=hit["se"], detail=hit.get("detail", {}), cached=True)
            p = fn(alpha)
            table[self._a(alpha)] = {"forgetting": p.forgetting, "se": p.se, "detail": p.detail}  # not its domain
            self._save()  # accuracy: that has its own key
            return p
        return at

    def domain(self, fn: Callable[[float], tuple[float, float]]) -> Callable[[float], tuple[float, float]]:
        def at(alpha: float) -> tuple[float, float]:
            table = self.data["domain"].setdefault(self.dkey, {})
            hit = table.get(self._a(alpha))
            if hit is not None:
                self.hits += 1
                return hit["acc"], hit["se"]
            acc, se = fn(alpha)
            table[self._a(alpha)] = {"acc": acc, "se": se}
            self._save()
            return acc, se
        return at
