#!/usr/bin/env bash
# The GPU sessions that start no SGLang server (those are benchmark/sglang_launch.py's): kernels, kernel variants,
# GPU tests, the Triton tier's session and the multi-GPU NCCL tests and benchmarks. Each phase is one device call
# under 10 minutes, from the repo root on the GPU machine; /tmp survives between calls while the machine is warm.
#
#   bash benchmark/gpu_kernels.sh kernels    # carry .sgl/c2 .sgl/bin .wheels: unpack c2, then gpu_costs.sh (every tier vs upstream)
#   bash benchmark/gpu_kernels.sh variants   # our top-k / logits kernel variants next to upstream's kernels
#   bash benchmark/gpu_kernels.sh unpack c2  # carry .sgl/c2 .sgl/bin .wheels (only when `kernels` did not run)
#   bash benchmark/gpu_kernels.sh unpack c1  # carry .sgl/c1 .sgl/bin (with c2 and c3: SGLang's stack)
#   bash benchmark/gpu_kernels.sh tests      # GPU tests (and `nsa-tp run`); then waits for servers the launcher
#                                            # started (`sglang_launch.py --gpus 1 start`), if any
#   bash benchmark/gpu_kernels.sh triton     # the Triton tier: its GPU tests beside a compile-only benchmark pass,
#                                            # then the timed kernel benchmark (bench_kernels.py --sweep)
#   bash benchmark/gpu_kernels.sh multi      # 2-8 GPUs: NCCL equivalence tests, layer modes, token-parallel bench;
#                                            # GPUS=0,1 PHASES="tests layer tp" (default all three); $OUT/multi_xN.tgz
#   bash benchmark/gpu_kernels.sh projection # token-parallel projection from one-GPU costs (PROJ_S, default 250 s)
#
# The kernel phase writes the card's tuning table to /tmp/bench/tuning.json; SGLang servers started afterwards by
# benchmark/sglang_launch.py read it through NSA_TP_TUNING_FILE, so the plugin routes by what this card measured
# a minute earlier. Without that phase the plugin reads the committed table for the card (nsa_tp/ops/measured/).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/bench
S=/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
stamp() { echo "=== $* $(date -u +%H:%M:%S)"; }
unpack() { bash .sgl/bin/device.sh unpack "$1" | tail -1; }
flashmla() {
  [ -d $S/flash_mla ] || python3 -m pip install -q --no-index --no-deps --target $S .wheels/sgl_flash_mla-*.whl
}
case ${1:-} in
  kernels|unpack|variants|tests|projection)
    export PYTHONPATH=$S:$(pwd)/python
    [ -f /tmp/bench/tuning.json ] && export NSA_TP_TUNING_FILE=/tmp/bench/tuning.json ;;
  triton) export PYTHONPATH=python ;;
  multi) export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} ;;
esac

case ${1:-} in
  kernels)
    stamp unpack c2; unpack c2; flashmla
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$OUT/card.txt"
    python3 -c "import torch, triton, flash_mla, deep_gemm, sgl_kernel; print('torch', torch.__version__, 'triton',
triton.__version__, 'imports ok')" 2>&1 | tail -2
    # Every tier of every op, the card's table (which the SGLang servers read through NSA_TP_TUNING_FILE), the
    # timed auto check, the Costs record and the projection: one script, the one that writes them (issue 20).
    bash benchmark/gpu_costs.sh; rc=$?
    slug=$(python3 -c "import torch; from nsa_tp.ops.tuning import card_slug; print(card_slug(torch.cuda.get_device_name()))")
    mkdir -p /tmp/bench && cp "$OUT/$slug.json" /tmp/bench/tuning.json && echo "tuning table: /tmp/bench/tuning.json"
    [ $rc -eq 0 ] || echo "gpu_costs.sh exit $rc (see $OUT/gpu_costs.log)"
    stamp done ;;
  unpack)
    unpack "$2"; [ "$2" = c2 ] && flashmla; true ;;
  variants)
    stamp topk variants; timeout ${TOPK_S:-170} python3 benchmark/bench_topk.py --reference \
      --out "$OUT/topk_bench.json" 2>&1 | tail -30
    stamp logits variants; timeout ${LOGITS_S:-230} python3 benchmark/bench_mqa_logits.py \
      --out "$OUT/mqa_logits.json" 2>&1 | tail -40
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
    if [ -f "${E2E_STATE:-/tmp/nsa_e2e}/servers.json" ]; then  # servers started by the launcher: wait for them
      stamp wait; timeout ${WAIT_S:-220} python3 benchmark/sglang_launch.py --gpus 1 wait --timeout ${WAIT_S:-220}
    fi
    stamp done ;;
  triton)  # was run_gpu_session.sh: compiles dominate a cold run, so the four test groups and a compile-only
    # pass of the benchmark (same integer specializations: Triton's on-disk cache then hits) run side by side
    LOG=$(mktemp -d)  # per-process logs; $OUT gets one combined tests.log (the device returns few files)
    export PYTHONUNBUFFERED=1 PYTHONPATH=python
    if ls .wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .wheels/*.whl >"$LOG/pip.log" 2>&1 && export PYTHONPATH=/tmp/site:python
    fi
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv \
        >"$LOG/gpu.txt" 2>&1
    python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
    python3 -c "import flash_mla; print('flash_mla', flash_mla.__file__)" 2>&1 | tail -1

    T=test/srt/test_triton_ops.py
    PT="python3 -m pytest -q -m gpu -p no:cacheprovider"
    timeout "${TEST_S:-150}" $PT $T -k "matches_reference" >"$LOG/pytest_a.log" 2>&1 &
    timeout "${TEST_S:-150}" $PT $T -k "topk_2048 or split_merge or exact_fp8" >"$LOG/pytest_b.log" 2>&1 &
    timeout "${TEST_S:-150}" $PT $T -k "decode" >"$LOG/pytest_c.log" 2>&1 &
    timeout "${TEST_S:-150}" $PT $T -k "logits or rejects or auto" >"$LOG/pytest_d.log" 2>&1 &
    timeout "${WARM_S:-150}" python3 benchmark/bench_kernels.py --warm-only --sweep >"$LOG/warm.log" 2>&1 &
    wait
    for f in "$LOG"/gpu.txt "$LOG"/pytest_*.log "$LOG"/warm.log "$LOG"/pip.log; do
        [ -f "$f" ] && { echo "== $(basename "$f")"; cat "$f"; }
    done >"$OUT/tests.log"
    grep -h -E "passed|failed|error" "$LOG"/pytest_*.log | tail -n 8
    grep -h -E "^(FAILED|ERROR)" "$LOG"/pytest_*.log | head -n 20
    tail -n 3 "$LOG/warm.log"

    timeout "${BENCH_S:-200}" python3 benchmark/bench_kernels.py --out "$OUT" --sweep 2>&1 | tee "$OUT/bench.log" ;;
  multi)  # was gpu_multi.sh: phases time-boxed so the call ends inside the device's 10 minutes
    R=$(mktemp -d)
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
    echo "done $(date -u +%H:%M:%S)" ;;
  projection)  # the token-parallel projection from one-GPU per-rank costs (after the servers stopped)
    stamp projection; timeout ${PROJ_S:-250} python3 benchmark/bench_tp_projection.py \
      --out "$OUT/tp_projection.json" 2>&1 | tail -30
    stamp done ;;
  *) echo "usage: bash benchmark/gpu_kernels.sh kernels|variants|unpack cN|tests|triton|multi|projection" >&2; exit 2 ;;
esac
