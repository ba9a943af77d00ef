"""Score the needle task through nsa-tp's own attention layer in any layout (CPU with gloo, or GPUs with NCCL).

Per layout, every rank runs :class:`nsa_tp.model.runner`'s rank state (the same layer, caches, DP padding and
all-gathers ``nsa-tp run`` checks) on the needle prompts' embedded tokens (:func:`request_tokens`: the prompt and
its expected greedy chain but the last token): a prefix fill for requests behind a cached prefix, a
teacher-forced prefill of the prompt but its final query, then one decode step per chain token (the final
query, then each expected answer, which asks for the next key). The layer's weights come from the written
checkpoint through nsa-tp's loader (:func:`nsa_tp.model.weights.load_layer_weights`); the rest of the model
(embedding, norms, MLP, lm_head) runs here in float32 from the same file. ``corrupt`` installs the negative
control (:class:`~.corrupt.ShiftTopk`) on every rank's indexer.

It uses the runner's own rank state and weight memo (``_Rank``, ``_case_weights``, private to it) on purpose: the
needle runs the exact path ``nsa-tp run`` checks, fed embedded tokens instead of random hidden states, rather than
a second copy of that path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nsa_tp.config import NSAConfig
from nsa_tp.model.runner import Request, RunCase, _case_weights, _Rank
from nsa_tp.needle.corrupt import ShiftTopk
from nsa_tp.needle.task import NeedlePrompt, score_chain, score_predictions
from nsa_tp.parallel.groups import build_groups
from nsa_tp.parallel.launch import RankContext, launch

__all__ = ["NeedleModel", "LayoutRun", "needle_cases", "run_needle_layouts", "score_layout", "request_tokens"]

_HEAD = ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
         "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
         "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight",
         "lm_head.weight")


def request_tokens(prompt: NeedlePrompt) -> tuple[int, ...]:
    """What the layer sees of a prompt: its ids and the expected chain but its last token (teacher-forced)."""
    return prompt.ids + prompt.chain[:-1]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class NeedleModel:
    """Everything of the checkpoint but the attention layer, float32 on CPU (the layer runs in the ranks)."""

    def __init__(self, ckpt: str | Path):
        from safetensors import safe_open

        self.path = Path(ckpt)
        self.cfg = NSAConfig.from_hf_config(self.path)
        with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
            self.t = {k: f.get_tensor(k).float() for k in _HEAD}

    def embed(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e [L, hidden] float32 residual, x [L, hidden] bfloat16 = input_layernorm(e), the layer's input)``."""
        e = self.t["model.embed_tokens.weight"][torch.tensor(list(ids))]
        x = _rms(e, self.t["model.layers.0.input_layernorm.weight"], self.cfg.rms_norm_eps)
        return e, x.to(torch.bfloat16)

    def top1(self, e: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``[L]`` argmax token after the layer: residual, MLP, final norm, lm_head."""
        eps, t = self.cfg.rms_norm_eps, self.t
        h = e + attn.float()
        n = _rms(h, t["model.layers.0.post_attention_layernorm.weight"], eps)
        mlp = (F.silu(n @ t["model.layers.0.mlp.gate_proj.weight"].T) * (n @ t["model.layers.0.mlp.up_proj.weight"].T))
        h = h + mlp @ t["model.layers.0.mlp.down_proj.weight"].T
        return (_rms(h, t["model.norm.weight"], eps) @ t["lm_head.weight"].T).argmax(-1)


@dataclasses.dataclass(frozen=True)
class LayoutRun:
    """One layout of the needle run (a :class:`RunCase` over the prompts) and whether its top-k is corrupted."""

    case: RunCase
    corrupt: bool = False
    decode_steps: tuple[int, ...] = ()  # per request: its last tokens run as decode steps (the chain)

    def label(self) -> str:
        return self.case.label() + (" +corrupt" if self.corrupt else "")


def needle_cases(ckpt: str | Path, prompts: Sequence[NeedlePrompt], prefix_lens: Sequence[int],
                 layouts: Sequence[tuple[int, int, bool, str]], *, corrupt: bool = False,
                 kv_cache_dtype: str = "bfloat16", backend: str = "auto") -> list[LayoutRun]:
    """``layouts``: ``(tp, dp, enable_dp_attention, core)`` each; requests ``(prefix_len, rest)`` per prompt."""
    cfg = NSAConfig.from_hf_config(ckpt)
    reqs = tuple(Request(p, len(request_tokens(pr)) - p) for pr, p in zip(prompts, prefix_lens, strict=True))
    steps = tuple(len(pr.chain) for pr in prompts)
    out = []
    for tp, dp, dpa, core in layouts:
        case = RunCase(tp=tp, dp=dp, enable_dp_attention=dpa, cfg=cfg, requests=reqs, decode_steps=0,
                       kv_cache_dtype=kv_cache_dtype, core=core, backend=backend,
                       weights_path=str(Path(ckpt) / "model.safetensors"),
                       name=_name(tp, dp, dpa, core))
        out.append(LayoutRun(case, corrupt, steps))
    return out


def _name(tp: int, dp: int, dpa: bool, core: str) -> str:
    base = f"DP{dp}xTP{tp // dp}" if dpa and tp // dp > 1 else (f"DP{dp}" if dpa else f"TP{tp}")
    return base if core == "heads" else f"{base}/{core}"


def _run_layout(ctx: RankContext | None, run: LayoutRun, xs: list[torch.Tensor],
                memo: dict[tuple[Any, ...], Any]) -> dict[int, torch.Tensor]:
    """One rank of one layout: every request's attention output ``[L, hidden]`` (rank 0's after the gathers)."""
    case = run.case
    device = ctx.device if ctx is not None else torch.device("cpu")
    rank = _Rank(case, build_groups(case.layout()), device, _case_weights(case, memo))
    if run.corrupt:
        rank.layer.indexer.topk_hook = ShiftTopk()
    for i in rank.mine:
        rank.inputs[i] = xs[i].to(device)
    reqs = case.requests
    ends = {i: r.prefix_len + r.new_len for i, r in enumerate(reqs)}
    dec = {i: run.decode_steps[i] if run.decode_steps else 1 for i in ends}
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in ends}
    steps = [({i: (r.prefix_len, ends[i] - dec[i]) for i, r in enumerate(reqs)}, False)]
    for d in range(max(dec.values())):  # requests with a shorter chain sit the later steps out (empty span)
        steps.append(({i: (ends[i] - dec[i] + d, ends[i] - dec[i] + d + (d < dec[i])) for i in ends}, True))
    if any(r.prefix_len for r in reqs):
        steps.insert(0, ({i: (0, r.prefix_len) for i, r in enumerate(reqs)}, False))
    for spans, is_decode in steps:
        for i, y in rank.forward(spans, is_decode).items():
            parts[i].append(y)
    return {i: torch.cat(p) for i, p in parts.items()}


def _rank_body(ctx: RankContext, runs: Sequence[LayoutRun], xs: list[torch.Tensor]) -> list[dict | None]:
    memo: dict[tuple[Any, ...], Any] = {}
    out: list[dict | None] = []
    for run in runs:
        if run.case.layout().world_size != ctx.world_size:
            out.append(None)
            continue
        res = _run_layout(ctx, run, xs, memo)
        out.append(res if ctx.rank == 0 else None)  # rank 0 holds every request's rows after the gathers
    return out


def run_needle_layouts(runs: Sequence[LayoutRun], xs: list[torch.Tensor], world: int,
                       *, timeout_s: float = 600.0) -> list[dict[int, torch.Tensor]]:
    """Attention outputs per run (all with ``world`` ranks): request -> ``[L, hidden]`` float32."""
    for r in runs:
        if r.case.layout().world_size != world:
            raise ValueError(f"{r.label()}: needs {r.case.layout().world_size} ranks, this spawn has {world}")
    if world == 1:
        memo: dict[tuple[Any, ...], Any] = {}
        return [_run_layout(None, r, xs, memo) for r in runs]
    per_rank = launch(_rank_body, world, (tuple(runs), xs), timeout_s=timeout_s)
    return [per_rank[0][k] for k in range(len(runs))]


def score_layout(model: NeedleModel, prompts: Sequence[NeedlePrompt], es: list[torch.Tensor],
                 attn: dict[int, torch.Tensor]) -> dict[str, Any]:
    """Teacher-forced accuracy over every query position, and the final queries' greedy (decode-step) answers."""
    correct = total = greedy_ok = greedy_total = 0
    need = [0, 0]  # [correct, total] over rows longer than the top-k (the indexer must pick the fact)
    for i, pr in enumerate(prompts):
        top = model.top1(es[i], attn[i]).tolist()
        s = score_predictions(pr, dict(enumerate(top)), topk=model.cfg.index_topk)
        correct, total = correct + s["correct"], total + s["total"]
        need = [need[0] + s["rows_needing_selection"][0], need[1] + s["rows_needing_selection"][1]]
        n = len(pr.chain)
        greedy_ok += score_chain(pr, top[len(pr) - 1 : len(pr) - 1 + n])  # decode steps' predictions
        greedy_total += n
    return {"correct": correct, "total": total, "accuracy": correct / max(total, 1),
            "greedy_correct": greedy_ok, "greedy_total": greedy_total, "rows_needing_selection": need}
