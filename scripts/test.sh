#!/usr/bin/env bash
# Install everything from scratch into .venv and run the checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/ruff check shared tests
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
