#!/usr/bin/env bash
# One device call on a multi-GPU host (2 or 4 GPUs): NCCL equivalence tests of the sharded layer and the
# token-parallel path, then the multi-GPU benchmarks. Everything lands in $OUT/multi.tgz (the device returns
# few files) plus $OUT/summary.txt. Phases are time-boxed so the call ends inside the device's 10 minutes.
#
#   bash benchmark/gpu_multi.sh            # GPUS=all visible; PHASES="tests layer tp" by default
#   GPUS=0,1 PHASES="tests tp" bash benchmark/gpu_multi.sh
set -u
OUT=${OUT:-/tmp/out}; R=$(mktemp -d); mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
if ls .wheels/sgl_flash_mla-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fmla .wheels/sgl_flash_mla-*.whl >/dev/null 2>&1 \
    && export PYTHONPATH=$PYTHONPATH:/tmp/fmla
fi
[ -n "${GPUS:-}" ] && export CUDA_VISIBLE_DEVICES=$GPUS
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi -L > "$R/cards.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', $N)" \
  | tee -a "$R/cards.txt"
PT="python3 -m pytest -q -s -p no:cacheprovider"
for phase in ${PHASES:-tests layer tp}; do
  echo "=== $phase $(date -u +%H:%M:%S)"
  case $phase in
    tests)  # correctness: every layout vs one GPU (real dims, NCCL), token-parallel vs pure TP on NCCL
      timeout "${TESTS_S:-240}" $PT test/nightly/test_sharded_layer_nccl.py > "$R/test_sharded_layer_nccl.log" 2>&1 &
      timeout "${TESTS_S:-240}" $PT -m multigpu test/srt/test_token_parallel_dist.py > "$R/test_token_parallel_nccl.log" 2>&1 &
      wait
      grep -h -E "rel err|passed|failed|Error" "$R"/test_*nccl.log | tail -20 ;;
    layer)  # batch-1 prefill latency per layout (pure TP, partial and full DP attention)
      timeout "${LAYER_S:-150}" python3 benchmark/bench_layer_modes.py --world "$N" --out "$R" 2>&1 \
        | tee "$R/bench_layer_modes.log" | tail -10 ;;
    tp)     # token-parallel vs pure TP (prefill 8K/32K, decode 128K key-sharded) + TP4/TP8 projection
      timeout "${TP_S:-180}" python3 benchmark/bench_token_parallel.py --world "$N" --project-to 4 8 \
        --out "$R/token_parallel_x$N.json" 2>&1 | tee "$R/bench_token_parallel.log" | tail -25 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
tar czf "$OUT/multi_x$N.tgz" -C "$R" .
grep -h -E "rel err|passed|failed" "$R"/*.log > "$OUT/summary_x$N.txt" 2>/dev/null
echo "done $(date -u +%H:%M:%S)"
