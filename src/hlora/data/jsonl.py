"""Strict JSONL reading: every error names the file, the line and the field."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..assets import AssetError
from .base import DataError


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise DataError(f"{path}: empty data set (no records)")
    return rows


def field(path: Path, lineno: int, obj: dict, names: str | tuple[str, ...], typ: type | tuple = str) -> Any:
    """The first present field of `names`, type-checked, or a DataError naming file:line and field."""
    names = (names,) if isinstance(names, str) else names
    for n in names:
        if n in obj:
            v = obj[n]
            if v is None and typ is str:
                return ""
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
                raise DataError(f"{path}:{lineno}: field {n!r} must be {want}, got {type(v).__name__}")
            return v
    raise DataError(f"{path}:{lineno}: missing field {' or '.join(repr(n) for n in names)}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
