"""The versions we claim: every installed dependency lies in the range pyproject.toml allows (any environment
that pip would accept passes, not only the lock file), and the package's declared lower bounds are the versions
constraints.txt records as tested (so the lowest version allowed is the tested one)."""
from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = _pyproject()["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _installed(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_installed_dependency_is_in_the_declared_range(req):
    version = _installed(req.name)
    assert version is not None, f"{req.name} is a dependency of hlora but is not installed"
    # Compare the public version: torch's local label (+cpu) is not part of any range.
    assert req.specifier.contains(Version(version.public), prereleases=True), (
        f"{req.name} {version} is installed; pyproject.toml allows {req.name}{req.specifier}")


@pytest.mark.parametrize("req", _requirements("test"), ids=lambda r: r.name)
def test_installed_test_extra_is_in_the_declared_range(req):
    version = _installed(req.name)
    if version is None:
        pytest.skip(f"{req.name} (test extra) is not installed")
    assert req.specifier.contains(Version(version.public), prereleases=True), (
        f"{req.name} {version} is installed; pyproject.toml's test extra allows {req.name}{req.specifier}")


def test_python_is_in_the_declared_range():
    spec = _pyproject()["project"]["requires-python"]
    here = ".".join(map(str, sys.version_info[:3]))
    assert Requirement(f"python{spec}").specifier.contains(here), f"Python {here}; pyproject requires {spec}"


def test_declared_lower_bounds_are_the_tested_versions():
    text = (ROOT / "pyproject.toml").read_text()
    pins = _pins()
    for pkg in ("torch", "transformers", "peft", "accelerate"):
        m = re.search(rf'"{pkg}>=([0-9.]+)', text)
        assert m, f"pyproject.toml declares no lower bound for {pkg}"
        lower = tuple(int(x) for x in m.group(1).split("."))
        tested = tuple(int(x) for x in pins[pkg].split(".")[: len(lower)])
        assert lower == tested, f"{pkg}: pyproject allows >= {m.group(1)} but the tests ran with {pins[pkg]}"
