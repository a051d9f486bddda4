"""Reading and checking `results.json`, and the few facts about records the rest of the report uses.

A record is one cell of the experiment (docs/design.md section 7.3); its schema, the checks and the
upgrade of older formats live in `hlora.record`, shared with the experiment that writes records.

Rows (methods) and tasks are ordered by first appearance in the file: the runner decides the order,
and the report keeps no table of method names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from ..record import BASE, OLD_GENERAL_EVAL, RECORD_VERSION, ResultsError, default_family, normalize_record  # noqa: F401

__all__ = [
    "ResultsError",
    "load_results",
    "normalize_record",
    "row_order",
    "task_order",
    "row_labels",
    "task_label",
    "main_cells",
    "sweep_key",
    "default_family",
    "family_label",
    "text_label",
    "general_names",
    "BASE",
    "role_row",
]

_TEXT_LABELS = {"c4": "C4", "wikitext": "WikiText-2"}
_FAMILY_LABELS = {"base": "Base", "hlora": "HLoRA and its variants", "alternatives": "Practical alternatives",
                  "wise": "WiSE-FT curves"}  # fmt: skip

_TASK_LABELS = {"sciq": "SciQ", "piqa": "PIQA", "medmcqa": "MedMCQA"}


def family_label(family: str) -> str:
    return _FAMILY_LABELS.get(family, family)


def load_results(path: str | Path) -> list[dict]:
    """Read and check `results.json`; returns the records in the current format.

    Raises FileNotFoundError for a missing file and ResultsError (a ValueError) naming the file,
    the record index and the field for anything malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, list):
        raise ResultsError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ResultsError(f"{path}: contains no records")
    return [normalize_record(rec, i, str(path)) for i, rec in enumerate(data)]


# ----------------------------------------------------------------------------- facts about records

def row_order(records: Iterable[dict]) -> list[str]:
    """Row (method) ids in order of first appearance: the runner's order."""
    return list(dict.fromkeys(r["method"] for r in records))


def role_row(records: Iterable[dict], role: str) -> str | None:
    """The first row (record order) whose records carry `role` (see hlora.record: "reference", "plain", "rival"),
    or None."""
    return next((r["method"] for r in records if r.get("role") == role), None)


def task_order(records: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(r["task"] for r in records))


def row_labels(records: Iterable[dict]) -> dict[str, str]:
    """Display label per row id: the first label a record of that row carries (else the id)."""
    out: dict[str, str] = {}
    for r in records:
        out.setdefault(r["method"], r.get("label") or r["method"])
    return out


def task_label(task: str) -> str:
    """Short display name of a task id; `mcq:/some/dir/file.jsonl` -> `mcq:file.jsonl`."""
    if task in _TASK_LABELS:
        return _TASK_LABELS[task]
    kind, sep, rest = task.partition(":")
    if sep and ("/" in rest or "\\" in rest):
        return kind + ":" + re.split(r"[\\/]", rest)[-1]
    return task


def main_cells(records: Iterable[dict]) -> list[dict]:
    """The rows' default points: only these enter the fixed tables."""
    return [r for r in records if r["main"]]


def sweep_key(rec: dict) -> tuple[str, float] | None:
    """(param, value) of the swept hyper-parameter of a cell, None when the cell is not on a sweep."""
    s = rec.get("sweep")
    return (s["param"], s["value"]) if s else None


def text_label(name: str) -> str:
    """Display name of a general text: `c4` -> C4, `wikitext` -> WikiText-2, `text:/dir/f.txt` -> text:f.txt."""
    return _TEXT_LABELS.get(name) or task_label(name)


def general_names(records: Iterable[dict], legacy: bool = True) -> dict:
    """How tables and figures name the general measures of these records.

    `ppl` / `kl`: "C4 PPL" / "C4 KL" (the records' general_eval); "WikiText-2 PPL (stage ν's text)" where the
    general text is the one stage ν trains on; texts joined by " / " when records differ. `ppl_short`: the
    perplexity's name without the note, for headers that quote it ("ΔWikiText-2 PPL"). `nu_ppl`: the
    label of a separate column for stage ν's own text (None when there is none, or when it is the general
    text itself). `battery`: whether some record has the battery. `kl_test`: whether the matched-accuracy table
    shows the paired KL test (named texts with a KL). `named`: False for records that all
    predate named texts (record_version 1) when `legacy`: tables then keep their old headers ("PPL",
    "KL"), so that old reports regenerate unchanged; figures pass legacy=False.
    """
    records = list(records)
    evals = list(dict.fromkeys(r.get("general_eval") or OLD_GENERAL_EVAL for r in records))
    nu = list(dict.fromkeys(k for r in records for k, t in (r.get("texts") or {}).items() if t.get("stage_nu_text")))
    if not nu and not any(r.get("record_version", 1) >= 2 for r in records):
        nu = [OLD_GENERAL_EVAL]
    on_nu = bool(evals) and all(e in nu for e in evals)
    text = " / ".join(text_label(e) for e in evals)
    named = not legacy or any(r.get("record_version", 1) >= 2 for r in records)
    nu_text = " / ".join(text_label(t) for t in nu if t not in evals)
    has_nu_col = bool(nu_text) and any(r.get("nu_text_ppl") is not None for r in records)
    return {
        "named": named,
        "text": text if named else "general",
        "ppl": (f"{text} PPL" + (" (stage ν's text)" if on_nu else "")) if named else "PPL",
        "ppl_short": f"{text} PPL" if named else "PPL",  # inside other headers: "ΔC4 PPL", "cap = Base C4 PPL"
        "kl": f"{text} KL" if named else "KL",
        "on_nu": on_nu,
        "mixed": len(evals) > 1,
        "nu_ppl": f"{nu_text} PPL (stage ν's own distribution)" if has_nu_col else None,
        "nu_text": nu_text or None,
        "battery": any(r.get("battery_acc") is not None for r in records),
        # the paired KL test at matched accuracy came with named texts: old reports keep their columns
        "kl_test": named and any(r.get("general_kl") is not None for r in records),
    }
