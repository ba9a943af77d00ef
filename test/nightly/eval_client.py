"""Evaluation client for the nightly accuracy tests: prompt formatting, answer extraction, scoring, and a
small OpenAI-compatible chat client for a local SGLang server.

Pure functions are unit-tested on CPU (``test/srt/test_eval_client.py``); the network part only ever talks
to the server the nightly test started on 127.0.0.1.

Data files (no download at run time):
- GSM8K test set as JSON lines with ``question`` and ``answer`` (the reference after ``####``).
- GPQA-diamond as the dataset's CSV (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``).
"""

from __future__ import annotations

import csv
import json
import random
import re
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = [
    "GSM8K_INSTRUCTION",
    "GPQA_TEMPLATE",
    "normalize_number",
    "gsm8k_reference",
    "extract_gsm8k_answer",
    "gsm8k_messages",
    "load_gsm8k",
    "GPQAItem",
    "load_gpqa",
    "gpqa_shuffle",
    "gpqa_messages",
    "extract_choice",
    "accuracy",
    "mean_of_repeats",
    "ChatClient",
    "run_batch",
]

GSM8K_INSTRUCTION = (
    "Solve the following math problem step by step. "
    "Write the final answer as a plain number on the last line, after '####'."
)
# The simple-evals wording: reasoning first, the letter on a last line of its own.
GPQA_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step "
    "before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)
LETTERS = "ABCD"

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"3.0"`` -> ``"3"``, ``"-7"`` -> ``"-7"``; None if not a number."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", s):
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def gsm8k_reference(answer: str) -> str:
    """The reference number of a GSM8K ``answer`` field (the text after its last ``####``)."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####': {answer[-80:]!r}")
    value = normalize_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"GSM8K reference is not a number: {answer.rsplit('####', 1)[1]!r}")
    return value


def extract_gsm8k_answer(text: str) -> str | None:
    """The model's final number: after the last ``####``, else in the last ``\\boxed{}``, else after the
    last "answer is", else the last number in the text; None when there is no number at all."""
    if "####" in text:
        m = re.search(_NUMBER, text.rsplit("####", 1)[1])
        if m:
            return normalize_number(m.group(0))
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        m = re.search(_NUMBER, boxed[-1])
        if m:
            return normalize_number(m.group(0))
    said = re.split(r"(?i)answer is", text)
    if len(said) > 1:
        m = re.search(_NUMBER, said[-1])
        if m:
            return normalize_number(m.group(0))
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{GSM8K_INSTRUCTION}\n\n{question.strip()}"}]


def load_gsm8k(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``[(question, reference number)]`` from a GSM8K JSON-lines file."""
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                items.append((row["question"], gsm8k_reference(row["answer"])))
    return items[:limit] if limit else items


@dataclass(frozen=True)
class GPQAItem:
    question: str
    correct: str
    incorrect: tuple[str, str, str]


def load_gpqa(path: str) -> list[GPQAItem]:
    """GPQA rows from the dataset's CSV (198 rows for the diamond subset)."""
    with open(path, encoding="utf-8", newline="") as f:
        return [
            GPQAItem(
                row["Question"].strip(),
                row["Correct Answer"].strip(),
                (
                    row["Incorrect Answer 1"].strip(),
                    row["Incorrect Answer 2"].strip(),
                    row["Incorrect Answer 3"].strip(),
                ),
            )
            for row in csv.DictReader(f)
        ]


def gpqa_shuffle(item: GPQAItem, seed: int) -> tuple[dict[str, str], str]:
    """The four options under letters A-D in an order fixed by ``seed``, and the correct letter."""
    options = [item.correct, *item.incorrect]
    order = list(range(4))
    random.Random(seed).shuffle(order)
    choices = {LETTERS[i]: options[j] for i, j in enumerate(order)}
    return choices, LETTERS[order.index(0)]


def gpqa_messages(item: GPQAItem, choices: dict[str, str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": GPQA_TEMPLATE.format(question=item.question, **choices)}]


def extract_choice(text: str) -> str | None:
    """The letter of the last ``Answer: X`` (also ``**Answer:** (X)``, ``\\boxed{X}``); None if absent."""
    found = re.findall(r"(?i)answer\s*[:：]\s*\**\s*\(?\s*([A-D])\b", text)
    if found:
        return found[-1].upper()
    boxed = re.findall(r"\\boxed\{\s*(?:\\text\{)?\s*([A-D])\s*\}?\s*\}", text)
    return boxed[-1] if boxed else None


def accuracy(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Share of exact matches; a missing prediction (None) counts as wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions: expected {len(references)} items, got {len(predictions)}")
    if not references:
        raise ValueError("references: expected at least one item")
    return sum(p is not None and p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def mean_of_repeats(scores: Iterable[float]) -> float:
    scores = list(scores)
    if not scores:
        raise ValueError("scores: expected at least one repeat")
    return statistics.fmean(scores)


class ChatClient:
    """Minimal client for ``/v1/chat/completions`` of a local OpenAI-compatible server."""

    def __init__(self, base_url: str, *, model: str = "default", timeout: float = 1200.0, retries: int = 2):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.retries = retries

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        extra: dict | None = None,
    ) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        body.update(extra or {})
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(
                f"{self.base_url}/v1/chat/completions", data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
            except (urllib.error.URLError, TimeoutError):
                if attempt == self.retries:
                    raise
                time.sleep(2.0 * (attempt + 1))
        raise AssertionError("unreachable")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            return False


def run_batch(fn: Callable[[int], str], n: int, *, concurrency: int = 64) -> list[str]:
    """``[fn(0), ..., fn(n-1)]`` with up to ``concurrency`` requests in flight, results in order."""
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, n))) as pool:
        return list(pool.map(fn, range(n)))
