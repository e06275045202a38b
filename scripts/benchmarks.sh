#!/usr/bin/env bash
# Reproduce docs/benchmarks.md: the speed tables (speed.py) and the side-by-side comparison with Topaz and
# DoG on every dataset in ../shared/data (compare.py; installs Topaz into its own venv under
# ${CRYOMAE_BENCH_CACHE:-~/.cache/cryomae-bench} on first use). Takes about an hour on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { python3.11 -m venv .venv && .venv/bin/python -m pip install -q -e '.[dev]'; }
.venv/bin/python tests/benchmarks/speed.py "$@"
.venv/bin/python tests/benchmarks/compare.py
