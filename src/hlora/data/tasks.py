"""The task registry: built-in tasks (sciq, piqa, medmcqa, the zero-shot battery, wikitext, c4), task groups
(`battery`) and the generic `text:FILE` and `mcq:FILE`. All multiple-choice tasks share one class; they
differ only in a template (data).

Prompts follow lm-evaluation-harness 0.4.x (tasks/sciq, piqa, medmcqa, arc, super_glue/boolq, commonsense_qa,
siqa, super_glue/copa, winogrande): the model scores (context, " " + choice) and acc_norm divides by
len(choice). The battery files are llm-foundry's local eval copies (query / choices / gold); each template
turns one back into lm-eval's prompt where the record holds what that needs (arc, boolq, copa, winogrande
exactly; commonsense_qa with the four options llm-foundry kept, siqa with its two). WinoGrande is lm-eval's
partial scoring: the shared continuation after each of two contexts (`PartialItem`).
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field as dfield
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

from ..assets import AssetError, find_data
from ..util import did_you_mean
from .base import DataError, MCQItem, PartialItem
from .jsonl import field, read_jsonl, sha256_file

# ------------------------------------------------------------------ templates (lm-eval's, as data)


def _sciq(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    ctx = f"{field(path, ln, d, 'support').lstrip()}\nQuestion: {field(path, ln, d, 'question')}\nAnswer:"
    ch = [field(path, ln, d, k) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return ctx, ch, 3


def _piqa(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    ctx = f"Question: {field(path, ln, d, 'goal')}\nAnswer:"
    return ctx, [field(path, ln, d, "sol1"), field(path, ln, d, "sol2")], field(path, ln, d, "label", int)


def _medmcqa(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    opts = [field(path, ln, d, k) for k in ("opa", "opb", "opc", "opd")]
    ctx = f"Question: {field(path, ln, d, 'question')}\nChoices:\n"
    ctx += "".join(f"{letter}. {opt}\n" for letter, opt in zip("ABCD", opts)) + "Answer:"
    cop = field(path, ln, d, "cop", int)  # 1-based in the raw MedMCQA release (the HF copy is 0-based)
    if not 1 <= cop <= 4:
        raise DataError(f"{path}:{ln}: field 'cop' must be 1..4 (1-based), got {cop}")
    return ctx, ["A", "B", "C", "D"], cop - 1


def _query(path: Path, ln: int, d: dict) -> str:
    return field(path, ln, d, "query")


def _choices_gold(path: Path, ln: int, d: dict) -> tuple[list[str], int]:
    choices = field(path, ln, d, "choices", list)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{path}:{ln}: field 'choices' must be a non-empty list of strings")
    return choices, field(path, ln, d, "gold", int)


def _prefixed(path: Path, ln: int, text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise DataError(f"{path}:{ln}: field 'query' should start with {prefix!r}")
    return text[len(prefix):]


def _arc(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    # lm-eval arc_challenge: "Question: {question}\nAnswer:"; llm-foundry's query is "Question: {question}"
    q = _prefixed(path, ln, _query(path, ln, d), "Question: ")
    return f"Question: {q}\nAnswer:", *_choices_gold(path, ln, d)


def _boolq(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    # lm-eval super_glue/boolq: "{passage}\nQuestion: {question}?\nAnswer:", choices no / yes;
    # llm-foundry's query is "Passage: {passage}\nQuestion: {question}?"
    body = _prefixed(path, ln, _query(path, ln, d), "Passage: ")
    return f"{body}\nAnswer:", *_choices_gold(path, ln, d)


_LETTERED = re.compile(r"^Question: (?P<q>.*)\nChoices:\n(?P<opts>(?:[A-Z]\. .*\n)+)Answer:$", re.S)
_SIQA = re.compile(r"^Context: (?P<c>.*)\nQuestion: (?P<q>.*)\nChoices:\n(?P<opts>(?:[A-Z]\. .*\n)+)Answer:$", re.S)


def _match(path: Path, ln: int, pattern: re.Pattern, text: str) -> re.Match:
    m = pattern.match(text)
    if not m:
        raise DataError(f"{path}:{ln}: field 'query' does not have the expected lettered layout")
    return m


def _commonsense_qa(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    # lm-eval commonsense_qa: "Question: {q}\nA. {a}\n...\nAnswer:", choices the letters (llm-foundry keeps
    # four of the five options and adds a "Choices:" line, dropped here)
    m = _match(path, ln, _LETTERED, _query(path, ln, d))
    choices, gold = _choices_gold(path, ln, d)
    return f"Question: {m['q'].strip()}\n{m['opts']}Answer:", choices, gold


def _siqa(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    # lm-eval social_iqa: "Q: {context} {question}\nA:", choices the answers' text (llm-foundry keeps two
    # of the three answers, lettered; the letters are dropped here)
    m = _match(path, ln, _SIQA, _query(path, ln, d))
    opts = [line[3:] for line in m["opts"].splitlines()]
    _, gold = _choices_gold(path, ln, d)
    return f"Q: {m['c']} {m['q']}\nA:", opts, gold


def _copa(path: Path, ln: int, d: dict) -> tuple[str, list[str], int]:
    # lm-eval super_glue/copa: premise without its final stop + " because" / " therefore", choices with a
    # lower-case first letter: llm-foundry's records are exactly that
    return _query(path, ln, d), *_choices_gold(path, ln, d)


def _winogrande(path: Path, ln: int, d: dict) -> tuple[tuple[str, ...], str, int]:
    # lm-eval winogrande: partial scoring, contexts sentence[:blank] + option, continuation after the blank
    ctxs = field(path, ln, d, "context_options", list)
    if len(ctxs) < 2 or not all(isinstance(c, str) for c in ctxs):
        raise DataError(f"{path}:{ln}: field 'context_options' must list two or more strings")
    return tuple(ctxs), field(path, ln, d, "continuation"), field(path, ln, d, "gold", int)


@dataclass
class MCQTemplate:
    parse: Callable[[Path, int, dict], tuple]
    files: dict[str, str]  # split -> path relative to the data root
    # Labelled files without a train split are split here: (file split name, eval fraction).
    split_from: str = ""
    eval_fraction: float = 0.5
    id_field: str = ""
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # what lm-eval reports for the task
    partial: bool = False  # parse returns (contexts, continuation, gold): lm-eval's partial scoring


BUILTIN_MCQ = {
    "sciq": MCQTemplate(_sciq, {"train": "sciq/train.jsonl", "validation": "sciq/validation.jsonl",
                                "test": "sciq/test.jsonl", "eval": "sciq/test.jsonl"}),
    "piqa": MCQTemplate(_piqa, {"all": "piqa/validation.jsonl"}, split_from="all"),
    "medmcqa": MCQTemplate(_medmcqa, {"all": "medmcqa/dev.jsonl"}, split_from="all", id_field="id"),
    # The zero-shot battery: evaluation only (no stage trains on it), items in file order (lm-eval's --limit).
    "arc_challenge": MCQTemplate(_arc, {"eval": "battery/arc_challenge.jsonl"}),
    "boolq": MCQTemplate(_boolq, {"eval": "battery/boolq.jsonl"}, metrics=("acc",)),
    "commonsense_qa": MCQTemplate(_commonsense_qa, {"eval": "battery/commonsense_qa.jsonl"}, metrics=("acc",)),
    "siqa": MCQTemplate(_siqa, {"eval": "battery/siqa.jsonl"}, metrics=("acc",)),
    "copa": MCQTemplate(_copa, {"eval": "battery/copa.jsonl"}, metrics=("acc",)),
    "winogrande": MCQTemplate(_winogrande, {"eval": "battery/winogrande.jsonl"}, metrics=("acc",), partial=True),
}
BUILTIN_TEXT = {
    "wikitext": {"train": "wikitext-2-raw/validation.jsonl", "eval": "wikitext-2-raw/test.jsonl"},
    "c4": {"eval": "c4/validation.jsonl"},  # web text that no stage trains on: evaluation only
}
# A group stands for its tasks in a task list; results add the unweighted mean of their accuracies.
TASK_GROUPS = {"battery": ("arc_challenge", "boolq", "commonsense_qa", "siqa", "copa", "winogrande")}
SPLIT_SEED = 1234  # fixed: the train/eval split of PIQA and MedMCQA never depends on the run's seed


def _generic_mcq_parser(opts: dict) -> Callable:
    ctx_f = tuple(opts["context"].split("|")) if "context" in opts else ("context", "query", "question")
    ch_f = opts.get("choices", "choices")
    gold_f = tuple(opts["gold"].split("|")) if "gold" in opts else ("gold", "answer", "label")
    template = opts.get("template", "{context}").replace("\\n", "\n")

    def parse(path: Path, ln: int, d: dict):
        ctx = field(path, ln, d, ctx_f)
        choices = field(path, ln, d, ch_f, list)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path}:{ln}: field {ch_f!r} must be a non-empty list of strings")
        gold = field(path, ln, d, gold_f, int)
        return template.replace("{context}", ctx), choices, gold

    return parse


@dataclass
class MCQTask:
    name: str
    template: MCQTemplate
    data_root: Path | None = None
    eval_split: str = "eval"
    kind: str = "mcq"
    _cache: dict = dfield(default_factory=dict, repr=False)

    def _path(self, split: str) -> Path:
        rel = self.template.files[split]
        if Path(rel).is_absolute():
            return Path(rel)
        return find_data(rel, [self.data_root] if self.data_root else None)

    def _load(self, split: str) -> list[MCQItem]:
        if split in self._cache:
            return self._cache[split]
        t = self.template
        if t.split_from:
            if split not in ("train", "eval", "all"):
                raise DataError(f"task {self.name}: split {split!r} unknown; use train, eval or all")
            items = self._parse(self._path(t.split_from))
            if split != "all":
                order = list(range(len(items)))
                random.Random(SPLIT_SEED).shuffle(order)
                n_eval = int(round(len(items) * t.eval_fraction))
                chosen = sorted(order[:n_eval]) if split == "eval" else sorted(order[n_eval:])
                items = [items[i] for i in chosen]
        else:
            if split not in t.files:
                raise DataError(f"task {self.name}: split {split!r} unknown; known: {', '.join(t.files)}")
            items = self._parse(self._path(split))
        self._cache[split] = items
        return items

    def _parse(self, path: Path) -> list[MCQItem | PartialItem]:
        items = []
        for ln, d in read_jsonl(path):
            ctx, choices, gold = self.template.parse(path, ln, d)
            n = len(ctx) if self.template.partial else len(choices)
            if not 0 <= gold < n:
                raise DataError(f"{path}:{ln}: answer index {gold} out of range for {n} choices")
            iid = str(d.get(self.template.id_field, "")) if self.template.id_field else ""
            iid = iid or f"{path.stem}:{ln}"
            if self.template.partial:
                items.append(PartialItem(id=iid, contexts=tuple(ctx), continuation=choices, gold=gold))
            else:
                items.append(MCQItem(id=iid, context=ctx, choices=tuple(choices), gold=gold))
        return items

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.template.metrics

    def eval_items(self, limit: int = 0) -> list[MCQItem | PartialItem]:
        items = self._load(self.eval_split)
        return items[:limit] if limit else items

    def train_items(self, limit: int = 0) -> list[MCQItem]:
        items = self._load("train")
        return items[:limit] if limit else items

    def train_texts(self, limit: int = 0) -> list[str]:
        return [it.train_text for it in self.train_items(limit)]

    def eval_texts(self) -> list[str]:
        return [it.train_text for it in self.eval_items()]

    def describe(self) -> dict:
        t = self.template
        files = {s: self._path(s) for s in t.files}
        out = {"task": self.name, "eval_split": self.eval_split,
               "files": {s: str(p.name) for s, p in files.items()},
               "sha256": {s: sha256_file(p)[:16] for s, p in files.items()}}
        if t.split_from:
            out.update(split_seed=SPLIT_SEED, eval_fraction=t.eval_fraction,
                       n_train=len(self._load("train")), n_eval=len(self._load("eval")),
                       eval_ids_head=[it.id for it in self._load("eval")[:5]])
        return out


@dataclass
class TextTask:
    """General text: JSONL with a `text` field, or plain .txt (one document)."""

    name: str
    files: dict[str, str]
    data_root: Path | None = None
    text_field: str = "text"
    kind: str = "text"

    def _path(self, split: str) -> Path:
        if split not in self.files:
            raise DataError(f"task {self.name} has no {split!r} split (it has {', '.join(self.files)}): "
                            f"{'it is held-out text, for evaluation only' if split == 'train' else 'pick another'}")
        rel = self.files[split]
        return Path(rel) if Path(rel).is_absolute() else find_data(rel, [self.data_root] if self.data_root else None)

    def _docs(self, split: str) -> list[str]:
        p = self._path(split)
        if p.suffix == ".jsonl":
            docs = [field(p, ln, d, self.text_field) for ln, d in read_jsonl(p)]
        else:
            if not p.is_file():
                raise AssetError(f"data file not found: {p}")
            docs = [p.read_text(encoding="utf-8")]
        docs = [d for d in docs if d.strip()]
        if not docs:
            raise DataError(f"{p}: empty data set (no non-empty text)")
        return docs

    def train_texts(self, limit: int = 0) -> list[str]:
        docs = self._docs("train")
        return docs[:limit] if limit else docs

    def eval_texts(self) -> list[str]:
        return self._docs("eval")

    def eval_items(self, limit: int = 0) -> list[MCQItem]:
        raise DataError(f"task {self.name} is general text: it has perplexity, not multiple-choice items")

    def describe(self) -> dict:
        return {"task": self.name, "files": {s: self._path(s).name for s in self.files},
                "sha256": {s: sha256_file(self._path(s))[:16] for s in self.files}}


TASK_NAMES = sorted([*BUILTIN_MCQ, *BUILTIN_TEXT, *TASK_GROUPS, "text:FILE", "mcq:FILE"])


def expand_tasks(names) -> list[str]:
    """A task list with each group replaced by its tasks (in place, without duplicates)."""
    out: list[str] = []
    for name in names:
        for t in TASK_GROUPS.get(name, (name,)):
            if t not in out:
                out.append(t)
    return out


def mean_accuracy(results: list[dict]) -> tuple[float, float]:
    """Unweighted mean of the tasks' accuracies and its standard error from theirs (independent items)."""
    k = len(results)
    return (sum(r["acc"] for r in results) / k,
            math.sqrt(sum(r.get("acc_stderr", float("nan")) ** 2 for r in results)) / k)


