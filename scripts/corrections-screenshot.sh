#!/usr/bin/env bash
# The pictures of "Correcting the picker" in docs/gallery.md and docs/operations.md, from a real session:
# `cryomae demo` picks 6 EMPIAR-10017 micrographs (../shared/data) with a model trained on 15 exemplars; headless
# Chromium marks a wrong pick and two missed particles on its session page (docs/images/gallery-corrections.jpg);
# `cryomae exemplars correct` applies them under `cryomae run`, and the re-picked page is taken again
# (docs/images/gallery-corrections-after.jpg). About 5 minutes on a busy 2-core CPU; nothing is downloaded.
# Extra arguments go to tests/benchmarks/corrections_screenshot.py (--no-after: the first picture only).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/cryomae ] || { echo "no .venv: bash scripts/install.sh dev" >&2; exit 1; }
.venv/bin/python tests/benchmarks/corrections_screenshot.py "$@"
