"""Reading results.json: malformed input fails with the record and field, old records are upgraded."""
from __future__ import annotations

import json

import pytest
from report_records import (
    LETTER_SIGNAL,
    battery_acc,
    cell,
    letter_cell,
    make_results,
    to_new_format,
    to_old_format,
)

from hlora.report import ResultsError, load_results, row_labels, row_order, write_report
from hlora.report.load import general_names


def test_malformed_results(write_results, tmp_path):
    recs = make_results(sweep=False)
    del recs[3]["acc"]
    p = write_results(recs)
    out = tmp_path / "r"
    with pytest.raises(ResultsError, match=r"record 3 .*'acc'"):
        write_report(p, out)
    assert not out.exists()  # nothing written on bad input

    recs = make_results(sweep=False)
    recs[5]["seed"] = "zero"
    p = write_results(recs)
    with pytest.raises(ResultsError, match=r"record 5 .*'seed' must be an integer"):
        load_results(p)
    recs = make_results(sweep=False)
    recs[2]["curve"]["penalty"] = [0.0]
    p = write_results(recs)
    with pytest.raises(ResultsError, match=r"record 2 .*'curve.penalty'"):
        load_results(p)
    recs = make_results(sweep=False)
    recs[1]["sweep"] = {"param": "phi"}
    p = write_results(recs)
    with pytest.raises(ResultsError, match=r"record 1 .*'sweep'"):
        load_results(p)
    recs = make_results(sweep=False)
    recs[4]["transfer"] = {"piqa": {"acc": "high"}}
    p = write_results(recs)
    with pytest.raises(ResultsError, match=r"record 4 .*'transfer.piqa'"):
        load_results(p)

    p.write_text(json.dumps({"method": "hlora"}))
    with pytest.raises(ResultsError, match="JSON list"):
        load_results(p)
    p.write_text("[{")
    with pytest.raises(ResultsError, match="not valid JSON"):
        load_results(p)
    with pytest.raises(FileNotFoundError, match="results file not found"):
        load_results(tmp_path / "nope.json")


def test_old_records_are_upgraded(write_results):
    recs = [to_old_format(r) for r in make_results()]
    assert all(isinstance(r["sweep"], bool) and "label" not in r for r in recs)
    got = load_results(write_results(recs))
    sweep_cell = next(r for r in got if r["method"] == "hlora" and r["phi"] == 0.1)
    assert sweep_cell["sweep"] == {"param": "phi", "value": 0.1} and sweep_cell["main"] is False
    main_hlora = next(r for r in got if r["method"] == "hlora" and r["main"])
    assert main_hlora["sweep"] == {"param": "phi", "value": 1e-3}  # the main cell joins its φ front
    base = next(r for r in got if r["method"] == "base")
    assert base["sweep"] is None and base["main"] is True and base["regularizer"] == "none"
    assert base["label"] == "base"  # no label: the row id
    assert next(r for r in got if r["method"] == "ewc_lora")["regularizer"] == "ewc"  # from config.method.name


def test_order_and_labels_come_from_records():
    recs = [cell("zeta", "sciq", 0, 0.5, 20.0, label="Zeta Z"), cell("alpha", "sciq", 0, 0.6, 21.0),
            cell("zeta", "sciq", 1, 0.5, 20.0, label="ignored later label")]  # fmt: skip
    assert row_order(recs) == ["zeta", "alpha"]  # first appearance, not alphabetical
    assert row_labels(recs) == {"zeta": "Zeta Z", "alpha": "alpha"}


def test_old_records_take_the_new_shape(write_results):
    """record_version 1: general_* were WikiText-2 (stage ν's own text), no battery; families by the default rule."""
    got = load_results(write_results(make_results(wise=True)))
    for r in got:
        assert r["record_version"] == 1 and r["general_eval"] == "wikitext" and r["battery"] is None
        assert r["texts"] == {"wikitext": {"ppl": r["general_ppl"], "word_ppl": r["general_word_ppl"],
                                           "bpb": r["general_bpb"], "kl": r["general_kl"], "n_tokens": None,
                                           "stage_nu_text": True}}  # fmt: skip
        assert r["battery_acc"] is None and r["nu_text_ppl"] == r["general_ppl"] and r["lr"] is None
    family = {r["method"]: r["family"] for r in got}
    assert family == {"base": "base", "lora_mu": "alternatives", "lora_nu_mu": "alternatives",
                      "rslora": "alternatives", "ewc_lora": "alternatives", "hlora": "hlora",
                      "hlora_no_layer": "hlora", "hlora_no_layer_element": "hlora",  # regularizer "none": id decides
                      "wise_lora_nu_mu": "wise"}  # fmt: skip
    names = general_names(got)
    assert names["ppl"] == "PPL" and not names["named"] and not names["battery"]  # tables keep their old headers
    figure = general_names(got, legacy=False)
    assert figure["ppl"] == "WikiText-2 PPL (stage ν's text)" and figure["nu_ppl"] is None


