"""What the session gallery costs the writer, per micrograph, at 1024 and 4096 px.

For each size, ``--count`` synthetic micrographs (MRC, float32, noise with particles) are written once; then

1. **STAR only**: the writer's work per micrograph without the gallery (``SessionOutputs.apply`` of a PicksReady
   with ``--candidates`` candidates: state, per-micrograph STAR, index, particles.star append, fsyncs);
2. **gallery alone**: what the gallery thread does per micrograph (read the micrograph, shrink and filter it,
   two JPEGs, the candidates file) and the index write, serially;
3. **writer with the gallery on**: the STAR writes with ``GalleryWorker`` drawing in its thread, as the writer
   runs: the writer's own rate (apply calls per second, which the STAR latency follows) and the rate at which
   pictures are finished (first apply to the worker idle).

    .venv/bin/python tests/benchmarks/gallery.py                     # about 2 minutes; prints a Markdown table
    .venv/bin/python tests/benchmarks/gallery.py --json docs/gallery-benchmark.json
    .venv/bin/python tests/benchmarks/gallery.py --warm     # the micrographs left in the page cache
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cryomae.gallery.page import SessionGallery, read_pixels
from cryomae.io import write_mrc
from cryomae.messages import PicksReady
from cryomae.service.gallery import GalleryWorker
from cryomae.store.outputs import SessionOutputs

MAX_PIXELS = 2**27


def _micrographs(folder: Path, size: int, count: int) -> list[Path]:
    rng = np.random.default_rng(size)
    base = rng.normal(0.0, 1.0, size=(size, size)).astype(np.float32)
    paths = []
    for i in range(count):
        path = folder / f"mic_{size}_{i:03d}.mrc"
        # float32 (mode 2), as motion correction writes them; distinct files, so no page cache is shared
        write_mrc(path, np.roll(base, i * 7, axis=1), dtype=np.float32)
        paths.append(path)
    return paths


def _message(path: Path, size: int, candidates: int, seed: int) -> PicksReady:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, size - 1, size=(candidates, 2))
    return PicksReady(
        project="bench",
        session=f"s{size}",
        micrograph=str(path),
        micrograph_id=f"m{seed}",
        model_version="v1",
        diameter=size / 30.0,
        threshold=0.5,
        x=xy[:, 0].tolist(),
        y=xy[:, 1].tolist(),
        scores=rng.uniform(0.0, 1.0, candidates).tolist(),
        shape=(size, size),
        complete_at=time.time(),
    )


def _drop_cache(paths: list[Path]) -> None:
    """Evict the micrographs from the page cache where the OS allows it, so reads are as from disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(work: Path, size: int, count: int, candidates: int, picture: int, warm: bool) -> dict[str, Any]:
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = _micrographs(data, size, count)
    messages = [_message(p, size, candidates, i) for i, p in enumerate(paths)]

    # 1. STAR only
    outputs = SessionOutputs(work / "star-only" / "bench" / f"s{size}")
    started = time.perf_counter()
    for msg in messages:
        outputs.apply(msg)
    star_s = (time.perf_counter() - started) / count

    # 2. the gallery's work alone, serially (on the outputs of 1)
    if not warm:
        _drop_cache(paths)
    gallery = SessionGallery(outputs, picture)
    read_s = draw_s = 0.0
    for msg in messages:
        t0 = time.perf_counter()
        pixels, problem = read_pixels(msg.micrograph, [data], MAX_PIXELS)
        assert problem is None, problem
        t1 = time.perf_counter()
        gallery.add(msg.micrograph, pixels)
        read_s, draw_s = read_s + t1 - t0, draw_s + time.perf_counter() - t1
    t0 = time.perf_counter()
    gallery.write_index()
    index_s = time.perf_counter() - t0

    # 3. the writer with the gallery thread on
    if not warm:
        _drop_cache(paths)
    live = SessionOutputs(work / "with-gallery" / "bench" / f"s{size}")
    worker = GalleryWorker(size=picture, max_pixels=MAX_PIXELS, roots=[data])
    worker.start()
    started = time.perf_counter()
    for msg in messages:
        live.apply(msg)
        worker.picked(live, msg.micrograph)
    writer_done = time.perf_counter() - started
    worker.wait_idle()
    pictures_done = time.perf_counter() - started
    worker.stop()
    return {
        "size": size,
        "micrographs": count,
        "candidates": candidates,
        "picture_px": picture,
        "star_only_ms": round(star_s * 1000, 1),
        "gallery_read_ms": round(read_s / count * 1000, 1),
        "gallery_draw_ms": round(draw_s / count * 1000, 1),
        "gallery_added_ms": round((read_s + draw_s) / count * 1000, 1),
        "index_write_ms": round(index_s * 1000, 1),
        "writer_per_s_gallery_on": round(count / writer_done, 1),
        "star_only_per_s": round(1.0 / star_s, 1),
        "pictures_per_s": round(count / pictures_done, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024,4096", help="micrograph sizes in pixels (square)")
    parser.add_argument("--count", type=int, default=20, help="micrographs per size")
    parser.add_argument("--candidates", type=int, default=1500, help="candidates per micrograph")
    parser.add_argument("--picture", type=int, default=512, help="picture size (gallery.size)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--warm",
        action="store_true",
        help="leave the micrographs in the page cache, as after the picker read them on the same host "
        "(default: evicted first, as from disk)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cryomae-gallery-bench-"))
    try:
        rows = [
            measure(work / s, int(s), args.count, args.candidates, args.picture, args.warm)
            for s in args.sizes.split(",")
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = (
        "| micrograph | STAR only | gallery added (read + draw) | index write | writer, gallery on | "
        "pictures finished |\n|---|---|---|---|---|---|"
    )
    cache = "in the page cache" if args.warm else "evicted from the page cache"
    print(f"{os.cpu_count()} CPU cores, {platform.machine()}, {args.candidates} candidates, micrographs {cache}")
    print(header)
    for r in rows:
        print(
            f"| {r['size']} x {r['size']} | {r['star_only_ms']} ms ({r['star_only_per_s']}/s) | "
            f"{r['gallery_added_ms']} ms ({r['gallery_read_ms']} + {r['gallery_draw_ms']}) | "
            f"{r['index_write_ms']} ms | "
            f"{r['writer_per_s_gallery_on']}/s | {r['pictures_per_s']}/s |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "warm": args.warm, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
