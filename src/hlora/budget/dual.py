"""During training: a method's coefficient (φ, β, λ, ρ) steered as a dual variable toward a forgetting budget.

Every K optimizer steps, `DualController` measures the forgetting proxy on a small fixed general validation
batch (one forward pass without gradients; for KL the base model's log-probs are computed once, at the start,
with the adapter disabled; for a perplexity rise the base model's NLL on the batch, once) and updates the
coefficient from the relative violation v = clip((measured − target)/target, ±max_violation):

    u ← u + η·v                 (the integral: the plain dual update)
    c = T⁻¹(u + kp·v + kd·Δv)   (a proportional term, kp = 2 by default: PI control; kd = 0)

with u = log c for coefficients that act multiplicatively (φ, β, λ: a range bounded away from 0) and u = c/0.2
for ρ (a share in [0, 0.9]: linear steps of 0.2·η per unit violation), clipped to the method's range
(anti-windup: u is clipped with c, so a coefficient pinned at a bound reacts at once when the sign changes).
The target is margin·limit (0.9 by default): the proxy batch is small and the final model is checked on the
validation slice by the α search anyway.

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
    proxy_tokens: int = 512  # general tokens of the fixed proxy batch (text measures)
    proxy_items: int = 64  # MCQ items of the proxy (drop_pts measures)
    start: float = 0.0  # the coefficient's starting value; 0 = the method config's value

    def check(self) -> "DualConfig":
        for name in ("every", "proxy_tokens", "proxy_items"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dual.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eta", "margin", "max_violation"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"dual.{name} must be > 0, got {getattr(self, name)}")
        if self.kp < 0 or self.kd < 0 or self.start < 0:
            raise ConfigError("dual.kp, dual.kd and dual.start must be >= 0")
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

    def _to_u(self, c: float) -> float:
        return math.log(c) if self.log else c / LINEAR_STEP

    def _from_u(self, u: float) -> float:
        return math.exp(u) if self.log else u * LINEAR_STEP

    def violation(self, measured: float) -> float:
        v = (measured - self.target) / self.target
        m = self.cfg.max_violation
        return max(-m, min(m, v)) if math.isfinite(v) else m

    def update(self, measured: float) -> float:
        v = self.violation(measured)
        lo_u, hi_u = self._to_u(self.lo), self._to_u(self.hi)
        self.u = max(lo_u, min(hi_u, self.u + self.cfg.eta * v))  # anti-windup: the integral stays in range
        dv = 0.0 if self.v_prev is None else v - self.v_prev
        self.v_prev = v
        self.value = min(max(self._from_u(self.u + self.cfg.kp * v + self.cfg.kd * dv), self.lo), self.hi)
        return self.value


# ----------------------------------------------------------------------------- proxies


class TextProxy:
    """KL(p_base ‖ p) per token, or the perplexity rise in %, on a fixed batch of general validation text."""

    def __init__(self, kind: str, texts: list[str], tokens: int, seq_len: int = 128):
        if kind not in ("kl", "ppl_rise_pct"):
            raise ValueError(f"TextProxy: kind must be kl or ppl_rise_pct, got {kind!r}")
        self.kind, self.texts, self.tokens, self.seq_len = kind, texts, tokens, seq_len
        self.ids = self.base_lp = self.base_nll = None

    def prepare(self, model, tok) -> None:
        from ..data.packing import pack
        from ..util import adapter_disabled, model_device

        seq = max(2, min(self.seq_len, self.tokens))
        ds = pack(tok, self.texts, seq, "dual proxy")
        n = max(1, min(len(ds), math.ceil(self.tokens / seq)))
        self.ids = ds.blocks[:n].to(model_device(model))
        with adapter_disabled(model):
            lp = self._logprobs(model)
        if self.kind == "kl":
            self.base_lp = lp
        else:
            self.base_nll = self._nll(lp)

    def _logprobs(self, model) -> torch.Tensor:
        from ..util import eval_mode

        with torch.no_grad(), eval_mode(model):
            logits = model(input_ids=self.ids).logits[:, :-1]
        return F.log_softmax(logits.float(), dim=-1)

    def _nll(self, lp: torch.Tensor) -> float:
        return float(-lp.gather(-1, self.ids[:, 1:, None]).mean())

    def measure(self, model) -> float:
        lp = self._logprobs(model)
        if self.kind == "kl":
            return float((self.base_lp.exp() * (self.base_lp - lp)).sum(-1).mean())
        return 100.0 * math.expm1(self._nll(lp) - self.base_nll)

    def describe(self) -> dict:
        return {"kind": self.kind, "tokens": int(self.ids.numel()) if self.ids is not None else self.tokens}


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


def make_proxy(budget: Budget, val: SliceTask | list[SliceTask], cfg: DualConfig, seq_len: int = 128):
    """The proxy of `budget` on (a part of) its validation slice."""
    if budget.kind in ("kl", "ppl_rise_pct"):
        (task,) = val if isinstance(val, list) else [val]
        return TextProxy(budget.kind, task.texts, cfg.proxy_tokens, seq_len)
    tasks = val if isinstance(val, list) else [val]
    per = max(1, cfg.proxy_items // len(tasks))
    return MCQProxy([it for t in tasks for it in t.items[:per]])


# ----------------------------------------------------------------------------- the callback


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
        self.seconds += time.perf_counter() - t0
        self._record(0, self.proxy.measure(model), update=False)

    def _record(self, step: int, measured: float, update: bool, final: bool = False) -> None:
        rec = {"step": step, "coefficient": self.name, "value": self.rule.value, "proxy": measured,
               "target": self.rule.target, "limit": self.limit, "updated": update}
        if final:
            rec["final"] = True
        self.trace.append(rec)
        if self.out is not None:
            append_jsonl(self.out / "dual.jsonl", rec)

    def on_step_end(self, args, state, control, **kw):
        if self.rule is None or state.global_step % self.cfg.every:
            return
        t0 = time.perf_counter()
        measured = self.proxy.measure(self.model)
        self.method.set_coefficient(self.rule.update(measured))
        self.seconds += time.perf_counter() - t0
        self._record(state.global_step, measured, update=True)

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
                "settings": {k: getattr(self.cfg, k) for k in ("every", "eta", "kp", "kd", "margin")},
                "trace": self.trace}
