"""The experiment's general-ability measures and per-row learning rates: a cell records every general text
by name (held-out C4 and stage ν's own WikiText, flagged), the battery's mean, tasks and items, and the
predictions behind its accuracies; a row may carry its own stage-μ lr and sweep it; and the committed
records of the older grid keep their settings hash (they still count as done)."""
import json
import shutil
from pathlib import Path

import pytest

from hlora.assets import EMBEDDED_DATA
from hlora.config import ConfigError, load_config
from hlora.experiment import ExperimentConfig, plan, records_dir, run_experiment, settings_hash

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from test_battery import RECORDS

    root = tmp_path_factory.mktemp("data")
    shutil.copytree(EMBEDDED_DATA, root, dirs_exist_ok=True)
    (root / "battery").mkdir()
    for name, rows in RECORDS.items():
        (root / "battery" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (root / "c4").mkdir(exist_ok=True)  # replaces the embedded C4 sample with four short pages
    (root / "c4" / "validation.jsonl").write_text(
        "".join(json.dumps({"text": f"Web page {i}: prices, opening hours and a map."}) + "\n" for i in range(4)))
    return root


def _cfg(tmp_path, data_root, **kw):
    base = dict(model={"name": "tiny-llama"}, lora={"targets": ["q_proj", "v_proj"], "r": 2, "alpha": 4},
                general={"max_steps": 2, "batch_size": 2, "seq_len": 16}, domain={"max_steps": 2, "batch_size": 2,
                                                                                  "seq_len": 16, "lr": 0.005},
                eval={"limit": 3, "ppl_max_tokens": 64, "ppl_window": 32, "kl": True},
                methods=["base", "lora_mu", "wise_lora_mu"], options={"lora_mu": {"lr": 0.01}, "wise_lora_mu": {}},
                sweeps={"lora_mu": {"lr": [0.001]}}, tasks=["sciq"], seeds=[0], general_eval="c4",
                texts=["wikitext"], battery=["battery"], battery_limit=2, data_root=str(data_root),
                out=str(tmp_path / "out"))
    base.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(base))
    return load_config(ExperimentConfig, path)


def test_cells_record_texts_battery_predictions_and_lr(tmp_path, data_root):
    cfg = _cfg(tmp_path, data_root)
    names = [c.name for c in plan(cfg)]
    assert names == ["base-sciq-s0", "lora_mu-sciq-s0-lr0.001", "lora_mu-sciq-s0", "wise_lora_mu-sciq-s0"]
    run_experiment(cfg, progress=lambda *_: None, report=False)
    recs = {p.stem: json.loads(p.read_text()) for p in records_dir(cfg).glob("*.json")}
    lm, slow, base = recs["lora_mu-sciq-s0"], recs["lora_mu-sciq-s0-lr0.001"], recs["base-sciq-s0"]
    assert lm["lr"] == 0.01 and slow["lr"] == 0.001 and base["lr"] is None
    assert recs["wise_lora_mu-sciq-s0"]["lr"] == 0.01  # the adapter it scales trained at its source's lr
    assert slow["sweep"] == {"param": "lr", "value": 0.001} and not slow["main"] and lm["main"]
    assert lm["config"]["train"]["lr"] == 0.01 and slow["config"]["train"]["lr"] == 0.001
    for r in recs.values():
        assert r["record_version"] == 2 and r["general_eval"] == "c4"
        assert set(r["texts"]) == {"c4", "wikitext"}
        assert r["texts"]["wikitext"]["stage_nu_text"] and not r["texts"]["c4"]["stage_nu_text"]
        assert r["general_ppl"] == r["texts"]["c4"]["ppl"] and r["general_kl"] == r["texts"]["c4"]["kl"]
        b = r["battery"]
        assert set(b["tasks"]) == {"arc_challenge", "boolq", "commonsense_qa", "siqa", "copa", "winogrande"}
        assert all(t["n"] == 2 for t in b["tasks"].values())
        assert b["acc"] == pytest.approx(sum(t["acc"] for t in b["tasks"].values()) / 6)
        assert all(len(v) == 2 for v in b["per_item"].values())
        assert len(r["per_item"]["pred"]) == 3 and len(r["per_item"]["gold"]) == 3
        assert [len(x) for x in r["per_item"]["ll"]] == [4, 4, 4]  # every choice's log-likelihood (SciQ: 4)
    assert base["texts"]["c4"]["kl"] == 0.0 and lm["texts"]["c4"]["kl"] > 0


def test_battery_must_not_be_tuned_and_lr_sweeps_need_training(tmp_path, data_root):
    with pytest.raises(ConfigError, match="also a tuned task"):
        plan(_cfg(tmp_path, data_root, tasks=["copa"], sweeps={}))
    with pytest.raises(ConfigError, match="trains nothing"):
        plan(_cfg(tmp_path, data_root, sweeps={"base": {"lr": [0.1]}}))


def test_committed_records_keep_their_settings_hash():
    cfg = load_config(ExperimentConfig, ROOT / "configs" / "fronts-smollm2.yaml")
    records = ROOT / "results" / "fronts-smollm2" / "records"
    cells = plan(cfg)
    assert len(cells) == len(list(records.glob("*.json")))
    for cell in cells:
        rec = json.loads((records / f"{cell.name}.json").read_text())
        assert rec["settings_hash"] == settings_hash(cfg, cell), cell.name


def test_demo_config_plans_on_the_embedded_data(monkeypatch):
    """The demo runs from the package alone: its tasks and general texts (C4 held out, WikiText-2 stage ν's)
    all resolve in the embedded subset."""
    from hlora.data import get_task

    cfg = load_config(ExperimentConfig, ROOT / "configs" / "demo.yaml")
    assert cfg.data_root == "embedded" and cfg.general_eval == "c4" and cfg.texts == ["wikitext"]
    assert [c.row.id for c in plan(cfg)] == cfg.methods
    monkeypatch.setenv("HLORA_DATA", str(EMBEDDED_DATA))
    assert len(get_task("c4").eval_texts()) == 16
    assert get_task("wikitext").eval_texts() and get_task("sciq").eval_items(cfg.eval.limit)


def test_heldout_grid_runs_each_row_at_the_lr_the_sweep_picked(bench_script):
    """configs/fronts-smollm2-heldout.yaml trains each swept row at the lr benchmarks/pick_lr.py picks from the
    committed lr sweep, and HLoRA's variants and ablations at HLoRA's."""
    from hlora.experiment import ROWS
    from hlora.experiment.plan import _row_lr

    picks = bench_script("pick_lr").pick(json.loads((ROOT / "results" / "lr-smollm2" / "results.json").read_text()))
    cfg = load_config(ExperimentConfig, ROOT / "configs" / "fronts-smollm2-heldout.yaml")
    assert set(picks) == {"lora_mu", "hlora", "ewc_lora", "replay", "kl_general", "corda_kpm"}
    for row, p in picks.items():
        assert _row_lr(cfg, ROWS[row]) == p["lr"], row
    for row in ("hlora_no_layer", "hlora_no_layer_element", "hlora_norm", "hlora_auto"):
        assert _row_lr(cfg, ROWS[row]) == picks["hlora"]["lr"], row
    for row in ("lora_nu_mu", "rslora"):
        assert _row_lr(cfg, ROWS[row]) == picks["lora_mu"]["lr"], row
