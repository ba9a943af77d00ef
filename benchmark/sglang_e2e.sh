#!/usr/bin/env bash
# Real SGLang 0.5.17 on a GPU machine, with nsa-tp's plugin on and off, one-layer DeepSeek-V3.2 (dummy
# weights). Runs on the device, from the repo root, after ../shared/sglang-on-device's three unpack calls:
#
#   bash benchmark/sglang_e2e.sh on:tp2 off:tp2 on:dp2 off:dp2      (any subset; each one server start)
#
#   on|off : NSA_TP_SGLANG_PLUGIN=1|0 for that server (the plugin is installed either way)
#   cp     : plugin off, upstream prefill context parallelism (--enable-prefill-cp --cp-strategy interleave)
#   auto|tokens|indexer : plugin on, NSA_TP_TOKEN_PARALLEL=auto|on|indexer (token-parallel extend)
#   verify : plugin on, token-parallel on, NSA_TP_SGLANG_VERIFY=1 (upstream beside ours, worst error logged)
#   tp2    : --tp 2          dp2 : --tp 2 --dp 2 --enable-dp-attention   (and device.sh's other modes)
#
# What it does: makes our package importable and its `sglang.srt.plugins` entry point visible in every
# SGLang process (a dist-info in /tmp/site, which device.sh puts on PYTHONPATH, and python/ on PYTHONPATH),
# runs device.sh with our client (TTFT + greedy tokens; benchmark/sglang_e2e_client.py) per run, and
# keeps under $OUT/<on|off>/: e2e_<mode>.json, server_<mode>.log and proof_<mode>.txt (every nsa-tp log
# line plus upstream's DSA TP line). Merge several calls' $OUT with benchmark/sglang_e2e_summary.py.
# Env: E2E_LENS (default 2048,8192,32768), E2E_TIMEOUT (server start, s), SGL_EXTRA, NSA_TP_SGLANG_BACKEND,
# PORT_BASE (default 30000; give concurrent instances on disjoint CUDA_VISIBLE_DEVICES their own base),
# E2E_CLIENT (the client device.sh runs; default benchmark/sglang_e2e_client.py), E2E_DRY_RUN=1 (print each
# server's command line and environment, run nothing: the CPU smoke test of benchmark/sglang_multi_gpu.sh).
set -u
repo=$(pwd)
[ -f "$repo/benchmark/sglang_e2e_client.py" ] || { echo "run from the nsa-tp repo root" >&2; exit 2; }
[ $# -gt 0 ] || set -- on:tp2 off:tp2 on:dp2 off:dp2
client=${E2E_CLIENT:-$repo/benchmark/sglang_e2e_client.py}
CP_FLAGS="--enable-prefill-cp --cp-strategy interleave"

# run state -> "PLUGIN TOKEN_PARALLEL VERIFY EXTRA_FLAGS" (one line per state; unknown state -> empty)
state_env() {
  case $1 in
    on) echo "1 - 0" ;;  off) echo "0 - 0" ;;  cp) echo "0 - 0 $CP_FLAGS" ;;
    auto) echo "1 auto 0" ;;  tokens) echo "1 on 0" ;;  indexer) echo "1 indexer 0" ;;  verify) echo "1 on 1" ;;
  esac
}

