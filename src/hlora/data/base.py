"""Task data types and the task protocol. Tasks are data (templates over records), not code paths."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass(frozen=True)
class MCQItem:
    """One multiple-choice item exactly as lm-evaluation-harness scores it.

    The request for choice i is (context, delimiter + choices[i]); acc_norm divides the
    log-likelihood by len(choices[i]) in characters (lm-eval: the choice without delimiter).
    """

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "

    @property
    def train_text(self) -> str:
        """Training text for a domain stage: prompt + " " + the right choice."""
        return self.context + self.delimiter + self.choices[self.gold]


@dataclass
class Task(Protocol):
    name: str
    kind: str  # "mcq" | "text"

    def eval_items(self, limit: int = 0) -> list[MCQItem]:
        """Held-out MCQ items (kind == "mcq")."""

    def eval_texts(self) -> list[str]:
        """Held-out documents for perplexity (kind == "text")."""

    def train_texts(self, limit: int = 0) -> list[str]:
        """Training texts: general documents, or prompt + " " + answer for MCQ tasks."""

    def describe(self) -> dict:
        """Where the data came from and how it was split (recorded in outputs)."""
