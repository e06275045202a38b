"""Training and picking on a busy machine: quiet, and beside CPU-bound processes that are not ours.

Facility nodes and Kubernetes pods are shared. With torch's defaults (as many threads as the host has cores,
OpenMP threads that spin while they wait) a training beside other jobs ran many times slower than its share of
the CPU explains. This benchmark times the two commands a project runs, as whole processes (start-up included):

- ``cryomae train`` on ``empiar10017/bin4``: the first micrograph by name with the protocol's 15 exemplars
  (``default_rng(0)``), the default (``fast``) training;
- ``cryomae pick`` of the next 9 micrographs with that model;

for each thread policy, each ``--runs`` times, on a quiet machine and beside ``--busy`` processes that each spin
one core (``python -c 'while True: pass'``, started before and stopped after each case). Policies:

- ``cryomae`` (what every cryomae process does now): threads from the CPU share, a waiting OpenMP thread spins
  1,000 times before it sleeps (``GOMP_SPINCOUNT=1000``);
- ``passive``: the same thread count, waiting threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``);
- ``torch-default``: the same thread count, libgomp's default spin of 300,000 (``GOMP_SPINCOUNT=300000``): what
  torch did before (its pool then had as many threads as the host's cores, here the same 2);
- ``one-thread``: ``CRYOMAE_THREADS=1``.

    .venv/bin/python tests/benchmarks/contention.py                      # every policy, 3 runs each
    .venv/bin/python tests/benchmarks/contention.py --policies cryomae --runs 5 --json /tmp/c.json

Writes ``docs/contention.json`` (every run) and prints the Markdown table of docs/performance.md: median and
spread (min-max) of each case, and the slowdown of the busy median over the quiet one. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.benchmarks``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from cryomae.io import read_coordinates, write_coordinates
from cryomae.io.coordinates import Coordinates
from tests.benchmarks.accuracy import DEFAULT_DATA_ROOT, PROJECT_ROOT, command_line, git_commit, machine

DATASET = "empiar10017/bin4"
DIAMETER = 27.0
N_EXEMPLARS, EXEMPLAR_SEED, N_QUERIES = 15, 0, 9
DEFAULT_JSON = PROJECT_ROOT / "docs" / "contention.json"
CRYOMAE = str(Path(sys.executable).with_name("cryomae"))
POLICIES: dict[str, dict[str, str]] = {
    "cryomae": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "torch-default": {"GOMP_SPINCOUNT": "300000"},
    "one-thread": {"CRYOMAE_THREADS": "1"},
}
BUSY_LOOP = "while True: pass"


def say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def busy(n: int) -> Iterator[None]:
    """``n`` processes that each keep one core busy, for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one command, as a whole process; a failure stops the benchmark with its output."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def run_case(work: Path, data: Path, policy: str, env_extra: dict[str, str]) -> dict[str, float]:
    """Train, then pick the queries, under one policy; the seconds of each."""
    mics = sorted((data / "micrographs").glob("*.mrc"))
    reference, queries = mics[0], mics[1 : 1 + N_QUERIES]
    exemplars = work / "exemplars.star"
    if not exemplars.is_file():
        table = read_coordinates(data / "coords" / f"{reference.stem}.star")
        chosen = np.random.default_rng(EXEMPLAR_SEED).choice(len(table), N_EXEMPLARS, replace=False)
        write_coordinates(exemplars, Coordinates(table.xy[chosen]))
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("CRYOMAE_", "OMP_", "GOMP_", "MKL_", "OPENBLAS_"))
    }
    env = {**clean, **env_extra}
    model, picks = work / f"model-{policy}", work / f"picks-{policy}"
    train = [CRYOMAE, "train", str(reference), "--coords", str(exemplars), "--diameter", str(DIAMETER)]
    train_s = timed([*train, "--out", str(model)], env)
    pick_s = timed([CRYOMAE, "pick", "--model", str(model), "--out", str(picks), *map(str, queries)], env)
    return {"train_s": round(train_s, 2), "pick_s": round(pick_s, 2)}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`{report['command']}` at {report['commit']}, {report['date']}, {report['machine']['cpu_count']} CPUs "
        f"({report['machine']['cpu_model']}): "
        f"{report['runs']} runs per case, beside {report['busy']} CPU-bound processes for the busy cases. "
        "Whole processes (start-up included): train = `cryomae train` on empiar10017/bin4 from 15 exemplars, "
        f"pick = `cryomae pick` of {N_QUERIES} micrographs (1024 x 1024). Median (min-max), seconds.",
        "",
        "| policy | train, quiet | train, busy | busy / quiet | pick, quiet | pick, busy | busy / quiet |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, cases in report["results"].items():
        cells = [policy]
        for key in ("train_s", "pick_s"):
            quiet = summary([r[key] for r in cases["quiet"]]) if cases.get("quiet") else None
            loaded = summary([r[key] for r in cases["busy"]]) if cases.get("busy") else None
            cells += ["-" if s is None else f"{s['median']} ({s['min']}-{s['max']})" for s in (quiet, loaded)]
            ratio = f"{loaded['median'] / quiet['median']:.1f}x" if quiet and loaded else "-"
            cells.append(ratio)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA_ROOT)
    ap.add_argument(
        "--policies", default="cryomae,passive,torch-default", help="comma-separated: " + ", ".join(POLICIES)
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--busy", type=int, default=3, help="CPU-bound processes beside the busy cases")
    ap.add_argument("--loads", default="quiet,busy")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    data = args.data / DATASET
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    report: dict[str, Any] = {
        "command": command_line(),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "runs": args.runs,
        "busy": args.busy,
        "results": {p: {load: [] for load in loads} for p in policies},
    }
    with tempfile.TemporaryDirectory(prefix="cryomae-contention-") as tmp:
        work = Path(tmp)
        for run in range(args.runs):  # runs interleaved, so that a slow minute of the machine hits every case
            for load in loads:
                for policy in policies:
                    with busy(args.busy if load == "busy" else 0):
                        result = run_case(work, data, policy, POLICIES[policy])
                    report["results"][policy][load].append(result)
                    say(f"run {run + 1}/{args.runs} {policy:10s} {load:5s} {result}")
                    args.json.parent.mkdir(parents=True, exist_ok=True)
                    args.json.write_text(json.dumps(report, indent=2) + "\n")
    say("")
    say(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
