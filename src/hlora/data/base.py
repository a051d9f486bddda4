"""Task data types and the task protocol. Tasks are data (templates over records), not code paths."""
from __future__ import annotations

from dataclasses import dataclass
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

    def requests(self) -> list[tuple[str, str]]:
        """One (context, continuation) request per choice."""
        return [(self.context, self.delimiter + ch) for ch in self.choices]

    def norm_lengths(self) -> list[int]:
        """acc_norm's divisor per choice: its length in characters (an empty choice counts 1)."""
        return [max(len(ch), 1) for ch in self.choices]


@dataclass(frozen=True)
class PartialItem:
    """lm-eval's partial scoring (WinoGrande): one continuation scored after each of several contexts.

    The request for option i is (contexts[i], delimiter + continuation); the prediction is the context
    under which the shared continuation is most likely. The continuation is the same for every option,
    so acc_norm equals acc (lm-eval reports acc only)."""

    id: str
    contexts: tuple[str, ...]
    continuation: str
    gold: int
    delimiter: str = " "

    @property
    def choices(self) -> tuple[str, ...]:  # what an option is: its context
        return self.contexts

    @property
    def train_text(self) -> str:
        return self.contexts[self.gold] + self.delimiter + self.continuation

    def requests(self) -> list[tuple[str, str]]:
        return [(ctx, self.delimiter + self.continuation) for ctx in self.contexts]

    def norm_lengths(self) -> list[int]:
        return [max(len(self.continuation), 1)] * len(self.contexts)


@dataclass
class Task(Protocol):
    name: str
    kind: str  # "mcq" | "text"

    def eval_items(self, limit: int = 0) -> list[MCQItem | PartialItem]:
        """Held-out multiple-choice items (kind == "mcq")."""

    def eval_texts(self) -> list[str]:
        """Held-out documents for perplexity (kind == "text")."""

    def train_texts(self, limit: int = 0) -> list[str]:
        """Training texts: general documents, or prompt + " " + answer for MCQ tasks."""

    def describe(self) -> dict:
        """Where the data came from and how it was split (recorded in outputs)."""
