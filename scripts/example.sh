#!/usr/bin/env bash
# Install everything from scratch into .venv and run the built-in example:
# synthetic micrographs -> train on 15 exemplars -> pick -> evaluate -> preview.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/cryomae example --out "${1:-runs/example}"
