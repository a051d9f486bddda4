"""Statistics with numbers worked out by hand: interpolation, cap, dominated area, paired tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
from report_records import cell
from scipy import stats

from hlora.report import (
    acc_under_cap,
    dominated_area,
    head_to_head,
    interp_ppl_at_acc,
    matched_summary,
    paired_matched_test,
    ttest,
)
from hlora.report.load import normalize_record


def test_ttest_matches_scipy():
    a = [1.2, 2.3, 2.9, 4.1, 5.0, 5.5]
    b = [0.9, 1.8, 3.5, 3.0, 4.2, 4.4]
    t, p = ttest(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    t, p = ttest(a, b, paired=True)
    ref = stats.ttest_rel(a, b)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    with pytest.raises(ValueError, match="equal lengths"):
        ttest(a, b[:3], paired=True)
    t, p = ttest([1.0], [2.0])  # too few values: nan, no exception
    assert math.isnan(p)


def test_interpolation():
    front = [(0.6, 20.0), (0.8, 30.0), (0.7, 26.0)]  # a trade-off, unsorted on purpose
    assert interp_ppl_at_acc(front, 0.65) == pytest.approx(23.0)  # halfway 20 -> 26
    assert interp_ppl_at_acc(front, 0.75) == pytest.approx(28.0)  # halfway 26 -> 30
    assert interp_ppl_at_acc(front, 0.6) == pytest.approx(20.0)  # endpoints
    assert interp_ppl_at_acc(front, 0.8) == pytest.approx(30.0)
    assert interp_ppl_at_acc(front, 0.59) is None and interp_ppl_at_acc(front, 0.81) is None  # outside
    assert interp_ppl_at_acc([(0.7, 25.0)], 0.7) == 25.0  # one point matches only itself
    assert interp_ppl_at_acc([(0.7, 25.0)], 0.71) is None
    assert interp_ppl_at_acc([], 0.7) is None
    assert interp_ppl_at_acc([(0.7, 25.0), (0.7, 24.0), (0.8, 30.0)], 0.7) == 24.0  # a tie: the best


def test_a_dominating_point_wins_over_interpolation():
    """A bent front (WiSE-FT of HLoRA, seed 0 on SciQ: α 0.75 at 90.7 %, KL 0.133; α 0.5 at 91.3 %, KL 0.063):
    at 90.7 % the row reaches KL 0.063, since α 0.5 has more accuracy and less forgetting. For a measure where
    higher is better (the battery) the best is the highest."""
    wise = [(0.827, 0.017), (0.9067, 0.133), (0.9133, 0.063), (0.9067, 0.227)]
    assert interp_ppl_at_acc(wise, 0.9067) == pytest.approx(0.063)
    seg = 0.017 + (0.85 - 0.827) / (0.9067 - 0.827) * (0.133 - 0.017)  # 0.050: below every point above 85 %
    assert interp_ppl_at_acc(wise, 0.85) == pytest.approx(seg)
    bent = [(0.6, 20.0), (0.7, 26.0), (0.75, 22.0), (0.8, 30.0)]
    assert interp_ppl_at_acc(bent, 0.7) == pytest.approx(22.0)
    assert interp_ppl_at_acc(bent, 0.775) == pytest.approx(26.0)  # no better point above: the segment's value
    battery = [(0.6, 0.40), (0.7, 0.38), (0.8, 0.41)]
    assert interp_ppl_at_acc(battery, 0.65, higher_is_better=True) == pytest.approx(0.41)
    assert interp_ppl_at_acc(battery, 0.65) == pytest.approx(0.38)


def test_accuracy_under_cap():
    # (0.7, 27) is under the cap 29, (0.8, 31) above: the segment meets 29 halfway, at 0.75
    assert acc_under_cap([(0.8, 31.0), (0.6, 25.0), (0.7, 27.0)], 29.0) == pytest.approx(0.75)
    assert acc_under_cap([(0.7, 30.0)], 29.0) is None  # nothing under the cap
    assert acc_under_cap([(0.6, 31.0), (0.8, 28.0)], 29.0) == pytest.approx(0.8)  # the best point itself
    # the front goes above the cap and back under: the last point wins over the crossing at 0.68
    assert acc_under_cap([(0.6, 25.0), (0.7, 30.0), (0.8, 28.0)], 29.0) == pytest.approx(0.8)


def test_dominated_area():
    base = (60.0, 30.0)
    # rectangles [60,70]x[25,30] (50) and [60,65]x[20,30] (50) overlap on [60,65]x[25,30] (25): union 75
    front = [(70.0, 25.0), (65.0, 20.0), (80.0, 31.0), (55.0, 10.0)]  # the last two do not beat Base in both
    assert dominated_area(front, base) == pytest.approx(75.0)
    assert dominated_area([(70.0, 31.0)], base) == 0.0
    assert dominated_area([], base) == 0.0
    # a point inside another's rectangle adds nothing
    assert dominated_area([(70.0, 25.0), (65.0, 27.0)], base) == pytest.approx(50.0)


def _seeded_fronts() -> list[dict]:
    """HLoRA main cells and a replay row swept over ρ, three seeds, one extra seed without HLoRA."""
    hl = [(0, 0.80, 20.0), (1, 0.82, 21.0), (2, 0.78, 20.5)]
    recs = [cell("hlora", "sciq", s, a, p, sweep=("phi", 1e-3), label="HLoRA") for s, a, p in hl]
    replay = {0: [(0.70, 19.0), (0.90, 23.0)],  # at 0.80: 21.0
              1: [(0.75, 20.0), (0.85, 24.0)],  # at 0.82: 22.8
              2: [(0.80, 22.0), (0.70, 21.0)],  # at 0.78: 21.8
              3: [(0.70, 19.0), (0.90, 23.0)]}  # no HLoRA cell on seed 3: left out  # fmt: skip
    for s, pts in replay.items():
        for k, (a, p) in enumerate(pts):
            recs.append(cell("replay", "sciq", s, a, p, sweep=("rho", 0.1 * (k + 1)), main=k == 0, label="Replay"))
    recs.append(cell("narrow", "sciq", 0, 0.70, 18.0, sweep=("lam", 1.0)))  # reaches no HLoRA accuracy
    return [normalize_record(r) for r in recs]


def test_paired_test_equals_scipy_ttest_rel():
    recs = _seeded_fronts()
    res = paired_matched_test(recs, "replay", "sciq")
    mine, theirs = [20.0, 21.0, 20.5], [21.0, 22.8, 21.8]
    ref = stats.ttest_rel(mine, theirs)
    assert res["n"] == 3 and res["seeds"] == [0, 1, 2]
    assert res["diff"] == pytest.approx(np.mean(np.subtract(mine, theirs)))  # -1.3667: HLoRA forgets less
    assert (res["t"], res["p"]) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9)
    res = paired_matched_test(recs, "narrow", "sciq")
    assert res["n"] == 0 and math.isnan(res["p"]) and math.isnan(res["diff"])
    one = paired_matched_test([r for r in recs if r["seed"] == 0], "replay", "sciq")
    assert one["n"] == 1 and one["diff"] == pytest.approx(-1.0) and math.isnan(one["p"])  # n < 2: no p


def test_matched_summary_by_hand():
    recs = [normalize_record(r) for r in [
        cell("base", "sciq", 0, 0.60, 30.0, label="Base"),
        cell("hlora", "sciq", 0, 0.80, 24.0, sweep=("phi", 1e-3), label="HLoRA"),
        cell("x", "sciq", 0, 0.70, 26.0, sweep=("beta", 0.1), main=True, label="X", kl=0.02),
        cell("x", "sciq", 0, 0.90, 30.0, sweep=("beta", 0.01), main=False, label="X", kl=0.06),
    ]]  # fmt: skip
    s = matched_summary(recs, "sciq")
    assert s["acc_ref"] == pytest.approx(0.80) and s["cap"] == pytest.approx(30.6)
    x = next(r for r in s["rows"] if r["method"] == "x")
    assert x["ppl"] == pytest.approx(28.0) and x["kl"] == pytest.approx(0.04)  # halfway along the front
    assert x["acc_cap"] == pytest.approx(0.90)  # both points are under 30.6
    assert x["area"] == pytest.approx(10 * 4)  # (70, 26) beats Base by 10 points x 4 PPL; (90, 30) ties on PPL
    assert x["points"] == 2 and x["test"]["n"] == 1 and x["test"]["diff"] == pytest.approx(24.0 - 28.0)
    base = next(r for r in s["rows"] if r["method"] == "base")
    assert base["ppl"] is None and base["area"] == 0.0 and base["acc_cap"] == pytest.approx(0.60)
    hl = next(r for r in s["rows"] if r["method"] == "hlora")
    assert hl["ppl"] == pytest.approx(24.0) and hl["test"] is None


def test_front_takes_the_ends_its_records_name():
    """WiSE-FT cells name their front's ends (α=0: Base, α=1: the adapter they scale): the front spans them."""
    from hlora.report.stats import front

    from report_records import cell

    recs = [cell("base", "sciq", 0, 0.70, 30.0), cell("lora_nu_mu", "sciq", 0, 0.90, 33.0)]
    for a, acc, ppl in ((0.25, 0.75, 30.5), (0.5, 0.82, 31.2)):
        recs.append(cell("wise", "sciq", 0, acc, ppl, sweep=("alpha", a), main=a == 0.5,
                         front_ends={"0": "base-sciq-s0", "1": "lora_nu_mu-sciq-s0"}))
    pts = front(recs, "wise", "sciq")
    assert [p["sweep"] for p in pts] == [("alpha", 0.0), ("alpha", 0.25), ("alpha", 0.5), ("alpha", 1.0)]
    assert [p["acc"] for p in pts] == [0.70, 0.75, 0.82, 0.90] and pts[-1]["general_ppl"] == 33.0
    assert [p["n"] for p in pts] == [1, 1, 1, 1] and not pts[0]["main"]
    assert [p["end"] for p in pts] == [True, False, False, True]  # borrowed ends are flagged


