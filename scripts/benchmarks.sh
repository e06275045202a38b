#!/usr/bin/env bash
# Reproduce docs/benchmarks.md: the speed tables (speed.py) and the side-by-side comparison with Topaz and
# DoG on every dataset in ../shared/data (compare.py; installs Topaz into its own venv under
# ${CRYOMAE_BENCH_CACHE:-~/.cache/cryomae-bench} on first use). Takes about 35 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python tests/benchmarks/speed.py --max-seconds 30
.venv/bin/python tests/benchmarks/compare.py --max-queries 3 --datasets empiar10017/bin4 --pickers topaz-trained \
  --out docs/benchmarks-topaz-trained.md
.venv/bin/python tests/benchmarks/compare.py --max-queries 3 \
  --pickers "fast,fast:stride_fraction=0.25,fast:shared_tokens=false,search=coarse_to_fine,topaz,dog"
