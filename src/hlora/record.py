"""The cell record: one schema shared by the experiment that writes records and the report that reads them.

`normalize_record` checks a record field by field (errors name the record and the field) and brings every
older format to the current one (RECORD_VERSION); `hlora.experiment` checks each record with it before writing
it, and `hlora.report.load` reads results.json through it. Formats:

- version 2 (current): `general_eval` names the text of general_ppl / general_kl / general_bpb; `texts` holds
  every general text by name (ppl, word_ppl, bpb, kl, n_tokens, stage_nu_text); `battery` the zero-shot battery
  (acc mean, acc_stderr, tasks, per_item); `lr`; per_item and transfer keep pred, gold and ll (per choice);
- version 1 (no `record_version`): general_* were WikiText-2, the text stage ν and replay train on; it is read
  as `general_eval` "wikitext", `texts` {"wikitext": ..., stage_nu_text true}, no battery;
- older still: `sweep: true` + `phi` -> `sweep: {"param": "phi", "value": phi}`, `main: false`; `sweep: false`
  -> `main: true` (and `sweep` = its φ, so an old HLoRA main cell joins its φ front); no `label` -> the method
  id; no `regularizer` -> `config.method.name`.

Flattened for the report: `battery_acc` and `nu_text_ppl` (perplexity on the text flagged stage_nu_text).
`family` (the fronts panel a row is drawn in) defaults to "base" for Base, "wise" for rows whose regularizer is
"wise", "hlora" for row ids starting with "hlora", "alternatives" otherwise. `role` (the row's part in the report:
"reference" = the row the others are matched against, "plain" = the grey reference in every fronts panel, "rival" =
the row the reference is compared with item by item) is declared by the row (hlora.methods.Row); records written
before rows declared it (no `role` key) get the roles of the rows of that time (OLD_ROLES); `ablation` (a row of
the ablation table) likewise (OLD_ABLATION).
"""
from __future__ import annotations

from typing import Any

RECORD_VERSION = 2
BASE = "base"  # the untrained row
# The roles of the rows of records written before rows declared them (no `role` key): read from these row ids.
OLD_ROLES = {"hlora": "reference", "lora_mu": "plain", "ewc_lora": "rival"}
OLD_ABLATION = ("hlora", "hlora_no_layer", "hlora_no_layer_element")  # likewise, the ablation table's rows
OLD_GENERAL_EVAL = "wikitext"  # what general_* measured before records named their text (record_version 1)


class ResultsError(ValueError):
    """A record (or results file) that breaks the schema; the message names the file, record and field."""


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
    "role": (str, None),
    "ablation": (bool, None),
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
    if "role" not in rec:
        out["role"] = OLD_ROLES.get(out["method"])
    if "ablation" not in rec:
        out["ablation"] = out["method"] in OLD_ABLATION
    return out
