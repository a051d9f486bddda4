"""`hlora run configs/tiny.yaml` + `hlora report` end to end, resuming a half-finished grid, and a grid that
resumes from committed records alone (a fresh machine with only the repository)."""
import json
import struct
from pathlib import Path

import pytest

from hlora.cli import main
from hlora.config import ConfigError, load_config
from hlora.experiment import ROWS, ExperimentConfig, plan, run_cell
from hlora.report import ttest

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FIGURES = ["loss_curves.png", "importance_heatmap.png", "sweeps.png", "violin_hlora_vs_ewc.png", "acc_vs_ppl.png",
           "fronts_sciq.png", "fronts_piqa.png"]


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
    cfg = load_config(ExperimentConfig, CONFIG)
    results = json.loads((tiny_run / "results.json").read_text())
    assert [r["cell"] for r in results] == [c.name for c in plan(cfg)]  # config order
    main_cells = [r for r in results if r["main"]]
    assert {r["method"] for r in main_cells} == set(cfg.methods)
    assert {r["task"] for r in main_cells} == {"sciq", "piqa"}
    assert {r["seed"] for r in main_cells} == {0, 1}
    # every row on SciQ over both seeds; PIQA thinned by per_task (seed 0, a few rows)
    expected = {(m, "sciq", s) for m in cfg.methods for s in (0, 1)} | {
        (m, "piqa", 0) for m in cfg.per_task["piqa"]["methods"]}
    assert sorted((r["method"], r["task"], r["seed"]) for r in main_cells) == sorted(expected)
    for r in main_cells:  # each row's label, written once with the row, travels with its records
        assert r["label"] == ROWS[r["method"]].label
    fronts = {(r["method"], r["sweep"]["param"]) for r in results if r["sweep"]}
    assert {("hlora", "phi"), ("ewc_lora", "lam"), ("replay", "rho"), ("kl_general", "beta"), ("kl_domain", "beta"),
            ("wise_lora_nu_mu", "alpha")} <= fronts
    assert sorted(r["sweep"]["value"] for r in results
                  if r["method"] == "hlora" and r["task"] == "sciq" and r["seed"] == 0) == [0.01, 1.0, 100.0]
    required = {"method", "label", "task", "seed", "general_ppl", "general_bpb", "general_kl", "acc", "acc_norm",
                "per_item", "transfer", "cost", "train_seconds", "importance_seconds", "importance_bytes", "config",
                "git_commit", "versions"}
    for r in results:
        assert required <= set(r), required - set(r)
        assert len(r["per_item"]["acc"]) == 6
        other = {"sciq": "piqa", "piqa": "sciq"}[r["task"]]
        assert list(r["transfer"]) == [other] and r["transfer"][other]["n"] == 4  # cross-task retention
        assert {"wall_seconds", "steps", "domain_tokens", "general_tokens", "extra_forward_tokens"} <= set(r["cost"])
    hl = next(r for r in main_cells if r["method"] == "hlora")
    assert hl["importance_kind"] == "si" and hl["importance_bytes"] > 0 and hl["layer_norms"]
    assert hl["curve"]["penalty"][-1] > 0
    assert hl["cost"]["general_tokens"] == 4 * 2 * 32  # stage ν's text counts for the rows that start from it
    ewc = next(r for r in main_cells if r["method"] == "ewc_lora")
    assert ewc["importance_kind"] == "fisher" and ewc["full_fisher_bytes"] > ewc["importance_bytes"]
    base = next(r for r in main_cells if r["method"] == "base")
    assert base["train_seconds"] == 0 and base["curve"] is None and base["general_kl"] == 0.0
    trained = [r for r in main_cells if r["method"] != "base"]
    assert all(r["general_kl"] > 0 for r in trained)
    replay = next(r for r in main_cells if r["method"] == "replay")
    assert replay["cost"]["general_tokens"] == 4 * 1 * 32 and replay["cost"]["domain_tokens"] == 4 * 1 * 32
    # same ν stage and same data: LoRA(ν+μ) and the "-layer,element" ablation are the same configuration
    a = [r for r in main_cells if r["method"] == "lora_nu_mu" and r["task"] == "sciq" and r["seed"] == 0][0]
    b = [r for r in main_cells if r["method"] == "hlora_no_layer_element" and r["task"] == "sciq" and r["seed"] == 0][0]
    assert a["general_ppl"] == pytest.approx(b["general_ppl"], rel=1e-6)
    # each seed's stage-ν adapter is evaluated on its own (one cache entry per adapter, not per run name)
    nu = {r["seed"]: r for r in main_cells if r["method"] == "lora_nu" and r["task"] == "sciq"}
    assert nu[0]["general_ppl"] != nu[1]["general_ppl"] and nu[0]["general_kl"] != nu[1]["general_kl"]
    # WiSE-FT evaluates LoRA(ν+μ)'s adapter: smaller α, closer to Base in KL
    wise = sorted((r["sweep"]["value"], r["general_kl"]) for r in results
                  if r["method"] == "wise_lora_nu_mu" and r["task"] == "sciq" and r["seed"] == 0)
    assert [k for _, k in wise] == sorted(k for _, k in wise) and wise[0][1] < a["general_kl"]
    report = tiny_run / "report"
    tables = (report / "tables.md").read_text()
    for label in ("Base", "LoRA(μ)", "LoRA(ν+μ)", "rsLoRA", "EWC-LoRA", "HLoRA", "Replay", "CorDA-KPM", "SciQ", "PIQA"):
        assert label in tables, label
    for f in FIGURES:
        w, h = png_size(report / f)
        assert w > 200 and h > 200, f


