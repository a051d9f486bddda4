"""The forgetting budget (hlora.budget): the budget's syntax and measures, the WiSE-FT α search on synthetic
curves and on a tiny model, the dual update of a method's coefficient (a lagged synthetic plant and a tiny
model), unresolvable budgets, and `hlora tune` end to end on a tiny model."""
from __future__ import annotations

import json
import os
import math
import random
import statistics

import pytest
import torch

from hlora.budget import AlphaSearchConfig, Budget, BudgetError, DualConfig, DualController, DualUpdate, Point
from hlora.budget import search_alpha
from hlora.budget.measure import Measurer, SliceConfig, acc_drop, kl_per_token, ppl_rise, text_slices
from hlora.config import ConfigError

WORDS = ("the cell is the basic unit of life water boils at one hundred degrees heat makes metal expand gravity "
         "friction planets Mercury Venus Earth Mars").split()


def make_data(d):
    """general.jsonl (held-out general text, 60 documents of 6 lines), pool.jsonl (general training text),
    domain.jsonl (a 4-way multiple-choice task)."""
    rng = random.Random(0)
    with open(d / "general.jsonl", "w") as f:
        for _ in range(60):
            lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(6)]
            f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    with open(d / "pool.jsonl", "w") as f:
        for _ in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n")
    ch = ["protons", "neutrons", "electrons", "gravity"]
    with open(d / "domain.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"question": f"Question: What is item {i % 7}? Answer:", "choices": ch,
                                "gold": rng.randrange(4)}) + "\n")
    return d


# ----------------------------------------------------------------------------- the budget and its measures


def test_budget_parses_measure_and_limit():
    b = Budget.parse("c4_kl=0.05")
    assert (b.task, b.kind, b.limit, b.measure) == ("c4", "kl", 0.05, "c4_kl")
    assert Budget.parse("battery_drop_pts=1").kind == "drop_pts"
    assert Budget.parse("wikitext_ppl_rise_pct=2").task == "wikitext"
    b = Budget.parse("text:data/my_general.jsonl_ppl_rise_pct=5")
    assert (b.task, b.kind, b.limit) == ("text:data/my_general.jsonl", "ppl_rise_pct", 5.0)
    for bad, msg in [("c4=0.05", "must end in"), ("c4_kl=-1", "budget.limit"), ("c4_kl=abc", "not a number"),
                     ("c4_kl", "MEASURE=LIMIT")]:
        with pytest.raises(ConfigError, match=msg):
            Budget.parse(bad)


def test_measures_and_their_standard_errors():
    # ppl rise: per-document NLL sums against the base on the same tokens
    v, se = ppl_rise([11.0, 22.0, 10.0, 21.0], [10.0, 20.0, 10.0, 20.0], [10, 20, 10, 20])
    assert v == pytest.approx(100 * math.expm1(4 / 60))
    assert se > 0
    v, se = ppl_rise([10.0, 20.0], [10.0, 20.0], [10, 20])
    assert (v, se) == (0.0, 0.0)
    v, se = kl_per_token([1.0, 2.0, 1.5], [10, 20, 15])
    assert v == pytest.approx(0.1) and se == pytest.approx(0.0)
    # accuracy drop in points, averaged over tasks without weights
    v, se = acc_drop([[1, 0, 1, 1], [0, 0]], [[1, 1, 1, 1], [1, 0]])
    assert v == pytest.approx((25 + 50) / 2)
    assert se > 0


# ----------------------------------------------------------------------------- α search on synthetic curves


def curve(f, se=lambda a: 1e-4):
    calls = []

    def measure(alpha):
        calls.append(alpha)
        return Point(alpha=alpha, forgetting=f(alpha), se=se(alpha), domain_acc=0.5 + 0.3 * alpha)

    return measure, calls


def test_alpha_search_finds_the_largest_feasible_alpha_on_a_bending_curve():
    b = 0.05
    roots = (0.4, 0.6, 0.83)  # within budget on [0, .4] and [.6, .83]; over it on (.4, .6) and above .83
    c = b / (roots[0] * roots[1] * roots[2])

    def f(a):
        return b + c * (a - roots[0]) * (a - roots[1]) * (a - roots[2])

    measure, calls = curve(f)
    cfg = AlphaSearchConfig(grid=4, refine=4)
    res = search_alpha(measure, b, cfg)
    step = 1 / (cfg.grid * 2 ** cfg.refine)
    assert roots[2] - step <= res.chosen.alpha <= roots[2]  # not the first crossing at 0.4
    assert res.chosen.feasible and res.chosen.forgetting <= b
    assert res.bracket[1] - res.bracket[0] == pytest.approx(step)
    assert calls[:3] == [0.0, 1.0, 0.75]  # base, α = 1 (over), 0.75 (within): bracket (0.75, 1)
    assert len(calls) == 3 + cfg.refine and res.evaluations == 2 + cfg.refine
    assert [p.alpha for p in res.points] == calls  # every α evaluated is recorded, in order
    assert all(p.seconds > 0 for p in res.points)


