#!/usr/bin/env bash
# Install everything from scratch into .venv and play a live collection session:
# micrographs written into a watched folder -> 15 exemplars registered -> trained -> every micrograph picked live.
# Extra arguments go to `cryomae demo` (e.g. --broker amqp://guest:guest@127.0.0.1:5672/ --count 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/cryomae demo "$@"