def test_ttest_without_variance_is_nan():
    """Accuracies k/150 that differ by the same k on every seed: rounding must not make p = 1e-15."""
    a = [0.9133333333333333, 0.9066666666666666]
    b = [a[0] - 2 / 150, a[1] - 2 / 150 + 1e-17]
    assert math.isnan(ttest(a, b, paired=True)[1])
    assert math.isnan(ttest([1.0, 1.0], [2.0, 2.0])[1])
    assert not math.isnan(ttest([1.0, 1.0], [2.0, 2.5])[1])  # one group varies: Welch is defined


def test_head_to_head_pairs_every_point_with_the_reference_by_seed():
    recs = [normalize_record(r) for r in [
        cell("hlora", "sciq", 0, 0.80, 24.0, sweep=("phi", 1.0), label="HLoRA", kl=0.20),
        cell("hlora", "sciq", 1, 0.82, 25.0, sweep=("phi", 1.0), label="HLoRA", kl=0.22),
        cell("hlora", "sciq", 2, 0.78, 23.0, sweep=("phi", 1.0), label="HLoRA", kl=0.21),
        cell("base", "sciq", 0, 0.60, 30.0, label="Base", kl=0.0),
        cell("base", "sciq", 1, 0.60, 30.0, label="Base", kl=0.0),
        cell("x", "sciq", 0, 0.81, 22.0, sweep=("rho", 0.5), main=True, label="X", kl=0.30),
        cell("x", "sciq", 1, 0.80, 24.5, sweep=("rho", 0.5), main=True, label="X", kl=0.33),
        cell("x", "sciq", 2, 0.79, 21.0, sweep=("rho", 0.5), main=True, label="X", kl=0.31),
        cell("x", "sciq", 3, 0.99, 10.0, sweep=("rho", 0.5), main=True, label="X", kl=0.0),  # no reference: out
        cell("x", "sciq", 0, 0.70, 20.0, sweep=("rho", 0.9), main=False, label="X"),  # one seed: no p
        cell("w", "sciq", 0, 0.70, 27.0, sweep=("alpha", 0.5), label="W", front_ends={"0": "base-sciq-s0"}),
    ]]  # fmt: skip
    h = head_to_head(recs, "sciq")
    assert h["ref_seeds"] == [0, 1, 2] and h["ref"]["general_ppl"] == pytest.approx(24.0)
    x = [r for r in h["rows"] if r["method"] == "x"]
    assert [r["sweep"] for r in x] == [("rho", 0.5), ("rho", 0.9)]
    mine, theirs = [22.0, 24.5, 21.0], [24.0, 25.0, 23.0]
    assert x[0]["seeds"] == [0, 1, 2] and x[0]["general_ppl"] == pytest.approx(np.mean(mine))
    assert x[0]["d_general_ppl"] == pytest.approx(np.mean(np.subtract(mine, theirs)))
    assert x[0]["p_general_ppl"] == pytest.approx(stats.ttest_rel(mine, theirs).pvalue, rel=1e-9)
    assert x[0]["p_general_kl"] == pytest.approx(stats.ttest_rel([0.30, 0.33, 0.31], [0.20, 0.22, 0.21]).pvalue)
    assert x[0]["d_acc"] == pytest.approx(0.0) and x[1]["seeds"] == [0] and math.isnan(x[1]["p_acc"])
    assert x[1]["d_general_kl"] is None  # that cell has no KL
    base = next(r for r in h["rows"] if r["method"] == "base")
    assert base["seeds"] == [0, 1] and base["d_acc"] == pytest.approx(-0.21)
    w = [r for r in h["rows"] if r["method"] == "w"]
    assert [r["sweep"] for r in w] == [("alpha", 0.5)]  # the borrowed α=0 end (Base) is Base's row, not W's
    ref = next(r for r in h["rows"] if r["method"] == "hlora")
    assert ref["main"] and ref["d_general_ppl"] == 0.0


