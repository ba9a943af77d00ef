#!/usr/bin/env bash
# Issue 14's run: token-parallel inside real SGLang 0.5.17 against upstream pure TP and upstream prefill CP,
# on one multi-GPU device kind, as one command from the repo root on the device (after the three
# `bash .sgl/bin/device.sh unpack c1|c2|c3` calls; carry .sgl/bin):
#
#   bash benchmark/sglang_multi_gpu.sh                 # every run for the visible GPU count (2, 4 or 8)
#   bash benchmark/sglang_multi_gpu.sh off:tp4 auto:tp4  # just these runs (STATE:LAYOUT, see sglang_e2e.sh)
#   bash benchmark/sglang_multi_gpu.sh --smoke         # print what it would run; runs nothing (CPU-tested)
#
# Per model (MODELS; default "1layer 4layer" on 2/4 GPUs, "full" = 61 layers on 8) and layout, servers one
# after another (each its own start; every server gets the same GPUs):
#   off     upstream pure TP, plugin off                      (--tp N; --tp N --dp D --enable-dp-attention)
#   cp      upstream prefill CP, plugin off (--enable-prefill-cp --cp-strategy interleave; --dp 1 only)
#   auto    plugin on, --nsa-token-parallel auto (the card's Costs record, or COSTS=<record json>; none: = heads)
#   tokens  plugin on, token-parallel forced on (the measurement auto needs)
#   verify  plugin on, token-parallel on, NSA_TP_SGLANG_VERIFY=1: worst relative error per hooked path
# Each server: TTFT at LENS (default 8K,32K,64K; fresh prompts), 32 greedy tokens at 32K, 16 concurrent
# mixed-length requests sharing cached prefixes (benchmark/sglang_multi_gpu_client.py). Which strategy ran
# and the verify error come from the server logs. Results: $OUT/<model>/<state>/ and
# $OUT/summary_<N>gpu.json (benchmark/sglang_multi_gpu_summary.py).
# Env: NGPUS (default: visible GPUs), MODELS, LENS, RUNS (space-separated STATE:LAYOUT list), COSTS,
# SGL_FLAGS (default: bf16 KV, flashmla_sparse prefill/decode, no CUDA graphs, radix cache ON), E2E_TIMEOUT.
set -u
repo=$(pwd)
[ -f "$repo/benchmark/sglang_e2e.sh" ] || { echo "run from the nsa-tp repo root" >&2; exit 2; }
smoke=0
if [ "${1:-}" = --smoke ]; then smoke=1; shift; fi
OUT=${OUT:-/tmp/out}
N=${NGPUS:-$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)}
case $N in
  2) layouts="tp2"; models_default="1layer 4layer" ;;
  4) layouts="tp4 tp4dp2"; models_default="1layer 4layer" ;;
  8) layouts="tp8 tp8dp4"; models_default="full" ;;
  *) echo "sglang_multi_gpu.sh: needs 2, 4 or 8 GPUs (NGPUS=$N)" >&2; exit 2 ;;
esac
MODELS=${MODELS:-$models_default}
LENS=${LENS:-8192,32768,65536}
if [ $# -gt 0 ]; then RUNS="$*"; fi
if [ -z "${RUNS:-}" ]; then
  RUNS=""
  for lay in $layouts; do
    case $lay in
      *dp*) states="off auto tokens verify" ;;  # upstream CP cannot run with DP attention
      *) states="off cp auto tokens verify" ;;
    esac
    for st in $states; do RUNS="$RUNS $st:$lay"; done
  done
fi
max_len=$(echo "$LENS" | tr ',' '\n' | sort -n | tail -1)
export SGL_CONTEXT=${SGL_CONTEXT:-$((max_len + 4096))}
export E2E_LENS=$LENS E2E_CLIENT="$repo/benchmark/sglang_multi_gpu_client.py"
export SGL_FLAGS=${SGL_FLAGS---kv-cache-dtype bfloat16 --dsa-prefill-backend flashmla_sparse --dsa-decode-backend flashmla_sparse --disable-cuda-graph}
# auto's costs: the card's committed Costs record (python/nsa_tp/ops/measured/costs_<card>.json, written by
# `nsa-tp bench --costs`) unless COSTS names another record file (load_costs ignores one of another card)
COSTS=${COSTS-}
[ -n "$COSTS" ] && export NSA_TP_TOKEN_PARALLEL_COSTS="$COSTS"
mkdir -p "$OUT"

model_config() {  # model name -> config path (the 61-layer one is written from the 4-layer config)
  local bin="$repo/.sgl/bin"
  case $1 in
    1layer) echo "$bin/config-v32-1layer.json" ;;
    4layer) echo "$bin/config-v32-4layer.json" ;;
    full)
      if [ $smoke = 0 ]; then
        python3 - "$bin/config-v32-4layer.json" /tmp/config-v32-61layer.json <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c.update(num_hidden_layers=61, first_k_dense_replace=3)  # DeepSeek-V3.2: 61 layers, the first 3 dense
json.dump(c, open(sys.argv[2], "w"), indent=1)
EOF
      fi
      echo /tmp/config-v32-61layer.json ;;
    *) echo "unknown model $1" >&2; return 1 ;;
  esac
}

echo "sglang_multi_gpu: $N GPUs, models: $MODELS, runs:$RUNS, lens $LENS, context $SGL_CONTEXT, auto costs: ${COSTS:-the committed record of the card}"
for model in $MODELS; do
  cfg=$(model_config "$model") || continue
  echo "=== model $model ($cfg) $(date -u +%H:%M:%S)"
  # shellcheck disable=SC2086  # RUNS is a word list on purpose
  E2E_DRY_RUN=$smoke SGL_CONFIG="$cfg" OUT="$OUT/$model" bash "$repo/benchmark/sglang_e2e.sh" $RUNS
done
summary="python3 benchmark/sglang_multi_gpu_summary.py $OUT --gpus $N --out $OUT/summary_${N}gpu.json"
if [ $smoke = 1 ]; then
  echo "SUMMARY $summary"
else
  $summary
fi