def test_new_records_load_with_flattened_measures(write_results):
    recs = [to_new_format(r) for r in make_results(sweep=False)]
    recs[0]["family"] = "my panel"
    got = load_results(write_results(recs))
    r = next(r for r in got if r["method"] == "hlora" and r["task"] == "sciq" and r["seed"] == 0)
    assert r["general_eval"] == "c4" and r["general_ppl"] == pytest.approx(1.4 * 23.5)
    assert r["nu_text_ppl"] == 23.5 and r["battery_acc"] == pytest.approx(battery_acc(r)) and r["lr"] == 2e-4
    assert got[0]["family"] == "my panel" and r["family"] == "hlora"
    names = general_names(got)
    assert names["named"] and names["ppl"] == "C4 PPL" and names["kl"] == "C4 KL" and names["battery"]
    assert names["nu_ppl"] == "WikiText-2 PPL (stage ν's own distribution)"
    # predictions and every choice's log-likelihood load, on the tuned task and on a transfer task
    cells = [letter_cell("base", LETTER_SIGNAL), letter_cell("hlora", LETTER_SIGNAL, task="sciq")]
    got = load_results(write_results(cells))
    assert got[0]["per_item"]["ll"][0] == [-1.0, -2.0, -2.0, -2.0] and got[1]["transfer"]["medmcqa"]["gold"][3] == 1


@pytest.mark.parametrize("field, value, message", [
    ("per_item.ll", [0.1, 0.2], r"'per_item.ll' must be a list of lists of numbers"),
    ("per_item.pred", ["A", "B"], r"'per_item.pred' must be a list of numbers"),
    ("transfer.medmcqa.pred", [[1]], r"'transfer.medmcqa.pred' must be a list of numbers"),
    ("transfer.medmcqa.ll", [[-1.0, "x"]], r"'transfer.medmcqa.ll' must be a list of lists"),
    ("texts.c4.ppl", None, r"'texts.c4.ppl' must be a number"),
    ("texts.c4.stage_nu_text", "no", r"'texts.c4.stage_nu_text' must be true/false"),
    ("texts.wikitext.kl", "0.1", r"'texts.wikitext.kl' must be a number or null"),
    ("battery.acc", None, r"'battery.acc' must be a number"),
    ("battery.tasks.boolq.acc", "high", r"'battery.tasks.boolq' must be an object with numbers"),
    ("battery.per_item.copa", [1, "0"], r"'battery.per_item.copa' must be a list of numbers"),
    ("lr", "fast", r"'lr' must be a number or null"),
    ("family", 3, r"'family' must be a string or null"),
    ("record_version", 2.5, r"'record_version' must be an integer or null"),
])  # fmt: skip
def test_new_fields_are_checked(write_results, field, value, message):
    recs = [to_new_format(r) for r in make_results(sweep=False)]
    rec = recs[3]
    rec["per_item"].update(pred=[0, 1], gold=[0, 0], ll=[[-1.0, -2.0], [-1.5, -0.5]])
    rec["transfer"]["medmcqa"] = {"acc": 0.5, "acc_norm": 0.5, "n": 2, "pred": [0, 1], "gold": [0, 0],
                                  "ll": [[-1.0, -2.0], [-1.5, -0.5]]}  # fmt: skip
    *path, last = field.split(".")
    target = rec
    for k in path:
        target = target[k]
    target[last] = value
    with pytest.raises(ResultsError, match=r"record 3 \(method='lora_mu', task='sciq', seed=1\): .*" + message):
        load_results(write_results(recs))