def test_alpha_points_are_measured_once_per_adapter_and_key(tmp_path):
    """PointCache: a second search on the same adapter (another budget level) reads the α points the first one
    measured and measures only new ones; another slice (another key) measures again."""
    from types import SimpleNamespace

    from hlora.budget.cache import PointCache
    from hlora.budget.measure import SliceTask

    def stub(texts):
        return SimpleNamespace(budget=Budget.parse("c4_kl=0.1"), general=[SliceTask("c4", "text", texts=texts)],
                               domain=None, batch_size=8, window=512)

    measure, calls = curve(lambda a: 0.2 * a)
    first = PointCache(tmp_path, stub(["a", "b"]))
    r1 = search_alpha(first.forgetting(measure), 0.1, AlphaSearchConfig(grid=4, refine=2), base=Point(0.0, 0.0, 0.0))
    assert calls == [1.0, 0.75, 0.5, 0.625, 0.5625] and first.hits == 0 and r1.chosen.alpha == 0.5
    calls.clear()
    again = PointCache(tmp_path, stub(["a", "b"]))
    r2 = search_alpha(again.forgetting(measure), 0.06, AlphaSearchConfig(grid=4, refine=2), base=Point(0.0, 0.0, 0.0))
    assert calls == [0.25, 0.375, 0.3125] and again.hits == 3  # 1, 0.75, 0.5 read back; the points below are new
    assert [p.cached for p in r2.points[1:]] == [True, True, True, False, False, False]
    assert r2.points[1].forgetting == r1.points[1].forgetting and r2.chosen.alpha == 0.25
    calls.clear()
    other = PointCache(tmp_path, stub(["a", "c"]))
    search_alpha(other.forgetting(measure), 0.1, AlphaSearchConfig(grid=4, refine=0), base=Point(0.0, 0.0, 0.0))
    assert calls == [1.0, 0.75, 0.5] and other.hits == 0


def test_alpha_search_monotone_curve_and_alpha_one():
    b = 0.02
    measure, _ = curve(lambda a: b * (a / 0.37) ** 2)
    res = search_alpha(measure, b, AlphaSearchConfig(grid=4, refine=5))
    assert 0.37 - 1 / 128 <= res.chosen.alpha <= 0.37
    measure, calls = curve(lambda a: 0.5 * b * a)
    res = search_alpha(measure, b)
    assert res.chosen.alpha == 1.0 and calls == [0.0, 1.0]  # α = 1 meets it: one evaluation


def test_alpha_search_measures_the_domain_at_the_chosen_alpha_only():
    """With a separate domain measure, only the chosen α's accuracy is measured (it alone picks the winner); the
    record writes the others as null, not NaN."""
    b = 0.02
    measure, _ = curve(lambda a: b * (a / 0.37) ** 2)

    def forgetting_only(a):
        p = measure(a)
        p.domain_acc = p.domain_se = float("nan")
        return p

    asked = []

    def domain(a):
        asked.append(a)
        return 0.5 + 0.3 * a, 0.01

    res = search_alpha(forgetting_only, b, AlphaSearchConfig(grid=4, refine=3), domain=domain)
    assert asked == [0.0, res.chosen.alpha] and res.chosen.domain_acc == pytest.approx(0.5 + 0.3 * res.chosen.alpha)
    others = [p.as_dict() for p in res.points if p.alpha not in (0.0, res.chosen.alpha)]
    assert len(others) >= 4 and all(d["domain_acc"] is None and d["domain_se"] is None for d in others)
    json.dumps(res.as_dict(), allow_nan=False)
    base = Point(alpha=0.0, forgetting=0.0, se=0.0, domain_acc=0.4, domain_se=0.02)
    res = search_alpha(forgetting_only, b * 1e-6, AlphaSearchConfig(on_unresolvable="nearest", min_snr=0),
                       base=base, domain=domain)  # only the base meets it: its accuracy is already measured
    assert res.chosen.alpha == 0.0 and res.chosen.domain_acc == 0.4 and len(asked) == 2
    res = search_alpha(forgetting_only, b, domain=domain)  # no base given: its point gets its accuracy too
    assert res.points[0].alpha == 0.0 and res.points[0].domain_acc == 0.5 and asked[-2:] == [0.0, res.chosen.alpha]


def test_budget_only_the_base_model_meets_is_an_error_or_the_nearest_model_with_a_warning():
    b = 0.01
    measure, _ = curve(lambda a: b * a / 0.03)  # only α <= 0.03 is within budget
    with pytest.raises(BudgetError, match="in effect the base model") as e:
        search_alpha(measure, b)
    assert e.value.result.chosen.alpha < 0.05  # what was measured travels with the error
    with pytest.warns(UserWarning, match="in effect the base model"):
        res = search_alpha(measure, b, AlphaSearchConfig(on_unresolvable="nearest"))
    assert res.warning and 0 < res.chosen.alpha <= 0.03


def test_budget_below_the_noise_of_the_validation_slice_is_an_error():
    b = 0.01
    measure, _ = curve(lambda a: 0.5 * b * a, se=lambda a: b)  # within budget, but ± one budget of noise
    with pytest.raises(BudgetError, match="below the measurement noise"):
        search_alpha(measure, b)
    res = search_alpha(measure, b, AlphaSearchConfig(min_snr=0))  # the check can be switched off
    assert res.chosen.alpha == 1.0
    measure, _ = curve(lambda a: -5 * b * a, se=lambda a: b)  # noisy, but far inside the budget: resolved
    assert search_alpha(measure, b).chosen.alpha == 1.0


# ----------------------------------------------------------------------------- the dual update