def test_report_command_rewrites_from_results_only(tiny_run, tmp_path, skip_figure_drawing):  # the grid draws them
    assert main(["report", str(tiny_run / "results.json"), "--out", str(tmp_path / "rep")]) == 0
    for f in FIGURES + ["tables.md", "table1.csv", "table2.csv", "complexity.csv", "tables.tex", "report.md"]:
        assert (tmp_path / "rep" / f).stat().st_size > 0, f


def _no_work(monkeypatch):
    import hlora.experiment.records as records
    import hlora.experiment.run as run

    calls = []  # where run_cell looks them up (the experiment package's modules)
    monkeypatch.setattr(records, "_evaluate", lambda *a, **k: calls.append(a) or {})
    monkeypatch.setattr(run, "_run_or_resume", lambda *a, **k: calls.append(a))
    return calls


@pytest.mark.slow  # a second `hlora run` of the grid (writes the report again)
def test_resume_recomputes_nothing_finished(tiny_run, monkeypatch):
    """A second `hlora run` over a finished grid trains and evaluates nothing."""
    calls = _no_work(monkeypatch)
    assert main(["run", str(CONFIG), f"out={tiny_run}"]) == 0
    assert calls == []


@pytest.mark.slow  # two more `hlora run`s of the grid
def test_committed_records_alone_resume_the_grid(tiny_run, tmp_path, monkeypatch):
    """On a fresh machine the repository holds only the records: a new work directory finds them done."""
    import shutil

    records = tmp_path / "repo" / "results" / "tiny" / "records"
    shutil.copytree(tiny_run / "records", records)
    calls = _no_work(monkeypatch)
    assert main(["run", str(CONFIG), f"out={tmp_path / 'fresh'}", f"records={records}"]) == 0
    assert calls == []
    assert (records.parent / "results.json").is_file() and (records.parent / "report" / "report.md").is_file()
    # --collect gathers what is there and runs nothing, even where records are missing
    (records / f"{plan(load_config(ExperimentConfig, CONFIG))[-1].name}.json").unlink()
    assert main(["run", str(CONFIG), f"out={tmp_path / 'fresh'}", f"records={records}", "--collect"]) == 0
    assert calls == []
    collected = json.loads((records.parent / "results.json").read_text())
    assert len(collected) == len(plan(load_config(ExperimentConfig, CONFIG))) - 1
    # a record made with other settings is not silently taken as this config's result
    with pytest.raises(ConfigError, match="other settings"):
        run_cell(load_config(ExperimentConfig, CONFIG, ["domain.lr=0.5"]), plan(load_config(ExperimentConfig, CONFIG))[1],
                 records)


