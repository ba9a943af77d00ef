#!/usr/bin/env bash
# Install the real SGLang 0.5.23 on a CPU machine for nsa-tp's plugin tests (test/srt/test_sglang_plugin.py),
# without its GPU stack: SGLang itself with --no-deps, plus the pure-Python packages that its argument
# parsing, model-config reading and attention-backend import need. torch is pinned to the one installed
# (never replaced by a CUDA build). Re-running is a no-op once everything is in place.
set -euo pipefail
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.23
here=$(cd "$(dirname "$0")/.." && pwd)

torch_version=$($PY -c "import torch; print(torch.__version__)")
ready() {  # cheap: versions and files only, no imports
  $PY - "$SGLANG_VERSION" <<'PYEOF' 2>/dev/null
import sys, sysconfig, os
from importlib.metadata import version
from importlib.util import find_spec
assert version("sglang") == sys.argv[1] and version("transformers") == "5.19.0"
assert all(find_spec(m) for m in ("torchvision", "triton", "tvm_ffi", "openai", "einops", "gguf", "compressed_tensors"))
assert os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "nsa_tp_torchvision_shim.pth"))
PYEOF
}
if ready; then
  echo "sglang $SGLANG_VERSION already installed (torch $torch_version)"
  exit 0
fi

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"
pip_install() { $PY -m pip install -q --disable-pip-version-check -c "$constraints" "$@"; }

pip_install --no-deps "sglang==$SGLANG_VERSION" apache-tvm-ffi==0.1.11
pip_install psutil pybase64 starlette msgspec pyzmq tqdm aiohttp huggingface_hub dill einops pillow gguf ipython \
  "transformers==5.19.0" "sentencepiece==0.2.1" "compressed-tensors==0.18.0" "openai==2.8.0" partial-json-parser
# sglang.srt.utils imports triton at module level (nothing runs it here); keep any triton already present.
$PY -c "import triton" 2>/dev/null || pip_install --no-deps "triton==3.6.0"
# torchvision: the release that matches this torch (0.(minor+15)), with the op-schema shim that lets PyPI's
# CUDA-built wheel import beside a CPU torch (see test/srt/sglang_shim/_nsa_tp_torchvision_shim.py).
if ! $PY -c "import torchvision" 2>/dev/null; then
  tv_minor=$($PY -c "import torch; print(int(torch.__version__.split('.')[1]) + 15)")
  pip_install --no-deps "torchvision==0.$tv_minor.*"
fi
site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp "$here/test/srt/sglang_shim/_nsa_tp_torchvision_shim.py" "$here/test/srt/sglang_shim/nsa_tp_torchvision_shim.pth" "$site/"

$PY -c "import sglang.srt.server_args" || { echo "install_sglang_cpu.sh: sglang $SGLANG_VERSION does not import" >&2; exit 1; }
echo "sglang $SGLANG_VERSION installed for CPU tests (torch $torch_version)"