def _battery_fronts() -> list[dict]:
    """HLoRA main cells and a replay front (two ρ) over three seeds, every cell with the battery's mean."""
    recs = [cell("base", "sciq", s, 0.60, 30.0, label="Base", battery={"acc": 0.55}) for s in (0, 1, 2)]
    for s, acc, bat in ((0, 0.80, 0.50), (1, 0.82, 0.52), (2, 0.78, 0.49)):
        recs.append(cell("hlora", "sciq", s, acc, 20.0 + s, sweep=("phi", 1e-3), label="HLoRA", battery={"acc": bat}))
    replay = {0: [(0.70, 0.56), (0.90, 0.46)],  # at 0.80: 0.51
              1: [(0.75, 0.55), (0.85, 0.49)],  # at 0.82: 0.508
              2: [(0.70, 0.53), (0.80, 0.47)]}  # at 0.78: 0.482  # fmt: skip
    for s, pts in replay.items():
        for k, (acc, bat) in enumerate(pts):
            recs.append(cell("replay", "sciq", s, acc, 21.0 + k, sweep=("rho", 0.5 * (k + 1)), main=k == 0,
                             label="Replay", battery={"acc": bat, "tasks": {"copa": {"acc": bat, "n": 10}}}))
    return [normalize_record(r) for r in recs]


