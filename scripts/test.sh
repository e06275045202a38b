#!/usr/bin/env bash
# The README's test command: install everything the tests need on a fresh machine (the project in .venv,
# promtool and Chromium from Debian's packages, a running RabbitMQ), then run the checks and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
bash scripts/test-services.sh
.venv/bin/ruff check shared tests services
.venv/bin/ruff format --check shared tests services
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
