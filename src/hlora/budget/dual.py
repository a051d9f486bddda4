"""During training: a method's coefficient (φ, β, λ, ρ) steered as a dual variable toward a forgetting budget.

Every K optimizer steps, `DualController` measures the forgetting proxy on the next few pieces of the general
validation slice in a fixed rotation, scored as the budget's measure scores them (forward passes without
gradients: for KL also one with the adapter disabled; for a perplexity rise the base model's NLL of every piece
is computed once, at the start) and updates the coefficient from the relative violation
v = clip((measured − target)/target, ±max_violation):

    u ← u + η·v                 (the integral: the plain dual update)
    c = T⁻¹(u + kp·v + kd·Δv)   (a proportional term, kp = 2 by default: PI control; kd = 0)

with u = log c for coefficients that act multiplicatively (φ, β, λ: a range bounded away from 0) and u = c/0.2
for ρ (a share in [0, 0.9]: linear steps of 0.2·η per unit violation), clipped to the method's range
(anti-windup: u is clipped with c, so a coefficient pinned at a bound reacts at once when the sign changes).
The target is margin·limit (0.9 by default): the proxy is small and the final model is checked on the
validation slice by the α search anyway. With dual.smooth = w > 0 the update acts on an exponential moving average
of the readings (level ← w·level + (1 − w)·measured) instead of each reading: off by default (docs/budget.md).

Choice of η, K and kp (docs/budget.md has the study, benchmarks/dual_study.py runs it): forgetting responds to
the coefficient with a lag and a dead zone (what the adapter learned stays until training pulls it back), so the
plain integral update winds up while the proxy has not moved yet and overshoots, ringing at η = 2 (the
oscillation the constrained-RL literature reports for Lagrange multipliers, Stooke et al. 2020), and is too
slow at η ≤ 0.25. On tiny-llama (kl_general, 120 steps, β from 0.1) η = 0.5, K = 5 with a proportional term
kp = 2 ended at 1.00× the target with a spread of 0.09 over the last third (the integral alone: 0.58×, after
undershooting to 0.32×); K = 10 reacts late, K = 2 overshoots early. Defaults: η = 0.5, K = 5, kp = 2, kd = 0.

The method reads its coefficient at every step (Method.set_coefficient); without a controller nothing changes.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..config import ConfigError
from ..files import append_jsonl
from .measure import Budget, SliceTask


@dataclass
class DualConfig:
    every: int = 5  # K: optimizer steps between updates
    eta: float = 0.5  # η: step of log c (or of ρ/0.2) per unit of relative violation
    kp: float = 2.0  # proportional gain (PI control; docs/budget.md); 0 = the plain dual (integral) update
    kd: float = 0.0  # derivative gain on the violation's change between updates (PID)
    margin: float = 0.9  # aim at margin·limit
    max_violation: float = 1.0  # |relative violation| used per update at most
    proxy_tokens: int = 512  # general tokens per proxy measurement at least: whole validation pieces (text measures)
    proxy_items: int = 64  # MCQ items of the proxy (drop_pts measures)
    start: float = 0.0  # the coefficient's starting value; 0 = the method config's value
    smooth: float = 0.0  # weight of the past in an exponential moving average of the readings; 0 = each as it is

    def check(self) -> "DualConfig":
        for name in ("every", "proxy_tokens", "proxy_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dual.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eta", "margin", "max_violation"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"dual.{name} must be > 0, got {getattr(self, name)}")
        if self.kp < 0 or self.kd < 0 or self.start < 0:
            raise ConfigError("dual.kp, dual.kd and dual.start must be >= 0")
        if not 0 <= self.smooth < 1:
            raise ConfigError(f"dual.smooth must be in [0, 1), got {self.smooth}")
        return self


LINEAR_STEP = 0.2  # a coefficient whose range starts at 0 (ρ) moves by LINEAR_STEP·η per unit violation


class DualUpdate:
    """The update rule alone (tests drive it with synthetic forgetting curves)."""

    def __init__(self, start: float, target: float, lo: float, hi: float, cfg: DualConfig):
        if not target > 0:
            raise ValueError(f"the dual target must be > 0, got {target}")
        self.target, self.lo, self.hi, self.cfg = target, lo, hi, cfg
        self.log = lo > 0  # multiplicative coefficients (φ, β, λ) move in log space
        if self.log and not start > 0:
            raise ConfigError(f"dual.start: a coefficient in ({lo:g}, {hi:g}) must start > 0, got {start}")
        self.value = min(max(start, lo), hi)
        self.u = self._to_u(self.value)
        self.v_prev: float | None = None
        self.level: float | None = None  # the reading the update acts on (smoothed when cfg.smooth > 0)

    def _to_u(self, c: float) -> float:
        return math.log(c) if self.log else c / LINEAR_STEP

    def _from_u(self, u: float) -> float:
        return math.exp(u) if self.log else u * LINEAR_STEP

    def violation(self, measured: float) -> float:
        v = (measured - self.target) / self.target
        m = self.cfg.max_violation
        return max(-m, min(m, v)) if math.isfinite(v) else m

    def smoothed(self, measured: float) -> float:
        """The moving average of the readings so far (a non-finite reading is passed on, not averaged in)."""
        s = self.cfg.smooth
        if s and self.level is not None and math.isfinite(measured) and math.isfinite(self.level):
            self.level = s * self.level + (1 - s) * measured
        else:
            self.level = measured
        return self.level

    def update(self, measured: float) -> float:
        v = self.violation(self.smoothed(measured))
        lo_u, hi_u = self._to_u(self.lo), self._to_u(self.hi)
        self.u = max(lo_u, min(hi_u, self.u + self.cfg.eta * v))  # anti-windup: the integral stays in range
        dv = 0.0 if self.v_prev is None else v - self.v_prev
        self.v_prev = v
        self.value = min(max(self._from_u(self.u + self.cfg.kp * v + self.cfg.kd * dv), self.lo), self.hi)
        return self.value


# ----------------------------------------------------------------------------- proxies


def rotation(lengths: list[int], tokens: int, seed: int = 0) -> list[list[int]]:
    """The pieces in a fixed shuffled order, cut into consecutive groups of at least `tokens` tokens (the last
    group joins the one before it when it is short): every piece is in exactly one group."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    groups, cur, n = [], [], 0
    for i in order:
        cur.append(i)
        n += lengths[i]
        if n >= tokens:
            groups.append(cur)
            cur, n = [], 0
    if cur:
        if groups:
            groups[-1].extend(cur)
        else:
            groups.append(cur)
    return groups


