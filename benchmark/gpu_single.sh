#!/usr/bin/env bash
# Everything issue 12/13 measure on ONE GPU, as phases of device calls that follow each other on one warm
# machine (each call under 10 minutes; /tmp survives between calls while the machine stays warm). Run from the
# repo root on the GPU machine, carrying .sgl/cN + .sgl/bin (../shared/sglang-on-device/prepare.sh) and
# .wheels/ (sgl-flash-mla 1.0.0):
#
#   bash benchmark/gpu_single.sh kernels     # carry .sgl/c2 .sgl/bin .wheels: `nsa-tp bench`, every tier vs upstream
#   bash benchmark/gpu_single.sh variants    # our top-k / logits kernel variants next to upstream's kernels
#   bash benchmark/gpu_single.sh unpack c2   # carry .sgl/c2 .sgl/bin .wheels (only when `kernels` did not run)
#   bash benchmark/gpu_single.sh unpack c1   # carry .sgl/c1 .sgl/bin (with c2: SGLang's stack)
#   bash benchmark/gpu_single.sh start       # carry .sgl/c3 .sgl/bin .wheels: unpack c3 (once), start SPECS
#   bash benchmark/gpu_single.sh tests       # GPU tests while the servers compile, then wait for them
#   bash benchmark/gpu_single.sh wait        # wait for the servers only
#   bash benchmark/gpu_single.sh measure     # SGLang off/on measurement (NAME=round), stop; PROJ_S=250 adds
#                                            # the token-parallel projection
#
# The kernel phase writes the card's tuning table to /tmp/bench/tuning.json; the SGLang servers read it through
# NSA_TP_TUNING_FILE, so the plugin routes by what this card measured a minute earlier. Without that phase the
# plugin reads the committed table for the card (python/nsa_tp/ops/measured/).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/bench
S=/tmp/site
export PYTHONPATH=$S:$(pwd)/python PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
[ -f /tmp/bench/tuning.json ] && export NSA_TP_TUNING_FILE=/tmp/bench/tuning.json
stamp() { echo "=== $* $(date -u +%H:%M:%S)"; }
unpack() { bash .sgl/bin/device.sh unpack "$1" | tail -1; }
flashmla() {
  [ -d $S/flash_mla ] || python3 -m pip install -q --no-index --no-deps --target $S .wheels/sgl_flash_mla-*.whl
}

case ${1:-} in
  kernels)
    stamp unpack c2; unpack c2; flashmla
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/card.txt"
    python3 -c "import torch, triton, flash_mla, deep_gemm, sgl_kernel; print('torch', torch.__version__, 'triton',
triton.__version__, 'imports ok')" 2>&1 | tail -2
    # The tiers the plugin routes between first: they make the table the SGLang servers read.
    stamp bench sparse; timeout 330 python3 -m nsa_tp bench --ops sparse_mla_fwd,sparse_mla_decode \
      --out /tmp/bench/sparse 2>&1 | tail -60 | tee "$OUT/bench_sparse.txt"
    stamp bench indexer; timeout 200 python3 -m nsa_tp bench --ops fp8_mqa_logits,fp8_paged_mqa_logits,topk \
      --out /tmp/bench/indexer 2>&1 | tail -40 | tee "$OUT/bench_indexer.txt"
    python3 - <<'EOF'
import glob, json
merged = None
for path in sorted(glob.glob("/tmp/bench/*/tuning_*.json")):
    t = json.load(open(path))
    merged = merged or {k: v for k, v in t.items() if k != "times"} | {"times": {}, "sources": []}
    merged["times"].update(t["times"]); merged["sources"] += t["sources"]
json.dump(merged, open("/tmp/bench/tuning.json", "w"), indent=1)
print("tuning table:", {op: sorted(c) for op, c in merged["times"].items()})
EOF
    cp /tmp/bench/tuning.json "$OUT/"; cp /tmp/bench/sparse/kernels_*.json "$OUT/kernels_sparse.json"
    cp /tmp/bench/indexer/kernels_*.json "$OUT/kernels_indexer.json" 2>/dev/null
    stamp done ;;
  unpack)
    unpack "$2"; [ "$2" = c2 ] && flashmla; true ;;
  variants)
    stamp topk variants; timeout ${TOPK_S:-170} python3 benchmark/bench_topk.py --reference \
      --out "$OUT/topk_bench.json" 2>&1 | tail -30
    stamp logits variants; timeout ${LOGITS_S:-230} python3 benchmark/bench_mqa_logits.py \
      --out "$OUT/mqa_logits.json" 2>&1 | tail -40
    stamp done ;;
  start)
    [ -d $S/fastapi ] || unpack c3  # a second round on the same machine needs no chunk
    flashmla
    python3 -c "import sglang.srt.models.deepseek_v2, sglang.srt.layers.attention.dsa_backend; print('sglang ok')" \
      2>&1 | tail -1
    stamp start; timeout 540 python3 benchmark/sglang_e2e_1gpu.py start ${SPECS:-} 2>&1 | cut -c1-220
    stamp done ;;
  tests)
    stamp gpu tests
    # The tiers new in this round first, so a cut-short run still checks them.
    FILES=${TEST_FILES:-"test/srt/test_deep_gemm_tier.py test/srt/test_sgl_kernel_tier.py test/srt/test_triton_ops.py
      test/srt/test_flashmla_tier.py test/srt/test_triton_topk.py test/srt/test_token_parallel_dist.py"}
    timeout ${TESTS_S:-330} python3 -m pytest -q -p no:cacheprovider -m gpu -rfE $FILES \
      > "$OUT/gpu_tests.txt" 2>&1; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -25
    if [ "${RUN_S:-150}" -gt 0 ]; then
      stamp nsa-tp run; timeout ${RUN_S:-150} python3 -m nsa_tp run > "$OUT/nsa_tp_run.txt" 2>&1
      tail -4 "$OUT/nsa_tp_run.txt"
    fi
    stamp wait; timeout ${WAIT_S:-220} python3 benchmark/sglang_e2e_1gpu.py wait --timeout ${WAIT_S:-220}
    stamp done ;;
  wait)
    stamp wait; timeout ${WAIT_S:-300} python3 benchmark/sglang_e2e_1gpu.py wait --timeout ${WAIT_S:-300}
    stamp done ;;
  measure)
    stamp measure; timeout ${MEASURE_S:-300} python3 benchmark/sglang_e2e_1gpu.py measure --timeout 60 \
      ${NAME:+--name $NAME} 2>&1 | tail -40
    python3 benchmark/sglang_e2e_1gpu.py stop; sleep 5
    if [ "${PROJ_S:-0}" -gt 0 ]; then
      stamp projection; timeout $PROJ_S python3 benchmark/bench_tp_projection.py \
        --out "$OUT/tp_projection.json" 2>&1 | tail -30
    fi
    stamp done ;;
  *) echo "usage: bash benchmark/gpu_single.sh kernels|variants|unpack cN|start|tests|wait|measure" >&2; exit 2 ;;
esac
