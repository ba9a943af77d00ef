"""NSA attention: kv cache formats, forward metadata, the lightning indexer, the NSA backend.

Modules (import the one you need; this package imports nothing heavy on its own):

- :mod:`nsa_tp.attention.indexer` — the lightning indexer (projections, chunked prefill / paged decode top-k).
- :mod:`nsa_tp.attention.chunking` — the pure logits chunk planner and the memory budget.
- :mod:`nsa_tp.attention.padding` — DP-padding of top-k rows and cache seqlens (the one padding module).
- :mod:`nsa_tp.attention.metadata` — ``ForwardMetadata``, built once per batch by ``ForwardMetadataBuilder``.
- :mod:`nsa_tp.attention.backend` — ``NSABackend``: indexer -> top-k -> pad -> sparse MLA, per layer.
- :mod:`nsa_tp.attention.kv_cache` — the paged latent and index-K caches of a layer.
"""