def lagged_plant(rule: DualUpdate, steps: int, gain: float, every: int, lag: float, noise: float = 0.0):
    """Forgetting moves toward gain/c with a lag per step (what the adapter learned stays until training pulls
    it back); the controller measures every `every` steps. Returns the (coefficient, forgetting) trace."""
    rng = random.Random(0)
    m, trace = 0.0, []
    for t in range(1, steps + 1):
        m += lag * (gain / rule.value - m)
        if t % every == 0:
            rule.update(m * (1 + noise * rng.gauss(0, 1)))
            trace.append((rule.value, m))
    return trace


def test_dual_update_moves_the_coefficient_the_right_way():
    cfg = DualConfig(eta=0.5, kp=0.0)  # the plain dual update
    rule = DualUpdate(1.0, target=0.1, lo=1e-6, hi=1e6, cfg=cfg)
    assert rule.update(0.3) > 1.0  # over budget: more regularisation
    rule = DualUpdate(1.0, target=0.1, lo=1e-6, hi=1e6, cfg=cfg)
    assert rule.update(0.01) < 1.0  # under budget: less
    assert rule.update(0.01) == pytest.approx(math.exp(-2 * 0.5 * 0.9))
    rho = DualUpdate(0.25, target=0.1, lo=0.0, hi=0.9, cfg=cfg)  # ρ: linear steps, clipped to [0, 0.9]
    assert rho.update(1.0) == pytest.approx(0.25 + 0.2 * 0.5)
    for _ in range(20):
        rho.update(1.0)
    assert rho.value == 0.9
    rho.update(0.0)  # anti-windup: pinned at the bound, it moves back at the first sign change
    assert rho.value < 0.9


def test_dual_update_settles_at_the_budget_on_a_lagged_plant():
    target = 0.05  # the coefficient starts 400x too small: c* = gain / target = 4
    for eta, kp in ((0.25, 0.0), (0.5, 0.0), (0.5, 2.0)):
        rule = DualUpdate(0.01, target=target, lo=1e-6, hi=1e6, cfg=DualConfig(eta=eta, kp=kp))
        trace = lagged_plant(rule, steps=600, gain=0.2, every=5, lag=0.05)
        tail = [m for _, m in trace[-20:]]
        assert all(abs(m / target - 1) < 0.05 for m in tail), (eta, tail)
        assert rule.value == pytest.approx(0.2 / target, rel=0.1)
    # a step far too large for the interval rings: the forgetting keeps swinging around the target
    rule = DualUpdate(0.01, target=target, lo=1e-6, hi=1e6, cfg=DualConfig(eta=4.0, kp=0.0))
    tail = [m for _, m in lagged_plant(rule, steps=600, gain=0.2, every=10, lag=0.15)[-20:]]
    assert max(tail) / target > 1.5 and min(tail) / target < 0.5


