"""nsa-tp's SGLang plugin (SGLang 0.5.17 to 0.5.23).

Installed with nsa-tp, it is found through the ``sglang.srt.plugins`` entry point (``nsa_tp =
"nsa_tp.integrations.sglang:register"``) and loaded by SGLang itself in every process. With it,
``sglang serve --model-path deepseek-ai/DeepSeek-V3.2 --tp 8`` (or ``python -m sglang.launch_server ...``):

- checks the ``--tp/--attn-dp-size`` (0.5.17: ``--tp/--dp/--enable-dp-attention``) layout with
  :func:`nsa_tp.parallel.resolve_layout` before any GPU work (:mod:`.layout_check`) and logs what FlashMLA head
  padding would cost;
- on the DSA backend's two FlashMLA sparse-MLA calls (:mod:`.attention_hooks`, through SGLang's
  ``HookRegistry``), runs :mod:`nsa_tp.ops` with the rank's own head count only where a tier measured faster
  than upstream's path for that shape class on this card (:mod:`.routing`), else SGLang's own function;
  ``NSA_TP_SGLANG_VERIFY=1`` compares both in a live server (:mod:`.verify`);
- with ``--nsa-token-parallel``, runs extend batches token-parallel over the attention TP group
  (:mod:`.token_parallel`: a registered DSA backend subclass and one indexer hook).

Off switch: ``NSA_TP_SGLANG_PLUGIN=0`` or ``--disable-nsa-tp``. Forced tier: ``NSA_TP_SGLANG_BACKEND``.
Importing this package does not import SGLang.
"""

from nsa_tp.integrations.sglang._version import MAX_VERSION, MIN_VERSION

__all__ = ["register", "MIN_VERSION", "MAX_VERSION"]


def register(role: str | None = None) -> list:
    """SGLang's entry point (called with no arguments); see :func:`nsa_tp.integrations.sglang.plugin.register`."""
    from nsa_tp.integrations.sglang.plugin import register as _register

    return _register(role)
