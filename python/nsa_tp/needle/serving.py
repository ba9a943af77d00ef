"""The needle task against a running SGLang server (``--skip-tokenizer-init``): request bodies, response
parsing and scoring. Host-only (no torch): the GPU script ``benchmark/needle_sglang.py`` sends what
:func:`plan_rows` plans; the CPU tests feed :func:`score_response` made-up server answers.

One request scores many positions: ``input_ids`` = the prompt, ``return_logprob`` with ``logprob_start_len`` =
the first scored position and ``top_logprobs_num=1`` — SGLang returns, for every input position ``p >= start``,
the top token predicting ``ids[p]`` (``meta_info.input_top_logprobs[p - start]``, a list of
``[logprob, token_id, text]``) — and greedy ``output_ids`` after the final query (the chain, one recall per
decode step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from nsa_tp.needle.task import NeedlePrompt, diagnose, make_prompt, score_chain, score_predictions
from nsa_tp.needle.vocab import NeedleVocab

__all__ = ["Row", "request_body", "top1_from_response", "score_response", "plan_rows", "concurrent_rows",
           "PASS", "MIXED_LENS", "SHARED_PREFIX"]

PASS = 0.99
MIXED_LENS = (2048, 4096, 6144, 8192, 12288, 16384, 3000, 10000)  # fresh half of the 16 concurrent requests
SHARED_PREFIX = 8192  # the other half: this many tokens in common (cached by a warm-up request), then their own


@dataclasses.dataclass(frozen=True)
class Row:
    """One scored request: its ``prompt`` and the first position SGLang scores (``start``)."""

    name: str
    prompt: NeedlePrompt
    start: int
    topk: int = 2048  # the model's index top-k: which rows need the selection (the diagnosis)

    def body(self) -> dict[str, Any]:
        return request_body(self.prompt, self.start)


def request_body(prompt: NeedlePrompt, start: int) -> dict[str, Any]:
    """``/generate`` body: ids, input-token top-1 from ``start`` on, greedy chain of ``len(prompt.chain)``."""
    if not 0 <= start < len(prompt):
        raise ValueError(f"start: expected a position in [0, {len(prompt)}), got {start}")
    return {"input_ids": list(prompt.ids), "return_logprob": True, "logprob_start_len": start,
            "top_logprobs_num": 1,
            "sampling_params": {"max_new_tokens": len(prompt.chain), "temperature": 0.0, "ignore_eos": True}}


def top1_from_response(resp: dict[str, Any], start: int, length: int,
                       ids: Sequence[int] | None = None) -> dict[int, int]:
    """``{p: top token predicting ids[p + 1]}`` from ``meta_info.input_top_logprobs`` (entry ``j`` is position
    ``start + j``). With ``ids`` (the prompt), ``input_token_logprobs`` must name the prompt's tokens at those
    positions. Raises ``ValueError`` saying what is missing or misaligned."""
    meta = resp.get("meta_info") or {}
    tops = meta.get("input_top_logprobs")
    if not isinstance(tops, list):
        raise ValueError(f"response: no meta_info.input_top_logprobs (got keys {sorted(meta)}); was return_logprob "
                         "with top_logprobs_num sent?")
    if len(tops) != length - start:
        raise ValueError(f"response: {len(tops)} input_top_logprobs entries, expected {length - start} "
                         f"(positions {start}..{length - 1})")
    toks = meta.get("input_token_logprobs")
    if isinstance(toks, list) and ids is not None:  # [logprob, token_id, text] per position: the alignment check
        if len(toks) != len(tops):
            raise ValueError(f"response: {len(toks)} input_token_logprobs but {len(tops)} input_top_logprobs")
        bad = [start + j for j, t in enumerate(toks) if t and t[1] is not None and int(t[1]) != ids[start + j]]
        if bad:
            raise ValueError(f"response: input_token_logprobs name other tokens than the prompt at positions "
                             f"{bad[:5]} (logprob_start_len not honoured?)")
    out: dict[int, int] = {}
    for j, entry in enumerate(tops):
        if entry:  # [[logprob, token_id, text]]; None at position 0 (nothing predicts the first token)
            out[start + j - 1] = int(entry[0][1])
    return out


def score_response(row: Row, resp: dict[str, Any]) -> dict[str, Any]:
    """Accuracy over the row's query positions at or after ``start``, and the greedy chain."""
    pr = row.prompt
    top = top1_from_response(resp, row.start, len(pr), pr.ids)
    s = score_predictions(pr, top, first_pos=row.start, topk=row.topk)
    out_ids = [int(t) for t in resp.get("output_ids") or []]
    s.update(name=row.name, length=len(pr), start=row.start, greedy_ids=out_ids,
             greedy_correct=score_chain(pr, out_ids), greedy_total=len(pr.chain),
             top1=[top.get(p, -1) for p, _ in pr.queries if p >= row.start],
             cached_tokens=(resp.get("meta_info") or {}).get("cached_tokens"))
    s["ok"] = s["accuracy"] >= PASS and s["greedy_correct"] == s["greedy_total"] and s["total"] > 0
    s["diagnosis"] = diagnose(s, PASS)
    return s


def plan_rows(vocab: NeedleVocab, lens: Sequence[int], topk: int, seed: int = 0) -> list[Row]:
    """One prompt per length; queries (and the scored positions) start at the index top-k."""
    rows = []
    for n in lens:
        pr = make_prompt(vocab, n, seed=seed * 1000 + n, min_query_pos=topk)
        rows.append(Row(f"len{n}", pr, min(p for p, _ in pr.queries), topk))
    return rows


def concurrent_rows(vocab: NeedleVocab, topk: int, seed: int = 0) -> tuple[list[int], list[Row]]:
    """``(shared prefix ids, 16 rows)``: 8 fresh prompts of :data:`MIXED_LENS`, 8 behind the shared prefix (they
    score from the prefix's end on, so the radix cache may serve it)."""
    base = make_prompt(vocab, SHARED_PREFIX + 64, seed=seed * 1000 + 7, min_query_pos=topk)
    prefix = list(base.ids[:SHARED_PREFIX])
    rows = []
    for i, n in enumerate(MIXED_LENS):
        pr = make_prompt(vocab, n, seed=seed * 1000 + 100 + i, min_query_pos=topk)
        rows.append(Row(f"conc{i}_fresh{n}", pr, min(p for p, _ in pr.queries), topk))
    for i, extra in enumerate(MIXED_LENS):
        pr = make_prompt(vocab, SHARED_PREFIX + extra, seed=seed * 1000 + 200 + i, min_query_pos=topk, prefix=prefix)
        rows.append(Row(f"conc{8 + i}_prefix{SHARED_PREFIX}+{extra}", pr, SHARED_PREFIX, topk))
    return prefix, rows
