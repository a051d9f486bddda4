"""A forgetting budget and how it is measured: on a validation slice while searching, on a test slice at the end.

A budget is one general measure and a limit:

    ppl_rise_pct  a general text task's token perplexity rise over the base model, in % (c4, wikitext, text:FILE)
    kl            a general text task's mean KL(p_base ‖ p_model) per token, in nats
    drop_pts      an MCQ task's or group's accuracy drop from the base model, in points (battery: the unweighted
                  mean over its six tasks, as evaluate reports it)

written `<task>_<kind>=<limit>` (`c4_kl=0.05`, `c4_ppl_rise_pct=2`, `battery_drop_pts=1`, `wikitext_ppl_rise_pct=2`).

Slices (never the reported test items):
- general text: the test slice is the task's held-out documents from the start, cut at `general_test_tokens`
  tokens (what `hlora eval` with `eval.ppl_max_tokens` measures); the validation slice is documents from the end,
  with long documents cut at line breaks into pieces (so that the noise of the measure can be estimated per piece),
  whole pieces until `general_val_tokens` and at least 8 pieces; the two never share a document.
- MCQ measure tasks: test = the first `mcq_test_items` items, validation = the last `mcq_val_items`, at most half
  of the task (disjoint: COPA's 100 items give 50 and 50).
- the domain task: validation = `<task>:validation` where the task has that split (SciQ), else the last
  `domain_val_items` of its held-out items; test = the held-out split without those.

Every measure comes with its standard error over documents / items (a paired difference against the base model
on the same documents or items), so that a budget smaller than the noise of the slice is caught.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

KINDS = {"ppl_rise_pct": "text", "kl": "text", "drop_pts": "mcq"}
MIN_UNITS = 8  # documents / pieces of a general validation slice at least (its noise is estimated over them)
UNITS = {"ppl_rise_pct": "% perplexity rise", "kl": "nats/token KL(p_base‖p)", "drop_pts": "accuracy points lost"}


class BudgetError(ValueError):
    """The budget cannot be met or resolved; `.result` holds what was measured (points evaluated)."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


@dataclass
class Budget:
    """What the model may lose on one general measure."""

    task: str = "c4"  # general text task (ppl_rise_pct, kl) or MCQ task / group (drop_pts)
    kind: str = "kl"  # ppl_rise_pct | kl | drop_pts
    limit: float = 0.0  # the most forgetting allowed, in the kind's units (> 0)

    @property
    def measure(self) -> str:
        return f"{self.task}_{self.kind}"

    @property
    def units(self) -> str:
        return UNITS.get(self.kind, "")

    def check(self) -> "Budget":
        if self.kind not in KINDS:
            raise ConfigError(f"budget.kind: {self.kind!r} is not a measure; known: {', '.join(KINDS)}")
        if not (isinstance(self.limit, (int, float)) and math.isfinite(self.limit) and self.limit > 0):
            raise ConfigError(f"budget.limit must be a number > 0 (e.g. --budget c4_kl=0.05), got {self.limit!r}")
        if not self.task:
            raise ConfigError("budget.task: name the general task the budget is measured on (e.g. c4)")
        return self

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """`c4_kl=0.05` -> Budget(task="c4", kind="kl", limit=0.05); the task may be any task name (text:FILE)."""
        measure, sep, value = str(text).rpartition("=")
        if not sep or not measure:
            raise ConfigError(f"budget {text!r}: expected MEASURE=LIMIT, e.g. c4_kl=0.05 or battery_drop_pts=1")
        for kind in sorted(KINDS, key=len, reverse=True):
            if measure.endswith("_" + kind) and len(measure) > len(kind) + 1:
                try:
                    limit = float(value)
                except ValueError:
                    raise ConfigError(f"budget {text!r}: limit {value!r} is not a number") from None
                return cls(task=measure[: -len(kind) - 1], kind=kind, limit=limit).check()
        raise ConfigError(f"budget {text!r}: the measure must end in one of {', '.join('_' + k for k in KINDS)} "
                          "(e.g. c4_kl, c4_ppl_rise_pct, battery_drop_pts, wikitext_ppl_rise_pct)")

    def __str__(self) -> str:
        return f"{self.measure} <= {self.limit:g} ({self.units})"


