"""Where the SGLang plugin's ``auto`` gets its measured costs: the card's one :class:`~nsa_tp.token_parallel.Costs`
record, read by :func:`nsa_tp.token_parallel.costs.load_costs` (committed ``nsa_tp/ops/measured/costs_<card>.json``,
written by ``nsa-tp bench --costs``; ``NSA_TP_TOKEN_PARALLEL_COSTS`` overrides it). No second loader here."""

from __future__ import annotations

from nsa_tp.token_parallel.costs import ENV_COSTS, load_costs

__all__ = ["ENV_COSTS", "load_costs"]
