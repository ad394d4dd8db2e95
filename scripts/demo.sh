#!/usr/bin/env bash
# Installs everything (scripts/setup.sh) and runs the main job: `trace-ray demo` on a local Ray.
# Extra arguments go to `trace-ray demo` (e.g. --out runs/demo, --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.cache/torch_extensions" TOKENIZERS_PARALLELISM=false
exec .venv/bin/trace-ray demo "$@"
