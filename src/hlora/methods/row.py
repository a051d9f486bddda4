"""A row of the experiment: one way to run a method (its label, where stage μ starts, its method fields, the field
its front sweeps) and its place in the report. Each method file declares its rows (`ROWS`) next to its config;
`hlora.experiment` builds the grid from the registry. This module imports no torch."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

STARTS = ("none", "fresh", "nu", "nu_adapter")  # or the id of the row whose trained adapter this row evaluates
ROLES = ("", "reference", "plain", "rival")


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    start: str  # "none" (no training) | "fresh" | "nu" (continue the stage-ν adapter, penalised by its importance)
    # | "nu_adapter" (the stage-ν adapter itself, no stage μ) | the id of the row whose trained adapter this row evaluates
    method: tuple = (("name", "none"),)  # method config fields (a tuple of pairs: rows are immutable)
    lora: tuple[str, ...] = ()  # LoRA overrides, e.g. ("rslora=true",)
    sweep: str = ""  # the method field the row's front varies
    # The report: the fronts panel the row is drawn in ("" = hlora.record.default_family), and its role:
    # "reference" (the row the others are matched against), "plain" (the thin grey reference in every panel),
    # "rival" (the row the reference is compared with item by item, and whose importance cost is set beside its own).
    family: str = ""
    role: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"row {self.id!r}: role must be one of {ROLES}, got {self.role!r}")

    def settings(self) -> dict:
        """What of the row determines a cell's result (the settings hash): not its place in the report, so that a
        field added here later leaves the hashes of committed records unchanged."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in ("id", "label", "start", "method", "lora", "sweep")}


def method_fields(name: str, **fields) -> tuple:
    """A row's `method`: (("name", name), (field, value), ...)."""
    return (("name", name), *fields.items())
