"""A forgetting budget (docs/design.md section 1): the user states what the model may lose on one general measure
and gets the most domain-accurate model within it.

- measure.py: `Budget` (`c4_kl=0.05`, `c4_ppl_rise_pct=2`, `battery_drop_pts=1`, ...), validation / test slices,
  the measures with their standard errors (`Measurer`);
- alpha.py: post-hoc WiSE-FT scale search for any trained adapter (`search_alpha`);
- cache.py: the α points of an adapter kept beside it, read back by a later tune of the same adapter;
- dual.py: the method's coefficient steered during training (`DualController`, a TrainerCallback);
- tune.py: `hlora tune` / `hlora.tune(...)`: candidates, the winner, OUT/tune.json.
"""
from .alpha import AlphaResult, AlphaSearchConfig, search_alpha
from .dual import DualConfig, DualController, DualUpdate
from .measure import Budget, BudgetError, Measurer, Point, SliceConfig
from .tune import TuneConfig, TuneOptions, tune

__all__ = ["AlphaResult", "AlphaSearchConfig", "Budget", "BudgetError", "DualConfig", "DualController", "DualUpdate",
           "Measurer", "Point", "SliceConfig", "TuneConfig", "TuneOptions", "search_alpha", "tune"]
