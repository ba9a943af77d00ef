"""Needle prompts (associative recall) and their scoring; host-only, shared by the CPU layer runs and the SGLang
client.

A prompt is ``BOS``, then fillers with facts ``D(k, v)`` (each key at most once) and query pairs ``Q(k) A(v)``
spread over it, and ends with one more ``Q(k*)``. The right next token after every ``Q(k)`` is ``A(v)`` of the
earlier fact with key ``k``: in a teacher-forced pass the model's top-1 token at each query position is scored
(many positions per prompt), and the greedy token after the final ``Q(k*)`` is the answer of a decode step.
Queries start at ``min_query_pos`` (the index top-k, at most half the prompt), so their rows select from more
tokens than the top-k holds: a wrong selection then misses the fact with probability about ``1 - topk / len``.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from nsa_tp.needle.vocab import BOS, NeedleVocab

__all__ = ["NeedlePrompt", "make_prompt", "score_predictions", "score_chain", "diagnose", "QUERY_SPACING", "CHAIN"]

QUERY_SPACING = 16  # one query pair per this many tokens after min_query_pos, on average
CHAIN = 4  # greedy tokens scored after the final query (the first from the prefill, the rest decode steps)


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    """``ids``; ``queries``: ``(position of Q(k), expected next token A(v))``; ``chain``: the greedy continuation
    after the last ``Q(k*)`` (``A(v1)`` from the prefill, then one decode step per token: ``A(v)`` asks for key
    ``v``); ``facts``: key -> (position, value)."""

    ids: tuple[int, ...]
    queries: tuple[tuple[int, int], ...]
    chain: tuple[int, ...]
    facts: dict[int, tuple[int, int]]

    @property
    def final_answer(self) -> int:
        return self.chain[0]

    def __len__(self) -> int:
        return len(self.ids)


def _facts_in(vocab: NeedleVocab, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    facts: dict[int, tuple[int, int]] = {}
    for pos, t in enumerate(ids):
        kind, k, v = vocab.kind(t)
        if kind == "fact":
            if k in facts:
                raise ValueError(f"prefix: key {k} is stored twice (positions {facts[k][0]} and {pos})")
            facts[k] = (pos, v)
    return facts


def make_prompt(vocab: NeedleVocab, length: int, seed: int, *, min_query_pos: int,
                prefix: Sequence[int] = (), spacing: int = QUERY_SPACING, chain: int = CHAIN) -> NeedlePrompt:
    """A prompt of ``length`` tokens, deterministic from ``seed``; it starts with ``prefix`` (its facts count) or
    with ``BOS``. Facts with the keys the prefix lacks are spread over the rest (one before ``min_query_pos``
    at least); query pairs sit at ``>= max(min_query_pos, len(prefix))``, every ``spacing`` tokens on average."""
    if length < 64 or length < len(prefix) + 16:
        raise ValueError(f"length: expected >= 64 and >= len(prefix) + 16, got {length} (prefix {len(prefix)})")
    rng = random.Random(repr(("needle", seed, length, len(prefix))))
    ids = list(prefix) if prefix else [BOS]
    facts = _facts_in(vocab, ids)
    start = len(ids)
    q_lo = max(min(min_query_pos, length // 2), start)
    ids += [vocab.filler(rng.randrange(vocab.n_fillers)) for _ in range(length - start)]
    free = [k for k in range(vocab.n_keys) if k not in facts]
    rng.shuffle(free)
    taken: set[int] = set()
    for n, k in enumerate(free):  # the first new fact lands before the first query
        hi = q_lo if n == 0 and not facts else length - 2
        pos = rng.randrange(start, max(start + 1, hi))
        while pos in taken:
            pos = rng.randrange(start, length - 2)
        taken.add(pos)
        v = rng.randrange(vocab.n_values)
        ids[pos] = vocab.fact(k, v)
        facts[k] = (pos, v)
    queries = []
    for pos in range(q_lo, length - 3, 1):
        if rng.random() * spacing >= 1 or pos in taken or pos + 1 in taken or (pos - 1) in taken:
            continue
        known = [k for k, (p, _) in facts.items() if p < pos]
        if not known:
            continue
        k = rng.choice(known)
        ids[pos], ids[pos + 1] = vocab.query(k), vocab.answer(facts[k][1])
        taken.update((pos, pos + 1))
        queries.append((pos, vocab.answer(facts[k][1])))
    known = [k for k, (p, _) in facts.items() if p < length - 1]
    k_final = rng.choice(known)
    ids[-1] = vocab.query(k_final)
    return NeedlePrompt(tuple(ids), tuple(queries), _chain(vocab, facts, k_final, chain), facts)


def _chain(vocab: NeedleVocab, facts: dict[int, tuple[int, int]], key: int, n: int) -> tuple[int, ...]:
    """Greedy tokens after ``Q(key)``: follow value -> key while the key is stored (all facts precede the end)."""
    out: list[int] = []
    while len(out) < n and key in facts:
        v = facts[key][1]
        out.append(vocab.answer(v))
        key = v if v < vocab.n_keys else -1
    return tuple(out)


def score_predictions(prompt: NeedlePrompt, top1: dict[int, int], *, first_pos: int = 0,
                      topk: int | None = None) -> dict[str, Any]:
    """Teacher-forced accuracy: ``top1[pos]`` = the model's top token predicting position ``pos + 1``.

    Queries at positions ``< first_pos`` (inside a cached prefix the server did not score) are left out; a
    position missing from ``top1`` counts as wrong. Returns ``{correct, total, accuracy, missing}``; with ``topk``
    also ``rows_needing_selection`` / ``rows_within_topk`` (``[correct, total]``: rows longer than the top-k,
    where the indexer must pick the fact, and rows that attend to every key) and ``chance``, the accuracy a wrong
    selection would leave (``min(1, topk / row length)`` averaged).
    """
    scored = [(p, want) for p, want in prompt.queries if p >= first_pos]
    ok = [top1.get(p) == want for p, want in scored]
    out: dict[str, Any] = {"correct": sum(ok), "total": len(scored),
                           "accuracy": sum(ok) / len(scored) if scored else 0.0,
                           "missing": sum(p not in top1 for p, _ in scored)}
    if topk is not None:
        long = [o for (p, _), o in zip(scored, ok, strict=True) if p + 1 > topk]
        short = [o for (p, _), o in zip(scored, ok, strict=True) if p + 1 <= topk]
        out.update(rows_needing_selection=[sum(long), len(long)], rows_within_topk=[sum(short), len(short)],
                   chance=sum(min(1.0, topk / (p + 1)) for p, _ in scored) / max(len(scored), 1))
    return out


def diagnose(score: dict[str, Any], pass_at: float) -> str:
    """One line on what a failing score points at (empty when it passes)."""
    if score.get("error"):
        return f"the request failed: {score['error']}"
    need, within = score.get("rows_needing_selection", [0, 0]), score.get("rows_within_topk", [0, 0])
    acc_need = need[0] / need[1] if need[1] else 1.0
    acc_within = within[0] / within[1] if within[1] else 1.0
    if score["total"] and score["accuracy"] < pass_at:
        if acc_within >= pass_at and acc_need < pass_at:
            return (f"rows that attend to every key are right ({within[0]}/{within[1]}) but rows where the indexer "
                    f"must select are not ({need[0]}/{need[1]}; chance {score.get('chance', 0):.2f}): the sparse "
                    "selection misses the fact (indexer logits, top-k, index offsets or page table)")
        return (f"rows wrong whether or not they need the selection ({within[0]}/{within[1]} within the top-k, "
                f"{need[0]}/{need[1]} beyond): the attention itself is wrong (projections, heads to ranks, "
                "softmax, cache contents)")
    if score.get("greedy_correct", 0) < score.get("greedy_total", 0):
        return (f"teacher-forced positions right but the greedy chain breaks at token {score['greedy_correct']}: "
                "the decode path (decode kernel, paged top-k, CUDA graphs) or the prefill's last row")
    return ""


def score_chain(prompt: NeedlePrompt, generated: Sequence[int]) -> int:
    """How many leading generated tokens follow the expected chain (``len(prompt.chain)`` = all right)."""
    n = 0
    for got, want in zip(generated, prompt.chain, strict=False):
        if got != want:
            break
        n += 1
    return n