@dataclass
class SliceConfig:
    """Where the validation and test items of the search come from (see the module docstring)."""

    general_val_tokens: int = 8192  # tokens of the general text validation slice at least (from the end)
    general_test_tokens: int = 8192  # tokens of its test slice (from the start: the fronts measure 8,192)
    piece_chars: int = 2000  # validation documents longer than twice this are cut into pieces of about this size
    mcq_val_items: int = 100  # items per task of an MCQ measure (drop_pts) for validation, from the end
    mcq_test_items: int = 100  # ... and for test, from the start
    domain_val: str = ""  # the domain validation task; "" = <task>:validation if it exists, else its last items
    domain_val_items: int = 200  # domain validation items
    domain_test_items: int = 0  # domain test items (0 = all of the held-out split not used for validation)


# ----------------------------------------------------------------------------- slices as tasks


@dataclass
class SliceTask:
    """A fixed subset of a task's held-out documents or items, evaluated like a task (evaluate.evaluate)."""

    name: str
    kind: str  # "text" | "mcq"
    texts: list = field(default_factory=list)
    items: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    max_tokens: int = 0  # text: tokens scored (perplexity's max_tokens)

    def eval_texts(self) -> list[str]:
        return list(self.texts)

    def eval_items(self, limit: int = 0) -> list:
        return self.items[:limit] if limit else list(self.items)

    def describe(self) -> dict:
        return dict(self.info)


def expand(name: str) -> list[str]:
    """A task name, or a group's member names (battery)."""
    from ..data import tasks as T

    groups = getattr(T, "TASK_GROUPS", {})
    return list(groups.get(name, (name,)))


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut at line breaks into pieces of about `size` characters (kept whole if shorter than 2·size)."""
    if size <= 0 or len(text) < 2 * size:
        return [text]
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        cur += line
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    if cur.strip():
        if out and len(cur) < size // 2:
            out[-1] += cur
        else:
            out.append(cur)
    return [p for p in out if p.strip()] or [text]


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def text_slices(task_name: str, tok, cfg: SliceConfig) -> tuple[SliceTask, SliceTask]:
    """(validation, test) slices of a general text task's held-out documents (disjoint)."""
    from ..data import get_task

    task = get_task(task_name)
    if task.kind != "text":
        raise ConfigError(f"budget.task: {task_name!r} is a {task.kind} task; ppl_rise_pct and kl need general text")
    docs = task.eval_texts()
    test, n = [], 0
    for d in docs:
        if n >= cfg.general_test_tokens:
            break
        test.append(d)
        n += _n_tokens(tok, d)
    val, m, used = [], 0, 0
    for d in reversed(docs[len(test):]):  # whole pieces, at least MIN_UNITS of them (the noise is estimated per piece)
        if m >= cfg.general_val_tokens and len(val) >= MIN_UNITS:
            break
        used += 1
        for p in _pieces(d, cfg.piece_chars):
            val.append(p)
            m += _n_tokens(tok, p)
    if m < cfg.general_val_tokens or len(val) < MIN_UNITS:
        raise ConfigError(
            f"slices: general task {task_name!r} has {len(docs)} held-out documents: after {len(test)} for a test slice "
            f"of {cfg.general_test_tokens} tokens, {len(val)} documents/pieces of {m} tokens are left for a validation "
            f"slice of {cfg.general_val_tokens} tokens in {MIN_UNITS} or more pieces; lower slices.general_val_tokens, "
            "slices.general_test_tokens or slices.piece_chars")
    info = {"task": task_name, "n_docs_held_out": len(docs)}
    return (SliceTask(task_name, "text", texts=val,
                      info={**info, "slice": "validation", "docs": f"last {used}", "pieces": len(val), "tokens": m}),
            SliceTask(task_name, "text", texts=test, max_tokens=cfg.general_test_tokens,
                      info={**info, "slice": "test", "docs": f"first {len(test)}", "tokens": cfg.general_test_tokens}))


