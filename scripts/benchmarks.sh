#!/usr/bin/env bash
# Reproduce docs/benchmarks.md: the speed tables (speed.py) and the side-by-side comparison with Topaz and
# DoG on every dataset in ../shared/data, every query (compare.py with its default pickers: cryomae fast and two
# search variants, Topaz pretrained and trained on the 15 exemplars, DoG). Topaz is installed into its own venv
# under ${CRYOMAE_BENCH_CACHE:-~/.cache/cryomae-bench} on first use. On a 2-core CPU: 1 to 2 hours the first
# time (Topaz: 10-70 s per micrograph, 3-8 minutes of training per dataset; 59 minutes on a quiet machine in
# session 6), about 20 minutes once Topaz's
# results are cached (tests/benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python tests/benchmarks/speed.py --max-seconds 30
.venv/bin/python tests/benchmarks/compare.py
