"""What a method declares besides its hooks, torch-free: the base of its typed config (`MethodConfig`) and its
experiment rows (`Row`: label, where stage μ starts, method fields, the field its front sweeps, its place in the
report). Each method file declares its config class and its rows (`ROWS`) next to each other; `hlora.config` reads
`method:` sections through MethodConfig, `hlora.experiment` builds the grid from the registry's rows. hlora.config
imports this module, never the other way round."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

@dataclass
class MethodConfig:
    """Base of every method's typed config: `name` picks the method from the registry
    (hlora.methods.REGISTRY). Each method subclasses this in its own file with its own fields (PEFT's
    pattern: one config class per method); a YAML/override section `method:` is read into the class
    that its `name` selects, so a field of another method is an error, not silently ignored."""

    name: str = "hlora"

    @staticmethod
    def resolve(data: dict) -> type:
        from . import config_class

        return config_class(str(data.get("name", "hlora")))


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
    ablation: bool = False  # a row of the ablation table (the paper's Table 2: HLoRA, −layer, −layer,element)

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
