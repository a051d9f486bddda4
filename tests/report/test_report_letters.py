"""MedMCQA's answer letters: which letter each row picks against the gold letters, the chi-square test, the
debiased accuracy and the letter-prior verdict, against a hand computation (report_records.LETTER_*)."""
from __future__ import annotations

import math

import pytest
from report_records import LETTER_SIGNAL, LETTER_WRONG, letter_cell, make_results
from scipy import stats

from hlora.report import load_results, write_report
from hlora.report.letters import letter_analysis

A_PRIOR = (3.0, 0.0, 0.0, 0.0)  # +3 on A whatever the question: the model always answers A
GOLD_SHARES = [3 / 8, 2 / 8, 2 / 8, 1 / 8]


def _records(task="medmcqa", seeds=(0,)):
    recs = []
    for s in seeds:
        recs += [letter_cell("base", LETTER_SIGNAL, task=task, seed=s, label="Base"),
                 letter_cell("lora_mu", LETTER_SIGNAL, A_PRIOR, task=task, seed=s, label="LoRA(μ)"),
                 letter_cell("ewc_lora", LETTER_WRONG, task=task, seed=s, label="EWC-LoRA"),
                 letter_cell("hlora", LETTER_SIGNAL, (0.5, 0, 0, 0), task=task, seed=s, label="HLoRA")]  # fmt: skip
    return recs


def test_a_row_that_always_answers_a_is_a_letter_prior(write_results):
    (block,) = letter_analysis(load_results(write_results(_records())))
    assert block["task"] == block["tuned"] == "medmcqa" and block["letters"] == "ABCD"
    rows = {r["method"]: r for r in block["rows"]}
    base_acc = 6 / 8  # Base knows items 1, 2, 4, 5, 6, 8
    assert block["base"] == {"acc": base_acc, "se": pytest.approx(math.sqrt(0.75 * 0.25 / 8)), "debiased_acc": 6 / 8}
    a = rows["lora_mu"]
    assert a["pred"] == [1.0, 0.0, 0.0, 0.0] and a["gold"] == GOLD_SHARES and a["acc"] == 3 / 8
    # chi-square by hand: counts (8, 0, 0, 0) against (3, 2, 2, 1): 25/3 + 4/2 + 4/2 + 1/1 = 40/3, 3 df
    assert a["chi2"] == pytest.approx(40 / 3) and a["p"] == pytest.approx(stats.chi2.sf(40 / 3, 3))
    # debiased by hand: letter means of ll are A -2+3+2/8, B -2+3/8, C -2+1/8, D -2+2/8; less those, the
    # argmax is the letter the model knows on every item but the two it never knew (items 3 and 7): 6 / 8
    assert a["debiased_acc"] == 6 / 8
    assert a["lost"] and a["recovers"] and a["prior"]
    wrong = rows["ewc_lora"]  # knows nothing: predictions spread like the gold letters, debiasing changes nothing
    assert wrong["pred"] == [0.25] * 4 and wrong["acc"] == 0.0 and wrong["debiased_acc"] == 0.0
    assert wrong["chi2"] == pytest.approx(1 / 3 + 1) and wrong["lost"] and not wrong["recovers"] and not wrong["prior"]
    mild = rows["hlora"]  # a prior of 0.5 moves no answer
    assert mild["acc"] == base_acc and not mild["lost"] and not mild["prior"]
    assert rows["base"]["lost"] is None and rows["base"]["debiased_acc"] == base_acc


def test_letters_of_a_transfer_task_pool_seeds(write_results):
    (block,) = letter_analysis(load_results(write_results(_records(task="sciq", seeds=(0, 1)))))
    assert block["task"] == "medmcqa" and block["tuned"] == "sciq"
    a = next(r for r in block["rows"] if r["method"] == "lora_mu")
    assert a["n"] == 16 and a["seeds"] == [0, 1] and a["gold"] == GOLD_SHARES
    assert a["chi2"] == pytest.approx(80 / 3) and a["debiased_acc"] == 6 / 8 and a["prior"]