def test_smoothed_readings_calm_the_coefficient_on_a_noisy_plant():
    """dual.smooth: the update acts on a moving average of the readings. With reading noise of 40 % of the target
    (SmolLM2's C4 KL proxy at 0.05 reads ±0.016-0.027 a measurement), the coefficient's step-to-step swing halves at
    w = 0.5 and the run still ends at the budget; w = 0 is the plain update, reading by reading."""
    def swing_and_end(smooth):
        rule = DualUpdate(0.01, target=0.05, lo=1e-6, hi=1e6, cfg=DualConfig(eta=0.5, kp=2.0, smooth=smooth))
        trace = lagged_plant(rule, steps=600, gain=0.2, every=5, lag=0.05, noise=0.4)
        logs = [math.log(c) for c, _ in trace[len(trace) // 2:]]
        return statistics.pstdev(b - a for a, b in zip(logs, logs[1:])), statistics.mean(m for _, m in trace[-40:])

    (raw, end_raw), (calm, end_calm) = swing_and_end(0.0), swing_and_end(0.5)
    assert calm < raw / 1.8, (raw, calm)
    assert abs(end_raw / 0.05 - 1) < 0.15 and abs(end_calm / 0.05 - 1) < 0.15, (end_raw, end_calm)
    rule = DualUpdate(1.0, target=0.1, lo=1e-6, hi=1e6, cfg=DualConfig(smooth=0.75))
    rule.update(0.3)
    rule.update(0.1)
    assert rule.level == pytest.approx(0.75 * 0.3 + 0.25 * 0.1)
    rule.update(float("nan"))  # a broken reading is passed on (it counts as the largest violation), not averaged in
    assert math.isnan(rule.level) and rule.smoothed(0.2) == 0.2
    with pytest.raises(ConfigError, match="dual.smooth"):
        DualConfig(smooth=1.0).check()


def test_steered_runs_keep_their_names_across_versions():
    """A steered run's directory under tune.runs_dir is named by a digest of its steering: a field added to the
    controller later (dual.smooth) must not rename the runs an earlier version trained, or tune retrains them."""
    from hlora.budget.tune import _steering
    from hlora.util import digest

    plain = _steering(Budget.parse("c4_kl=0.05"), DualConfig(), SliceConfig(), 512)
    assert digest(plain) == "1b20a0133e8c"  # what the version before dual.smooth named it
    assert "smooth" in _steering(Budget.parse("c4_kl=0.05"), DualConfig(smooth=0.5), SliceConfig(), 512)["dual"]


@pytest.fixture
def data(tmp_path):
    return make_data(tmp_path)


def _tiny_run(tmp_path, data, method: str, budget: float, name: str, steps: int = 6, smooth: float = 0.0):
    from hlora.budget.dual import TextProxy
    from hlora.config import RunConfig, load_config
    from hlora.model import load_model
    from hlora.train import run_stage

    _, tok, _ = load_model("tiny-llama")
    val, _ = text_slices(f"text:{data}/general.jsonl", tok, SliceConfig(general_val_tokens=2048, general_test_tokens=64))
    cfg = load_config(RunConfig, None, ["model.name=tiny-llama", f"data=mcq:{data}/domain.jsonl",
                                        f"general_data=text:{data}/pool.jsonl", f"method.name={method}",
                                        f"train.max_steps={steps}", "train.seq_len=32", "train.lr=0.03", "lora.r=4",
                                        "lora.alpha=16", f"out={tmp_path / name}"])
    ctrl = DualController(TextProxy("kl", val.texts, 128, 32), budget, DualConfig(every=2, eta=0.5, smooth=smooth))
    out = run_stage(cfg, "domain", extra_callbacks=[ctrl])
    return ctrl, out


def test_dual_controller_on_a_tiny_model_steers_the_coefficient(tmp_path, data):
    # a budget far below what the run forgets: β rises at every update; far above: it falls
    ctrl, out = _tiny_run(tmp_path, data, "kl_general", 1e-6, "tight")
    betas = [r["value"] for r in ctrl.trace]
    assert ctrl.name == "beta" and betas[0] == 0.1
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))
    assert ctrl.method.cfg.beta == betas[-1]  # the method reads the steered value
    logged = [json.loads(line) for line in (out / "dual.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 2, 4, 6] and logged[-1]["value"] == betas[-1]
    assert all(r["proxy"] > 0 for r in logged[1:])
    ctrl, _ = _tiny_run(tmp_path, data, "replay", 10.0, "loose")
    rhos = [r["value"] for r in ctrl.trace]
    assert ctrl.name == "rho" and rhos[0] == 0.25 and rhos[-1] == 0.0  # ρ falls to 0, clipped
    assert ctrl.method._mixed.steered
    assert ctrl.method._mixed.rho == 0.0  # the data laid out after an update takes the steered share
    # with dual.smooth each update's line also holds the moving average it acted on
    ctrl, out = _tiny_run(tmp_path, data, "kl_general", 1e-6, "smoothed", smooth=0.5)
    logged = [json.loads(line) for line in (out / "dual.jsonl").read_text().splitlines()]
    proxies, smoothed = [r["proxy"] for r in logged[1:]], [r["smoothed"] for r in logged[1:]]
    assert smoothed[0] == proxies[0] and smoothed[1] == pytest.approx(0.5 * proxies[0] + 0.5 * proxies[1])
    assert "smoothed" not in logged[0] and ctrl.summary()["settings"]["smooth"] == 0.5
    betas = [r["value"] for r in logged]
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))


def test_replay_lays_out_steps_lazily_like_mix_order():
    from hlora.data.packing import PackedDataset
    from hlora.methods.replay import MixedDataset, mix_order

    dom = PackedDataset(torch.arange(40).view(10, 4))
    gen = PackedDataset(100 + torch.arange(28).view(7, 4))
    fixed = MixedDataset(dom, gen, steps=5, global_batch=4, rho=0.25, seed=3, description={})
    _ = [fixed[i] for i in range(len(fixed))]
    assert fixed.order == mix_order(10, 7, steps=5, global_batch=4, k=1, seed=3)
    steered = MixedDataset(dom, gen, steps=20, global_batch=4, rho=0.3, seed=3, description={}, steered=True)
    _ = [steered[i] for i in range(len(steered))]
    assert steered.general_sequences == 24  # error diffusion: 0.3 · 4 · 20 general sequences in all


# ----------------------------------------------------------------------------- α search on a tiny model


def test_alpha_search_finds_a_planted_budget_on_a_tiny_model(tmp_path, data):
    from hlora.budget.measure import domain_slices
    from hlora.budget.tune import _scaled_adapter
    from hlora.model import load_adapter, load_model

    model, tok = _random_adapter()
    sl = SliceConfig(general_val_tokens=512, general_test_tokens=128, domain_val_items=12)
    val, _ = text_slices(f"text:{data}/general.jsonl", tok, sl)
    dom_val, _ = domain_slices(f"mcq:{data}/domain.jsonl", sl)
    b = Budget(task=f"text:{data}/general.jsonl", kind="kl", limit=1.0)
    m = Measurer(b, val, dom_val, tok).attach(model)
    dense = {a: m.measure(a).forgetting for a in (0.3, 0.55, 0.6, 0.65, 1.0)}
    assert all(dense[x] < dense[y] for x, y in zip(sorted(dense), sorted(dense)[1:]))  # KL grows with α here
    b.limit = dense[0.6]  # plant the optimum at α = 0.6
    res = search_alpha(m.forgetting_at, b.limit, AlphaSearchConfig(grid=4, refine=4), domain=m.domain_at)
    assert 0.6 - 1 / 64 <= res.chosen.alpha <= 0.6 + 1e-9
    assert res.chosen.domain_acc == pytest.approx(m.measure(res.chosen.alpha).domain_acc)  # measured at α, as tune does
    assert res.chosen.forgetting <= b.limit and res.chosen.se > 0
    assert res.points[0].alpha == 0.0 and not math.isnan(res.points[0].domain_acc)  # the base model's point
    # the saved adapter, ΔW scaled by α, is the chosen model
    alpha = res.chosen.alpha
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    from peft.helpers import rescale_adapter_scale

    with torch.no_grad(), rescale_adapter_scale(model, alpha):
        want = model(input_ids=ids).logits
    _scaled_adapter(model, alpha, tmp_path / "adapter")
    loaded = load_adapter(load_model("tiny-llama")[0], tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, want, atol=1e-5)


