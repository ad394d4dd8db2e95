#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the test suite on a local Ray, CPU only.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k triage`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