class TextProxy:
    """KL(p_base ‖ p) per token, or the perplexity rise in %, on whole pieces of the general validation slice, each
    scored as the budget's measure scores it (its first `window` tokens predicted from the prefix token: the first
    rolling window of `hlora eval`). Each measurement takes the next group of about `tokens` tokens in a fixed
    rotation over all pieces, so that over a cycle the proxy reads the measure of the whole slice.

    Why: on SmolLM2 (C4, EWC-LoRA after 100 SciQ steps, validation measure 0.027 nats/token) a fixed batch read
    0.049 when packed into 128-token training blocks (short contexts forget more) and 0.015-0.044 as one, two,
    four or eight whole pieces (a piece's forgetting depends on its document): any fixed subset is a fixed bias
    that the controller's integral term turns into a model held far inside, or outside, its budget. A rotating
    subset is noisy instead, and the integral averages the noise out. KL needs the base model's log-probs of
    the group: they are computed with the adapter disabled at each measurement (two forward passes) rather
    than kept for the whole slice (8,192 tokens × 49,152 vocabulary = 1.6 GB in fp32)."""

    def __init__(self, kind: str, texts: list[str], tokens: int, window: int = 512):
        if kind not in ("kl", "ppl_rise_pct"):
            raise ValueError(f"TextProxy: kind must be kl or ppl_rise_pct, got {kind!r}")
        self.kind, self.texts, self.tokens, self.window = kind, texts, tokens, window
        self.docs = self.groups = self.base_nll = None
        self.measured = 0  # measurements so far (the next group is groups[measured % len(groups)])
        self.last_tokens = 0

    def prepare(self, model, tok) -> None:
        from ..evaluate.engine import resolve_max_length
        from ..evaluate.requests import encode_docs, prefix_token_id
        from ..util import adapter_disabled

        self.window = max(1, min(self.window, resolve_max_length(model, tok)))  # as the measure caps it
        self.docs = [d[0][: self.window] for d in encode_docs(tok, self.texts, 0) if d[0]]
        if not self.docs:
            raise ConfigError("dual proxy: the general validation slice has no tokens")
        self.prefix = prefix_token_id(tok)
        self.groups = rotation([len(d) for d in self.docs], self.tokens)
        if self.kind == "ppl_rise_pct":  # the base NLL of every piece, once (a number per piece)
            with adapter_disabled(model):
                self.base_nll = {}
                for g in self.groups:
                    nll, _ = self._scores(model, g)
                    self.base_nll.update(zip(g, nll))

    def _scores(self, model, group: list[int]) -> tuple[list[float], torch.Tensor]:
        """Per piece of `group`: summed NLL of its tokens; and the log-probs at all its target positions."""
        from ..evaluate.engine import _right_padded
        from ..util import eval_mode, model_device

        rows = [self.docs[i] for i in group]
        ids, mask = _right_padded([[self.prefix] + d[:-1] for d in rows], self.prefix)  # padding is masked out
        targets, _ = _right_padded(rows, 0)
        dev = model_device(model)
        ids, targets, mask = ids.to(dev), targets.to(dev), mask.to(dev)
        with torch.no_grad(), eval_mode(model):
            lp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        mask = mask.bool()
        nll = -(lp.gather(-1, targets[..., None])[..., 0] * mask).sum(-1)
        return nll.tolist(), lp[mask]

    def measure(self, model) -> float:
        from ..util import adapter_disabled

        g = self.groups[self.measured % len(self.groups)]
        self.measured += 1
        self.last_tokens = sum(len(self.docs[i]) for i in g)
        nll, lp = self._scores(model, g)
        if self.kind == "kl":
            with adapter_disabled(model):
                _, base_lp = self._scores(model, g)
            return float((base_lp.exp() * (base_lp - lp)).sum(-1).sum()) / self.last_tokens
        return 100.0 * math.expm1((sum(nll) - sum(self.base_nll[i] for i in g)) / self.last_tokens)

    def describe(self) -> dict:
        d = {"kind": self.kind, "tokens": self.tokens, "window": self.window}
        if self.groups is not None:
            d.update(groups=len(self.groups), pieces=len(self.docs))
        return d