def _random_adapter():
    from hlora.config import LoraConfig
    from hlora.model import attach_lora, load_model

    base, tok, _ = load_model("tiny-llama")
    model = attach_lora(base, LoraConfig(r=4, alpha=16, dropout=0.0))
    torch.manual_seed(0)
    with torch.no_grad():  # a "trained" adapter: ΔW ≠ 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model, tok


def test_perplexity_rise_and_accuracy_drop_measures_on_a_tiny_model(data):
    from hlora.budget.dual import MCQProxy, TextProxy
    from hlora.budget.measure import mcq_slices

    model, tok = _random_adapter()
    sl = SliceConfig(general_val_tokens=256, general_test_tokens=64, mcq_val_items=20, mcq_test_items=20)
    val, test = text_slices(f"text:{data}/general.jsonl", tok, sl)
    assert not set(val.texts) & set(test.texts)
    m = Measurer(Budget(f"text:{data}/general.jsonl", "ppl_rise_pct", 1.0), val, None, tok).attach(model)
    assert m.measure(0.0).forgetting == 0.0
    p = m.measure(1.0)
    assert p.forgetting == pytest.approx(100 * (p.detail["token_ppl"] / p.detail["base_token_ppl"] - 1), rel=1e-6)
    assert p.se > 0 and math.isnan(p.domain_acc)
    mval, mtest = mcq_slices(f"mcq:{data}/domain.jsonl", sl)
    assert len(mval[0].items) == 20 and len(mtest[0].items) == 20
    m = Measurer(Budget(f"mcq:{data}/domain.jsonl", "drop_pts", 5.0), mval, None, tok).attach(model)
    p = m.measure(1.0)
    d = p.detail[f"mcq:{data}/domain.jsonl"]
    assert p.forgetting == pytest.approx(100 * (d["base_acc"] - d["acc"]))
    proxy = MCQProxy(mval[0].items)  # the training-time proxies read the same quantities
    proxy.prepare(model, tok)
    assert proxy.measure(model) == pytest.approx(p.forgetting)
    proxy = TextProxy("ppl_rise_pct", val.texts, 128, 32)
    proxy.prepare(model, tok)
    assert math.isfinite(proxy.measure(model)) and proxy.measure(model) != 0.0


def test_rotation_puts_every_piece_in_one_group_of_enough_tokens():
    from hlora.budget.dual import rotation

    groups = rotation([100] * 9, 250)
    assert sorted(i for g in groups for i in g) == list(range(9))
    assert [len(g) for g in groups] == [3, 3, 3] and rotation([100] * 9, 250) == groups  # fixed
    assert [len(g) for g in rotation([100] * 7, 250)] == [3, 4]  # a short last group joins the one before
    assert rotation([10, 10], 1000) == [[0, 1]] or rotation([10, 10], 1000) == [[1, 0]]


@pytest.mark.parametrize("kind", ["kl", "ppl_rise_pct"])
def test_text_proxy_over_one_rotation_reads_the_budgets_own_measure(data, kind):
    # Each measurement scores a group of whole pieces as the α search's measurer scores them (from the prefix
    # token, within the measure's window); over one cycle the groups cover the slice, so their token-weighted
    # mean is the measure of the whole slice (a fixed subset would be a fixed bias: dual.py)
    from hlora.budget.dual import TextProxy

    model, tok = _random_adapter()
    sl = SliceConfig(general_val_tokens=1024, general_test_tokens=64, piece_chars=100)  # pieces shorter than 256 tokens
    val, _ = text_slices(f"text:{data}/general.jsonl", tok, sl)
    m = Measurer(Budget(f"text:{data}/general.jsonl", kind, 1.0), val, None, tok, window=1024).attach(model)
    want = m.measure(1.0)
    proxy = TextProxy(kind, val.texts, 300, window=1024)  # each piece within one window: the same tokens
    proxy.prepare(model, tok)
    assert proxy.window == 256  # capped at the model's length, as the measure caps it
    assert max(len(d) for d in proxy.docs) < 256
    n = len(proxy.groups)
    assert n >= 3 and proxy.describe()["groups"] == n
    values, tokens = [], []
    for _ in range(n):
        values.append(proxy.measure(model))
        tokens.append(proxy.last_tokens)
    assert min(tokens) >= 300 and sum(tokens) == want.detail["tokens"]
    if kind == "kl":
        got = sum(v * t for v, t in zip(values, tokens)) / sum(tokens)
    else:  # a perplexity rise is exp of the mean NLL difference: average the log ratios
        got = 100 * math.expm1(sum(math.log1p(v / 100) * t for v, t in zip(values, tokens)) / sum(tokens))
    assert want.forgetting > 0 and got == pytest.approx(want.forgetting, rel=1e-4)
    assert len(set(round(v, 9) for v in values)) > 1  # the groups differ
    assert proxy.measure(model) == pytest.approx(values[0], rel=1e-5)  # the cycle starts again


