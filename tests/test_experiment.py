"""`hlora run configs/tiny.yaml` + `hlora report` end to end, and resuming a half-finished grid."""
import json
import struct
from pathlib import Path

import pytest

from hlora.cli import main
from hlora.experiment import METHODS, ExperimentConfig, run_cell
from hlora.report import ttest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FIGURES = ["loss_curves.png", "importance_heatmap.png", "phi_sweep.png", "violin_hlora_vs_ewc.png", "acc_vs_ppl.png"]


def png_size(p: Path) -> tuple[int, int]:
    head = p.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", p
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid") / "tiny"
    assert main(["run", str(CONFIG), f"out={out}"]) == 0
    return out


def test_grid_has_every_method_task_and_figure(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    main_cells = [r for r in results if not r["sweep"]]
    assert {r["method"] for r in main_cells} == set(METHODS)
    assert {r["task"] for r in main_cells} == {"sciq", "piqa"}
    assert {r["seed"] for r in main_cells} == {0, 1}
    assert len(main_cells) == len(METHODS) * 2 * 2
    assert sorted(r["phi"] for r in results if r["sweep"]) == [0.01, 100.0]
    required = {"method", "task", "seed", "general_ppl", "general_bpb", "acc", "acc_norm", "per_item",
                "train_seconds", "importance_seconds", "importance_bytes", "config", "git_commit", "versions"}
    for r in results:
        assert required <= set(r), required - set(r)
        assert len(r["per_item"]["acc"]) == 6
    hl = next(r for r in main_cells if r["method"] == "hlora")
    assert hl["importance_kind"] == "si" and hl["importance_bytes"] > 0 and hl["layer_norms"]
    assert hl["curve"]["penalty"][-1] > 0
    ewc = next(r for r in main_cells if r["method"] == "ewc_lora")
    assert ewc["importance_kind"] == "fisher" and ewc["full_fisher_bytes"] > ewc["importance_bytes"]
    base = next(r for r in main_cells if r["method"] == "base")
    assert base["train_seconds"] == 0 and base["curve"] is None
    # same ν stage and same data: LoRA(ν+μ) and the "-layer,element" ablation are the same configuration
    a = [r for r in main_cells if r["method"] == "lora_nu_mu" and r["task"] == "sciq" and r["seed"] == 0][0]
    b = [r for r in main_cells if r["method"] == "hlora_no_layer_element" and r["task"] == "sciq" and r["seed"] == 0][0]
    assert a["general_ppl"] == pytest.approx(b["general_ppl"], rel=1e-6)
    report = tiny_run / "report"
    tables = (report / "tables.md").read_text()
    for label in ("Base", "LoRA(μ)", "LoRA(ν+μ)", "rsLoRA", "EWC-LoRA", "HLoRA", "SciQ", "PIQA"):
        assert label in tables, label
    for f in FIGURES:
        w, h = png_size(report / f)
        assert w > 200 and h > 200, f


def test_report_command_rewrites_from_results_only(tiny_run, tmp_path):
    assert main(["report", str(tiny_run / "results.json"), "--out", str(tmp_path / "rep")]) == 0
    for f in FIGURES + ["tables.md", "table1.csv", "table2.csv", "complexity.csv", "tables.tex", "report.md"]:
        assert (tmp_path / "rep" / f).stat().st_size > 0, f


def test_resume_recomputes_nothing_finished(tiny_run, monkeypatch):
    """A second `hlora run` over a finished grid trains and evaluates nothing."""
    import hlora.experiment as ex

    calls = []
    monkeypatch.setattr(ex, "_evaluate", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(ex, "_run_or_resume", lambda *a, **k: calls.append(a))
    assert main(["run", str(CONFIG), f"out={tiny_run}"]) == 0
    assert calls == []


def test_interrupted_cell_continues(tmp_path, monkeypatch):
    """A cell whose stage-μ run was cut short is resumed, other finished cells are reused."""
    import hlora.experiment as ex
    from hlora.config import load_config

    cfg = load_config(ExperimentConfig, CONFIG, [f"out={tmp_path}", "seeds=[0]", "tasks=[sciq]",
                                                 "methods=[lora_mu]", "domain.save_steps=2"])
    monkeypatch.setenv("HLORA_DATA", str(Path(ex.__file__).parent / "assets" / "data"))
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    import hlora.train as tr

    real = tr.run_stage
    monkeypatch.setattr(tr, "run_stage", lambda *a, **k: real(*a, extra_callbacks=[Stop()], **k))
    with pytest.raises(KeyboardInterrupt):
        run_cell(cfg, "lora_mu", "sciq", 0, None, tmp_path)
    run_dir = tmp_path / "cells" / "lora_mu-sciq-s0" / "run"
    assert (run_dir / "checkpoints" / "checkpoint-2").exists() and not (run_dir / "DONE").exists()
    monkeypatch.setattr(tr, "run_stage", real)
    rec = run_cell(cfg, "lora_mu", "sciq", 0, None, tmp_path)
    assert (run_dir / "DONE").exists() and rec["curve"]["step"] == [1, 2, 3, 4]


def test_ttest_agrees_with_scipy():
    from scipy import stats

    a, b = [0.1, 0.4, 0.35, 0.8, 0.55], [0.3, 0.2, 0.1, 0.15, 0.05]
    assert ttest(a, b) == pytest.approx(tuple(stats.ttest_ind(a, b, equal_var=False)))
    assert ttest(a, b, paired=True) == pytest.approx(tuple(stats.ttest_rel(a, b)))