class MCQProxy:
    """Accuracy drop in points on a fixed set of MCQ validation items (noisy: few items flip per update)."""

    def __init__(self, items: list):
        self.items, self.base = items, None

    def _acc(self, model, tok) -> float:
        from ..evaluate import evaluate_mcq

        return evaluate_mcq(model, tok, self.items, progress=False)["acc"]

    def prepare(self, model, tok) -> None:
        from ..util import adapter_disabled

        self.tok = tok
        with adapter_disabled(model):
            self.base = self._acc(model, tok)

    def measure(self, model) -> float:
        return 100.0 * (self.base - self._acc(model, self.tok))

    def describe(self) -> dict:
        return {"kind": "drop_pts", "items": len(self.items)}


def make_proxy(budget: Budget, val: SliceTask | list[SliceTask], cfg: DualConfig, window: int = 512):
    """The proxy of `budget` on (a part of) its validation slice; `window`: the measure's (eval.ppl_window)."""
    if budget.kind in ("kl", "ppl_rise_pct"):
        (task,) = val if isinstance(val, list) else [val]
        return TextProxy(budget.kind, task.texts, cfg.proxy_tokens, window)
    tasks = val if isinstance(val, list) else [val]
    per = max(1, cfg.proxy_items // len(tasks))
    return MCQProxy([it for t in tasks for it in t.items[:per]])


# ----------------------------------------------------------------------------- the callback


def kept_note(trace: list[dict]) -> dict:
    """{"frozen": why, "thawed_at": the step it was steered again from (if it was)} when the trace kept its
    coefficient at the start; else {}. Read from the trace, so a reused run's record says the same."""
    if not trace or "frozen" not in trace[0]:
        return {}
    thawed = next((r["step"] for r in trace if r.get("thawed")), None)
    return {"frozen": trace[0]["frozen"], **({"thawed_at": thawed} if thawed is not None else {})}


class DualController(TrainerCallback):
    """Steers the bound method's coefficient toward `limit` (run_stage binds it: `bind(method, model, tok, out)`).

    `trace` holds one record per measurement: step, coefficient, proxy, target, seconds; the run directory gets
    the same lines in dual.jsonl."""

    def __init__(self, proxy, limit: float, cfg: DualConfig | None = None):
        self.proxy, self.limit, self.cfg = proxy, float(limit), (cfg or DualConfig()).check()
        self.trace: list[dict] = []
        self.method = self.model = self.rule = None
        self.out = None
        self.seconds = 0.0
        self.frozen = ""  # why the coefficient is not steered (set in bind), else ""

    def bind(self, method, model, tok, out=None) -> None:
        name = getattr(method, "coefficient", "")
        if not name:
            raise ConfigError(f"method {method.cfg.name!r} has no coefficient to steer toward a budget "
                              "(steerable: hlora φ, kl_general β, ewc λ, replay ρ)")
        lo, hi = method.coefficient_range
        start = self.cfg.start or float(getattr(method.cfg, name))
        self.method, self.model, self.name, self.out = method, model, name, out
        self.rule = DualUpdate(start, self.cfg.margin * self.limit, lo, hi, self.cfg)
        method.set_coefficient(self.rule.value)
        t0 = time.perf_counter()
        self.proxy.prepare(model, tok)
        m0 = self.proxy.measure(model)
        self.seconds += time.perf_counter() - t0
        if getattr(method, "anchored_at_start", False) and m0 >= self.rule.target:
            # e.g. HLoRA after a stage ν whose own drift already exceeds a KL-to-base budget: raising φ only ties
            # the model harder to that drift (on SmolLM2 φ climbed 1 → 6e4 while the KL rose), so it is kept.
            self.frozen = (f"the run starts at {m0:.4g} on the proxy, at or above the target {self.rule.target:.4g}, and "
                           f"{method.cfg.name}'s penalty pulls toward that start, not toward the base model: {name} "
                           f"is kept at {self.rule.value:.4g} until the proxy comes below the target (the α search "
                           "scales the result)")
        self._record(0, m0, update=False, **({"frozen": self.frozen} if self.frozen else {}))

    def _record(self, step: int, measured: float, update: bool, **extra) -> None:
        """One trace line; `extra`: final, frozen (why the coefficient is kept), thawed (steered again from here)."""
        rec = {"step": step, "coefficient": self.name, "value": self.rule.value, "proxy": measured,
               "target": self.rule.target, "limit": self.limit, "updated": update, **extra}
        self.trace.append(rec)
        if self.out is not None:
            append_jsonl(self.out / "dual.jsonl", rec)

    def on_step_end(self, args, state, control, **kw):
        if self.rule is None or state.global_step % self.cfg.every:
            return
        t0 = time.perf_counter()
        measured = self.proxy.measure(self.model)
        thawed = bool(self.frozen) and measured < self.rule.target
        if thawed:  # the domain stage itself brought the run inside (e.g. a perplexity that falls): steer from here
            self.frozen = ""
        if not self.frozen:
            self.method.set_coefficient(self.rule.update(measured))
        self.seconds += time.perf_counter() - t0
        extra = {"thawed": True} if thawed else {}
        if self.cfg.smooth and not self.frozen:
            extra["smoothed"] = self.rule.level
        self._record(state.global_step, measured, update=not self.frozen, **extra)

    def on_train_end(self, args, state, control, **kw):
        if self.rule is None or (self.trace and self.trace[-1]["step"] == state.global_step):
            return
        t0 = time.perf_counter()
        measured = self.proxy.measure(self.model)
        self.seconds += time.perf_counter() - t0
        self._record(state.global_step, measured, update=False, final=True)

    @property
    def measurements(self) -> int:
        return len(self.trace)

    def summary(self) -> dict:
        return {"coefficient": getattr(self, "name", ""), "final": self.rule.value if self.rule else None,
                "target": self.rule.target if self.rule else None, "measurements": self.measurements,
                "seconds": round(self.seconds, 3), "proxy": self.proxy.describe(),
                **kept_note(self.trace),
                "settings": {k: getattr(self.cfg, k) for k in ("every", "eta", "kp", "kd", "margin", "smooth")},
                "trace": self.trace}
