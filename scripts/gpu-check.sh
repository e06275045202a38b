#!/usr/bin/env bash
# The GPU check (issue 14): every GPU figure of the project in one call, within 8 minutes, on the lent device
# machine (Python 3.12 and its own torch, no network, the project's missing dependencies carried as wheels).
#
#   bash scripts/gpu-check.sh --prepare            # here: wheels + data subset into .gpu-check/ (ignored by git)
#   bash scripts/gpu-check.sh                      # there: install the wheels, measure, write $OUT/gpu-check.*
#   bash scripts/gpu-check.sh --dry-run --out DIR  # here and in CI: prepare, check the wheels install for 3.12,
#                                                  # then the same measurements with tiny sizes on this CPU
#
# The device call (the `run` tool): command "bash scripts/gpu-check.sh --out \"$OUT\"", carry [".gpu-check"].
# Afterwards: copy its gpu-check.json to docs/gpu-check.json and run
# `.venv/bin/python tests/benchmarks/gpu_report.py` to fill the GPU section of docs/benchmarks.md.
#
# Options: --out DIR (default $OUT, else runs/gpu-check), --work DIR (default .gpu-check: wheels/ and data/),
# --data-src DIR (default ../shared/data), --budget-s S (the measurement's time budget), --no-download (dry run:
# verify the wheel folder as it is). PYTHON picks the interpreter (default .venv/bin/python here, python3 there).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=device
OUT_DIR=${OUT:-runs/gpu-check}
WORK=.gpu-check
DATA_SRC=../shared/data
BUDGET=()
DOWNLOAD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    --out) OUT_DIR=$2; shift ;;
    --work) WORK=$2; shift ;;
    --data-src) DATA_SRC=$2; shift ;;
    --budget-s) BUDGET=(--budget-s "$2"); shift ;;
    --no-download) DOWNLOAD=0 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
DRIVER=tests/benchmarks/gpu_check.py
WHEELS=$WORK/wheels
# every manylinux tag an x86-64 glibc >= 2.28 machine accepts; pure-Python wheels (py3-none-any) match anyway
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
say() { echo "[gpu-check] $*"; }

prepare() {
  mkdir -p "$WHEELS"
  if [ "$DOWNLOAD" = 1 ] && ! "$PY" "$DRIVER" verify-wheels "$WHEELS" > /dev/null; then
    rm -f "$WHEELS"/*.whl
    mapfile -t PINS < <("$PY" "$DRIVER" verify-wheels --versions "$WHEELS")
    say "downloading ${#PINS[@]} wheels for CPython 3.12 x86-64: ${PINS[*]}"
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${PLATFORMS[@]}" -d "$WHEELS" "${PINS[@]}"
  fi
  "$PY" "$DRIVER" verify-wheels "$WHEELS" > "$WORK/wheels.json" || {
    cat "$WORK/wheels.json" >&2; echo "gpu-check: the wheel folder $WHEELS is not ready" >&2; exit 1; }
  [ -d "$DATA_SRC" ] || { echo "gpu-check: no data at $DATA_SRC (--data-src)" >&2; exit 1; }
  "$PY" "$DRIVER" prepare-data "$DATA_SRC" "$WORK/data"
  COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
  printf '{"commit": "%s", "date": "%s"}\n' "$COMMIT" "$(date -u '+%Y-%m-%d %H:%M UTC')" > "$WORK/prepared.json"
  say "ready: $(du -sh "$WORK" | cut -f1) in $WORK (wheels $(du -sh "$WHEELS" | cut -f1))"
}

case "$MODE" in
  prepare)
    prepare
    ;;
  dry-run)
    prepare
    # the device's install command, resolved for CPython 3.12 x86-64 (this Python cannot import cp312 wheels,
    # so it installs them for that target and checks what landed)
    SITE=$(mktemp -d)
    trap 'rm -rf "$SITE"' EXIT
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" --python-version 3.12 --implementation cp --only-binary=:all: "${PLATFORMS[@]}" \
      "$WHEELS"/*.whl
    for mod in mrcfile starfile pydantic pydantic_core annotated_types typing_inspection typing_extensions \
               pydantic_settings dotenv structlog pika watchdog; do
      [ -e "$SITE/$mod" ] || [ -e "$SITE/$mod.py" ] || { echo "gpu-check: $mod not installed from the wheels" >&2; exit 1; }
    done
    say "the wheels install for CPython 3.12 into a --target folder: $(ls "$SITE" | grep -c dist-info) distributions"
    mkdir -p "$OUT_DIR"
    cp "$WORK/wheels.json" "$OUT_DIR/wheels.json"
    PYTHONPATH=$PWD/shared:$PWD "$PY" "$DRIVER" run --dry-run --out "$OUT_DIR" --data "$WORK/data" "${BUDGET[@]}" \
      2>&1 | tee "$OUT_DIR/gpu-check.log"
    ;;
  device)
    [ -f "$WORK/data/manifest.json" ] && ls "$WHEELS"/*.whl > /dev/null 2>&1 || {
      echo "gpu-check: $WORK has no wheels or data: run 'bash scripts/gpu-check.sh --prepare' first and carry $WORK" >&2
      exit 1; }
    mkdir -p "$OUT_DIR"
    SITE=${TMPDIR:-/tmp}/gpu-check-site
    t0=$(date +%s)
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$WHEELS"/*.whl 2>&1 | tee "$OUT_DIR/install.log"
    say "installed $(ls "$WHEELS" | wc -l) wheels in $(( $(date +%s) - t0 )) s; $(nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi')"
    # 470 s in all: the driver's own budget (450 s by default) stops starting stages in time to write the report
    PYTHONPATH=$SITE:$PWD/shared:$PWD timeout --signal=INT --kill-after=10 470 "$PY" "$DRIVER" run \
      --out "$OUT_DIR" --data "$WORK/data" "${BUDGET[@]}" 2>&1 | tee "$OUT_DIR/gpu-check.log"
    ;;
esac