def test_interrupted_cell_continues(tmp_path, monkeypatch):
    """A cell whose stage-μ run was cut short is resumed, other finished cells are reused."""
    import hlora.experiment as ex

    cfg = load_config(ExperimentConfig, CONFIG, [f"out={tmp_path}", "seeds=[0]", "tasks=[sciq]",
                                                 "methods=[lora_mu]", "domain.save_steps=2", "per_task={}"])
    monkeypatch.setenv("HLORA_DATA", str(Path(ex.__file__).parent / "assets" / "data"))
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise KeyboardInterrupt

    import hlora.train as tr

    real = tr.run_stage
    (cell,) = plan(cfg)
    monkeypatch.setattr(tr, "run_stage", lambda *a, **k: real(*a, extra_callbacks=[Stop()], **k))
    with pytest.raises(KeyboardInterrupt):
        run_cell(cfg, cell, tmp_path / "records")
    (run_dir,) = (tmp_path / "runs").glob("sciq-s0-*")
    assert (run_dir / "checkpoints" / "checkpoint-2").exists() and not (run_dir / "DONE").exists()
    assert not (tmp_path / "records" / "lora_mu-sciq-s0.json").exists()
    monkeypatch.setattr(tr, "run_stage", real)
    rec = run_cell(cfg, cell, tmp_path / "records")
    assert (run_dir / "DONE").exists() and rec["curve"]["step"] == [1, 2, 3, 4]
    # the record lost, the run and its evaluation are reused: its cost is what the result needed, not this process's
    (tmp_path / "records" / "lora_mu-sciq-s0.json").unlink()
    again = run_cell(cfg, cell, tmp_path / "records")
    c = again["cost"]
    assert c["wall_seconds"] == pytest.approx(c["train_seconds"] + c["eval_seconds"])
    assert c["wall_seconds"] > c["process_seconds"]
    assert c["train_seconds"] == rec["cost"]["train_seconds"] > 0
    # the resumed run's training began in the interrupted process, so its wall time is at least its parts; when the
    # earlier part outweighs this process's own time (timing decides), that time is kept as process_seconds
    r = rec["cost"]
    assert r["wall_seconds"] >= r["train_seconds"] + r["eval_seconds"] - 1e-9
    if "process_seconds" in r:
        assert r["wall_seconds"] == pytest.approx(r["train_seconds"] + r["eval_seconds"])
        assert r["wall_seconds"] > r["process_seconds"]
    # a WiSE-FT cell of that adapter counts its own evaluation, not the training of the adapter it scales
    summary = run_dir / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "train_seconds": 1000.0}))
    wcfg = load_config(ExperimentConfig, CONFIG, [f"out={tmp_path}", "seeds=[0]", "tasks=[sciq]", "per_task={}",
                                                  "methods=[lora_mu, wise_lora_mu]", "sweeps={}"])
    wise = next(x for x in plan(wcfg) if x.row.id == "wise_lora_mu")
    w = run_cell(wcfg, wise, tmp_path / "records")["cost"]
    assert w["train_seconds"] == 1000.0 and w["wall_seconds"] < 1000.0 and "process_seconds" not in w


def test_ttest_agrees_with_scipy():
    from scipy import stats

    a, b = [0.1, 0.4, 0.35, 0.8, 0.55], [0.3, 0.2, 0.1, 0.15, 0.05]
    assert ttest(a, b) == pytest.approx(tuple(stats.ttest_ind(a, b, equal_var=False)))
    assert ttest(a, b, paired=True) == pytest.approx(tuple(stats.ttest_rel(a, b)))


