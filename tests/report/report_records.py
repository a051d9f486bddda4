"""Synthetic results.json records for the report tests (the format of docs/design.md section 7.3).

A plain module (not a conftest) so that the tests can import its builders.
"""
from __future__ import annotations

import math

import numpy as np

TASKS = ("sciq", "piqa")
SEEDS = (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (row id, label, regularizer) in the runner's order
ROWS = (
    ("base", "Base", "none"),
    ("lora_mu", "LoRA(μ)", "none"),
    ("lora_nu_mu", "LoRA(ν+μ)", "none"),
    ("rslora", "rsLoRA", "none"),
    ("ewc_lora", "EWC-LoRA", "ewc"),
    ("hlora", "HLoRA", "hlora"),
    ("hlora_no_layer", "HLoRA −layer", "hlora"),
    ("hlora_no_layer_element", "HLoRA −layer,element", "none"),
)
ROW_IDS = tuple(r[0] for r in ROWS)
WISE = ("wise_lora_nu_mu", "WiSE-FT LoRA(ν+μ)", "wise")
HLORA_PHIS = (1e-2, 1e-1, 1.0)  # sweep cells besides the main φ = 1e-3
WISE_ALPHAS = (0.25, 0.5, 1.0)  # α = 1 is the main cell (the trained source)

# Hand-checked cell: hlora on sciq, seeds 0 and 1.
HLORA_SCIQ_PPL = (23.5, 23.7)  # mean 23.60, sample std 0.1414 -> "23.60 ± 0.14"
HLORA_SCIQ_ACC = (0.88, 0.90)  # mean 89.00 %, sample std 1.414 points -> "89.00 ± 1.41"


def cell(method, task, seed, acc, ppl, *, sweep=None, main=True, label=None, kl=None, **extra) -> dict:
    """A minimal valid record in the current format."""
    rec = {"cell": f"{method}-{task}-s{seed}" + (f"-{sweep[0]}{sweep[1]:g}" if sweep else ""),
           "method": method, "label": label or method, "task": task, "seed": seed,
           "sweep": {"param": sweep[0], "value": sweep[1]} if sweep else None, "main": main,
           "general_ppl": ppl, "general_bpb": math.log2(ppl) / 4, "general_kl": kl,
           "acc": acc, "acc_norm": acc - 0.02}  # fmt: skip
    rec.update(extra)
    return rec


def _layer_norms(rng) -> dict[str, float]:
    return {f"base_model.model.model.layers.{b}.self_attn.{mod}": float(scale * (1 + rng.random()))
            for b in range(6) for mod, scale in (("q_proj", 5e3), ("v_proj", 5e4))}  # fmt: skip


def _curve(i: int, method: str, rng) -> dict:
    steps = list(range(1, 61))
    pen = {"hlora": 1e-3, "hlora_no_layer": 5e-4, "ewc_lora": 1e-1}.get(method)
    return {"step": steps, "loss": [2.5 * math.exp(-s / 20) + 0.3 + 0.07 * i + 0.05 * rng.random() for s in steps],
            "penalty": [pen * (1 - math.exp(-s / 10)) if pen else 0.0 for s in steps]}  # fmt: skip


def _metrics(i: int, method: str, task: str, seed: int, phi: float | None) -> tuple[float, float]:
    """(ppl, acc) of a cell: a larger φ keeps perplexity lower and costs accuracy."""
    if phi is not None and phi > 1e-3:
        return 22.0 + 2.0 / (1 + 10 * phi) + 0.1 * seed, 0.85 - 0.05 * math.log10(1 + 100 * phi) + 0.01 * seed
    if method == "hlora" and task == "sciq":
        return HLORA_SCIQ_PPL[seed], HLORA_SCIQ_ACC[seed]
    return 28.5 - 0.5 * i + 0.1 * seed + (1.0 if task == "piqa" else 0.0), 0.60 + 0.03 * i + 0.01 * seed


def _record(i: int, task: str, seed: int, rng, *, phi=None, main=True) -> dict:
    method, label, reg = ROWS[i]
    ppl, acc = _metrics(i, method, task, seed, phi)
    ll = (-2.0 + 0.15 * i + rng.normal(0, 1.0, 40)).tolist()
    trained, is_si = method != "base", method.startswith("hlora")
    others = [t for t in TASKS if t != task]
    return cell(
        method, task, seed, acc, ppl, label=label, regularizer=reg, main=main,
        sweep=("phi", phi) if phi is not None else None, kl=0.0 if not trained else 0.01 * (9 - i) + 0.001 * seed,
        per_item={"acc": [int(x > -1.5) for x in ll], "acc_norm": [int(x > -1.6) for x in ll], "ll_gold": ll},
        transfer={t: {"acc": 0.70 - (0.01 * (8 - i) if trained else 0.0), "acc_norm": 0.7, "n": 200} for t in others},
        cost={"wall_seconds": 12.0 if trained else 0.0, "train_seconds": 10.0 if trained else 0.0,
              "eval_seconds": 2.0, "steps": 60 if trained else 0, "domain_tokens": 30720 if trained else 0,
              "general_tokens": 30720 if method in ("lora_nu_mu", "hlora") else 0,
              "extra_forward_tokens": 0},
        train_seconds=10.0 if trained else 0.0,
        importance_seconds=0.2 + 0.01 * seed if is_si else (30.0 + seed if method == "ewc_lora" else None),
        importance_bytes=1_000_000 if is_si else (8_000_000 if method == "ewc_lora" else None),
        importance_kind="si" if is_si else ("fisher" if method == "ewc_lora" else None),
        full_fisher_bytes=540_000_000 if method == "ewc_lora" else None,
        full_fisher_seconds=300.0 if method == "ewc_lora" else None,
        curve=_curve(i, method, rng) if trained else None, layer_norms=_layer_norms(rng) if is_si else None,
        config={"method": {"name": reg}}, git_commit="0123456789abcdef", versions={"torch": "2.x"},
    )  # fmt: skip


def _wise(src: dict, base: dict, alpha: float) -> dict:
    """WiSE-FT of the LoRA(ν+μ) cell: α scales the update, α = 1 is the source itself."""
    ppl = base["general_ppl"] + alpha * (src["general_ppl"] - base["general_ppl"]) - 0.8 * alpha * (1 - alpha)
    acc = base["acc"] + alpha * (src["acc"] - base["acc"])
    return dict(src, cell=f"{WISE[0]}-{src['task']}-s{src['seed']}-a{alpha}", method=WISE[0], label=WISE[1],
                regularizer=WISE[2], sweep={"param": "alpha", "value": alpha}, main=alpha == 1.0,
                general_ppl=ppl, acc=acc, general_kl=alpha**2 * src["general_kl"])  # fmt: skip


def make_results(rows=ROW_IDS, sweep=True, wise=False) -> list[dict]:
    rng = np.random.default_rng(0)
    recs = []
    for t in TASKS:
        for i, (m, _, _) in enumerate(ROWS):
            if m not in rows:
                continue
            for s in SEEDS:
                recs.append(_record(i, t, s, rng, phi=1e-3 if m.startswith("hlora") and m != ROW_IDS[-1] else None))
        if sweep and "hlora" in rows:
            hl = ROW_IDS.index("hlora")
            recs += [_record(hl, t, s, rng, phi=phi, main=False) for phi in HLORA_PHIS for s in SEEDS]
        if wise:
            for s in SEEDS:
                src = next(r for r in recs if r["method"] == "lora_nu_mu" and r["task"] == t and r["seed"] == s)
                base = next(r for r in recs if r["method"] == "base" and r["task"] == t and r["seed"] == s)
                recs += [_wise(src, base, a) for a in WISE_ALPHAS]
    return recs


def to_old_format(rec: dict) -> dict:
    """The same record as the runner wrote it before sweeps were general: `sweep: bool`, `phi`."""
    old = {k: v for k, v in rec.items() if k not in ("cell", "label", "regularizer", "main", "general_kl", "transfer",
                                                     "cost")}  # fmt: skip
    old["phi"] = rec["sweep"]["value"] if rec["sweep"] else None
    old["sweep"] = not rec["main"]
    return old


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


BATTERY_TASKS = ("arc_challenge", "boolq", "commonsense_qa", "siqa", "copa", "winogrande")


def battery_acc(rec: dict) -> float:
    """The battery mean a synthetic v2 record gets: lower the further from Base (KL), a little per seed (by
    how much depends on the row, so that paired differences vary over seeds)."""
    m, s = rec["method"], rec["seed"]
    return 0.55 - 2.0 * (rec.get("general_kl") or 0.0) - 0.004 * s * (1 + len(m) % 3) + 0.001 * len(m)


def to_new_format(rec: dict) -> dict:
    """The same record as the runner writes it now (record_version 2): general_* on C4, both texts by name,
    the battery, stage μ's lr."""
    new = dict(rec)
    c4, wiki = 1.4 * rec["general_ppl"], rec["general_ppl"]
    kl = rec.get("general_kl")
    acc = battery_acc(rec)
    new.update(
        record_version=2, general_eval="c4", general_ppl=c4, general_word_ppl=2 * c4, general_bpb=math.log2(c4) / 4,
        lr=None if rec["method"] == "base" else 2e-4,
        texts={"c4": {"ppl": c4, "word_ppl": 2 * c4, "bpb": math.log2(c4) / 4, "kl": kl, "n_tokens": 4096,
                      "stage_nu_text": False},
               "wikitext": {"ppl": wiki, "word_ppl": 2 * wiki, "bpb": math.log2(wiki) / 4,
                            "kl": None if kl is None else kl / 2, "n_tokens": 4096, "stage_nu_text": True}},
        battery={"acc": acc, "acc_stderr": 0.01,
                 "tasks": {t: {"acc": acc, "acc_norm": acc, "n": 50, "metrics": {"acc": acc}} for t in BATTERY_TASKS},
                 "per_item": {t: [1] * int(50 * acc) + [0] * (50 - int(50 * acc)) for t in BATTERY_TASKS}},
    )  # fmt: skip
    return new


# Letter analysis by hand (MedMCQA, letters A–D): 8 items, gold A A A B B C C D. Each model's log-likelihoods
# are -2 everywhere, +1 on the letter it "knows" (SIGNAL) and + its letter prior (PRIOR, on every item).
LETTER_GOLD = [0, 0, 0, 1, 1, 2, 2, 3]
LETTER_SIGNAL = [0, 0, 1, 1, 1, 2, 3, 3]  # right on 6 of 8 items (wrong on items 3 and 7)
LETTER_WRONG = [1, 2, 3, 0, 2, 3, 0, 1]  # right on none


def letter_ll(signal: list[int], prior: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)) -> list[list[float]]:
    return [[-2.0 + prior[j] + (1.0 if j == s else 0.0) for j in range(4)] for s in signal]


def letter_cell(method: str, signal: list[int], prior=(0.0, 0.0, 0.0, 0.0), task="medmcqa", seed=0, **kw) -> dict:
    """A cell tuned on `task` whose MedMCQA items (its own, or its transfer entry) come from signal and prior."""
    ll = letter_ll(signal, prior)
    pred = [max(range(4), key=lambda j: x[j]) for x in ll]
    acc = sum(p == g for p, g in zip(pred, LETTER_GOLD)) / len(pred)
    items = {"pred": pred, "gold": LETTER_GOLD, "ll": ll}
    if task == "medmcqa":
        return cell(method, task, seed, acc, 30.0, per_item={"acc": [int(p == g) for p, g in zip(pred, LETTER_GOLD)],
                                                             **items}, **kw)  # fmt: skip
    return cell(method, task, seed, 0.8, 30.0, transfer={"medmcqa": {"acc": acc, "acc_norm": acc, "n": 8, **items}},
                **kw)  # fmt: skip
