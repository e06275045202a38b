#!/usr/bin/env bash
# Install everything from scratch into .venv and run the built-in example:
# synthetic micrographs -> train on 15 exemplars -> pick -> evaluate -> preview.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/cryomae example --out "${1:-runs/example}"
