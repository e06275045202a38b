#!/usr/bin/env bash
# Reproduce docs/benchmarks.md: the speed tables (speed.py) and the side-by-side comparison with Topaz and
# DoG on every dataset in ../shared/data, every query (compare.py with its default pickers: cryomae fast and two
# search variants, Topaz pretrained and trained on the 15 exemplars, DoG; cryomae fast also over exemplar draws
# 1-4). Topaz is installed into its own venv under ${CRYOMAE_BENCH_CACHE:-~/.cache/cryomae-bench} on first use.
# On a 2-core CPU: about 2 hours the first time (Topaz: 5-45 s per micrograph, about 5 minutes of training per
# dataset; 112 minutes for compare.py in session 17), about 40 minutes once Topaz's results are cached
# (tests/benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
.venv/bin/python tests/benchmarks/speed.py --max-seconds 30
.venv/bin/python tests/benchmarks/compare.py