def test_hashes_ignore_fields_left_at_their_defaults():
    """A field added later with a default that keeps the old behaviour must not orphan finished runs and
    committed records: the hashes see only what differs from the defaults."""
    from hlora.config import method_config
    from hlora.experiment import _canonical

    assert _canonical(method_config("hlora")) == {"class": "HLoRAConfig"}
    assert _canonical(method_config("hlora", phi=2.0)) == {"class": "HLoRAConfig", "phi": 2.0}
    cfg = load_config(ExperimentConfig, CONFIG)
    from hlora.experiment import settings_hash

    cell = plan(cfg)[0]
    again = load_config(ExperimentConfig, CONFIG, ["domain.save_steps=7", "eval.batch_size=2"])
    assert settings_hash(again, plan(again)[0]) == settings_hash(cfg, cell)  # neither changes a result


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG.parent.glob("*.yaml")))
def test_every_shipped_config_loads_and_plans(name):
    """A config in configs/ that no longer matches the schema fails here, not on a user's machine: grids
    (`hlora run`) load and plan, stage configs (`hlora domain --config`, benchmarks) load as a RunConfig."""
    import yaml

    from hlora.config import RunConfig

    path = CONFIG.parent / name
    if "methods" in yaml.safe_load(path.read_text()):
        cells = plan(load_config(ExperimentConfig, path))
        assert cells and all(c.row.id in ROWS for c in cells)
    else:
        assert load_config(RunConfig, path).train.lr > 0


def test_transfer_tasks_add_tasks_no_cell_tunes_on():
    """An lr sweep on one task can watch others: `transfer_tasks` join the grid's other tasks (once, never the
    cell's own), only where `transfer` asks for them; without them nothing changes."""
    from hlora.experiment import ExperimentConfig, plan
    from hlora.experiment.run import _transfer_tasks

    cfg = ExperimentConfig(methods=["lora_mu"], tasks=["sciq:validation"], transfer="all",
                           transfer_tasks=["medmcqa", "piqa", "sciq:validation", "medmcqa"])
    (cell,) = plan(cfg)
    assert _transfer_tasks(cfg, cell) == ["medmcqa", "piqa"]
    assert _transfer_tasks(ExperimentConfig(methods=["lora_mu"], tasks=["sciq", "piqa"], transfer="all"), cell) == [
        "sciq", "piqa"]
    cfg.transfer = "none"
    assert _transfer_tasks(cfg, cell) == []


def test_a_cell_on_a_task_split_finds_its_results(tmp_path, monkeypatch):
    """A cell on "sciq:validation" (an lr sweep scored on validation) reads the results evaluation keys by the
    task's name, with its transfer tasks, and writes a record that passes the schema."""
    from hlora.experiment import ExperimentConfig, plan
    from hlora.experiment import records as R

    def mcq(acc):
        return {"acc": acc, "acc_norm": acc, "n": 2, "seconds": 1.0,
                "per_item": {"acc": [1.0, 0.0], "acc_norm": [1.0, 0.0], "ll_gold": [-1.0, -2.0], "pred": [0, 1],
                             "gold": [0, 0], "ll": [[-1.0, -2.0], [-3.0, -2.0]]}}

    ev = {"sciq": mcq(0.5), "medmcqa": mcq(0.25),
          "c4": {"token_ppl": 30.0, "word_ppl": 60.0, "bits_per_byte": 1.0, "n_tokens": 64, "seconds": 1.0}}
    cfg = ExperimentConfig(methods=["base"], tasks=["sciq:validation"], transfer="all", transfer_tasks=["medmcqa"],
                           general_eval="c4", texts=["c4"], out=str(tmp_path / "work"))
    (cell,) = plan(cfg)
    monkeypatch.setattr(R, "_trained", lambda cfg, cell: (None, {"cost": {}, "train_seconds": 0.0}))
    monkeypatch.setattr(R, "_evaluate", lambda cfg, cell, adapter: ev)
    rec = R.run_cell(cfg, cell, tmp_path / "records")
    assert rec["task"] == "sciq:validation" and rec["acc"] == 0.5 and rec["general_ppl"] == 30.0
    assert list(rec["transfer"]) == ["medmcqa"] and rec["transfer"]["medmcqa"]["acc"] == 0.25
    assert (tmp_path / "records" / f"{cell.name}.json").exists()


