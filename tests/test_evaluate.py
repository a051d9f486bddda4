"""hlora.evaluate on tiny random models: log-likelihoods equal a hand computation from one unpadded
forward pass, the shared-context (KV cache) path equals the full path and runs each context and
each shared continuation prefix once, acc_norm divides by characters, perplexity equals lm-eval's
rolling windows computed by hand, KL to a reference (or the PEFT base) equals its formula, and
PEFT adapters are honoured."""
from __future__ import annotations

import copy
import importlib
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from hlora.data.base import MCQItem
from hlora.tiny import TINY_TARGETS, tiny_model, tiny_tokenizer

# The module, never the `hlora.evaluate` function that the package exports under the same name.
ev = importlib.import_module("hlora.evaluate")

ARCHS = ["tiny-llama", "tiny-gpt-neox", "tiny-gpt2"]
TOL = 1e-5

# Mixed lengths; a context shared by three continuations (of 1, 2 and several tokens); unshared
# contexts; a context with trailing whitespace; the empty context; continuations of one context
# that start alike (a shared prefix), and a repeated request.
REQUESTS = [
    ("The cell is the basic unit", " of life."),
    ("Question: What gas do plants absorb? Answer:", " carbon dioxide"),
    ("The cell is the basic unit", " x"),
    ("Heat makes metal ", "expand."),
    ("", "Water boils at one hundred degrees."),
    ("To open a jar,", " twist the lid. Heat makes metal expand. The mitochondria make energy."),
    ("The cell is the basic unit", " of energy in the mitochondria"),
    ("Mercury Venus  ", " Earth"),
    ("1", " 2"),
    ("Heat makes metal ", "expand in the sun."),
    ("Heat makes metal ", "expand."),
    ("To open a jar,", " twist the lid and pull."),
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def lm_eval_tokens(tok, context, continuation):
    """lm-eval's encoding written out independently of hlora.evaluate."""
    if context == "":
        return [tok.eos_token_id if tok.bos_token_id is None else tok.bos_token_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def hand_ll(model, ctx, cont):
    """log P(cont | ctx) and is_greedy from one unpadded forward of ctx + cont."""
    logits = model(torch.tensor([ctx + cont])).logits[0].float()
    lp = F.log_softmax(logits, dim=-1)
    pos = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    ll = sum(lp[p, t].item() for p, t in zip(pos, cont))
    greedy = all(lp[p].argmax().item() == t for p, t in zip(pos, cont))
    return ll, greedy


def test_encoding_follows_lm_eval(tok):
    enc = ev.encode_requests(tok, REQUESTS)
    for (c, x), got in zip(REQUESTS, enc):
        assert got == lm_eval_tokens(tok, c, x)
    ctx, cont = enc[3]  # trailing space moved to the continuation
    assert tok.decode(ctx) == "Heat makes metal" and tok.decode(cont) == " expand."
    assert enc[4][0] == [tok.bos_token_id]  # empty context -> the prefix token
    assert enc[0][0] == enc[2][0] == enc[6][0]  # shared context, same tokens


def test_encoding_with_a_bos_adding_tokenizer():
    """lm-eval 0.4.13 keeps the tokenizer's own special-token default (add_bos_token=None) but never
    doubles a BOS that the text already starts with; add_special_tokens=False drops it."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.bos_token_id)]
    )
    bos = tok.bos_token_id
    body = tok.encode("Heat makes", add_special_tokens=False)
    (ctx, cont), (ctx2, cont2), (ctx3, _) = ev.encode_requests(
        tok, [("Heat makes", " metal"), ("<|endoftext|>Heat makes", " metal"), ("", " metal")]
    )
    assert ctx == ctx2 == [bos] + body and cont == cont2 and bos not in cont
    assert ctx3 == [bos]
    (ctx4, cont4), = ev.encode_requests(tok, [("Heat makes", " metal")], add_special_tokens=False)
    assert ctx4 == body and cont4 == cont
    model = tiny_model("tiny-llama")
    (ll, _), = ev.loglikelihood(model, tok, [("Heat makes", " metal")], progress=False)
    assert ll == pytest.approx(hand_ll(model, ctx, cont)[0], abs=TOL)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_matches_hand_computation(model, tok, batch_size):
    hand = [hand_ll(model, *lm_eval_tokens(tok, c, x)) for c, x in REQUESTS]
    fast = ev.loglikelihood(model, tok, REQUESTS, batch_size=batch_size, progress=False)
    full = ev.loglikelihood_full(model, tok, REQUESTS, batch_size=batch_size, progress=False)
    for (h, hg), (a, ag), (b, bg) in zip(hand, fast, full):
        assert a == pytest.approx(h, abs=TOL)
        assert b == pytest.approx(h, abs=TOL)
        assert a == pytest.approx(b, abs=TOL)  # cached shared-context path == full path
        assert ag == hg == bg


def test_greedy_flag_true_for_argmax_continuation(model, tok):
    ctx = tok.encode("The cell is")
    with torch.no_grad():
        nxt = model(torch.tensor([ctx])).logits[0, -1].argmax().item()
    cont_text = tok.decode([nxt])
    if tok.encode("The cell is" + cont_text)[len(ctx):] != [nxt]:
        pytest.skip("argmax token does not round-trip through the tokenizer")
    (ll, greedy), = ev.loglikelihood(model, tok, [("The cell is", cont_text)], progress=False)
    assert greedy


def test_each_shared_context_runs_once(model, tok):
    calls = []

    def hook(_module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        calls.append((ids.shape, kwargs.get("past_key_values") is not None, bool((mask == 0).any())))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        ev.loglikelihood(model, tok, REQUESTS, batch_size=4, progress=False)
    finally:
        handle.remove()
    contexts = {tuple(c) for c, _ in ev.encode_requests(tok, REQUESTS)}
    ctx_calls = [c for c in calls if not c[1]]
    assert sum(shape[0] for shape, _, _ in ctx_calls) == len(contexts) < len(REQUESTS)
    assert any(padded for _, _, padded in ctx_calls)  # left padding was exercised
    assert any(past for _, past, _ in calls)  # continuations ran on the cache


def test_shared_continuation_prefix_runs_once(model, tok):
    """Tokens that all continuations of a context start with run once, with the context; each
    continuation pass then reads only the rest."""
    enc = ev.encode_requests(tok, REQUESTS)
    by_ctx = {}
    for c, x in enc:
        by_ctx.setdefault(tuple(c), []).append(x)
    rest, shared = set(), 0
    for c, xs in by_ctx.items():
        n = 0
        while len(xs) > 1 and all(len(x) > n + 1 and x[n] == xs[0][n] for x in xs):
            n += 1
        shared += n
        rest |= {(c, tuple(x[n:-1])) for x in xs if len(x) > n + 1}
    assert shared >= 3  # " twist the lid" and " expand" are shared
    ctx_tokens, cont_tokens = [], []

    def hook(_module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        real = int(mask[:, -ids.shape[1]:].sum())
        (cont_tokens if kwargs.get("past_key_values") is not None else ctx_tokens).append(real)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = ev.loglikelihood(model, tok, REQUESTS, batch_size=4, progress=False)
    finally:
        handle.remove()
    assert sum(ctx_tokens) == sum(len(c) for c in by_ctx) + shared
    assert sum(cont_tokens) == sum(len(r) for _, r in rest)
    assert got[3] == got[-2]  # a repeated request
    for (a, ag), (c, x) in zip(got, enc):
        h, hg = hand_ll(model, c, x)
        assert a == pytest.approx(h, abs=TOL) and ag == hg


# lm-eval's partial scoring (WinoGrande): one continuation after contexts that differ from the blank on; and
# one-request contexts that share too little to run as one.
PARTIAL = [
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the harder cases."),
    ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases."),
    ("The trophy does not fit in the suitcase because the trophy", " is too big."),
    ("The trophy does not fit in the suitcase because the suitcase", " is too big."),
    ("The trophy does not fit", " in the box"),
    ("Heat makes metal expand", "."),
    ("Water boils at one hundred degrees", " Celsius."),
]


def test_one_request_contexts_that_start_alike_share_their_prefix(model, tok):
    """Each pair's common prefix runs once in the context passes; the rest of each context runs in its
    continuation row, unscored; log-likelihoods equal the hand computation."""
    enc = ev.encode_requests(tok, PARTIAL)
    runs = ev.engine._contexts({tuple(c): [i] for i, (c, _) in enumerate(enc)}, enc)
    shared = sorted(sorted(c.requests) for c in runs if c.tails)
    assert [0, 1] in shared and any({2, 3} <= set(r) for r in shared)  # each pair runs as one
    assert not any(5 in r or 6 in r for r in shared)  # too little in common: on their own
    ctx_tokens = []

    def hook(_module, args, kwargs):
        if kwargs.get("past_key_values") is None:
            ctx_tokens.append(int(kwargs["attention_mask"].sum()))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = ev.loglikelihood(model, tok, PARTIAL, batch_size=4, progress=False)
    finally:
        handle.remove()
    assert sum(ctx_tokens) == sum(len(c.tokens) for c in runs) < sum(len(c) for c, _ in enc)
    for (a, ag), (c, x) in zip(got, enc):
        h, hg = hand_ll(model, c, x)
        assert a == pytest.approx(h, abs=TOL) and ag == hg
    full = ev.loglikelihood_full(model, tok, PARTIAL, progress=False)
    assert [g for _, g in got] == [g for _, g in full]


def test_packed_batches_minimise_padding_plus_passes(monkeypatch):
    lens = [40, 39, 38, 20, 19, 5, 5, 5, 1]
    monkeypatch.setattr(ev.batches, "FORWARD_COST", 10)
    got = ev._packed_batches(lens, int, 1, 200)
    assert got == [[40, 39, 38], [20, 19], [5, 5, 5, 1]]
    monkeypatch.setattr(ev.batches, "FORWARD_COST", 1000)  # as few passes as the size cap allows
    assert ev._packed_batches(lens, int, 1, 60) == [[40], [39], [38], [20, 19], [5, 5, 5, 1]]
    assert ev._packed_batches(lens, int, 9, 60) == [lens]  # `min_count` items fit whatever their size
    monkeypatch.setattr(ev.batches, "FORWARD_COST", 0)
    assert ev._packed_batches(lens, int, 1, 200) == [[40], [39], [38], [20], [19], [5, 5, 5], [1]]
    assert ev._packed_batches([], int, 1, 200) == []


@pytest.mark.parametrize("forward_cost", [0, 10_000])
def test_continuation_sub_batches_match_hand(model, tok, monkeypatch, forward_cost):
    """One continuation pass per distinct length (each on a copy of the context cache), or one for all."""
    monkeypatch.setattr(ev.batches, "FORWARD_COST", forward_cost)
    got = ev.loglikelihood(model, tok, REQUESTS, batch_size=4, progress=False)
    for (a, ag), (c, x) in zip(got, REQUESTS):
        h, hg = hand_ll(model, *lm_eval_tokens(tok, c, x))
        assert a == pytest.approx(h, abs=TOL) and ag == hg


def test_order_independent_of_batching(model, tok):
    a = ev.loglikelihood(model, tok, REQUESTS, batch_size=2, progress=False)
    b = ev.loglikelihood(model, tok, REQUESTS[::-1], batch_size=5, progress=False)[::-1]
    for (x, _), (y, _) in zip(a, b):
        assert x == pytest.approx(y, abs=TOL)


def test_truncation_falls_back_to_lm_eval_window(model, tok):
    L = 8
    reqs = [("The cell is the basic unit of life. Water boils", " at one hundred degrees."), ("1 2", " 3")]
    got = ev.loglikelihood(model, tok, reqs, max_length=L, progress=False)
    ref = ev.loglikelihood_full(model, tok, reqs, max_length=L, progress=False)
    ctx, cont = lm_eval_tokens(tok, *reqs[0])
    assert len(ctx) + len(cont) > L + 1
    window = (ctx + cont)[-(L + 1):]
    n_cont = min(len(cont), L)
    hand = hand_ll(model, window[:-n_cont], window[-n_cont:])
    assert got[0][0] == pytest.approx(hand[0], abs=TOL)
    assert ref[0][0] == pytest.approx(hand[0], abs=TOL)
    assert got[1][0] == pytest.approx(hand_ll(model, *lm_eval_tokens(tok, *reqs[1]))[0], abs=TOL)


def test_acc_norm_divides_by_characters(tok):
    model = tiny_model("tiny-llama")
    context = "Question: What gas do plants absorb?\nAnswer:"
    choices = ("x", "carbon dioxide and water")  # short choice wins on total, long one per character
    lls = [hand_ll(model, *lm_eval_tokens(tok, context, " " + ch))[0] for ch in choices]
    assert lls[0] > lls[1] and lls[0] / 1 < lls[1] / len(choices[1])  # the item is meaningful
    items = [
        MCQItem("a", context, choices, gold=1),
        MCQItem("b", context, choices, gold=0),
    ]
    r = ev.evaluate_mcq(model, tok, items, batch_size=2, progress=False)
    p = r["per_item"]
    assert p["acc"] == [0, 1] and p["acc_norm"] == [1, 0]
    assert p["pred"] == [0, 0] and p["pred_norm"] == [1, 1]
    assert r["acc"] == 0.5 and r["acc_norm"] == 0.5 and r["n"] == 2
    assert p["id"] == ["a", "b"] and p["ll_gold"] == [p["ll"][0][1], p["ll"][1][0]]
    for got, want in zip(p["ll"][0], lls):
        assert got == pytest.approx(want, abs=TOL)


def test_ties_pick_first_index():
    assert ev._argmax([1.0, 3.0, 3.0, 2.0]) == 1
    assert ev._argmax([-1.0, -1.0]) == 0


def hand_windows(tok, text, L):
    """lm-eval's rolling windows (context length 1) written out: (model input, targets) with the
    targets the last len(targets) predictions of a full-length forward pass over the input."""
    toks = tok.encode(text)
    pairs = [([tok.bos_token_id] + toks[:L][:-1], toks[:L])]
    for start in range(L, len(toks), L):
        end = min(start + L, len(toks))
        pairs.append((toks[end - L - 1:end - 1], toks[start:end]))
    return pairs


@torch.no_grad()
def hand_logprobs(model, inp, n):
    """log-softmax of the last n positions of one unpadded forward pass."""
    return F.log_softmax(model(torch.tensor([inp])).logits[0, -n:].float(), -1)


def hand_rolling_ll(model, tok, text, L):
    total = 0.0
    for inp, tgt in hand_windows(tok, text, L):
        lp = hand_logprobs(model, inp, len(tgt))
        total += sum(lp[i, t].item() for i, t in enumerate(tgt))
    return total


PPL_TEXTS = [
    "The cell is the basic unit of life. Water boils at one hundred degrees.",  # 44 tokens: 2.75 windows of 16
    "Heat makes metal expand.",  # shorter than a window
    "x",
    "Mercury Venus Earth Mars Jupiter Saturn protons neutrons electrons gravity friction. "
    "To open a jar, twist the lid.",
    "Photosynthesis converts light energy into chemical energy. " * 3,  # 96 tokens: 6 full windows
]


def test_rolling_windows_follow_lm_eval():
    toks = list(range(100, 123))  # 23 tokens, windows of 10: 10 + 10 + 3
    wins = ev.rolling_windows(toks, prefix=7, max_len=10)
    assert wins[0] == ([7], toks[:10])
    assert wins[1] == ([toks[9]], toks[10:20])  # a full window: one token of context
    assert wins[2] == (toks[12:20], toks[20:])  # the last, partial one reads a full window
    assert all(len(c) + len(t) - 1 <= 10 for c, t in wins)
    assert [x for _, t in wins for x in t] == toks
    assert ev.rolling_windows(toks[:4], 7, 10) == [([7], toks[:4])]
    assert ev.rolling_windows([], 7, 10) == []


def test_perplexity_is_lm_eval_rolling_loglikelihood(model, tok):
    """Per-document log-likelihoods equal full-length forward passes over lm-eval's rolling windows
    (the last partial window of a document keeps a full window of context)."""
    L = 16
    r = ev.perplexity(model, tok, PPL_TEXTS, window=L, batch_size=3, progress=False)
    counts = [len(tok.encode(t)) for t in PPL_TEXTS]
    assert counts[0] % L and counts[0] > 2 * L  # the first document ends in a partial window
    assert r["per_item"]["n_tokens"] == counts and r["n_tokens"] == sum(counts)
    assert r["n_words"] == sum(len(t.split()) for t in PPL_TEXTS)
    assert r["n_bytes"] == sum(len(t.encode("utf-8")) for t in PPL_TEXTS)
    hand = [hand_rolling_ll(model, tok, t, L) for t in PPL_TEXTS]
    for got, want in zip(r["per_item"]["nll"], hand):
        assert -got == pytest.approx(want, abs=TOL)
    nll = -sum(hand)
    assert r["nll"] == pytest.approx(nll, abs=TOL)
    assert r["token_ppl"] == pytest.approx(math.exp(nll / r["n_tokens"]), rel=1e-6)
    assert r["word_ppl"] == pytest.approx(math.exp(nll / r["n_words"]), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(nll / r["n_bytes"] / math.log(2), rel=1e-6)
    one = ev.perplexity(model, tok, PPL_TEXTS, window=L, batch_size=1, progress=False)
    for a, b in zip(one["per_item"]["nll"], r["per_item"]["nll"]):
        assert a == pytest.approx(b, abs=TOL)  # padding and batching change nothing


def test_perplexity_short_document_is_one_pass(model, tok):
    doc = PPL_TEXTS[0]
    toks = tok.encode(doc)
    lp = hand_logprobs(model, [tok.bos_token_id] + toks[:-1], len(toks))
    want = sum(lp[i, t].item() for i, t in enumerate(toks))
    r = ev.perplexity(model, tok, [doc], window=512, progress=False)  # clamped to the model's 256
    assert r["window"] == 256 and r["n_tokens"] == len(toks)
    assert -r["nll"] == pytest.approx(want, abs=TOL)


def test_perplexity_max_tokens(tok):
    model = tiny_model("tiny-gpt2")
    texts = ["The cell is the basic unit of life.", "Heat makes metal expand.", "Water boils."]
    first = len(tok.encode(texts[0]))
    r = ev.perplexity(model, tok, texts, window=4, max_tokens=first + 2, progress=False)
    assert r["n_tokens"] == first + 2 and r["n_docs"] == 2
    assert r["per_item"]["n_tokens"] == [first, 2]


def _peft(model, arch, seed=1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TINY_TARGETS[arch], init_lora_weights=False,
        fan_in_fan_out=arch == "tiny-gpt2", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_is_used_and_equals_merged(arch, tok):
    base = tiny_model(arch)
    base_ll = ev.loglikelihood(base, tok, REQUESTS, batch_size=3, progress=False)
    peft_model = _peft(copy.deepcopy(base), arch)
    peft_model.train()  # evaluation must switch dropout off and restore the mode afterwards
    got = ev.loglikelihood(peft_model, tok, REQUESTS, batch_size=3, progress=False)
    assert peft_model.training and all(m.training for m in peft_model.modules())
    full = ev.loglikelihood_full(peft_model, tok, REQUESTS, batch_size=3, progress=False)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, base_ll)) > 1e-3
    merged = copy.deepcopy(peft_model).merge_and_unload()
    want = ev.loglikelihood(merged, tok, REQUESTS, batch_size=3, progress=False)
    for (a, _), (b, _), (c, _) in zip(got, want, full):
        assert a == pytest.approx(b, abs=1e-4)
        assert a == pytest.approx(c, abs=TOL)


def hand_kl(model, ref_logprobs, tok, texts, L):
    """Mean over predicted tokens of Σ_v p_ref(v) (log p_ref(v) − log p(v)), two separate forwards."""
    total, n = 0.0, 0
    for text in texts:
        for inp, tgt in hand_windows(tok, text, L):
            lp, lr = hand_logprobs(model, inp, len(tgt)), ref_logprobs(inp, len(tgt))
            total += (lr.exp() * (lr - lp)).sum().item()
            n += len(tgt)
    return total / n, n


def test_kl_of_a_model_with_itself_is_zero(tok):
    model = tiny_model("tiny-gpt2")
    plain = ev.perplexity(model, tok, PPL_TEXTS, window=16, batch_size=3, progress=False)
    assert "kl" not in plain
    for ref in (model, copy.deepcopy(model)):
        r = ev.perplexity(model, tok, PPL_TEXTS, window=16, batch_size=3, progress=False, kl_reference=ref)
        assert r["kl"] == pytest.approx(0.0, abs=1e-7) and r["kl_tokens"] == r["n_tokens"]
        assert r["nll"] == plain["nll"]
    with pytest.raises(ValueError, match="PEFT"):
        ev.perplexity(model, tok, PPL_TEXTS, kl_reference="base", progress=False)
    with pytest.raises(ValueError, match="kl_reference"):
        ev.perplexity(model, tok, PPL_TEXTS, kl_reference="bsae", progress=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_kl_to_base_matches_explicit_formula(arch, tok):
    L = 16
    base = tiny_model(arch)
    base_copy = copy.deepcopy(base)
    peft_model = _peft(base, arch)
    peft_model.train()  # dropout must be off for both distributions

    def base_logprobs(inp, n):
        with peft_model.disable_adapter():
            return hand_logprobs(peft_model, inp, n)

    r = ev.perplexity(peft_model, tok, PPL_TEXTS, window=L, batch_size=3, progress=False, kl_reference="base")
    assert peft_model.training
    peft_model.eval()
    want, n = hand_kl(peft_model, base_logprobs, tok, PPL_TEXTS, L)
    assert want > 1e-3  # the adapter changes the distribution
    assert r["kl_tokens"] == n == r["n_tokens"]
    assert r["kl"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert sum(r["per_item"]["kl_sum"]) / n == pytest.approx(r["kl"], rel=1e-9)
    separate = ev.perplexity(peft_model, tok, PPL_TEXTS, window=L, batch_size=2, progress=False, kl_reference=base_copy)
    assert separate["kl"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert separate["nll"] == pytest.approx(r["nll"], abs=TOL)
    task = _Task("text-toy", "text", texts=PPL_TEXTS[:2])
    out = ev.evaluate(peft_model, tok, [task], ppl_window=L, progress=False, kl_reference="base")
    assert out["tasks"]["text-toy"]["kl"] > 0


def test_restores_mixed_train_eval_flags(tok):
    model = tiny_model("tiny-gpt-neox")
    model.train()
    model.gpt_neox.layers[0].eval()
    ev.loglikelihood(model, tok, REQUESTS[:2], progress=False)
    assert model.training and not model.gpt_neox.layers[0].training and model.gpt_neox.layers[1].training


class _Task:
    def __init__(self, name, kind, items=(), texts=()):
        self.name, self.kind, self._items, self._texts = name, kind, list(items), list(texts)

    def eval_items(self, limit=0):
        return self._items[:limit] if limit else self._items

    def eval_texts(self):
        return self._texts

    def describe(self):
        return {"name": self.name, "source": "test"}


def test_evaluate_tasks(tok, capfd):
    model = tiny_model("tiny-llama")
    items = [
        MCQItem(f"q{i}", f"Question: {q}\nAnswer:", ("energy", "carbon dioxide", "water"), gold=i % 3)
        for i, q in enumerate(["What gas do plants absorb?", "What do mitochondria make?", "What boils?"])
    ]
    tasks = [
        _Task("mcq-toy", "mcq", items=items),
        _Task("text-toy", "text", texts=["The cell is the basic unit of life.", "Heat makes metal expand."]),
    ]
    out = ev.evaluate(model, tok, tasks, limit=2, batch_size=2, ppl_window=4, progress=False)
    m, t = out["tasks"]["mcq-toy"], out["tasks"]["text-toy"]
    assert m["n"] == 2 and len(m["per_item"]["acc"]) == 2 and m["data"] == {"name": "mcq-toy", "source": "test"}
    assert 0 <= m["acc"] <= 1 and m["seconds"] >= 0
    assert t["n"] == 2 and t["n_tokens"] > 0 and t["token_ppl"] > 1 and t["seconds"] >= 0
    direct = ev.evaluate_mcq(model, tok, items[:2], progress=False)
    for got, want in zip(m["per_item"]["ll"], direct["per_item"]["ll"]):
        assert got == pytest.approx(want, abs=TOL)
    assert "loglikelihood" not in capfd.readouterr().err  # no progress bar when progress=False
    with pytest.raises(ValueError, match="unknown kind"):
        ev.evaluate(model, tok, [SimpleNamespace(name="bad", kind="audio")], progress=False)


def test_reference_cache_gives_the_same_kl_without_the_reference_forward(tok):
    """Inside reference_cache(), a second adapter of the same base on the same text reuses the base's logits:
    KL equal to the bit to an uncached run, no base forward; a changed base is computed again, not served stale."""
    from hlora.evaluate import engine

    peft_model = _peft(tiny_model("tiny-llama"), "tiny-llama")
    peft_model.eval()

    def ppl():
        return ev.perplexity(peft_model, tok, PPL_TEXTS, window=16, batch_size=3, progress=False, kl_reference="base")

    def other_adapter():
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05)

    def other_base():
        with torch.no_grad():
            next(p for n, p in peft_model.named_parameters() if "embed" in n).mul_(1.01)

    state = copy.deepcopy(peft_model.state_dict())
    plain = [ppl()]
    other_adapter()
    plain.append(ppl())
    other_base()
    plain.append(ppl())
    peft_model.load_state_dict(state)

    calls, real = [], engine._window_logits
    engine._window_logits = lambda m, *a: calls.append(1) or real(m, *a)
    try:
        with engine.reference_cache():
            cached, counts = [], []
            for change in (None, other_adapter, other_base):
                if change:
                    change()
                calls.clear()
                cached.append(ppl())
                counts.append(len(calls))
    finally:
        engine._window_logits = real
    for c, p in zip(cached, plain):
        assert c["kl"] == p["kl"] and c["nll"] == p["nll"]  # the cache changes no number
    assert plain[1]["kl"] != plain[0]["kl"] and plain[2]["kl"] != plain[1]["kl"]
    assert counts[0] == 2 * counts[1] and counts[2] == counts[0]  # model + base, model only, model + base again
    assert engine._REF_CACHE is None  # closed with its block
