"""Post-hoc WiSE-FT scale search: the largest α ∈ [0, 1] whose measured forgetting is within the budget.

α scales a trained adapter's ΔW (PEFT's rescale_adapter_scale; α = 0 is the base model, α = 1 the adapter as
trained). Forgetting need not be monotone in α (the fronts show WiSE-FT curves that bend), so the search does
not bisect [0, 1] blindly:

1. bracket: α = 1, then the coarse grid (grid−1)/grid, ..., 1/grid, from the top down, until a point meets the
   budget: that is the largest feasible grid point, and the grid point above it is infeasible (or it is α = 1);
2. refine: `refine` bisection steps between that feasible point and the infeasible one above it (a resolution of
   1/(grid·2^refine)); the answer is the last feasible point.

A curve that dips back under the budget between two grid points above the bracket is missed; a finer grid
finds it. Every evaluated α is recorded with its forgetting, standard error and seconds, and its domain accuracy
where it was measured (given a separate `domain` measure, at the chosen α only).

Unresolvable budgets are never a silent miss: if only α < alpha_min meets it (the base model, in effect), or
the budget is smaller than `min_snr` standard errors of the measure at the chosen α (the validation slice cannot
tell it from the noise, and the chosen model is not clearly inside it either), `on_unresolvable="error"` raises
BudgetError and `"nearest"` returns the nearest model (the largest feasible α found) with a warning in the result.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

from ..config import ConfigError
from .measure import BudgetError, Point


@dataclass
class AlphaSearchConfig:
    grid: int = 4  # coarse grid 1/grid, ..., 1 (scanned from α = 1 down until a point meets the budget)
    refine: int = 4  # bisection steps after bracketing: resolution 1/(grid·2^refine) (1/64 by default)
    alpha_min: float = 0.05  # a chosen α below this counts as "only the base model meets the budget"
    min_snr: float = 2.0  # the budget must be at least this many standard errors of the measure at the chosen α
    on_unresolvable: str = "error"  # error | nearest (return the nearest model, with a warning)

    def check(self) -> "AlphaSearchConfig":
        if self.grid < 1:
            raise ConfigError(f"search.grid must be >= 1, got {self.grid}")
        if self.refine < 0:
            raise ConfigError(f"search.refine must be >= 0, got {self.refine}")
        if not 0.0 <= self.alpha_min < 1.0:
            raise ConfigError(f"search.alpha_min must be in [0, 1), got {self.alpha_min}")
        if self.min_snr < 0:
            raise ConfigError(f"search.min_snr must be >= 0, got {self.min_snr}")
        if self.on_unresolvable not in ("error", "nearest"):
            raise ConfigError(f"search.on_unresolvable must be 'error' or 'nearest', got {self.on_unresolvable!r}")
        return self


@dataclass
class AlphaResult:
    limit: float
    chosen: Point
    points: list[Point] = field(default_factory=list)  # every α evaluated, in order (the base first, if given)
    bracket: tuple[float, float] = (0.0, 1.0)  # (last feasible, first infeasible above it); (1, 1) if α = 1 meets it
    warning: str = ""  # set when the budget could not be resolved and the nearest model was returned
    seconds: float = 0.0

    @property
    def evaluations(self) -> int:
        return sum(1 for p in self.points if p.alpha > 0)

    def as_dict(self) -> dict:
        return {"limit": self.limit, "chosen": self.chosen.as_dict(), "bracket": list(self.bracket),
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
                "points": [p.as_dict() for p in self.points], **({"warning": self.warning} if self.warning else {})}


def search_alpha(measure: Callable[[float], Point], limit: float, cfg: AlphaSearchConfig | None = None,
                 base: Point | None = None, what: str = "forgetting",
                 domain: Callable[[float], tuple[float, float]] | None = None) -> AlphaResult:
    """The largest α whose `measure(α).forgetting` is within `limit` (see the module docstring).

    `measure(α)` returns a Point (a Measurer, or any function: tests inject synthetic curves). `base`: the α = 0
    point when already measured (else it is measured: the base model's domain accuracy is part of the record).
    `domain(α)` -> (accuracy, s.e.): given when `measure` leaves the domain accuracy out (Measurer.forgetting_at);
    it is then measured at the chosen α only, the one point where it decides anything (which candidate wins)."""
    cfg = (cfg or AlphaSearchConfig()).check()
    if not (math.isfinite(limit) and limit > 0):
        raise ConfigError(f"budget.limit must be > 0, got {limit}")
    t0 = time.perf_counter()
    points: list[Point] = []
    cache: dict[float, Point] = {}

    def at(alpha: float) -> Point:
        alpha = round(alpha, 12)
        if alpha not in cache:
            t = time.perf_counter()
            p = measure(alpha)
            if not p.seconds:
                p.seconds = time.perf_counter() - t
            p.alpha = alpha
            p.feasible = alpha == 0.0 or p.forgetting <= limit
            cache[alpha] = p
            points.append(p)
        return cache[alpha]

    def with_domain(p: Point) -> Point:
        """p with its domain accuracy, measured now (and timed into p) if `measure` left it out."""
        if domain is not None and math.isnan(p.domain_acc):
            t = time.perf_counter()
            p.domain_acc, p.domain_se = domain(p.alpha)
            p.seconds += time.perf_counter() - t
        return p

    if base is not None:
        base.alpha, base.feasible = 0.0, True
        cache[0.0] = base
        points.append(base)
    else:
        with_domain(at(0.0))  # the base model's accuracy is part of the record
    if at(1.0).feasible:
        lo, hi = 1.0, 1.0
    else:
        lo, hi = 0.0, 1.0
        for i in range(cfg.grid - 1, 0, -1):
            a = i / cfg.grid
            if at(a).feasible:
                lo = a
                break
            hi = a
        for _ in range(cfg.refine):
            mid = (lo + hi) / 2
            if at(mid).feasible:
                lo = mid
            else:
                hi = mid
    chosen = with_domain(cache[round(lo, 12)])
    res = AlphaResult(limit=limit, chosen=chosen, points=points, bracket=(lo, hi), seconds=time.perf_counter() - t0)
    problem = unresolved(res, cfg, what)
    if problem:
        if cfg.on_unresolvable == "error":
            raise BudgetError(problem, result=res)
        res.warning = problem
        warnings.warn(problem, stacklevel=2)
    return res


def unresolved(res: AlphaResult, cfg: AlphaSearchConfig, what: str = "forgetting") -> str:
    """Why the search's answer does not resolve the budget ('' if it does)."""
    c, limit = res.chosen, res.limit
    if c.alpha < max(cfg.alpha_min, 1e-12):
        above = next((p for p in res.points if p.alpha == res.bracket[1]), None)
        seen = f" (α = {above.alpha:.3g} measured {above.forgetting:.4g} ± {above.se:.2g})" if above else ""
        return (f"only α = {c.alpha:.3g} < search.alpha_min = {cfg.alpha_min:g}, in effect the base model, meets the "
                f"budget {what} <= {limit:g}{seen}: raise the budget or train with a stronger regulariser")
    # Below the noise: the budget is smaller than min_snr standard errors, and the chosen model is not clearly
    # inside it either (a model far under the budget, e.g. at α = 1, is within it whatever the noise).
    if cfg.min_snr > 0 and not (c.se * cfg.min_snr <= limit) and not (c.forgetting + c.se * cfg.min_snr <= limit):
        return (f"the budget {what} <= {limit:g} is below the measurement noise of the validation slice: at the chosen "
                f"α = {c.alpha:.3g} the measure is {c.forgetting:.4g} ± {c.se:.2g} (standard error), and the budget must "
                f"be at least search.min_snr = {cfg.min_snr:g} standard errors: use a larger validation slice "
                "(slices.*) or a larger budget")
    return ""