def test_first_rows_run_first_and_results_keep_the_plan_order(tmp_path, monkeypatch):
    """`first`: within each task, the named rows' cells (every seed) run before the others; results.json keeps the
    plan's order; a row the grid does not hold is an error that names it."""
    import hlora.experiment.grid as grid
    from hlora.experiment.plan import run_order

    cfg = load_config(ExperimentConfig, CONFIG, [f"out={tmp_path}", "first=[hlora, base]"])
    cells = plan(cfg)
    order = run_order(cfg, cells)
    assert sorted(c.name for c in order) == sorted(c.name for c in cells)
    sciq = [c for c in order if c.task == "sciq"]
    k = sum(c.row.id in ("hlora", "base") for c in sciq)
    assert k == 2 * (1 + 3) and all(c.row.id in ("hlora", "base") for c in sciq[:k])  # 2 seeds × (Base, HLoRA φ ×3)
    assert [c.seed for c in sciq[:k]] == sorted(c.seed for c in sciq[:k])  # seed by seed, as in the plan
    assert [c.task for c in order] == [c.task for c in cells]  # task-major still
    ran = []
    monkeypatch.setattr(grid, "run_cell", lambda cfg, cell, records: ran.append(cell.name) or {
        "cell": cell.name, "acc": 0.5, "general_ppl": 10.0})
    grid.run_experiment(cfg, progress=lambda *a: None, report=False)
    assert ran == [c.name for c in order]
    assert [r["cell"] for r in json.loads((tmp_path / "records").parent.joinpath("results.json").read_text())] == [
        c.name for c in cells]
    with pytest.raises(ConfigError, match="first: 'hlroa'"):
        run_order(load_config(ExperimentConfig, CONFIG, ["first=[hlroa]"]), cells)


def test_first_may_name_one_point_of_a_row():
    """`row@point` puts only that swept cell first (the headline's φ, not the whole front); a point the row does
    not sweep, or one that is not a number, is an error that names the entry and the row's points."""
    from hlora.experiment.plan import run_order

    cfg = load_config(ExperimentConfig, CONFIG, ["first=[hlora@100, base]"])
    cells = plan(cfg)
    sciq = [c for c in run_order(cfg, cells) if c.task == "sciq"]
    early = [(c.row.id, c.point) for c in sciq[:4]]
    assert early == [("base", None), ("hlora", 100.0)] * 2  # seed 0, then seed 1, in the plan's order
    assert all((c.row.id, c.point) not in early for c in sciq[4:])
    assert any(c.row.id == "hlora" for c in sciq[4:])  # the rest of the front comes later, not dropped
    with pytest.raises(ConfigError, match=r"first: 'hlora@3' matches no cell; hlora's points: 0.01, 1, 100"):
        run_order(load_config(ExperimentConfig, CONFIG, ["first=[hlora@3]"]), cells)
    with pytest.raises(ConfigError, match="must be a number"):
        run_order(load_config(ExperimentConfig, CONFIG, ["first=[hlora@high]"]), cells)


def test_a_wise_cell_hash_follows_its_sources_lr_and_setting():
    """A WiSE-FT cell evaluates its source row's adapter: once the source trains at its own lr, changing that lr
    or the source's setting makes the cell's committed record stale (its settings hash changes)."""
    from hlora.experiment import settings_hash

    over = ["methods=[lora_mu, wise_lora_mu]", "sweeps={}", "per_task={}", "tasks=[sciq]", "seeds=[0]"]
    cfg = load_config(ExperimentConfig, CONFIG, over)
    wise = next(c for c in plan(cfg) if c.row.id == "wise_lora_mu")
    own = load_config(ExperimentConfig, CONFIG, over + ["options={lora_mu: {lr: 0.01}}"])
    other = load_config(ExperimentConfig, CONFIG, over + ["options={lora_mu: {lr: 0.02}}"])
    hashes = {settings_hash(c, next(x for x in plan(c) if x.row.id == "wise_lora_mu")) for c in (cfg, own, other)}
    assert len(hashes) == 3 and settings_hash(cfg, wise) in hashes
