"""`hlora inspect`: importance summary, layer weights and the heatmap from per-module norms."""
from __future__ import annotations

import math

import pytest
from report_records import PNG_MAGIC

from hlora import report


def test_inspect_importance(tmp_path):
    norms = {f"base_model.model.transformer.h.{b}.attn.c_attn": 10.0 ** (3 + b) for b in range(4)}
    norms["base_model.model.lm_head"] = 5.0
    text = report.inspect_importance(norms, tmp_path)
    assert (tmp_path / "importance_heatmap.png").read_bytes()[:8] == PNG_MAGIC
    assert "c_attn" in text and "layer_scale=1e-08" in text and "layer_scale=auto" in text
    assert "no block index" in text
    w = report.layer_weights(norms, 1e-8)
    assert sum(w.values()) == pytest.approx(1.0)
    assert report.entropy([0.25] * 4) == pytest.approx(math.log(4))
    m = report.importance_matrix(norms)
    assert m["rows"] == ["c_attn"] and m["blocks"] == [0, 1, 2, 3]
    assert all(".tmp" not in p.name for p in tmp_path.iterdir())


def test_inspect_without_blocks_skips_heatmap(tmp_path):
    text = report.inspect_importance({"lm_head": 3.0, "embed": 4.0}, tmp_path)
    assert "Heatmap skipped" in text and not (tmp_path / "importance_heatmap.png").exists()
    assert (tmp_path / "importance_summary.txt").read_text(encoding="utf-8") == text