class _Plant:
    """A proxy reading a fixed value, and a method with a steerable coefficient (DualController's two sides)."""

    def __init__(self, value):
        self.value = value

    def prepare(self, model, tok):
        pass

    def measure(self, model):
        return self.value

    def describe(self):
        return {}


@pytest.mark.parametrize("anchored", [True, False])
def test_a_coefficient_that_pulls_toward_a_start_beyond_the_budget_is_not_steered(anchored):
    from types import SimpleNamespace

    from hlora.methods.base import Method

    class M(Method):
        coefficient, coefficient_range = "phi", (1e-8, 1e8)
        anchored_at_start = anchored

    method = M.__new__(M)
    method.cfg = SimpleNamespace(name="m", phi=1.0)
    ctrl = DualController(_Plant(0.4), 0.05, DualConfig(every=5))  # the start forgets 8x the budget
    ctrl.bind(method, None, None)
    ctrl.on_step_end(None, SimpleNamespace(global_step=5), None)
    if anchored:  # HLoRA after a stage ν that already drifted: φ stays, the trace says why
        assert method.cfg.phi == 1.0 and "pulls toward that start" in ctrl.trace[0]["frozen"]
        assert ctrl.summary()["frozen"] and ctrl.trace[-1]["updated"] is False
    else:
        assert method.cfg.phi > 1.0 and not ctrl.frozen and ctrl.trace[-1]["updated"] is True
    plant = _Plant(0.4)
    ctrl = DualController(plant, 0.05, DualConfig(every=5))
    method.cfg.phi = 1.0
    ctrl.bind(method, None, None)
    plant.value = 0.01  # the domain stage itself brings the run inside (a perplexity that falls): steered from then on
    ctrl.on_step_end(None, SimpleNamespace(global_step=5), None)
    assert method.cfg.phi < 1.0 and not ctrl.frozen and ctrl.trace[-1]["updated"] is True
    assert ctrl.trace[-1].get("thawed") is (True if anchored else None)
    assert ctrl.summary().get("thawed_at") == (5 if anchored else None)  # the record keeps why, and from when
    ctrl = DualController(_Plant(0.0), 0.05, DualConfig(every=5))  # an anchored run starting inside: steered
    method.cfg.phi = 1.0
    ctrl.bind(method, None, None)
    ctrl.on_step_end(None, SimpleNamespace(global_step=5), None)
    assert method.cfg.phi < 1.0 and not ctrl.frozen


def test_hlora_and_ewc_pull_toward_their_start():
    from hlora.methods import method_class

    assert method_class("hlora").anchored_at_start and method_class("ewc").anchored_at_start
    assert not method_class("kl_general").anchored_at_start and not method_class("replay").anchored_at_start


def test_domain_validation_comes_from_another_split(embedded_data):
    from hlora.budget.measure import domain_slices

    val, test = domain_slices("sciq", SliceConfig(domain_val_items=30))
    assert val.info["task"] == "sciq:validation" and len(val.items) == 30
    assert not {it.context for it in val.items} & {it.context for it in test.items}
    val, test = domain_slices("piqa", SliceConfig(domain_val_items=30))  # no validation split: its last items
    assert len(val.items) == 30 and not {it.context for it in val.items} & {it.context for it in test.items}


# ----------------------------------------------------------------------------- hlora tune end to end


def _cli(tmp_path, data, *extra):
    from hlora.cli import main

    return main(["tune", "--model", "tiny-llama", "--data", f"mcq:{data}/domain.jsonl",
                 "--general-data", f"text:{data}/pool.jsonl", "--max-steps", "2", "--seq-len", "32", "--r", "4",
                 "--alpha", "16", "--out", str(tmp_path / "tune"),
                 "slices.general_val_tokens=512", "slices.general_test_tokens=128", "slices.domain_val_items=20",
                 "dual.every=1", "dual.proxy_tokens=128", "search.grid=2", "search.refine=1", *extra])


def test_cli_tune_end_to_end_on_a_tiny_model(tmp_path, data, capsys):
    rc = _cli(tmp_path, data, "tune.start={kl_general: 0.3}", "tune.lr={kl_general: 0.02}", "--method", "auto",
              "--allow", "kl_general",
              "--budget", f"text:{data}/general.jsonl_kl=0.5")
    out = capsys.readouterr()
    assert rc == 0, out.err
    rec = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert [c["label"] for c in rec["candidates"]] == ["none", "kl_general"]
    kl = rec["candidates"][1]
    assert kl["steered"] and kl["dual"]["coefficient"] == "beta" and len(kl["dual"]["trace"]) == 3
    assert kl["dual"]["trace"][0]["value"] == 0.3  # tune.start
    import yaml

    lrs = [yaml.safe_load(open(os.path.join(c["run"], "config.yaml")))["train"]["lr"] for c in rec["candidates"]]
    assert lrs[1] == 0.02 and lrs[0] != 0.02  # tune.lr: the candidate's own learning rate, the others train.lr
    w = rec["winner"]
    assert w["label"] in ("none", "kl_general") and 0 < w["alpha"] <= 1
    assert w["validation"]["forgetting"] <= 0.5 and "forgetting" in w["test"] and "domain_acc" in w["test"]
    assert rec["cost"]["training_steps"] == 4 and rec["cost"]["evaluations"] >= 4
    assert (tmp_path / "tune" / "adapter" / "adapter_config.json").is_file()
    assert "chosen:" in out.out and "(test)" in out.out and "training steps" in out.out
    # validation and test never share a document
    sl = rec["slices"]
    assert sl["general_validation"][0]["docs"].startswith("last") and sl["general_test"][0]["docs"].startswith("first")
    # a finished tune is not overwritten
    assert _cli(tmp_path, data, "--method", "none", "--budget", f"text:{data}/general.jsonl_kl=0.5") == 2
    assert "already holds a finished tune" in capsys.readouterr().err