def test_letter_table_only_with_predictions(write_results, tmp_path):
    write_report(write_results(_records()), tmp_path / "r")
    tables = (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")
    assert "#### MedMCQA answer letters, tuned on MedMCQA; Base 75.0 % ± 15.3 (se)" in tables
    assert (f"| LoRA(μ) | 8 (0) | 100 / 0 / 0 / 0 | 38 / 25 / 25 / 12 | 37.5 | 13.3 ({stats.chi2.sf(40 / 3, 3):.3f}) "
            "| 75.0 | yes: letter prior |") in tables  # fmt: skip
    assert ("| EWC-LoRA | 8 (0) | 25 / 25 / 25 / 25 | 38 / 25 / 25 / 12 | 0.0 | 1.3 (0.721) | 0.0 | no: debiased "
            "acc stays below Base |") in tables  # fmt: skip
    assert "| HLoRA | 8 (0) |" in tables and "| no loss |" in tables and "| Base | 8 (0) |" in tables
    assert "is back at Base's debiased level (≥ Base's debiased accuracy − se" in tables  # the rule is in the caption
    assert (tmp_path / "r" / "letters.csv").read_text().startswith("task,tuned_task,method,")
    assert "Answer letters" in (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    write_report(write_results(make_results()), tmp_path / "old")  # no predictions: no table, no file
    assert "Answer letters" not in (tmp_path / "old" / "tables.md").read_text(encoding="utf-8")
    assert not (tmp_path / "old" / "letters.csv").exists()


def test_a_letter_task_with_a_split_is_still_one(write_results):
    recs = _records()
    for r in recs:
        r["task"] = "medmcqa:validation"
    (block,) = letter_analysis(load_results(write_results(recs)))
    assert block["task"] == block["tuned"] == "medmcqa:validation" and block["letters"] == "ABCD"
    assert next(r for r in block["rows"] if r["method"] == "lora_mu")["prior"]


def test_an_lr_sweep_gets_a_letters_line_per_learning_rate(write_results, tmp_path):
    """In an lr sweep each learning rate is its own line (the row's points are settings, not a front); a grid
    with other sweeps keeps main cells only."""
    recs = [letter_cell("base", LETTER_SIGNAL, task="sciq", label="Base"),
            letter_cell("lora_mu", LETTER_SIGNAL, (0.5, 0, 0, 0), task="sciq", label="LoRA(μ)",
                        sweep=("lr", 1e-4), main=False),
            letter_cell("lora_mu", LETTER_SIGNAL, A_PRIOR, task="sciq", label="LoRA(μ)",
                        sweep=("lr", 1e-3))]  # fmt: skip
    (block,) = letter_analysis(load_results(write_results(recs)), points=True)
    rows = {r["label"]: r for r in block["rows"]}
    assert set(rows) == {"Base", "LoRA(μ) (lr = 0.0001)", "LoRA(μ) (lr = 0.001)"} and block["points"]
    assert not rows["LoRA(μ) (lr = 0.0001)"]["lost"] and rows["LoRA(μ) (lr = 0.001)"]["prior"]
    write_report(write_results(recs), tmp_path / "r")
    tables = (tmp_path / "r" / "tables.md").read_text(encoding="utf-8")
    assert "| LoRA(μ) (lr = 0.0001) | 8 (0) |" in tables and "Every sweep point as its own row" in tables
    (main_only,) = letter_analysis(load_results(write_results(recs)))
    assert [r["label"] for r in main_only["rows"]] == ["Base", "LoRA(μ)"]


def test_a_base_that_always_answers_a_is_the_knowledge_reference_debiased(write_results):
    """When Base's own accuracy is a letter prior (it answers A everywhere, right on the gold A items), a tuned row
    that spreads its letters loses raw accuracy; whether it lost knowledge is read against Base's *debiased*
    accuracy, not its raw one."""
    recs = [letter_cell("base", LETTER_SIGNAL, A_PRIOR, label="Base"),  # always A: 3 / 8 right, debiased 6 / 8
            letter_cell("lora_mu", LETTER_SIGNAL, (0, 0, 3.0, 0), label="LoRA(μ)")]  # always C: 2 / 8
    (block,) = letter_analysis(load_results(write_results(recs)))
    base = block["base"]
    assert base["acc"] == 3 / 8 and base["debiased_acc"] == 6 / 8
    row = next(r for r in block["rows"] if r["method"] == "lora_mu")
    assert row["acc"] == 2 / 8 and not row["lost"]  # 25 % vs 37.5 % ± 17: within one se
    recs[1] = letter_cell("lora_mu", LETTER_WRONG, (0, 0, 3.0, 0), label="LoRA(μ)")  # knows nothing: debiased 0
    row = next(r for r in letter_analysis(load_results(write_results(recs)))[0]["rows"] if r["method"] == "lora_mu")
    assert row["recovers"] is False
