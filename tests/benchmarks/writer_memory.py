"""The writer's memory over a long run: many sessions, one after another, as a facility runs for weeks.

    .venv/bin/python tests/benchmarks/writer_memory.py                      # 20,000 micrographs, 50 sessions
    .venv/bin/python tests/benchmarks/writer_memory.py --micrographs 2000 --sessions 10 --json /tmp/w.json

The real ``Writer`` (with its gallery thread off: the pictures are measured in footprint.py) handles picks
messages, as delivered by the broker, for ``--micrographs`` micrographs spread evenly over ``--sessions`` sessions
taken in turn (each session's micrographs arrive together, then the next session starts), each message with
``--candidates`` candidates. The micrographs are hard links to one small MRC file inside a data root, so the disk
holds the outputs only. The process's resident memory (VmRSS) is read after every ``--every`` messages; the table
gives it at the start, after each tenth of the run and at the end, with the sessions the writer holds open
(``service.lru``: an idle session is closed, and read back from disk if it is busy again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.io import write_mrc
from cryomae.messages import PicksReady, SessionStarted
from cryomae.messaging.base import Envelope
from cryomae.messaging.memory import MemoryBroker
from cryomae.service.writer import Writer
from cryomae.store.projects import ProjectStore

PROJECT, SIDE, DIAMETER = "bench", 512, 24.0


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


_MAKE_VERSION = """
import sys, torch
from pathlib import Path
from cryomae.model.checkpoint import save_model
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import PRESETS
from cryomae.preprocess import Geometry
from cryomae.store.projects import ProjectStore
model = MaskedAutoencoder(PRESETS["test"])
geometry = Geometry(diameter=float(sys.argv[3]), box_factor=1.0, img_size=PRESETS["test"].img_size)
bank = model.features(torch.zeros(2, 1, geometry.img_size, geometry.img_size))
with ProjectStore(Path(sys.argv[1])).staged_version(sys.argv[2]) as (version, folder):
    save_model(folder, model, bank, geometry, {})
print(version)
"""


def _published_version(store: ProjectStore) -> str:
    """A model version in the store, made in a child process: the writer never loads torch, nor does this one."""
    out = subprocess.run(
        [sys.executable, "-c", _MAKE_VERSION, str(store.root), PROJECT, str(DIAMETER)],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def run(
    micrographs: int, sessions: int, candidates: int, every: int, root: Path, idle_s: float, keep_all: bool = False
) -> dict[str, object]:
    data, outputs = root / "data", root / "outputs"
    store = ProjectStore(root / "store")
    store.create_project(PROJECT, DIAMETER, {})
    version = _published_version(store)
    source = data / "source.mrc"
    source.parent.mkdir(parents=True)
    write_mrc(source, np.random.default_rng(0).normal(size=(SIDE, SIDE)).astype(np.float32))
    writer = Writer(MemoryBroker(), outputs, store=store, roots=[data])
    writer._sessions.idle_s = idle_s
    if keep_all:  # as before issue 25: every session kept open for good
        writer._sessions.idle_s, writer._sessions.max_open = float("inf"), 10**9
    rng = np.random.default_rng(1)
    per_session = micrographs // sessions
    samples = [(0, rss_bytes(), 0)]
    t0 = time.perf_counter()
    done = 0
    for s in range(sessions):
        folder = data / f"session_{s:03d}"
        folder.mkdir()
        started = SessionStarted(project=PROJECT, session=f"session_{s:03d}", folder=str(folder))
        writer.handle(Envelope("picks", started.body()))  # as the watcher tells the writer
        for i in range(per_session):
            path = folder / f"mic_{i:05d}.mrc"
            os.link(source, path)
            xy = rng.uniform(DIAMETER, SIDE - DIAMETER, size=(candidates, 2))
            msg = PicksReady(
                project=PROJECT,
                session=f"session_{s:03d}",
                micrograph=str(path),
                micrograph_id=f"m{s}-{i}",
                model_version=version,
                diameter=DIAMETER,
                threshold=0.5,
                x=[round(float(v), 2) for v in xy[:, 0]],
                y=[round(float(v), 2) for v in xy[:, 1]],
                scores=[round(float(v), 4) for v in rng.random(candidates)],
                shape=(SIDE, SIDE),
                complete_at=time.time(),
            )
            writer.handle(Envelope("picks", msg.body()))
            done += 1
            if done % every == 0:
                samples.append((done, rss_bytes(), len(writer._sessions)))
    seconds = time.perf_counter() - t0
    return {
        "micrographs": done,
        "sessions": sessions,
        "candidates": candidates,
        "seconds": round(seconds, 1),
        "messages_per_s": round(done / seconds, 1),
        "samples": [{"messages": m, "rss_mib": round(r / 2**20, 1), "open_sessions": o} for m, r, o in samples],
        "evicted": writer._sessions.evicted,
        "idle_s": idle_s,
        "keep_all": keep_all,
        "torch_loaded": "torch" in sys.modules,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--micrographs", type=int, default=20_000)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--candidates", type=int, default=300)
    p.add_argument("--every", type=int, default=200)
    p.add_argument(
        "--idle-s",
        type=float,
        default=2.0,
        help="the writer's idle time before it closes a session (the product's is 600 s for sessions of hours; "
        "this run is hundreds of times faster, so its sessions take seconds)",
    )
    p.add_argument("--keep-all", action="store_true", help="never close a session (the writer before issue 25)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="writer-memory-") as tmp:
        result = run(
            args.micrographs, args.sessions, args.candidates, args.every, Path(tmp), args.idle_s, args.keep_all
        )
    samples = result["samples"]
    assert isinstance(samples, list)
    step = max(1, len(samples) // 10)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    print(
        f"{result['micrographs']} micrographs over {result['sessions']} sessions, {result['candidates']} candidates "
        f"each: {result['seconds']} s ({result['messages_per_s']} messages/s), {result['evicted']} sessions closed"
    )
    print("| messages handled | resident MiB | sessions open |")
    print("|---|---|---|")
    for row in shown:
        print(f"| {row['messages']:,} | {row['rss_mib']} | {row['open_sessions']} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
