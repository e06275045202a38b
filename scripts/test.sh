#!/usr/bin/env bash
# Install everything from scratch into .venv and run the checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
.venv/bin/ruff check shared tests
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
