#!/usr/bin/env bash
# The Triton top-k on one GPU, one shot: the benchmark first (it compiles every variant in parallel worker
# processes, with and without row starts, so the tests then hit Triton's on-disk cache), then the GPU tests.
# Everything lands under $OUT: topk_bench.json (read DEFAULT_BY_WIDTH's choice from it), topk_bench.log,
# topk_tests.log.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
python3 -c "import sgl_kernel; print('sgl_kernel', sgl_kernel.__version__, sgl_kernel.__file__)" 2>&1 | tail -n 1
timeout "${BENCH_S:-300}" python3 benchmark/bench_topk.py --reference --out "$OUT/topk_bench.json" 2>&1 \
    | tee "$OUT/topk_bench.log"
timeout "${TEST_S:-900}" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE test/srt/test_triton_topk.py \
    >"$OUT/topk_tests.log" 2>&1
echo "tests rc=$?"
grep -E "passed|failed|error" "$OUT/topk_tests.log" | tail -n 3
grep -E "^(FAILED|ERROR)" "$OUT/topk_tests.log" | head -n 30
