"""Fixtures of the report tests; the record builders are in report_records.py."""
from __future__ import annotations

import json

import pytest
from report_records import make_results


@pytest.fixture
def write_results(tmp_path):
    """Write records to tmp_path/results.json and return the path."""

    def write(recs: list[dict], name: str = "results.json"):
        p = tmp_path / name
        p.write_text(json.dumps(recs), encoding="utf-8")
        return p

    return write


@pytest.fixture
def results_file(write_results):
    return write_results(make_results())


@pytest.fixture(autouse=True)
def _tables_without_drawing(request):
    """test_report_tables checks tables only: its reports skip drawing figures (tests/conftest.py)."""
    if request.module.__name__ == "test_report_tables":
        request.getfixturevalue("skip_figure_drawing")
