#!/usr/bin/env bash
# Fresh machine -> the whole test suite (installs the venv and Debian's chromium for browser tests).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh --browser
export GRADIO_ANALYTICS_ENABLED=False MPLBACKEND=Agg VITSLIM_NO_PROGRESS=1 VITSLIM_FAST=1 OMP_NUM_THREADS=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
