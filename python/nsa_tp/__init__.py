"""nsa-tp: tensor-parallel serving of DeepSeek-V3.2 sparse attention (NSA / DSA).

Layout: ``config`` (model dims), ``parallel`` (the layout rule, process groups), ``ops`` (stateless
kernels behind one dispatcher), ``attention`` (indexer, backend, token-parallel), ``model`` (the
sharded attention layer), ``integrations.sglang`` (the SGLang plugin). See ``docs/architecture.md``.
"""

__version__ = "0.1.0"
