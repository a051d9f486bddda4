"""The record schema shared by writer and reader: every committed record of every grid loads and comes out in
the current format, and a record that breaks the schema is refused before it is written."""
import json
from pathlib import Path

import pytest

from hlora.record import RECORD_VERSION, ResultsError, normalize_record

ROOT = Path(__file__).resolve().parents[1]


def test_every_committed_record_loads_in_the_current_format():
    paths = sorted(ROOT.glob("results/*/records/*.json"))
    assert len(paths) >= 166
    for p in paths:
        rec = normalize_record(json.loads(p.read_text()), where=str(p))
        assert rec["general_eval"] in ("wikitext", "c4") and rec["texts"][rec["general_eval"]]["ppl"] > 0
        assert rec["family"] in ("base", "hlora", "alternatives", "wise")
        if rec["record_version"] < 2:  # the first grid: general_* on WikiText-2, stage ν's own text
            assert rec["general_eval"] == "wikitext" and rec["texts"]["wikitext"]["stage_nu_text"]
            assert rec["battery"] is None and rec["battery_acc"] is None
    assert RECORD_VERSION == 2


def test_a_broken_record_names_its_field():
    with pytest.raises(ResultsError, match="records/x.json: record 0 .*'battery.acc' must be a number"):
        normalize_record({"method": "m", "task": "sciq", "seed": 0, "general_ppl": 1.0, "general_bpb": 1.0,
                          "acc": 0.5, "acc_norm": 0.5, "record_version": 2, "battery": {"acc": "high"}},
                         where="records/x.json")
