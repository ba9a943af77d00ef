#!/usr/bin/env bash
# Install the real SGLang 0.5.23 on a CPU machine for nsa-tp's plugin tests (test/srt/test_sglang_plugin.py),
# without its GPU stack: SGLang itself with --no-deps, plus exactly the packages SGLang imports at module level
# on the paths those tests take (server_args, the plugin hook registry, the DSA attention backend,
# launch_server --help). torch stays the one installed (never replaced by a CUDA build).
#
# Readiness is checked by importing those modules, not by version numbers: a run that finds them importable
# installs nothing. Quiet on success; on failure it prints what did not import and pip's log.
set -euo pipefail
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.23
here=$(cd "$(dirname "$0")/.." && pwd)

# Import name -> pinned requirement: what sglang.srt.server_args, sglang.srt.plugins.hook_registry,
# sglang.srt.layers.attention.dsa_backend and sglang.launch_server import at module level (found by importing
# them in a fresh virtual environment with only torch and sglang --no-deps, one missing module at a time;
# with these, `launch_server --help` needs nothing more).
# Their own dependencies come with them (pip resolves those, under the torch pin).
DEPS=(
  "numpy numpy==2.4.6"
  "orjson orjson==3.8.3"
  "psutil psutil==7.2.2"
  "pybase64 pybase64==1.5.1"
  "requests requests==2.34.2"
  "packaging packaging==26.2"
  "PIL pillow==13.0.0"
  "starlette starlette==1.10.0"
  "msgspec msgspec==0.23.0"
  "pydantic pydantic==2.13.4"
  "zmq pyzmq==27.3.0"
  "tqdm tqdm==4.70.1"
  "IPython ipython==8.12.3"
  "aiohttp aiohttp==3.14.5"
  "transformers transformers==5.19.0"
  "dill dill==0.4.1"
  "tvm_ffi apache-tvm-ffi==0.1.11"
  "sentencepiece sentencepiece==0.2.1"
  "compressed_tensors compressed-tensors==0.18.0"
  "gguf gguf==0.19.0"
  "openai openai==2.8.0"
  "partial_json_parser partial-json-parser==0.2.1.1.post7"
  "einops einops==0.8.2"
)

log=$(mktemp)
constraints=$(mktemp)
trap 'rm -f "$log" "$constraints"' EXIT
fail() {
  echo "install_sglang_cpu.sh: $*" >&2
  if [ -s "$log" ]; then echo "--- log ---" >&2; tail -n 60 "$log" >&2; fi
  exit 1
}

# The check: sglang at the pinned version, and every module the plugin tests import, imported for real.
check() {
  $PY - "$SGLANG_VERSION" >>"$log" 2>&1 <<'PYEOF' || return 1
import importlib, sys
from importlib.metadata import PackageNotFoundError, version
try:
    got = version("sglang")
except PackageNotFoundError:
    sys.exit("sglang is not installed")
if got != sys.argv[1]:
    sys.exit(f"sglang {got} is installed, the tests pin {sys.argv[1]}")
for mod in ("sglang.srt.server_args", "sglang.srt.plugins.hook_registry",
            "sglang.srt.layers.attention.dsa_backend", "sglang.launch_server"):
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        sys.exit(f"import {mod}: no module named {e.name!r}")
PYEOF
}

if check; then
  exit 0
fi
: >"$log"  # the first check's failure is expected here; keep only what follows

torch_version=$($PY -c "import torch; print(torch.__version__)") || fail "torch does not import; install it first"
echo "torch==$torch_version" > "$constraints"
pip_install() {
  $PY -m pip install --disable-pip-version-check --no-input -c "$constraints" "$@" >>"$log" 2>&1 \
    || fail "pip install $* failed"
}

# Only what does not import yet: an installed package is never replaced.
missing=()
for entry in "${DEPS[@]}"; do
  read -r mod req <<<"$entry"
  $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null \
    || missing+=("$req")
done
[ ${#missing[@]} -eq 0 ] || pip_install "${missing[@]}"
# sglang.srt.utils imports triton at module level (nothing runs it on CPU); keep any triton already present.
$PY -c "import triton" 2>/dev/null || pip_install --no-deps "triton==3.6.0"
# torchvision: the release that matches this torch (0.(minor+15)), with the op-schema shim that lets the
# CUDA-built wheel import beside a CPU torch (see test/srt/sglang_shim/_nsa_tp_torchvision_shim.py).
if ! $PY -c "import torchvision" 2>/dev/null; then
  tv_minor=$($PY -c "import torch; print(int(torch.__version__.split('.')[1]) + 15)")
  pip_install --no-deps "torchvision==0.$tv_minor.*"
fi
site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$here/test/srt/sglang_shim/_nsa_tp_torchvision_shim.py" "$here/test/srt/sglang_shim/nsa_tp_torchvision_shim.pth" "$site/"
# sglang last and without its dependencies: they are the GPU stack (and a torch pin of their own).
pip_install --no-deps "sglang==$SGLANG_VERSION"

check || fail "sglang $SGLANG_VERSION installed but does not import on this machine (see the log)"