def test_tune_measures_kl_against_the_base_logits_it_kept(tmp_path, data, monkeypatch):
    """Within a tune the base model's logits of the KL slice are computed once and read back afterwards (the
    engine's reference cache); outside it nothing is kept."""
    from hlora.evaluate import engine

    calls = []
    real = engine._cached_ref_logits

    def spy(ref, ref_id, ids, mask, keep):
        before = None if engine._REF_CACHE is None else len(engine._REF_CACHE)
        out = real(ref, ref_id, ids, mask, keep)
        calls.append((before, None if engine._REF_CACHE is None else len(engine._REF_CACHE)))
        return out

    monkeypatch.setattr(engine, "_cached_ref_logits", spy)
    assert _cli(tmp_path, data, "--method", "none", "--budget", f"text:{data}/general.jsonl_kl=1e-6",
                "search.on_unresolvable=nearest") == 0
    rec = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert rec["candidates"][0]["search"]["evaluations"] >= 3  # several α measured on one slice
    assert calls and all(b is not None for b, _ in calls)  # the cache was open for every KL measurement
    hits = [c for c in calls if c[0] == c[1]]
    assert len(hits) >= len(calls) / 2  # after the first α, every base window came from the cache
    assert engine._REF_CACHE is None


def test_tunes_sharing_a_runs_dir_reuse_what_the_budget_does_not_change(tmp_path, data, capsys):
    """With tune.runs_dir, a second tune with another budget reuses the unsteered candidate's run and trains the
    steered one again (its controller depends on the budget)."""
    shared = f"tune.runs_dir={tmp_path / 'shared'}"
    args = [shared, "--method", "auto", "--allow", "kl_general"]
    assert _cli(tmp_path, data, *args, "--budget", f"text:{data}/general.jsonl_kl=0.5") == 0
    first = json.loads((tmp_path / "tune" / "tune.json").read_text())
    (tmp_path / "tune").rename(tmp_path / "tune-a")
    assert _cli(tmp_path, data, *args, "--budget", f"text:{data}/general.jsonl_kl=0.4") == 0
    second = json.loads((tmp_path / "tune" / "tune.json").read_text())
    none_a, kl_a = first["candidates"]
    none_b, kl_b = second["candidates"]
    assert none_b["run"] == none_a["run"] and none_b["train"]["reused"]  # plain LoRA: trained once
    assert kl_b["run"] != kl_a["run"] and not kl_b["train"]["reused"]  # steered toward another budget: trained again
    assert all(os.path.dirname(c["run"]) == str(tmp_path / "shared") for c in first["candidates"] + second["candidates"])
    # ... and its α points: those the first tune measured are read back (same values), the others measured
    pts_a = {p["alpha"]: p for p in none_a["search"]["points"]}
    pts_b = none_b["search"]["points"]
    assert first["cost"]["evaluations_cached"] == 0 and not any(p.get("cached") for p in pts_a.values())
    read = [p for p in pts_b if p.get("cached")]
    assert read and all(p["alpha"] in pts_a for p in read)
    assert all(p["forgetting"] == pts_a[p["alpha"]]["forgetting"] and p["se"] == pts_a[p["alpha"]]["se"] for p in read)
    assert second["base"]["domain_acc"] == first["base"]["domain_acc"]
    assert none_b["cached_points"] >= len(read) + 1 and second["cost"]["evaluations_cached"] == none_b["cached_points"]
    assert kl_b["cached_points"] == 0  # a run trained again has no points yet
    assert second["cost"]["evaluations"] == sum(c["search"]["evaluations"] for c in second["candidates"]) + 2
    # a point is keyed by what it depends on: another measure on the same adapter is measured, not read
    (tmp_path / "tune").rename(tmp_path / "tune-b")
    assert _cli(tmp_path, data, shared, "--method", "none", "--budget", f"text:{data}/general.jsonl_ppl_rise_pct=50") == 0
    third = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert not any(p.get("cached") for p in third["candidates"][0]["search"]["points"][1:])
    # only domain accuracies are read: the base model's, and the chosen α's when an earlier tune chose it too
    assert 1 <= third["candidates"][0]["cached_points"] <= 2


