"""`hlora bench` JSON in both settings and the tables rendered from it (no measuring here: the bench itself runs in
the slow tier, tests/test_cli.py)."""
from pathlib import Path

from hlora.bench import lora_settings
from hlora.bench_table import _per_setting, markdown_table
from hlora.cli import main

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench-smollm2-cpu.json"


def test_settings_of_a_tiny_model():
    s = lora_settings("tiny-llama")
    assert s == {"paper": (["q_proj", "v_proj"], 8),
                 "all-linear": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 16)}
    assert lora_settings("tiny-gpt2", "all-linear") == {"all-linear": (["c_attn", "c_proj", "c_fc"], 16)}
    assert lora_settings("tiny-gpt-neox", "paper") == {"paper": (["query_key_value"], 8)}
    assert lora_settings("tiny-llama", targets=["q_proj", "k_proj"], r=4) == {"custom": (["q_proj", "k_proj"], 4)}


def test_committed_bench_json_renders(capsys):
    """A JSON of one setting (keys at the top, before both settings were measured) is the q,v r=8 setting."""
    import json

    res = json.loads(COMMITTED.read_text())
    per = _per_setting(res)
    if "settings" not in res:
        assert list(per) == ["paper"] and per["paper"]["r"] == 8
    table = markdown_table(res)
    assert "| `si_overhead` | paper |" in table and "| `eval_speedup_vs_lmeval` | sciq" in table
    assert main(["bench", "--table", str(COMMITTED)]) == 0
    assert "| `storage_ratio_fp32` |" in capsys.readouterr().out
