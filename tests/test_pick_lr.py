"""The lr-picking rule of benchmarks/pick_lr.py: within one s.e. of the best validation accuracy, lowest KL."""
import pytest


@pytest.fixture(scope="module")
def pick_lr(bench_script):
    return bench_script("pick_lr")


def rec(method, lr, acc, kl, n=100):
    return {"method": method, "lr": lr, "acc": acc, "general_kl": kl, "per_item": {"acc": [0] * n}}


def test_picks_lowest_kl_within_one_standard_error_of_the_best(pick_lr):
    recs = [rec("a", 1e-4, 0.80, 0.01), rec("a", 3e-4, 0.86, 0.05), rec("a", 1e-3, 0.88, 0.20),  # s.e. 4.6 pts
            rec("b", 1e-4, 0.60, 0.01), rec("b", 1e-3, 0.90, 0.30),  # far apart: the best wins
            rec("c", 1e-3, 0.9, 0.1), {"method": "base", "lr": None, "acc": 0.7}]
    picks = pick_lr.pick(recs)
    assert picks["a"]["lr"] == 3e-4 and picks["b"]["lr"] == 1e-3
    assert "c" not in picks and "base" not in picks  # one lr: nothing to pick
    assert abs(picks["a"]["se"] - (2 * 0.88 * 0.12 / 100) ** 0.5) < 1e-12


def test_markdown_lists_base_and_every_lr_and_marks_the_pick(pick_lr):
    recs = [rec("a", 1e-4, 0.80, 0.01), rec("a", 1e-3, 0.88, 0.20)]
    recs[0].update(label="Row A", general_ppl=30.0, transfer={"medmcqa": {"acc": 0.3}})
    base = {"method": "base", "lr": None, "acc": 0.7, "general_ppl": 31.0, "general_kl": 0.0, "battery": {"acc": 0.4}}
    text = pick_lr.markdown(pick_lr.pick(recs), [base])
    lines = text.splitlines()
    assert lines[2] == "| Base | — | 70.0 | 31.00 | 0.000 | 40.0 | — | — |  |"
    assert lines[3] == "| a | 0.0001 | 80.0 | 30.00 | 0.010 | — | 30.0 | — |  |"  # 8 points below: > one s.e.
    assert lines[4] == "| a | 0.001 | 88.0 | — | 0.200 | — | — | — | **yes** |"
    assert text.endswith("  a: {lr: 0.001}")
