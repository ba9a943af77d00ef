"""Integrations with serving frameworks. Each subpackage imports its framework lazily, so importing
:mod:`nsa_tp` never requires one to be installed.

- :mod:`nsa_tp.integrations.sglang` — plugin for SGLang's ``sglang.srt.plugins`` entry point.
"""