def test_cli_tune_bad_input_names_the_field(tmp_path, data, capsys):
    assert _cli(tmp_path, data, "--method", "none", "--budget", "c4=0.05") == 2
    assert "must end in" in capsys.readouterr().err
    assert _cli(tmp_path, data, "--method", "wise", "--budget", f"text:{data}/general.jsonl_kl=0.5") == 2
    assert "tune.method" in capsys.readouterr().err
    assert _cli(tmp_path, data, "--method", "none", "--budget", f"mcq:{data}/domain.jsonl_kl=0.5") == 2
    assert "budget.task" in capsys.readouterr().err
    assert _cli(tmp_path, data, "tune.lr={wise: 0.1}", "--method", "none", "--budget",
                f"text:{data}/general.jsonl_kl=0.5") == 2
    assert "tune.lr: 'wise' is not a candidate" in capsys.readouterr().err
    assert _cli(tmp_path, data, "tune.lr={none: fast}", "--method", "none", "--budget",
                f"text:{data}/general.jsonl_kl=0.5") == 2
    assert "tune.lr.none: expected float, got 'fast'" in capsys.readouterr().err
    assert _cli(tmp_path, data, "tune.start={kl_general: -1}", "--method", "none", "--budget",
                f"text:{data}/general.jsonl_kl=0.5") == 2
    assert "tune.start.kl_general: -1 is not a coefficient >= 0" in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()  # nothing written before the input is checked


def test_cli_tune_unresolvable_budget_is_a_clear_error(tmp_path, data, capsys):
    rc = _cli(tmp_path, data, "--method", "none", "--lr", "0.05", "--budget", f"text:{data}/general.jsonl_kl=1e-7")
    err = capsys.readouterr().err
    assert rc == 2 and "no candidate meets the budget" in err
    rec = json.loads((tmp_path / "tune" / "tune.json").read_text())  # what was tried is on record
    assert rec["winner"] is None and rec["candidates"][0]["error"]
    assert not (tmp_path / "tune" / "adapter").exists()


@pytest.mark.filterwarnings("ignore:only α = 0")
def test_a_kept_coefficient_run_serves_the_budget_levels_it_would_repeat(tmp_path, data, capsys):
    """With tune.runs_dir, a steered HLoRA run whose φ was kept throughout (stage ν already beyond the budget) is
    the run a tighter budget would train step for step: that tune reuses it. A budget it starts inside of is
    steered, so it trains again."""
    shared = f"tune.runs_dir={tmp_path / 'shared'}"
    args = [shared, "--method", "hlora", "--lr", "0.05", "search.on_unresolvable=nearest"]

    def run(limit, *more):
        assert _cli(tmp_path, data, *args, *more, "--budget", f"text:{data}/general.jsonl_kl={limit}") == 0, \
            capsys.readouterr().err
        rec = json.loads((tmp_path / "tune" / "tune.json").read_text())
        (tmp_path / "tune").rename(tmp_path / f"tune-{limit}")
        return rec["candidates"][0], capsys.readouterr().out

    first, _ = run(1e-5)
    assert first["dual"]["frozen"] and not first["train"]["reused"]
    assert min(r["proxy"] for r in first["dual"]["trace"]) > 1e-5  # kept throughout: it starts and stays beyond
    second, out = run(2e-6)
    assert second["run"] == first["run"] and second["train"]["reused"] and "reusing" in out
    assert "not steered (in the run it reuses, under the budget 1e-05)" in out  # the note names the other target
    assert second["dual"]["shared_from_limit"] == 1e-5 and second["dual"]["trace"] == first["dual"]["trace"]
    assert second["dual"]["shared_from_margin"] == DualConfig().margin
    fourth, out = run(3e-6, "dual.margin=1.0")  # another margin, a target still below the run: the same run again
    assert fourth["run"] == first["run"] and fourth["train"]["reused"] and fourth["dual"]["shared_from_limit"] == 1e-5
    assert fourth["dual"]["shared_from_margin"] == DualConfig().margin  # the record says which target it ran at
    assert f"under the budget 1e-05 at dual.margin {DualConfig().margin:g}" in out
    third, _ = run(100.0)  # inside from the start: steered, so its own run
    assert third["run"] != first["run"] and not third["train"]["reused"] and "frozen" not in third["dual"]
    assert "shared_from_limit" not in third["dual"]


def test_the_winner_is_the_most_accurate_then_the_larger_alpha_then_the_lower_forgetting():
    """Ties on validation accuracy are common at a few hundred items: the rule, not the candidate order, decides."""
    from hlora.budget.alpha import AlphaResult
    from hlora.budget.tune import pick_winner

    def cand(label, acc, alpha, forgetting, **more):
        return {"label": label, "_result": AlphaResult(limit=0.1, chosen=Point(alpha, forgetting, 0.01, acc)), **more}

    assert pick_winner([cand("a", 0.89, 1.0, 0.05), cand("b", 0.90, 0.5, 0.09)])["label"] == "b"  # accuracy first
    assert pick_winner([cand("a", 0.90, 0.8, 0.05), cand("b", 0.90, 1.0, 0.09)])["label"] == "b"  # then larger α
    assert pick_winner([cand("a", 0.90, 1.0, 0.083), cand("b", 0.90, 1.0, 0.082)])["label"] == "b"  # then forgetting
    assert pick_winner([cand("a", 0.90, 1.0, 0.08), cand("b", 0.90, 1.0, 0.08)])["label"] == "a"  # then the order
    # a resolved candidate beats a more accurate one returned with a warning; an error is never the winner
    assert pick_winner([cand("a", 0.85, 1.0, 0.05), cand("b", 0.95, 1.0, 0.05, warning="nearest")])["label"] == "a"
    assert pick_winner([cand("a", 0.95, 1.0, 0.05, warning="nearest"), cand("b", 0.99, 1.0, 0.0, error="x")])["label"] == "a"
    assert pick_winner([cand("a", 0.95, 1.0, 0.05, error="x")]) is None
