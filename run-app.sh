#!/usr/bin/env bash
# Fresh machine -> the vitslim app on the bundled digits demo at http://127.0.0.1:7860 (no internet needed).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/vitslim app "$@"
