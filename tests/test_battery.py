"""The zero-shot battery and C4: each llm-foundry record becomes lm-eval's prompt (written out here from
lm-eval's task templates), WinoGrande's partial scoring scores the shared continuation after each context
(checked against a hand computation on a tiny model), and a task group reports the unweighted mean."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hlora.data import DataError, get_task
from hlora.data.base import MCQItem, PartialItem
from hlora.data.tasks import TASK_GROUPS, expand_tasks, group_results
from hlora.evaluate import evaluate_mcq
from hlora.tiny import tiny_model, tiny_tokenizer

RECORDS = {
    "arc_challenge": [{"query": "Question: Which gas do plants absorb?", "choices": ["oxygen", "carbon dioxide"],
                       "gold": 1}],
    "boolq": [{"query": "Passage: Water boils at 100 C at sea level.\nQuestion: does water boil at 100 c?",
               "choices": ["no", "yes"], "gold": 1}],
    "commonsense_qa": [{"query": "Question: Where are books sold?\nChoices:\nA. bank\nB. bookstore\nC. mall\n"
                                 "D. zoo\nAnswer:", "choices": ["A", "B", "C", "D"], "gold": 1}],
    "siqa": [{"query": "Context: Tracy stayed out late.\nQuestion: How would Tracy feel?\nChoices:\nA. tired\n"
                       "B. rested\nAnswer:", "choices": ["A", "B"], "gold": 0}],
    "copa": [{"query": "The man turned on the faucet, therefore", "choices": ["the toilet filled.", "water flowed."],
              "gold": 1}],
    "winogrande": [{"context_options": ["Sarah was a better surgeon than Maria so Sarah",
                                        "Sarah was a better surgeon than Maria so Maria"],
                    "continuation": "always got the harder cases.", "gold": 0}],
}


@pytest.fixture
def battery_root(tmp_path, monkeypatch):
    (tmp_path / "battery").mkdir()
    for name, rows in RECORDS.items():
        (tmp_path / "battery" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "validation.jsonl").write_text(
        json.dumps({"text": "Web text one.", "url": "u"}) + "\n" + json.dumps({"text": "Two."}) + "\n")
    monkeypatch.setenv("HLORA_DATA", str(tmp_path))
    return tmp_path


def test_templates_are_lm_evals_prompts(battery_root):
    def first(name):
        return get_task(name).eval_items()[0]

    it = first("arc_challenge")  # lm-eval arc: "Question: {question}\nAnswer:", " " + choice text
    assert it.requests() == [("Question: Which gas do plants absorb?\nAnswer:", " oxygen"),
                             ("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide")]
    it = first("boolq")  # super_glue/boolq: "{passage}\nQuestion: {question}?\nAnswer:", no / yes
    assert it.context == "Water boils at 100 C at sea level.\nQuestion: does water boil at 100 c?\nAnswer:"
    assert it.choices == ("no", "yes") and it.gold == 1
    it = first("commonsense_qa")  # "Question: {q}\nA. ..\nAnswer:", letters
    assert it.context == "Question: Where are books sold?\nA. bank\nB. bookstore\nC. mall\nD. zoo\nAnswer:"
    assert it.requests()[1] == (it.context, " B")
    it = first("siqa")  # social_iqa: "Q: {context} {question}\nA:", the answers' text
    assert it.context == "Q: Tracy stayed out late. How would Tracy feel?\nA:"
    assert it.choices == ("tired", "rested") and it.gold == 0
    it = first("copa")
    assert it.requests() == [("The man turned on the faucet, therefore", " the toilet filled."),
                             ("The man turned on the faucet, therefore", " water flowed.")]
    it = first("winogrande")  # partial scoring: the shared continuation after each context
    assert isinstance(it, PartialItem)
    assert it.requests() == [("Sarah was a better surgeon than Maria so Sarah", " always got the harder cases."),
                             ("Sarah was a better surgeon than Maria so Maria", " always got the harder cases.")]
    assert it.train_text == "Sarah was a better surgeon than Maria so Sarah always got the harder cases."
    assert get_task("boolq").metrics == ("acc",) and get_task("arc_challenge").metrics == ("acc", "acc_norm")


def test_battery_is_evaluation_only_and_names_bad_records(battery_root):
    with pytest.raises(DataError, match="split 'train' unknown"):
        get_task("copa").train_items()
    with pytest.raises(DataError, match="evaluation only"):
        get_task("c4").train_texts()
    assert get_task("c4").eval_texts() == ["Web text one.", "Two."]
    (battery_root / "battery" / "siqa.jsonl").write_text(json.dumps({"query": "no layout", "choices": ["A"],
                                                                     "gold": 0}) + "\n")
    with pytest.raises(DataError, match=r"siqa\.jsonl:1: field 'query'"):
        get_task("siqa").eval_items()
    (battery_root / "battery" / "winogrande.jsonl").write_text(json.dumps({"context_options": ["a"],
                                                                           "continuation": "b", "gold": 0}) + "\n")
    with pytest.raises(DataError, match=r"winogrande\.jsonl:1: field 'context_options'"):
        get_task("winogrande").eval_items()
    with pytest.raises(DataError, match="task group"):
        get_task("battery")


def test_groups_expand_in_place_and_average():
    assert expand_tasks(["sciq", "battery", "copa", "c4"]) == ["sciq", *TASK_GROUPS["battery"], "c4"]
    res = {t: {"acc": 0.1 * (i + 1), "acc_stderr": 0.01, "acc_norm": 0.5, "n": 10}
           for i, t in enumerate(TASK_GROUPS["battery"])}
    g = group_results(res)["battery"]
    assert g["acc"] == pytest.approx(sum(0.1 * (i + 1) for i in range(6)) / 6)
    assert g["acc_stderr"] == pytest.approx(math.sqrt(6 * 0.01 ** 2) / 6)
    assert g["acc_norm_tasks"] == ["arc_challenge"] and g["n"] == 60  # lm-eval reports acc_norm for ARC only
    assert group_results({k: v for k, v in res.items() if k != "copa"}) == {}  # incomplete: no mean


@torch.no_grad()
def _hand_ll(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from one unpadded forward (lm-eval's encoding: ctx, whole[len(ctx):])."""
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    lp = F.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_partial_scoring_matches_hand_computation(arch):
    tok, model = tiny_tokenizer(), tiny_model(arch)
    items = [
        PartialItem("w0", ("The trophy did not fit the case because the trophy",
                           "The trophy did not fit the case because the case"), "was too big.", gold=0),
        PartialItem("w1", ("Ann thanked Mary because Ann", "Ann thanked Mary because Mary", "Ann thanked Mary so"),
                    "had helped her.", gold=1),
    ]
    # mixed with ordinary items in one call: both request shapes go through the same engine
    mcq = MCQItem("m", "Question: What boils?\nAnswer:", ("water", "stone"), gold=0)
    r = evaluate_mcq(model, tok, [items[0], mcq, items[1]], batch_size=2, progress=False)
    per = r["per_item"]
    for k, it in zip((0, 2), items):
        hand = [_hand_ll(model, tok, c, " " + it.continuation) for c in it.contexts]
        assert per["ll"][k] == pytest.approx(hand, abs=1e-5)
        pred = max(range(len(hand)), key=lambda j: (hand[j], -j))
        assert per["pred"][k] == pred and per["acc"][k] == int(pred == it.gold)
        assert per["acc_norm"][k] == per["acc"][k]  # one shared continuation: per-character norm changes nothing
    assert per["ll"][1] == pytest.approx([_hand_ll(model, tok, mcq.context, " " + c) for c in mcq.choices], abs=1e-5)
