#!/usr/bin/env bash
# Set up everything vitslim needs in ./.venv (idempotent). Usage: scripts/setup.sh [--browser]
#   --browser  also install Debian's chromium for the browser tests (needs root/apt-get)
# Every run also installs Debian's Fashion-MNIST (dataset-fashion-mnist) where apt-get exists and the
# files are not there yet; without it `--data fashion-mnist` needs `--download` (torchvision).
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
fashion_missing=0
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  [ -f "/usr/share/datasets/fashion-mnist/$f.gz" ] || fashion_missing=1
done
if [ "$fashion_missing" = 1 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; then
      echo "setup: could not install dataset-fashion-mnist; Fashion-MNIST needs --download (torchvision)" >&2
    fi
  fi
fi
