import json

import pytest

from hlora.assets import AssetError
from hlora.data import DataError, get_task
from hlora.data.packing import pack
from hlora.tiny import tiny_tokenizer


def test_sciq_template_matches_lm_eval(embedded_data):
    t = get_task("sciq")
    rec = json.loads((embedded_data / "sciq" / "test.jsonl").read_text().splitlines()[0])
    it = t.eval_items(1)[0]
    assert it.context == f"{rec['support'].lstrip()}\nQuestion: {rec['question']}\nAnswer:"
    assert it.choices == (rec["distractor1"], rec["distractor2"], rec["distractor3"], rec["correct_answer"])
    assert it.gold == 3 and it.delimiter == " "
    assert it.train_text == it.context + " " + rec["correct_answer"]
    assert len(t.eval_items()) == 200 and len(t.train_items()) == 400
    assert len(get_task("sciq:validation").eval_items()) == 100


def test_piqa_split_is_seeded_disjoint_and_recorded(embedded_data):
    t = get_task("piqa")
    ev, tr = t.eval_items(), t.train_items()
    assert len(ev) + len(tr) == 120 and {i.id for i in ev}.isdisjoint({i.id for i in tr})
    assert [i.id for i in get_task("piqa").eval_items()] == [i.id for i in ev]  # deterministic
    assert ev[0].context.startswith("Question: ") and ev[0].context.endswith("\nAnswer:")
    d = t.describe()
    assert d["split_seed"] and d["n_eval"] == len(ev)


def test_medmcqa_cop_is_one_based(tmp_path, monkeypatch):
    (tmp_path / "medmcqa").mkdir()
    rows = [{"question": f"q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1 + i % 4, "id": str(i)}
            for i in range(8)]
    (tmp_path / "medmcqa" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("HLORA_DATA", str(tmp_path))
    items = get_task("medmcqa").eval_items() + get_task("medmcqa").train_items()
    assert len(items) == 8
    for it in items:
        assert it.choices == ("A", "B", "C", "D")
        assert it.gold == int(it.id) % 4  # cop 1 -> index 0
        assert it.context == f"Question: q{it.id}?\nChoices:\nA. a\nB. b\nC. c\nD. d\nAnswer:"


def test_generic_mcq_and_text(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"question": "2+2=", "choices": ["3", "4"], "answer": 1}) + "\n")
    it = get_task(f"mcq:{f}").eval_items()[0]
    assert (it.context, it.choices, it.gold) == ("2+2=", ("3", "4"), 1)
    g = tmp_path / "n.jsonl"
    g.write_text(json.dumps({"q": "Sky?", "opts": ["blue", "red"], "ans": 0}) + "\n")
    it = get_task(f"mcq:{g}?context=q&choices=opts&gold=ans&template=Q: {{context}}\\nA:").eval_items()[0]
    assert (it.context, it.gold) == ("Q: Sky?\nA:", 0)
    txt = tmp_path / "t.txt"
    txt.write_text("hello world")
    assert get_task(f"text:{txt}").eval_texts() == ["hello world"]


@pytest.mark.parametrize(
    "content,needle",
    [
        ('{"question": "q", "choices": ["a"], "answer": 0}\n{bad json\n', ":2: malformed JSON"),
        ('{"choices": ["a", "b"], "answer": 0}\n', ":1: missing field 'context' or 'query' or 'question'"),
        ('{"question": "q", "choices": "ab", "answer": 0}\n', ":1: field 'choices' must be list"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}\n', ":1: answer index 2 out of range"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "1"}\n', ":1: field 'answer' must be int"),
        ("\n", "empty data set"),
    ],
)
def test_bad_mcq_files_name_file_and_line(tmp_path, content, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        get_task(f"mcq:{f}").eval_items()
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="did you mean 'sciq'"):
        get_task("scienceq")
    with pytest.raises(AssetError, match="not found"):
        get_task(f"mcq:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(AssetError, match="not found"):
        get_task("sciq", data_root=tmp_path).eval_items()


def test_packing_blocks_and_eos():
    tok = tiny_tokenizer()
    ds = pack(tok, ["The cell is the basic unit of life."] * 10, seq_len=16)
    assert ds.blocks.shape[1] == 16 and len(ds) >= 1
    assert (ds.blocks == tok.eos_token_id).any()
    row = ds[0]
    assert row["labels"].tolist() == row["input_ids"].tolist()
    with pytest.raises(DataError, match="less than one training sequence"):
        pack(tok, ["hi"], seq_len=512)