def test_battery_is_aggregated_and_compared_paired_by_seed():
    from hlora.report.stats import aggregate, front

    recs = _battery_fronts()
    agg = aggregate(recs)
    assert agg[("hlora", "sciq")]["battery_acc"] == pytest.approx(np.mean([0.50, 0.52, 0.49]))
    assert agg[("hlora", "sciq")]["battery_acc_std"] == pytest.approx(np.std([0.50, 0.52, 0.49], ddof=1))
    pts = front(recs, "replay", "sciq")
    assert [p["battery_acc"] for p in pts] == pytest.approx([0.55 - 0.01 / 3, 0.47 + 0.01 / 3])
    # head to head: replay's ρ = 0.5 point against HLoRA's main cell, seed by seed
    h = head_to_head(recs, "sciq")
    rp = next(r for r in h["rows"] if r["method"] == "replay" and r["sweep"] == ("rho", 0.5))
    mine, theirs = [0.56, 0.55, 0.53], [0.50, 0.52, 0.49]
    assert rp["battery_acc"] == pytest.approx(np.mean(mine))
    assert rp["d_battery_acc"] == pytest.approx(np.mean(np.subtract(mine, theirs)))
    assert rp["p_battery_acc"] == pytest.approx(stats.ttest_rel(mine, theirs).pvalue, rel=1e-9)
    assert h["ref"]["battery_acc"] == pytest.approx(np.mean(theirs))
    # at matched accuracy: replay's battery interpolated at each seed's HLoRA accuracy
    s = matched_summary(recs, "sciq")
    row = next(r for r in s["rows"] if r["method"] == "replay")
    at = [0.51, 0.508, 0.482]
    test = row["battery_test"]
    assert test["n"] == 3 and test["diff"] == pytest.approx(np.mean(np.subtract(theirs, at)))
    assert test["p"] == pytest.approx(stats.ttest_rel(theirs, at).pvalue, rel=1e-9)
    acc_ref = np.mean([0.80, 0.82, 0.78])  # on the seed-mean front (0.7167, 0.5467) .. (0.85, 0.4733)
    a0, b0 = np.mean([0.70, 0.75, 0.70]), np.mean([0.56, 0.55, 0.53])
    a1, b1 = np.mean([0.90, 0.85, 0.80]), np.mean([0.46, 0.49, 0.47])
    assert row["battery"] == pytest.approx(b0 + (acc_ref - a0) / (a1 - a0) * (b1 - b0))
    assert paired_matched_test(recs, "replay", "sciq", metric="battery_acc") == test
    assert next(r for r in s["rows"] if r["method"] == "hlora")["battery_test"] is None
    # records without the battery: no battery test, None at acc*
    plain = [normalize_record({k: v for k, v in r.items() if k not in ("battery", "battery_acc")}) for r in recs]
    row = next(r for r in matched_summary(plain, "sciq")["rows"] if r["method"] == "replay")
    assert row["battery"] is None and row["battery_test"] is None and row["test"]["n"] == 3


