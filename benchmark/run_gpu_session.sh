#!/usr/bin/env bash
# One GPU session for the Triton tier: GPU tests and the kernel benchmark, everything written under $OUT.
#
# Compiles dominate a cold run, so the four test groups and a compile-only pass of the benchmark
# (`--warm-only`: same integer specializations, Triton's on-disk cache then hits) run side by side first;
# the timed benchmark runs alone afterwards. Carried wheels (.wheels/: FlashMLA, pytest) are installed
# into /tmp/site when present.
set -u
OUT=${OUT:-out}
LOG=$(mktemp -d)  # per-process logs; $OUT gets one combined tests.log (the device returns few files)
mkdir -p "$OUT"
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

timeout "${BENCH_S:-200}" python3 benchmark/bench_kernels.py --out "$OUT" --sweep 2>&1 | tee "$OUT/bench.log"
