"""The tables of `hlora bench`: a bench JSON (see bench.py for its keys) rendered as the console summary and as
Markdown, every ratio beside its target. Pure functions of the JSON (no torch): `hlora bench --table` and
results/README.md render committed JSONs with them.
"""
from __future__ import annotations

TARGETS = {"si_overhead": "<= 1.02", "penalty_overhead": "<= 1.02", "fisher_over_si": ">= 100",
           "storage_ratio_fp32": "<= 0.15", "storage_ratio_half": "<= 0.05", "eval_speedup_vs_lmeval": ">= 2",
           "matmul_peak_fraction": ">= 0.7"}


def _per_setting(res: dict) -> dict[str, dict]:
    """The per-setting results of a bench JSON; an older JSON (one setting, keys at the top) is q,v r=8."""
    if "settings" in res:
        return res["settings"]
    old = {k: res[k] for k in ("si_overhead", "penalty_overhead", "fisher_over_si", "storage_ratio_fp32",
                               "storage_ratio_half", "train_tokens_per_s") if k in res}
    old["matmul_peak_fraction"] = {"train": res["matmul_peak_fraction"]["train"]}
    return {"paper": {"lora_targets": ["q_proj", "v_proj"], "r": 8, **old}}


def _eval_fraction(res: dict) -> float:
    return res["matmul_peak_fraction"]["eval"]


def _label(name: str, s: dict) -> str:
    what = "all linear" if name == "all-linear" else ",".join(t.removesuffix("_proj") for t in s["lora_targets"])
    return f"{what} r={s['r']}"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def summary(res: dict) -> str:
    f = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
    ev = res["eval_speedup_vs_lmeval"]
    evs = ", ".join(f"{t} {v['ratio']:.2f}x (acc {v['acc']})" if "ratio" in v else f"{t} skipped"
                    for t, v in ev.items() if isinstance(v, dict)) or "skipped"
    lines = [f"hlora bench: {res['model']} on {res['machine']['cpu']} ({res['machine']['torch_threads']} threads), "
             f"{res['wall_seconds']:.0f} s"]
    for name, s in _per_setting(res).items():
        lines += [
            f" {name}: LoRA on {_label(name, s)}",
            f"  SI recording overhead (step ratio)   {f(s['si_overhead'])}   target {TARGETS['si_overhead']}",
            f"  per-step method overhead             {f(s['penalty_overhead'])}   target {TARGETS['penalty_overhead']}",
            f"  EWC Fisher / SI added time           {f(s['fisher_over_si'])}   target {TARGETS['fisher_over_si']}",
            f"  storage vs full fp32 Fisher          Ω fp32 {s['storage_ratio_fp32']:.4f}, Ω bf16 "
            f"{s['storage_ratio_half']:.4f}   target {TARGETS['storage_ratio_fp32']} / {TARGETS['storage_ratio_half']}",
            f"  train tokens/s, matmul peak fraction {s['train_tokens_per_s']:.0f}, "
            f"{s['matmul_peak_fraction']['train']:.3f}   target {TARGETS['matmul_peak_fraction']}",
        ]
        mem = s.get("memory")
        if mem:
            lines.append("  held bytes (measured / planned)      " + ", ".join(
                f"{k} {_mib(v)} / {_mib(mem['planned'][k]) if mem['planned'][k] is not None else '?'}"
                for k, v in mem["measured"].items()))
    lines += [" evaluation (no adapter)",
              f"  evaluation speed-up vs lm-eval       {evs}   target {TARGETS['eval_speedup_vs_lmeval']}",
              f"  eval tokens/s, matmul peak fraction  {res['eval_tokens_per_s']:.0f}, {_eval_fraction(res):.3f}"
              f"   target {TARGETS['matmul_peak_fraction']}"]
    return "\n".join(lines)


def _meets(value: float, target: str) -> str:
    op, bound = target.split()
    ok = value <= float(bound) if op == "<=" else value >= float(bound)
    return "yes" if ok else "**no**"


def _cell(value: float, target: str | None) -> str:
    if value is None:
        return ""
    if target is None:
        return f"{value:.0f}" if value >= 100 else f"{value:.3f}"
    return f"{value:.3f}" if _meets(value, target) == "yes" else f"**{value:.3f}** (no)"


def markdown_table(res: dict) -> str:
    """The results' tables of a bench JSON: every ratio beside its target, one column per LoRA setting (a miss in
    bold), then the evaluation's (no adapter), and the machine it ran on."""
    m = res["machine"]
    per = _per_setting(res)
    rows = ["| key | variant | target | " + " | ".join(_label(n, s) for n, s in per.items()) + " |",
            "|---|---|---|" + "---:|" * len(per)]

    def add(key, variant, values, target_key=None):
        target = TARGETS.get(target_key or key)
        rows.append(f"| `{key}` | {variant} | {target or ''} | " + " | ".join(_cell(v, target) for v in values) + " |")

    first = next(iter(per.values()))
    for key in ("si_overhead", "penalty_overhead", "fisher_over_si"):
        for variant in first[key]:
            add(key, variant, [s[key].get(variant) for s in per.values()])
    for key in ("storage_ratio_fp32", "storage_ratio_half"):
        add(key, "Ω fp32" if key.endswith("fp32") else "Ω half", [s[key] for s in per.values()])
    add("matmul_peak_fraction", "train", [s["matmul_peak_fraction"]["train"] for s in per.values()])
    add("train_tokens_per_s", "", [s["train_tokens_per_s"] for s in per.values()])
    ev_rows = ["| key | variant | target | measured |", "|---|---|---|---:|",
               f"| `matmul_peak_fraction` | eval | {TARGETS['matmul_peak_fraction']} | "
               f"{_cell(_eval_fraction(res), TARGETS['matmul_peak_fraction'])} |"]
    for task, v in res["eval_speedup_vs_lmeval"].items():
        if isinstance(v, dict) and "ratio" in v:
            ev_rows.append(f"| `eval_speedup_vs_lmeval` | {task} ({v['items']} items, acc {v['acc']['hlora']:.3f} = "
                           f"{v['acc']['lm_eval']:.3f}) | {TARGETS['eval_speedup_vs_lmeval']} | "
                           f"{_cell(v['ratio'], TARGETS['eval_speedup_vs_lmeval'])} |")
    ev_rows.append(f"| `eval_tokens_per_s` | | | {res['eval_tokens_per_s']:.0f} |")
    cuda = m.get("cuda") or "no GPU"
    head = (f"`hlora bench --model {res['model']}` on {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch "
            f"threads), {cuda}, torch {m['torch']}; {res['wall_seconds'] / 60:.1f} min.")
    return head + "\n\n" + "\n".join(rows) + "\n\n" + "\n".join(ev_rows)