def mcq_slices(task_name: str, cfg: SliceConfig) -> tuple[list[SliceTask], list[SliceTask]]:
    """(validation, test) slices of each task of an MCQ measure (a task or a group)."""
    from ..data import get_task

    val, test = [], []
    for name in expand(task_name):
        task = get_task(name)
        if task.kind != "mcq":
            raise ConfigError(f"budget.task: {name!r} is a {task.kind} task; drop_pts needs multiple-choice tasks")
        items = task.eval_items()
        # validation from the end, at most half of a small task (COPA has 100 items); test from the start
        nv = min(cfg.mcq_val_items or len(items) // 2, len(items) // 2)
        nt = min(cfg.mcq_test_items or len(items), len(items) - nv)
        if nv < 2 or nt < 1:
            raise ConfigError(f"slices: MCQ task {name!r} has {len(items)} items, too few for validation and test")
        val.append(SliceTask(name, "mcq", items=items[len(items) - nv:],
                             info={"task": name, "slice": "validation", "items": f"last {nv} of {len(items)}"}))
        test.append(SliceTask(name, "mcq", items=items[:nt],
                              info={"task": name, "slice": "test", "items": f"first {nt} of {len(items)}"}))
    return val, test


def domain_slices(task_name: str, cfg: SliceConfig) -> tuple[SliceTask, SliceTask]:
    """(validation, test) items of the domain task: its validation split where it has one, else its held-out
    items split (validation from the end, test from the start)."""
    from ..data import get_task

    task = get_task(task_name)
    if task.kind != "mcq":
        raise ConfigError(f"data: the domain task {task_name!r} must be multiple choice (its accuracy is maximised)")
    held = task.eval_items()
    val_name = cfg.domain_val
    if not val_name and ":" not in task_name and "validation" in getattr(getattr(task, "template", None), "files", {}):
        val_name = f"{task_name}:validation"
    if val_name:
        vt = get_task(val_name)
        if vt.kind != "mcq":
            raise ConfigError(f"slices.domain_val: {val_name!r} is not a multiple-choice task")
        val = vt.eval_items(cfg.domain_val_items)
        ids = {(it.context, it.choices) for it in val}
        test = [it for it in held if (it.context, it.choices) not in ids]
        vinfo = {"task": val_name, "items": len(val)}
    else:
        nv = min(cfg.domain_val_items, len(held) // 2)
        if nv < 2:
            raise ConfigError(f"slices: domain task {task_name!r} has {len(held)} held-out items, too few to split "
                              "into validation and test; give slices.domain_val")
        val, test = held[len(held) - nv:], held[: len(held) - nv]
        vinfo = {"task": task_name, "items": f"last {nv} of {len(held)} held-out"}
    if cfg.domain_test_items:
        test = test[: cfg.domain_test_items]
    return (SliceTask(task_name, "mcq", items=list(val), info={**vinfo, "slice": "validation"}),
            SliceTask(task_name, "mcq", items=list(test), info={"task": task_name, "slice": "test", "items": len(test)}))


# ----------------------------------------------------------------------------- the measures


def _ratio_se(num: list[float], den: list[float]) -> float:
    """Standard error of Σnum/Σden over units (documents), the ratio estimator's: sqrt(m/(m−1)·Σ(x_i − R·n_i)²)/Σn."""
    m, N = len(num), sum(den)
    if m < 2 or N <= 0:
        return float("nan")
    r = sum(num) / N
    return math.sqrt(m / (m - 1) * sum((x - r * n) ** 2 for x, n in zip(num, den))) / N


def ppl_rise(nll: list[float], nll_base: list[float], n_tokens: list[int]) -> tuple[float, float]:
    """(100·(ppl/ppl_base − 1), its standard error) from per-document summed NLLs on the same tokens."""
    d = [a - b for a, b in zip(nll, nll_base)]
    mean = sum(d) / sum(n_tokens)
    return 100.0 * math.expm1(mean), 100.0 * math.exp(mean) * _ratio_se(d, n_tokens)


def kl_per_token(kl_sum: list[float], n_tokens: list[int]) -> tuple[float, float]:
    """(mean KL per token, its standard error) from per-document summed KL."""
    return sum(kl_sum) / sum(n_tokens), _ratio_se(kl_sum, n_tokens)


def acc_drop(acc: list[list[int]], acc_base: list[list[int]]) -> tuple[float, float]:
    """(100·(acc_base − acc), its standard error) averaged over tasks without weights (per-task paired items)."""
    drops, ses = [], []
    for a, b in zip(acc, acc_base):
        diff = [y - x for x, y in zip(a, b)]
        n = len(diff)
        mean = sum(diff) / n
        var = sum((x - mean) ** 2 for x in diff) / (n - 1) if n > 1 else float("nan")
        drops.append(100.0 * mean)
        ses.append(100.0 * math.sqrt(var / n))
    k = len(drops)
    return sum(drops) / k, math.sqrt(sum(s * s for s in ses)) / k


@dataclass
class Point:
    """One model measured: its forgetting (in the budget's units) and domain accuracy, with standard errors."""

    alpha: float
    forgetting: float
    se: float
    domain_acc: float = float("nan")
    domain_se: float = float("nan")
    seconds: float = 0.0
    feasible: bool | None = None
    detail: dict = field(default_factory=dict)
    cached: bool = False  # read from an earlier measurement of the same adapter (PointCache), not measured again

    def as_dict(self) -> dict:
        def num(x):  # a domain accuracy not measured (the α search measures it only where it decides) is null
            return None if isinstance(x, float) and math.isnan(x) else x

        return {"alpha": self.alpha, "forgetting": self.forgetting, "se": self.se, "domain_acc": num(self.domain_acc),
                "domain_se": num(self.domain_se), "seconds": round(self.seconds, 3), "feasible": self.feasible,
                **({"detail": self.detail} if self.detail else {}), **({"cached": True} if self.cached else {})}


class Measurer:
    """Measures a PEFT model's forgetting (against its own adapter-disabled base) and domain accuracy on fixed
    slices. The base model's side is measured once per slice and kept; `at(alpha)` rescales the adapter in place
    (PEFT's rescale_adapter_scale: the WiSE-FT model) and measures, without reloading anything."""

    def __init__(self, budget: Budget, general: SliceTask | list[SliceTask], domain: SliceTask | None, tok,
                 batch_size: int = 8, window: int = 512, base_cache: dict | None = None):
        self.budget, self.tok, self.batch_size, self.window = budget, tok, batch_size, window
        self.general = general if isinstance(general, list) else [general]
        self.domain = domain
        self.model = None
        self.base = base_cache if base_cache is not None else {}  # slice id -> base per-item values (shared)

    def attach(self, model) -> "Measurer":
        self.model = model
        return self

    def _eval(self, task: SliceTask, kl: bool) -> dict:
        from ..evaluate import evaluate

        r = evaluate(self.model, self.tok, [task], batch_size=self.batch_size, ppl_window=self.window,
                     ppl_max_tokens=task.max_tokens, progress=False, kl_reference="base" if kl else None)
        return r["tasks"][task.name]

    def _base(self, task: SliceTask) -> dict:
        key = (task.name, task.info.get("slice"), id(task))
        if key not in self.base:
            from ..util import adapter_disabled

            with adapter_disabled(self.model):
                self.base[key] = self._eval(task, kl=False)
        return self.base[key]

    def forgetting(self) -> tuple[float, float, dict]:
        """(forgetting, its standard error, detail) of the model as it stands."""
        kind = self.budget.kind
        if kind in ("ppl_rise_pct", "kl"):
            (task,) = self.general
            base = self._base(task)
            r = self._eval(task, kl=kind == "kl")
            if kind == "kl":
                v, se = kl_per_token(r["per_item"]["kl_sum"], r["per_item"]["n_tokens"])
            else:
                v, se = ppl_rise(r["per_item"]["nll"], base["per_item"]["nll"], r["per_item"]["n_tokens"])
            return v, se, {"token_ppl": r["token_ppl"], "base_token_ppl": base["token_ppl"], "tokens": r["n_tokens"]}
        accs, bases, detail = [], [], {}
        for task in self.general:
            base = self._base(task)
            r = self._eval(task, kl=False)
            accs.append(r["per_item"]["acc"])
            bases.append(base["per_item"]["acc"])
            detail[task.name] = {"acc": r["acc"], "base_acc": base["acc"], "n": r["n"]}
        v, se = acc_drop(accs, bases)
        return v, se, detail

    def domain_acc(self) -> tuple[float, float]:
        if self.domain is None:
            return float("nan"), float("nan")
        r = self._eval(self.domain, kl=False)
        return r["acc"], r["acc_stderr"]

    def _scaled(self, alpha: float | None):
        if alpha is None or alpha == 1.0:
            return contextlib.nullcontext()
        from peft.helpers import rescale_adapter_scale

        return rescale_adapter_scale(self.model, float(alpha))

    def measure(self, alpha: float | None = None, domain: bool = True) -> Point:
        """The model at adapter scale `alpha` (None: as it stands); `domain=False` leaves its domain accuracy out
        (NaN), for `domain_at` to measure later."""
        t0 = time.perf_counter()
        acc = acc_se = float("nan")
        with self._scaled(alpha):
            if alpha == 0.0:  # the base model: no forgetting by definition; measure its domain accuracy only
                v, se, detail = 0.0, 0.0, {}
            else:
                v, se, detail = self.forgetting()
            if domain:
                acc, acc_se = self.domain_acc()
        return Point(alpha=1.0 if alpha is None else float(alpha), forgetting=v, se=se, domain_acc=acc,
                     domain_se=acc_se, seconds=time.perf_counter() - t0, detail=detail)

    __call__ = measure

    def forgetting_at(self, alpha: float) -> Point:
        """The forgetting alone at scale `alpha`: what the α search decides by (the domain evaluation is half a point's
        cost, and only the chosen α's decides anything)."""
        return self.measure(alpha, domain=False)

    def domain_at(self, alpha: float) -> tuple[float, float]:
        """(domain accuracy, its standard error) at adapter scale `alpha`."""
        with self._scaled(alpha):
            return self.domain_acc()
