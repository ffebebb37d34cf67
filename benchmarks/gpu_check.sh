#!/usr/bin/env bash
# One call on the GPU machine: install the carried wheels, run the GPU tests, then (optionally) the
# QLoRA speed comparison of issue 5. Everything lands in $OUT (or ./gpu_out). Fill the carry folders
# first, here: `bash benchmarks/gpu_carry.sh`; then carry .carry_w, .carry_bnb and .carry_tok and run
#   bash benchmarks/gpu_check.sh tests            # the GPU test set, ~3 min
#   bash benchmarks/gpu_check.sh speed TAG        # memory.py tunery_act vs standard and liger, 2 rounds, ~5 min
#   bash benchmarks/gpu_check.sh all TAG          # both
#   bash benchmarks/gpu_check.sh trace TAG        # tunery_act once + a profile of two replays, ~2 min
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry_w/*.whl .carry_bnb/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 TUNERY_TEST_TOKENIZER=$PWD/.carry_tok
what=${1:-tests}
tag=${2:-_gpu}
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graph.py tests/test_kernels_gpu.py \
    tests/test_quant.py tests/test_offload.py tests/test_plan.py tests/test_weight_stream.py tests/test_dora.py \
    tests/test_methods.py tests/test_generate.py > "$OUT/gpu_tests$tag.log" 2>&1
  tail -3 "$OUT/gpu_tests$tag.log"
fi
if [ "$what" = speed ] || [ "$what" = all ]; then
  python3 benchmarks/memory.py --stacks tunery_act,standard,liger --rounds 2 --tag "$tag" > "$OUT/speed$tag.log" 2>&1  # + $OUT/memory$tag.json
  tail -15 "$OUT/speed$tag.log"
fi
if [ "$what" = trace ]; then  # one tunery_act run, then two replays under the profiler: where the GPU idles
  python3 benchmarks/memory.py --stacks tunery_act --rounds 1 --trace --tag "$tag" > "$OUT/trace$tag.log" 2>&1
  tail -5 "$OUT/trace$tag.log"; head -40 "$OUT"/profile_tunery_act_qlora"$tag".txt
fi
