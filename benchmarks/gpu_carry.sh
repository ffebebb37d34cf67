#!/usr/bin/env bash
# Fill the git-ignored folders that a call on the GPU machine carries; that machine has torch, triton,
# transformers, peft and accelerate but reaches no package registry. Run here, in the repo root:
#   bash benchmarks/gpu_carry.sh
#   .carry_w    wheels the GPU image lacks: pydantic (+ its core, annotated-types, typing-inspection),
#               gguf, liger-kernel (the standard stack's optional kernels)
#   .carry_bnb  bitsandbytes, the standard stack's 4-bit (~43 MB: one call carries at most 64 MiB)
#   .carry_tok  SmolLM2's tokenizer files, for the tests' TUNERY_TEST_TOKENIZER (the 98 MB GGUF stays here)
# Then each call carries them and starts with (its python is 3.12):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry_w/*.whl .carry_bnb/*.whl \
#     >/dev/null 2>&1; export PYTHONPATH=/tmp/site:$PWD/src TUNERY_TEST_TOKENIZER=$PWD/.carry_tok
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {  # fetch DIR NAME==VERSION...: wheels for the GPU machine's CPython 3.12, no dependencies
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLAT[@]}" -d "$dir" "$@"
}
# Versions: the ones scripts/constraints.txt pins where it has them (pydantic-core must match pydantic).
pin() { grep -i "^$1==" scripts/constraints.txt | head -1; }
fetch .carry_w "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
  "$(pin gguf)" "liger-kernel==0.8.5"
fetch .carry_bnb "bitsandbytes==0.50.2"
# The tokenizer of the embedded model, from its cached conversion (made by the first use if missing).
tok=$(.venv/bin/python -c 'from tunery.models import resolve_model_path; print(resolve_model_path("default"))')
mkdir -p .carry_tok
cp "$tok"/tokenizer* "$tok"/special_tokens_map.json .carry_tok/ 2>/dev/null || cp "$tok"/tokenizer* .carry_tok/
du -sh .carry_w .carry_bnb .carry_tok
