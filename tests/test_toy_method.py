"""A method declares itself: a toy method in one file plus one registry line is in the CLI's flags, a grid's plan,
the report and the bench, with nothing else edited."""
from __future__ import annotations

import json
import textwrap

import pytest

import hlora.methods as methods

TOY = '''
from dataclasses import dataclass

from hlora.config import MethodConfig
from hlora.methods.base import Method
from hlora.methods.spec import Row


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"
    toy_gamma: float = 0.5


ROWS = [Row("toy_row", "Toy method", "fresh", (("name", "toy"),), sweep="toy_gamma", family="toys",
            role="reference")]


class Toy(Method):
    config_class = ToyConfig
    writes = {"toy.bin": "toy_kind"}

    def bench_variant(self, model, omega, domain, general):
        return {"extra": lambda m, b, o: None, "held": self}
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_method.py").write_text(textwrap.dedent(TOY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.REGISTRY, "toy", "toy_method:Toy")  # the one registry line
    return "toy"


def test_toy_method_flags_in_the_cli(toy, capsys):
    from hlora.cli import _run_config, build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["domain", "--help"])
    out = capsys.readouterr().out
    assert "--toy-gamma" in out and "method.toy_gamma=V (method toy)" in out
    assert "| toy" in " ".join(out.split("--method V", 2)[2].split("--")[0].split())  # --method's help lists it
    cfg = _run_config(build_parser().parse_args(["domain", "--method", "toy", "--toy-gamma", "0.25"]))
    assert type(cfg.method).__name__ == "ToyConfig" and cfg.method.toy_gamma == 0.25


def test_toy_method_rows_in_a_grid(toy):
    from hlora.experiment import ROWS, ExperimentConfig, plan

    assert list(ROWS)[-1] == "toy_row" and ROWS["toy_row"].label == "Toy method"
    cells = plan(ExperimentConfig(methods=["base", "toy_row"], tasks=["sciq"], seeds=[0, 1],
                                  sweeps={"toy_row": {"toy_gamma": [0.1, 0.9]}}))
    toy_cells = [c for c in cells if c.row.id == "toy_row"]
    assert [c.point for c in toy_cells] == [0.1, 0.5, 0.9] * 2
    assert [c.main for c in toy_cells[:3]] == [False, True, False]
    assert all(c.method.name == "toy" and c.param == "toy_gamma" for c in toy_cells)


def _record(method, label, reg, seed, acc, ppl, gamma=None, main=True, **kw):
    return {"cell": f"{method}-sciq-s{seed}-{gamma}", "method": method, "label": label, "regularizer": reg,
            "task": "sciq", "seed": seed, "main": main, "acc": acc, "acc_norm": acc, "general_ppl": ppl,
            "general_bpb": 1.0, "general_kl": 0.0 if method == "base" else 0.01 * (gamma or 1),
            "sweep": {"param": "toy_gamma", "value": gamma} if gamma is not None else None,
            "train_seconds": 1.0, "record_version": 2, **kw}


def test_toy_method_in_the_report(toy, tmp_path, skip_figure_drawing):
    from hlora.report import write_report

    recs = []
    for seed in (0, 1):
        recs.append(_record("base", "Base", "none", seed, 0.5, 20.0, family="base", role=None))
        for g in (0.1, 0.5, 0.9):  # the record says the row's family and role, as the experiment writes them
            recs.append(_record("toy_row", "Toy method", "toy", seed, 0.6 + 0.1 * g + 0.01 * seed, 20.5 + g,
                                gamma=g, main=g == 0.5, family="toys", role="reference"))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(recs))
    write_report(path, tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Toy method as reference" in md
    assert "Toy method" in (tmp_path / "report" / "tables.md").read_text()


def test_toy_method_in_the_bench(toy, monkeypatch):
    from hlora.bench import method_variants
    from hlora.methods import StageContext

    monkeypatch.setattr(methods, "REGISTRY", {"none": methods.REGISTRY["none"], "toy": methods.REGISTRY["toy"]})
    variants = method_variants(None, StageContext(stage="domain"), {}, {}, {})
    assert list(variants) == ["toy"] and variants["toy"]["extra"](None, None, None) is None


def test_toy_method_declares_its_files(toy):
    assert methods.method_class("toy").writes == {"toy.bin": "toy_kind"}


def test_declaring_methods_imports_no_torch():
    """Config classes, rows and the CLI's generated flags come from the method files without torch: `RunConfig()`,
    every method's config, every row's plan and the parser import none of it (the hooks do, when they run)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from hlora.config import RunConfig, method_config\n"
            "from hlora.methods import REGISTRY\n"
            "from hlora.experiment import ROWS, ExperimentConfig, plan\n"
            "from hlora.cli import build_parser\n"
            "RunConfig(); [method_config(n) for n in REGISTRY]\n"
            "plan(ExperimentConfig(methods=list(ROWS))); build_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_toy_method_with_a_coefficient_is_steerable_by_hlora_tune(toy, capsys):
    """Declaring `coefficient` is all it takes for the budget tool to steer a method (no list in budget/)."""
    import toy_method

    from hlora.budget.measure import Budget
    from hlora.budget.tune import TuneConfig, TuneOptions, _check
    from hlora.cli import build_parser
    from hlora.methods import needs_general_run, steerable

    assert "toy" not in steerable()
    toy_method.Toy.coefficient, toy_method.Toy.coefficient_range = "toy_gamma", (0.0, 1.0)
    try:
        assert steerable()[-1] == "toy" and TuneOptions().allow[-1] == "toy"
        assert needs_general_run("toy") == ""  # a domain-only method trains no stage ν first
        _check(TuneConfig(budget=Budget.parse("c4_kl=0.05"), tune=TuneOptions(method="toy")))  # accepted as a tune method
        with pytest.raises(SystemExit):
            build_parser().parse_args(["tune", "--help"])
        assert "toy" in capsys.readouterr().out.split("--allow", 2)[2]
    finally:
        toy_method.Toy.coefficient = ""
    assert needs_general_run("hlora") == "importance.safetensors"
