"""Reading results.json: malformed input fails with the record and field, old records are upgraded."""
from __future__ import annotations

import json

import pytest
from report_records import cell, make_results, to_old_format

from hlora.report import ResultsError, load_results, row_labels, row_order, write_report


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
