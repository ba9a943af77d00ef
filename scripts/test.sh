#!/usr/bin/env bash
# The project's test command (README): install nsa-tp with its dev extras, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[dev]'
python3 -m ruff check python test benchmark
python3 -m pytest -q test
bash scripts/install_sglang_cpu.sh && python3 -m pytest -q -m sglang test/srt  # every test that needs real SGLang 0.5.23 (docs/sglang.md)
