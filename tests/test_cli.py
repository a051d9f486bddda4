"""The CLI as a user runs it: help, a two-step tiny pipeline, eval output, and clean failures."""
import json
import subprocess
import sys

import pytest

from hlora.cli import _overrides, build_parser, main, parse_args

SUBCOMMANDS = ["general", "domain", "eval", "run", "report", "inspect", "bench", "demo"]


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: hlora " + cmd in capsys.readouterr().out


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "hlora.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "general" in r.stdout and "demo" in r.stdout


def test_overrides_may_stand_among_the_flags(capsys):
    """`key=value` after a flag that follows other overrides was "unrecognized arguments" (argparse takes one run
    of positionals): the documented tune command has overrides on both sides of --out."""
    a = parse_args(["tune", "--r", "8", "train.lr=1e-3", "--seed", "1", "tune.runs_dir=x", "--out", "o", "eval.kl=true"])
    assert _overrides(a)[-3:] == ["train.lr=1e-3", "tune.runs_dir=x", "eval.kl=true"]
    assert "lora.r=8" in _overrides(a) and "out=o" in _overrides(a)
    for bad in (["tune", "--r", "8", "a=1", "--seed", "1", "oops"], ["tune", "--nope", "1"], ["bench", "--out", "b", "x=1"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


TINY = ["--model", "tiny-llama", "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--r", "4"]


def test_general_domain_eval_inspect_pipeline(tmp_path, embedded_data, capsys):
    nu, mu = tmp_path / "nu", tmp_path / "mu"
    assert main(["general", *TINY, f"out={nu}"]) == 0
    assert main(["domain", *TINY, "--data", "sciq", "--method", "hlora", "--phi", "10",
                 "--init-adapter", str(nu / "adapter"), "--importance", str(nu / "importance.safetensors"),
                 f"out={mu}"]) == 0
    assert (mu / "DONE").exists()
    log = [json.loads(l) for l in (mu / "log.jsonl").read_text().splitlines()]
    assert log[-1]["penalty"] > 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(mu / "adapter"), "--tasks", "sciq,wikitext",
                 "--limit", "3", "eval.kl=true", "ppl_max_tokens=64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["tasks"]["sciq"]["n"] == 3 and len(res["tasks"]["sciq"]["per_item"]["acc"]) == 3
    assert res["tasks"]["wikitext"]["token_ppl"] > 1
    # eval.X (as the README and experiment configs spell it) and X are the same EvalConfig field
    assert res["tasks"]["wikitext"]["kl"] > 0 and res["tasks"]["wikitext"]["n_tokens"] == 64
    printed = capsys.readouterr().out
    assert "| sciq | acc |" in printed and "bits_per_byte" in printed
    assert main(["inspect", str(nu / "importance.safetensors"), "--out", str(tmp_path / "ins")]) == 0
    assert (tmp_path / "ins" / "importance_heatmap.png").exists()


def _bad_mcq(tmp_path, text):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    return f"mcq:{f}"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", "scienceq"], "did you mean 'sciq'"),
        (["--tasks", "mcq:/nonexistent/x.jsonl"], "not found"),
        (["--tasks", "BAD_MALFORMED"], "bad.jsonl:2: malformed JSON"),
        (["--tasks", "BAD_FIELD"], "bad.jsonl:1: missing field"),
        (["--tasks", "BAD_RANGE"], "answer index 5 out of range"),
        (["--tasks", "BAD_CHOICES"], "field 'choices' must be list"),
        (["--tasks", "BAD_EMPTY"], "empty data set"),
        (["--model", "./no/such/model", "--tasks", "sciq"], "model path does not exist"),
        (["--model", "tiny-llama", "--adapter", "/nonexistent/adapter", "--tasks", "sciq"], "adapter_config.json"),
    ],
)
def test_eval_bad_input_clear_error_no_output(tmp_path, embedded_data, capsys, args, needle):
    bad = {
        "BAD_MALFORMED": '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{oops\n',
        "BAD_FIELD": '{"choices": ["a", "b"], "answer": 0}\n',
        "BAD_RANGE": '{"question": "q", "choices": ["a", "b"], "answer": 5}\n',
        "BAD_CHOICES": '{"question": "q", "choices": "ab", "answer": 0}\n',
        "BAD_EMPTY": "\n\n",
    }
    args = [_bad_mcq(tmp_path, bad[a]) if a in bad else a for a in args]
    if "--model" not in args:
        args = ["--model", "tiny-llama", *args]
    out = tmp_path / "eval.json"
    assert main(["eval", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") <= 2, err
    assert not out.exists() and not list(tmp_path.glob(".eval.json*"))


def test_training_bad_input_leaves_nothing(tmp_path, embedded_data, capsys):
    out = tmp_path / "run"
    assert main(["general", *TINY, "--data", "mcq:/nonexistent.jsonl", f"out={out}"]) == 2
    assert "not found" in capsys.readouterr().err and not out.exists()
    assert main(["general", *TINY, "--targets", "nope_proj", f"out={out}"]) == 2
    assert "nope_proj" in capsys.readouterr().err and not out.exists()
    assert main(["general", *TINY, "train.lrr=1", f"out={out}"]) == 2
    assert "unknown key" in capsys.readouterr().err and not out.exists()
    # importance of another model: the error names the module and both shapes
    nu = tmp_path / "nu"
    assert main(["general", *TINY, f"out={nu}"]) == 0
    assert main(["domain", *TINY, "--model", "tiny-gpt2", "--targets", "c_attn", "--data", "sciq", "--method", "hlora",
                 "--importance", str(nu / "importance.safetensors"), f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "module" in err and not out.exists(), err


def test_public_names_importable():
    import hlora
    import hlora.evaluate  # noqa: F401  (the submodule must not shadow the function)
    from hlora import HLoRACallback, HLoRAPenalty, Importance, SIRecorder, evaluate

    assert callable(evaluate) and callable(hlora.evaluate) and not isinstance(hlora.evaluate, type(hlora))
    assert all(callable(x) for x in (HLoRACallback, HLoRAPenalty, Importance, SIRecorder))


@pytest.mark.slow
def test_bench_runs_and_reports_ratios(tmp_path, embedded_data, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny-llama", "--steps", "4", "--rounds", "2", "--no-lmeval",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["settings"]) == {"paper", "all-linear"}  # both settings by default
    assert res["settings"]["paper"]["lora_targets"] == ["q_proj", "v_proj"] and res["settings"]["paper"]["r"] == 8
    assert res["settings"]["all-linear"]["r"] == 16 and len(res["settings"]["all-linear"]["lora_targets"]) == 7
    for s in res["settings"].values():
        for key in ("si_overhead", "penalty_overhead", "fisher_over_si", "matmul_peak_fraction"):
            assert all(v > 0 for v in s[key].values()), key  # ratios (1.0 = no overhead), not "ratio - 1"
        assert set(s["si_overhead"]) == {"paper", "exact"}
        assert set(s["penalty_overhead"]) == {"hlora", "ewc", "kl_domain", "kl_general", "replay"}
        assert 0 < s["storage_ratio_half"] < s["storage_ratio_fp32"] < 1
        assert 0 < s["details"]["storage"]["bf16_max_relative_error"] <= 2.0**-8
        assert s["memory"]["measured"] == s["memory"]["planned"]  # the memory plan, on the real objects
        assert s["train_tokens_per_s"] > 0
    paper, every = res["settings"]["paper"], res["settings"]["all-linear"]
    assert paper["storage_ratio_fp32"] < every["storage_ratio_fp32"]
    assert res["eval_tokens_per_s"] > 0 and res["matmul_peak_fraction"]["eval"] > 0
    assert res["eval_speedup_vs_lmeval"] == {"skipped": "--no-lmeval"}
    assert "SI recording overhead" in capsys.readouterr().out
    assert main(["bench", "--table", str(out)]) == 0  # the README's table, from the JSON alone
    table = capsys.readouterr().out
    assert "| `si_overhead` | paper |" in table and "| `storage_ratio_half` |" in table and "tiny-llama" in table
    assert "| q,v r=8 | all linear r=16 |" in table
