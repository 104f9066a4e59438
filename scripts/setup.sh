#!/usr/bin/env bash
# Set up everything vitslim needs in ./.venv (idempotent). Usage: scripts/setup.sh [--browser]
#   --browser  also install Debian's chromium for the browser tests (needs root/apt-get)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.vitslim-installed
want="$(sha1sum pyproject.toml | cut -c1-40)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch first and pinned: a loose range would let the resolver pick a different multi-GB build
  pip install --disable-pip-version-check -q "torch==2.14.1" "torchvision==0.29.1"
  pip install --disable-pip-version-check -q -e ".[all]"
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium not found and apt-get unavailable; browser tests will be skipped" >&2
  fi
fi