def test_kl_at_matched_accuracy_is_tested_paired_by_seed():
    """The matched-accuracy table's KL test: per seed, the reference's main KL against the row's KL interpolated
    at the reference's accuracy on that seed's front, scipy's paired t-test over the seeds."""
    from hlora.record import normalize_record

    recs = [cell("base", "sciq", s, 0.60, 30.0, label="Base", kl=0.0) for s in (0, 1, 2)]
    for s, acc, kl in ((0, 0.80, 0.20), (1, 0.82, 0.25), (2, 0.78, 0.21)):
        recs.append(cell("hlora", "sciq", s, acc, 20.0, sweep=("phi", 1.0), label="HLoRA", kl=kl))
    fronts = {0: [(0.70, 0.10), (0.90, 0.30)], 1: [(0.80, 0.12), (0.84, 0.16)], 2: [(0.70, 0.05), (0.80, 0.25)]}
    for s, pts in fronts.items():
        for k, (acc, kl) in enumerate(pts):
            recs.append(cell("kl_general", "sciq", s, acc, 21.0, sweep=("beta", 10.0 ** -k), main=k == 0,
                             label="KL-to-base", kl=kl))
    recs = [normalize_record(r) for r in recs]
    row = next(r for r in matched_summary(recs, "sciq")["rows"] if r["method"] == "kl_general")
    theirs, at = [0.20, 0.25, 0.21], [0.20, 0.14, 0.21]  # interpolated at 0.80, 0.82, 0.78
    t = row["kl_test"]
    assert t["n"] == 3 and t["diff"] == pytest.approx(np.mean(np.subtract(theirs, at)))
    assert t["p"] == pytest.approx(stats.ttest_rel(theirs, at).pvalue, rel=1e-9)
    assert next(r for r in matched_summary(recs, "sciq")["rows"] if r["method"] == "hlora")["kl_test"] is None
    no_kl = [{**r, "general_kl": None} for r in recs]
    assert next(r for r in matched_summary(no_kl, "sciq")["rows"] if r["method"] == "kl_general")["kl_test"] is None