def group_results(results: dict[str, dict]) -> dict[str, dict]:
    """For every group whose tasks all have results: the unweighted mean of their accuracies (and of acc_norm
    over the tasks for which lm-eval reports it), its standard error from the tasks' own, and the tasks."""
    out = {}
    for g, members in TASK_GROUPS.items():
        rs = [results.get(t) for t in members]
        if any(r is None or "acc" not in r for r in rs):
            continue
        acc, se = mean_accuracy(rs)
        entry = {"tasks": list(members), "acc": acc, "acc_stderr": se, "n": sum(r["n"] for r in rs)}
        normed = [r for t, r in zip(members, rs) if "acc_norm" in BUILTIN_MCQ[t].metrics]
        if normed:
            entry["acc_norm"] = sum(r["acc_norm"] for r in normed) / len(normed)
            entry["acc_norm_tasks"] = [t for t in members if "acc_norm" in BUILTIN_MCQ[t].metrics]
        out[g] = entry
    return out


def get_task(name: str, data_root: str | Path | None = None, eval_split: str = "eval"):
    """Resolve a task name: sciq | piqa | medmcqa | wikitext | text:FILE | mcq:FILE[?field=..&template=..].

    `sciq:validation` picks the evaluation split of a built-in task.
    """
    root = Path(data_root) if data_root else None
    kind, _, rest = name.partition(":")
    if kind in ("text", "mcq") and rest:
        file, _, query = rest.partition("?")
        opts = dict(parse_qsl(query, keep_blank_values=True))
        p = Path(file).expanduser()
        if not p.is_file():
            raise AssetError(f"data file not found: {p} (task {name!r})")
        if kind == "text":
            return TextTask(name, {"train": str(p.resolve()), "eval": str(p.resolve())},
                            text_field=opts.get("field", "text"))
        tmpl = MCQTemplate(_generic_mcq_parser(opts), {"train": str(p.resolve()), "eval": str(p.resolve())},
                           id_field=opts.get("id", ""))
        return MCQTask(name, tmpl)
    if kind in TASK_GROUPS:
        raise DataError(f"{name!r} is a task group ({', '.join(TASK_GROUPS[kind])}): expand it with expand_tasks")
    if kind in BUILTIN_MCQ:
        return MCQTask(kind, BUILTIN_MCQ[kind], root, rest or eval_split)
    if kind in BUILTIN_TEXT:
        return TextTask(kind, BUILTIN_TEXT[kind], root)
    raise DataError(f"unknown task {name!r}{did_you_mean(kind, [*BUILTIN_MCQ, *BUILTIN_TEXT, 'text', 'mcq'])}; "
                    f"known: {', '.join(TASK_NAMES)}")
