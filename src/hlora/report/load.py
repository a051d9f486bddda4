"""Reading and checking `results.json`, and the few facts about records the rest of the report uses.

A record is one cell of the experiment (DESIGN.md section 5). `load_results` checks every field the
report reads, fills optional ones with defaults and brings old records to the current format:

- `sweep: true` + `phi` (old)  -> `sweep: {"param": "phi", "value": phi}`, `main: false`;
- `sweep: false` (old)         -> `main: true`, and `sweep` = the cell's φ when it has one, so an old
                                  HLoRA main cell still joins its φ front;
- no `label`                   -> the method id; no `regularizer` -> `config.method.name` if known.

Rows (methods) and tasks are ordered by first appearance in the file: the runner decides the order,
and the report keeps no table of method names.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

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
    "BASE",
]

BASE = "base"  # the untrained row; its perplexity is the reference for the cap and the dominated area

_TASK_LABELS = {"sciq": "SciQ", "piqa": "PIQA", "medmcqa": "MedMCQA"}


class ResultsError(ValueError):
    """A results file that cannot be reported on; the message names the file, record and field."""


_NUM = "number"
_REQUIRED: dict[str, Any] = {
    "method": str,
    "task": str,
    "seed": int,
    "general_ppl": _NUM,
    "general_bpb": _NUM,
    "acc": _NUM,
    "acc_norm": _NUM,
}
# Optional fields: checked when present and not null; filled with these defaults when absent.
# `sweep` and `main` are checked by `_normalize_sweep` (two formats).
_OPTIONAL: dict[str, tuple[Any, Any]] = {
    "cell": (str, None),
    "label": (str, None),
    "regularizer": (str, None),
    "phi": (_NUM, None),
    "general_word_ppl": (_NUM, None),
    "general_kl": (_NUM, None),
    "per_item": (dict, None),
    "transfer": (dict, None),
    "cost": (dict, None),
    "wall_seconds": (_NUM, None),
    "train_seconds": (_NUM, None),
    "eval_seconds": (_NUM, None),
    "importance_seconds": (_NUM, None),
    "importance_bytes": (int, None),
    "importance_kind": (str, None),
    "full_fisher_bytes": (int, None),
    "full_fisher_seconds": (_NUM, None),
    "curve": (dict, None),
    "layer_norms": (dict, None),
    "config": (dict, None),
    "git_commit": (str, None),
    "versions": (dict, None),
}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_ok(v: Any, tp: Any) -> bool:
    if tp is _NUM:
        return _is_num(v)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp)


def _type_name(tp: Any) -> str:
    return {_NUM: "a number", int: "an integer", str: "a string", bool: "true/false", dict: "an object"}[tp]


def _record_name(i: int, rec: dict) -> str:
    """Identify a record by what it has, for error messages."""
    parts = [f"{k}={rec[k]!r}" for k in ("method", "task", "seed") if k in rec]
    return f"record {i}" + (f" ({', '.join(parts)})" if parts else "")


def _check_fields(rec: dict, fail) -> dict:
    for key, tp in _REQUIRED.items():
        if key not in rec or rec[key] is None:
            fail(f"missing required field '{key}'")
        if not _type_ok(rec[key], tp):
            fail(f"field '{key}' must be {_type_name(tp)}, got {type(rec[key]).__name__}")
    out = dict(rec)
    for key, (tp, default) in _OPTIONAL.items():
        v = rec.get(key)
        if v is None:
            out[key] = default
        elif not _type_ok(v, tp):
            fail(f"field '{key}' must be {_type_name(tp)} or null, got {type(v).__name__}")
    return out


def _check_nested(out: dict, fail) -> None:
    """Nested structures the tables and figures rely on."""
    curve = out["curve"]
    if curve is not None:
        for k in ("step", "loss"):
            if not isinstance(curve.get(k), list):
                fail(f"field 'curve.{k}' must be a list")
        for k in ("loss", "penalty"):
            if curve.get(k) is not None and (not isinstance(curve[k], list) or len(curve[k]) != len(curve["step"])):
                fail(f"field 'curve.{k}' must be a list as long as 'curve.step'")
    for k, v in (out["per_item"] or {}).items():
        if not isinstance(v, list) or not all(x is None or _is_num(x) for x in v):
            fail(f"field 'per_item.{k}' must be a list of numbers")
    for k, v in (out["layer_norms"] or {}).items():
        if not _is_num(v):
            fail(f"field 'layer_norms.{k}' must be a number")
    for k, v in (out["transfer"] or {}).items():
        if not isinstance(v, dict) or not all(v.get(m) is None or _is_num(v[m]) for m in ("acc", "acc_norm", "n")):
            fail(f"field 'transfer.{k}' must be an object with numbers acc, acc_norm, n")
    for k, v in (out["cost"] or {}).items():
        if v is not None and not _is_num(v):
            fail(f"field 'cost.{k}' must be a number or null")


def _normalize_sweep(rec: dict, out: dict, fail) -> None:
    """Bring `sweep`/`main` to the current format (see the module docstring)."""
    sweep, main = rec.get("sweep"), rec.get("main")
    if main is not None and not isinstance(main, bool):
        fail("field 'main' must be true/false or null")
    if isinstance(sweep, bool):  # old format: a φ-sweep flag, φ in its own field
        phi = out["phi"]
        out["sweep"] = {"param": "phi", "value": float(phi)} if phi is not None else None
        out["main"] = (not sweep) if main is None else main
        return
    if sweep is not None:
        if not isinstance(sweep, dict) or not isinstance(sweep.get("param"), str) or not _is_num(sweep.get("value")):
            fail("field 'sweep' must be {\"param\": name, \"value\": number}, true/false or null")
        out["sweep"] = {"param": sweep["param"], "value": float(sweep["value"])}
    out["main"] = True if main is None else main


def normalize_record(rec: Any, i: int = 0, where: str = "results") -> dict:
    """Check one record and return it in the current format (raises ResultsError)."""
    if not isinstance(rec, dict):
        raise ResultsError(f"{where}: record {i}: expected an object, got {type(rec).__name__}")

    def fail(msg: str):
        raise ResultsError(f"{where}: {_record_name(i, rec)}: {msg}")

    out = _check_fields(rec, fail)
    _check_nested(out, fail)
    _normalize_sweep(rec, out, fail)
    out["label"] = out["label"] or out["method"]
    if out["regularizer"] is None:  # old records: the training method is in the resolved config
        name = ((out["config"] or {}).get("method") or {}).get("name")
        out["regularizer"] = "none" if out["method"] == BASE else name
    return out


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
