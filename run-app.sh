#!/usr/bin/env bash
# Fresh machine -> the vitslim app at http://127.0.0.1:7860 on the bundled runs (Fashion-MNIST first when its
# data set is installed, else the digits demo; no internet needed).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/vitslim app "$@"
