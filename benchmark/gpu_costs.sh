#!/usr/bin/env bash
# Issue 20 on ONE GPU (H100 or H200), in one device call of at most 9 minutes (phase timeouts 300 + 60 + 180 s;
# expected 4-7 minutes: a cold Triton and DeepGEMM compile cache dominates phase 1; BENCH_S, COSTS_S, PROJ_S
# override the timeouts): regenerate this card's tuning table
# with the measured auto check, its token-parallel Costs record, and the honest projection (heads = upstream's
# kernels), every file flat under $OUT with card, date and command inside.
#
#   bash benchmark/gpu_single.sh unpack c2     # once per warm machine: flash_mla, deep_gemm, sgl_kernel -> /tmp/site
#   bash benchmark/gpu_costs.sh                # this script
#
# Writes to $OUT (6 files):
#   card.txt                          nvidia-smi: name, clocks, power, temperature
#   gpu_costs.log                     every phase's output (progress, tables, the auto check verdicts)
#   kernels_<card>_<yyyymmdd>.json    nsa-tp bench: every tier of every op, tiers that ran, the timed auto check
#   <card-slug>.json                  the tuning table (commit as python/nsa_tp/ops/measured/<card-slug>.json)
#   costs_<card-slug>.json            the Costs record (commit as python/nsa_tp/ops/measured/costs_<card-slug>.json)
#   tp_projection_<card-slug>.json    TP2/4/8 at 8K/32K/128K, heads pieces on upstream's kernels
# Exit status: 0 when every phase passed; otherwise the first failing phase's (the later phases still run).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
RUN=/tmp/gpu_costs; rm -rf "$RUN"; mkdir -p "$RUN"
export PYTHONPATH=/tmp/site:$(pwd)/python PYTHONUNBUFFERED=1
unset NSA_TP_TUNING_FILE NSA_TP_TOKEN_PARALLEL_COSTS  # this run measures its own; nothing stale is read
LOG="$OUT/gpu_costs.log"; : > "$LOG"
RC=0
stamp() { echo "=== $* $(date -u +%H:%M:%S)" | tee -a "$LOG"; }
phase() {  # phase NAME SECONDS CMD...: run under a timeout, log everything, keep the first failure's status
  local name=$1 limit=$2; shift 2
  stamp "$name (timeout ${limit}s)"
  timeout "$limit" "$@" > "$RUN/phase.log" 2>&1; local rc=$?
  cat "$RUN/phase.log" >> "$LOG"
  # progress and verdicts only (the whole output is in gpu_costs.log)
  grep -E "done \(|auto check|error|ERROR|FAIL|wrote|skip" "$RUN/phase.log" | cut -c1-230 | tail -60
  tail -4 "$RUN/phase.log" | cut -c1-230
  stamp "$name exit $rc $([ $rc -eq 124 ] && echo '(timed out)')"
  [ $RC -eq 0 ] && [ $rc -ne 0 ] && RC=$rc
  return 0
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > "$OUT/card.txt"
cat "$OUT/card.txt"
python3 - <<'PY' 2>&1 | tee -a "$LOG"
import sys
import deep_gemm, flash_mla, sgl_kernel, torch, triton  # noqa: F401 - upstream's kernels must be present
missing = [f for f in ("fast_topk_v2", "fast_topk_transform_ragged_fused") if not hasattr(sgl_kernel, f)]
print("torch", torch.__version__, "triton", triton.__version__, "card", torch.cuda.get_device_name(),
      "missing sgl_kernel functions:" if missing else "upstream kernels importable", *missing)
sys.exit(1 if missing else 0)
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "upstream kernels missing: run bash benchmark/gpu_single.sh unpack c2"; exit 2; }
SLUG=$(python3 -c "import torch; from nsa_tp.ops.tuning import card_slug; print(card_slug(torch.cuda.get_device_name()))")

# 1. Every tier of every op (rows record the tiers that ran; a mislabelled row writes nothing), the tuning table,
#    then auto timed on every case with that table (exit 1 naming any shape where auto > 1.03x the fastest).
phase "nsa-tp bench" ${BENCH_S:-300} python3 -m nsa_tp bench --out "$RUN" --measured-dir "$OUT"
cp "$RUN"/kernels_*.json "$OUT/" 2>/dev/null
export NSA_TP_TUNING_FILE="$OUT/$SLUG.json"  # auto in phases 2 and 3 routes by the table phase 1 measured

# 2. The Costs record: kernels through auto on this card; collectives from the committed 4xH200 NCCL run.
phase "nsa-tp bench --costs" ${COSTS_S:-60} python3 -m nsa_tp bench --costs --measured-dir "$OUT"

# 3. The projection: heads = DeepGEMM + sgl-kernel's fused top-k + FlashMLA with its padding (checked),
#    collectives and the decider's prediction from the record phase 2 wrote.
COSTS_ARG=(); [ -f "$OUT/costs_$SLUG.json" ] && COSTS_ARG=(--costs "$OUT/costs_$SLUG.json")
phase "bench_tp_projection" ${PROJ_S:-180} python3 benchmark/bench_tp_projection.py "${COSTS_ARG[@]}" \
  --time-limit-s $(( ${PROJ_S:-180} - 60 )) --out "$OUT/tp_projection_$SLUG.json"

stamp "done, exit $RC"; ls -la "$OUT"
exit $RC
