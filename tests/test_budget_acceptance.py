"""benchmarks/budget_acceptance.py: what is left to run, the commands it runs (valid for the real CLI), and how a
finished or unresolved tune becomes a committed record."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def acc(bench_script):
    return bench_script("budget_acceptance")


def test_todo_skips_committed_records_budget_major(acc, tmp_path):
    (tmp_path / acc.record_name("c4_kl=0.05", 1)).write_text("{}")
    left = acc.todo(["c4_kl=0.05", "c4_ppl_rise_pct=1"], [0, 1], tmp_path)
    assert left == [("c4_kl=0.05", 0), ("c4_ppl_rise_pct=1", 0), ("c4_ppl_rise_pct=1", 1)]


def test_commands_are_what_the_cli_accepts(acc, tmp_path):
    """The tune line parses into the regime the docs state: a wrong flag or override would fail here, not hours
    into a run."""
    from hlora.budget.tune import config_from_args
    from hlora.cli import _overrides, _run_config, parse_args

    general, tune = acc.commands("c4_kl=0.05", 2, tmp_path, ["hlora"])
    g = parse_args(general[1:])
    gcfg = _run_config(g)
    assert (gcfg.data, gcfg.train.max_steps, gcfg.train.lr, gcfg.train.seed, gcfg.lora.r) == ("wikitext", 60, 8e-4, 2, 16)
    assert gcfg.out == str(tmp_path / "nu-s2")
    t = parse_args(tune[1:])
    cfg = config_from_args(t, _overrides(t))
    assert (cfg.budget.task, cfg.budget.kind, cfg.budget.limit) == ("c4", "kl", 0.05)
    assert cfg.tune.method == "auto" and cfg.train.seed == 2 and cfg.train.max_steps == 100
    assert {k: float(v) for k, v in cfg.tune.lr.items()} == {"none": 1e-3, "hlora": 3e-3, "replay": 3e-3,
                                                            "kl_general": 1e-3, "ewc": 1e-3}
    assert cfg.init_adapter == str(tmp_path / "nu-s2" / "adapter")
    assert cfg.tune.runs_dir == str(tmp_path / "shared-s2") and cfg.out == str(tmp_path / "c4_kl=0.05-s2")
    assert len(cfg.lora.targets) == 7 and cfg.slices.domain_test_items == 150
    assert cfg.tune.start == {"hlora": 1.0, "kl_general": 0.1, "ewc": 5000.0, "replay": 0.25}


def test_a_regime_changes_the_tune_line_and_the_record_name(acc, tmp_path):
    """`@lr3e-3` (the perplexity budgets' regime) trains every candidate at 3e-3 and measures on 4× the slices,
    under its own record name."""
    from hlora.budget.tune import config_from_args
    from hlora.cli import _overrides, parse_args

    _, tune = acc.commands("c4_ppl_rise_pct=1@lr3e-3", 0, tmp_path, ["hlora"])
    t = parse_args(tune[1:])
    cfg = config_from_args(t, _overrides(t))
    assert (cfg.budget.kind, cfg.budget.limit) == ("ppl_rise_pct", 1.0)
    assert {k: float(v) for k, v in cfg.tune.lr.items()} == dict.fromkeys(
        ["none", "hlora", "replay", "kl_general", "ewc"], 3e-3)
    assert (cfg.slices.general_val_tokens, cfg.slices.general_test_tokens) == (32768, 32768)
    assert acc.record_name("c4_ppl_rise_pct=1@lr3e-3", 0) == "c4_ppl_rise_pct=1@lr3e-3-s0.json"
    assert cfg.out == str(tmp_path / "c4_ppl_rise_pct=1@lr3e-3-s0") and cfg.tune.runs_dir == str(tmp_path / "shared-s0")
    assert all(b.partition("@")[2] in ("", *acc.REGIMES) for b in acc.BUDGETS)
    with pytest.raises(SystemExit, match="unknown regime 'fast'"):
        acc.main(["--dry-run", "--records", str(tmp_path), "--budgets", "c4_kl=0.05@fast"])


class FakeCLI:
    """Stands in for `hlora`: stage ν writes an adapter and importance, tune writes tune.json (or not)."""

    def __init__(self, tune_rc=0, write=True):
        self.calls, self.tune_rc, self.write = [], tune_rc, write

    def __call__(self, argv):
        self.calls.append(argv[1])
        out = Path(argv[argv.index("--out") + 1] if "--out" in argv else next(a[4:] for a in argv if a.startswith("out=")))
        if argv[1] == "general":
            (out / "adapter").mkdir(parents=True)
            (out / "importance.safetensors").write_bytes(b"x")
            return subprocess.CompletedProcess(argv, 0)
        if self.write:
            out.mkdir(parents=True, exist_ok=True)
            (out / "tune.json").write_text(json.dumps({"budget": argv[argv.index("--budget") + 1]}))
        return subprocess.CompletedProcess(argv, self.tune_rc)


def test_run_pair_trains_nu_once_per_seed_and_keeps_the_record(acc, tmp_path):
    runs, records, fake = tmp_path / "runs", tmp_path / "records", FakeCLI()
    for b in ("c4_kl=0.02", "c4_kl=0.05"):
        assert acc.run_pair(b, 0, runs, records, ["hlora"], run=fake) == "kept"
    assert fake.calls == ["general", "tune", "tune"]
    assert json.loads((records / "c4_kl=0.05-s0.json").read_text()) == {"budget": "c4_kl=0.05"}
    # a tune.json already under runs (a session cut after the tune, before the copy): copied, nothing re-run
    (records / "c4_kl=0.05-s0.json").unlink()
    acc.run_pair("c4_kl=0.05", 0, runs, records, ["hlora"], run=fake)
    assert fake.calls == ["general", "tune", "tune"] and (records / "c4_kl=0.05-s0.json").exists()


def test_unresolved_tune_is_kept_failed_tune_is_an_error(acc, tmp_path):
    runs, records = tmp_path / "runs", tmp_path / "records"
    acc.run_pair("c4_kl=0.001", 0, runs, records, ["hlora"], run=FakeCLI(tune_rc=1))  # no candidate: tune.json
    assert (records / "c4_kl=0.001-s0.json").exists()
    with pytest.raises(RuntimeError, match="without a tune.json"):
        acc.run_pair("c4_kl=0.002", 0, runs, records, ["hlora"], run=FakeCLI(tune_rc=1, write=False))
    assert not (records / "c4_kl=0.002-s0.json").exists()


def test_interrupted_stage_nu_is_restarted(acc, tmp_path):
    runs, records, fake = tmp_path / "runs", tmp_path / "records", FakeCLI()
    (runs / "nu-s1" / "checkpoint-20").mkdir(parents=True)  # cut before its adapter was written
    acc.run_pair("c4_kl=0.1", 1, runs, records, ["hlora"], run=fake)
    assert fake.calls == ["general", "tune"] and not (runs / "nu-s1" / "checkpoint-20").exists()


def test_dry_run_lists_what_is_left(acc, tmp_path, capsys):
    (tmp_path / acc.record_name("c4_kl=0.02", 0)).write_text("{}")
    assert acc.main(["--dry-run", "--records", str(tmp_path), "--seeds", "0", "--budgets", "c4_kl=0.02,c4_kl=0.1"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 tunes recorded" in out and "c4_kl=0.1 seed 0" in out and "c4_kl=0.02 seed 0" not in out


def test_end_to_end_on_a_tiny_model(acc, tmp_path, capsys):
    """The script as a user runs it, with its real `hlora` calls on the tiny model: stage ν, the tune, the record;
    a second call finds the record and runs nothing."""
    from test_budget import make_data

    data = make_data(tmp_path)
    records, runs = tmp_path / "records", tmp_path / "runs"
    budget = f"text:{data}/general.jsonl_kl=0.5"
    small = "--model tiny-llama --max-steps 2 --seq-len 32 --r 4 --alpha 16 --targets q_proj,v_proj"
    args = ["--records", str(records), "--runs", str(runs), "--seeds", "0", "--budgets", budget,
            "--nu-args", f"{small} --data text:{data}/pool.jsonl",
            "--tune-args", f"{small} --data mcq:{data}/domain.jsonl --general-data text:{data}/pool.jsonl "
                           "--allow hlora,kl_general slices.general_val_tokens=512 slices.general_test_tokens=128 "
                           "slices.domain_val_items=20 slices.domain_test_items=0 dual.every=1 dual.proxy_tokens=128 "
                           "search.grid=2 search.refine=1"]
    assert acc.main(args) == 0
    rec = json.loads((records / acc.record_name(budget, 0)).read_text())
    assert [c["label"] for c in rec["candidates"]] == ["none", "hlora", "kl_general"]
    assert rec["budget"]["limit"] == 0.5 and rec["config"]["train"]["seed"] == 0 and rec["winner"]
    assert (runs / "nu-s0" / "importance.safetensors").is_file()
    capsys.readouterr()
    assert acc.main(args) == 0 and "1 of 1 tunes recorded" in capsys.readouterr().out
