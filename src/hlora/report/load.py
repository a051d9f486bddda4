"""Reading and checking `results.json`, and the few facts about records the rest of the report uses.

A record is one cell of the experiment (docs/design.md section 7.3). `load_results` checks every field the
report reads, fills optional ones with defaults and brings old records to the current format:

- `sweep: true` + `phi` (old)  -> `sweep: {"param": "phi", "value": phi}`, `main: false`;
- `sweep: false` (old)         -> `main: true`, and `sweep` = the cell's φ when it has one, so an old
                                  HLoRA main cell still joins its φ front;
- no `label`                   -> the method id; no `regularizer` -> `config.method.name` if known;
- no `record_version` (1)      -> `general_eval` = "wikitext" (the text stage ν and replay train on),
                                  `texts` = {"wikitext": its general_ppl / word_ppl / bpb / kl,
                                  stage_nu_text true}, `battery` None.

Flattened for the stats: `battery_acc` (the battery's mean accuracy, None without one) and `nu_text_ppl`
(perplexity on the text flagged `stage_nu_text`, None without one). `family` (the panel of the fronts
figure a row is drawn in) defaults to: "base" for Base, "wise" for rows whose regularizer is "wise",
"hlora" for row ids starting with "hlora", "alternatives" for every other row.

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
    "default_family",
    "family_label",
    "text_label",
    "general_names",
    "BASE",
    "PLAIN",
]

BASE = "base"  # the untrained row; its perplexity is the reference for the cap and the dominated area
PLAIN = "lora_mu"  # plain LoRA on the domain: the thin grey reference in every family panel of the fronts
OLD_GENERAL_EVAL = "wikitext"  # what general_* measured before records named their text (record_version 1)

_TEXT_LABELS = {"c4": "C4", "wikitext": "WikiText-2"}
_FAMILY_LABELS = {"base": "Base", "hlora": "HLoRA and its variants", "alternatives": "Practical alternatives",
                  "wise": "WiSE-FT curves"}  # fmt: skip

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
    "record_version": (int, 1),
    "label": (str, None),
    "family": (str, None),
    "lr": (_NUM, None),
    "general_eval": (str, None),
    "texts": (dict, None),
    "battery": (dict, None),
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
        _check_items(v, f"per_item.{k}", k == "ll", fail)
    for k, v in (out["layer_norms"] or {}).items():
        if not _is_num(v):
            fail(f"field 'layer_norms.{k}' must be a number")
    for k, v in (out["transfer"] or {}).items():
        if not isinstance(v, dict) or not all(v.get(m) is None or _is_num(v[m]) for m in ("acc", "acc_norm", "n")):
            fail(f"field 'transfer.{k}' must be an object with numbers acc, acc_norm, n")
        for m in ("pred", "gold", "ll"):
            if v.get(m) is not None:
                _check_items(v[m], f"transfer.{k}.{m}", m == "ll", fail)
    _check_texts(out["texts"], fail)
    _check_battery(out["battery"], fail)
    for k, v in (out["cost"] or {}).items():
        if v is not None and not _is_num(v):
            fail(f"field 'cost.{k}' must be a number or null")


def _check_items(v: Any, name: str, lists: bool, fail) -> None:
    """A per-item list: numbers (or null), or for `ll` lists of numbers (each item's per-choice log-likelihoods)."""
    if lists:
        ok = isinstance(v, list) and all(x is None or (isinstance(x, list) and all(y is None or _is_num(y) for y in x))
                                         for x in v)  # fmt: skip
        if not ok:
            fail(f"field '{name}' must be a list of lists of numbers (per item, one log-likelihood per choice)")
    elif not isinstance(v, list) or not all(x is None or _is_num(x) for x in v):
        fail(f"field '{name}' must be a list of numbers")


def _check_texts(texts: dict | None, fail) -> None:
    for name, t in (texts or {}).items():
        if not isinstance(t, dict):
            fail(f"field 'texts.{name}' must be an object")
        if not _is_num(t.get("ppl")):
            fail(f"field 'texts.{name}.ppl' must be a number")
        for k in ("word_ppl", "bpb", "kl", "n_tokens"):
            if t.get(k) is not None and not _is_num(t[k]):
                fail(f"field 'texts.{name}.{k}' must be a number or null")
        if not isinstance(t.get("stage_nu_text", False), bool):
            fail(f"field 'texts.{name}.stage_nu_text' must be true/false")


def _check_battery(b: dict | None, fail) -> None:
    if b is None:
        return
    if not _is_num(b.get("acc")):
        fail("field 'battery.acc' must be a number (the mean accuracy over the battery's tasks)")
    if b.get("acc_stderr") is not None and not _is_num(b["acc_stderr"]):
        fail("field 'battery.acc_stderr' must be a number or null")
    tasks = b.get("tasks") or {}
    if not isinstance(tasks, dict):
        fail("field 'battery.tasks' must be an object")
    for k, v in tasks.items():
        if not isinstance(v, dict) or not all(v.get(m) is None or _is_num(v[m]) for m in ("acc", "acc_norm", "n")):
            fail(f"field 'battery.tasks.{k}' must be an object with numbers acc, acc_norm, n")
    items = b.get("per_item") or {}
    if not isinstance(items, dict):
        fail("field 'battery.per_item' must be an object")
    for k, v in items.items():
        _check_items(v, f"battery.per_item.{k}", False, fail)


def _normalize_texts(out: dict) -> None:
    """Old records (record_version 1): general_* were WikiText-2, stage ν's own text; no battery."""
    if out["general_eval"] is None:
        out["general_eval"] = OLD_GENERAL_EVAL
    if out["texts"] is None and out["record_version"] < 2:
        out["texts"] = {OLD_GENERAL_EVAL: {"ppl": out["general_ppl"], "word_ppl": out["general_word_ppl"],
                                           "bpb": out["general_bpb"], "kl": out["general_kl"],
                                           "n_tokens": None, "stage_nu_text": True}}  # fmt: skip
    texts = out["texts"] or {}
    nu = next((t for t in texts.values() if t.get("stage_nu_text")), None)
    out["nu_text_ppl"] = None if nu is None else nu["ppl"]
    out["battery_acc"] = None if out["battery"] is None else out["battery"]["acc"]


def default_family(method: str, regularizer: str | None) -> str:
    """The fronts panel a row is drawn in when its records do not name one (see the module docstring)."""
    if method == BASE:
        return "base"
    if regularizer == "wise":
        return "wise"
    return "hlora" if method.startswith("hlora") else "alternatives"


def family_label(family: str) -> str:
    return _FAMILY_LABELS.get(family, family)


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
    _normalize_texts(out)
    out["family"] = out["family"] or default_family(out["method"], out["regularizer"])
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


def text_label(name: str) -> str:
    """Display name of a general text: `c4` -> C4, `wikitext` -> WikiText-2, `text:/dir/f.txt` -> text:f.txt."""
    return _TEXT_LABELS.get(name) or task_label(name)


def general_names(records: Iterable[dict], legacy: bool = True) -> dict:
    """How tables and figures name the general measures of these records.

    `ppl` / `kl`: "C4 PPL" / "C4 KL" (the records' general_eval); "WikiText-2 PPL (stage ν's text)" where the
    general text is the one stage ν trains on; texts joined by " / " when records differ. `ppl_short`: the
    perplexity's name without the note, for headers that quote it ("ΔWikiText-2 PPL"). `nu_ppl`: the
    label of a separate column for stage ν's own text (None when there is none, or when it is the general
    text itself). `battery`: whether some record has the battery. `named`: False for records that all
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
    }
