"""The versions we claim: the environment the tests run in is the one constraints.txt pins, and the package's
declared lower bounds are those tested versions (so the lowest version allowed is the tested one)."""
from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ("torch", "transformers", "peft", "accelerate", "trl")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("pkg", CORE)
def test_installed_versions_are_the_pinned_ones(pkg):
    installed = md.version(pkg).split("+")[0]  # torch's local label (+cpu) is not part of the pin
    assert installed == _pins()[pkg], f"{pkg} {installed} is installed, constraints.txt pins {_pins()[pkg]}"


def test_declared_lower_bounds_are_the_tested_versions():
    text = (ROOT / "pyproject.toml").read_text()
    pins = _pins()
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        m = re.search(rf'"{pkg}>=([0-9.]+)', text)
        assert m, f"pyproject.toml declares no lower bound for {pkg}"
        lower = tuple(int(x) for x in m.group(1).split("."))
        tested = tuple(int(x) for x in pins[pkg].split(".")[: len(lower)])
        assert lower == tested, f"{pkg}: pyproject allows >= {m.group(1)} but the tests ran with {pins[pkg]}"