if [ "${E2E_DRY_RUN:-0}" = 1 ]; then
  for run in "$@"; do
    state=${run%%:*}; mode=${run#*:}; env=$(state_env "$state")
    [ -n "$env" ] || { echo "bad run '$run'"; continue; }
    read -r flag tpmode verify extra <<< "$env"
    [ "$tpmode" = - ] && tpmode=${NSA_TP_TOKEN_PARALLEL:-off}
    echo "RUN $state:$mode NSA_TP_SGLANG_PLUGIN=$flag NSA_TP_TOKEN_PARALLEL=$tpmode NSA_TP_SGLANG_VERIFY=$verify" \
         "SGL_CONFIG=${SGL_CONFIG:-default} SGL_CONTEXT=${SGL_CONTEXT:-40000} E2E_LENS=${E2E_LENS:-2048,8192,32768}" \
         "client=$(basename "$client") OUT=${OUT:-/tmp/out}/$state :: .sgl/bin/device.sh run $mode" \
         "costs=${NSA_TP_TOKEN_PARALLEL_COSTS:-card-record}" \
         "SGL_FLAGS=${SGL_FLAGS-<device.sh easy flags>} SGL_EXTRA=${SGL_EXTRA:-}${extra:+ $extra}"
  done
  exit 0
fi
[ -f "$repo/.sgl/bin/device.sh" ] || { echo "missing .sgl/bin (bash ../shared/sglang-on-device/prepare.sh, carry .sgl/bin)" >&2; exit 2; }
S=/tmp/site
OUT=${OUT:-/tmp/out}
mkdir -p "$S" "$OUT"

# Our package: python/ on PYTHONPATH (device.sh keeps it after /tmp/site) and a dist-info that declares the
# entry point, so importlib.metadata finds it in the launcher and in every spawned scheduler. Two instances
# may start side by side (one per GPU pair): the lock keeps them from rewriting /tmp/site at the same time.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
(
flock 9
if ls "$repo"/.wheels/sgl_flash_mla-*.whl >/dev/null 2>&1 && [ ! -d "$S/flash_mla" ]; then
  # The FlashMLA tier's wheel (carried as .wheels/), beside SGLang's own kernels.
  python3 -m pip install -q --no-index --no-deps --target "$S" "$repo"/.wheels/sgl_flash_mla-*.whl
fi
di="$S/nsa_tp-$version.dist-info"
if [ ! -d "$di" ]; then
  rm -rf "$S"/nsa_tp-*.dist-info
  mkdir -p "$di.tmp"
  printf 'Metadata-Version: 2.1\nName: nsa-tp\nVersion: %s\n' "$version" > "$di.tmp/METADATA"
  printf 'nsa_tp\n' > "$di.tmp/top_level.txt"
  sed -n '/^\[project.entry-points."sglang.srt.plugins"\]/,/^$/p' pyproject.toml \
    | sed 's/^\[project.entry-points."sglang.srt.plugins"\]/[sglang.srt.plugins]/; s/ = "/ = /; s/"$//' \
    > "$di.tmp/entry_points.txt"
  mv "$di.tmp" "$di"
fi
) 9>/tmp/nsa_tp_e2e.lock
export PYTHONPATH="$repo/python${PYTHONPATH:+:$PYTHONPATH}"
PYTHONPATH="$S:$PYTHONPATH" python3 - <<'EOF' 2>&1 | tee "$OUT/plugin_install.txt"
from importlib.metadata import entry_points, version
eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "nsa_tp"]
assert eps, "nsa_tp entry point not visible"
import nsa_tp.ops as ops, torch
print("entry point:", eps[0].value, "| sglang", version("sglang"), "| torch", torch.__version__,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("ops tiers:", {name: ("ok" if not isinstance(ops.registry._load(name), str) else ops.registry._load(name))
                     for name in ops.tier_names()})
EOF

# device.sh runs "$(dirname $0)/client.py": a private copy of .sgl/bin with our client in its place.
bin=$(mktemp -d /tmp/sglbin.XXXX)
cp "$repo"/.sgl/bin/* "$bin/"
cp "$repo/benchmark/sglang_e2e_client.py" "$bin/sglang_e2e_client.py"  # helpers other clients import
cp "$client" "$bin/client.py"
sed -i "s/^port=30000;/port=${PORT_BASE:-30000};/" "$bin/device.sh"

for run in "$@"; do
  state=${run%%:*}; mode=${run#*:}; env=$(state_env "$state")
  [ -n "$env" ] || { echo "bad run '$run' (want STATE:MODE, STATE one of on off cp auto tokens indexer verify)"; continue; }
  read -r flag tpmode verify extra <<< "$env"
  [ "$tpmode" = - ] && tpmode=${NSA_TP_TOKEN_PARALLEL:-off}  # plain "on" keeps today's kernels-only plugin
  dir="$OUT/$state"; mkdir -p "$dir"
  echo "=== $run (NSA_TP_SGLANG_PLUGIN=$flag NSA_TP_TOKEN_PARALLEL=$tpmode NSA_TP_SGLANG_VERIFY=$verify) $(date -u +%H:%M:%S)"
  NSA_TP_SGLANG_PLUGIN=$flag NSA_TP_TOKEN_PARALLEL=$tpmode NSA_TP_SGLANG_VERIFY=$verify \
    SGL_EXTRA="${SGL_EXTRA:-}${extra:+ $extra}" OUT="$dir" bash "$bin/device.sh" run "$mode"
  grep -E "\[nsa-tp pid=|DSA with TP mode|Enabled DSA context parallel|Traceback|Error" "$dir/server_$mode.log" \
    > "$dir/proof_$mode.txt" 2>/dev/null
  echo "--- $run: $(grep -c 'role=scheduler' "$dir/proof_$mode.txt") scheduler(s) loaded the plugin, " \
       "$(grep -c 'sparse-MLA path active' "$dir/proof_$mode.txt") path-active line(s)"
  head -20 "$dir/proof_$mode.txt"
done
rm -rf "$bin"
