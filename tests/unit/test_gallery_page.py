"""The session gallery's files: what the page reads agrees with the STAR files, a re-threshold redraws the
pictures, an unreadable micrograph gets an entry without a picture, and the writer's gallery thread keeps up,
catches up after a crash and never stops for a failure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import starfile
from PIL import Image

from cryomae.gallery.page import GALLERY_DIR, SessionGallery, read_pixels
from cryomae.io import write_mrc
from cryomae.messages import PicksReady
from cryomae.service.gallery import GalleryWorker
from cryomae.store.outputs import SessionOutputs
from cryomae.synthetic import make_micrograph


def _session_data(gallery: SessionGallery) -> dict:
    text = (gallery.root / "session.js").read_text()
    prefix = "window.CRYOMAE_GALLERY = "
    assert text.startswith(prefix) and text.endswith(";\n")
    return json.loads(text[len(prefix) : -2])


def _candidates(gallery: SessionGallery, key: str) -> dict:
    text = gallery.data_path(key).read_text()
    head = f"CRYOMAE_CANDIDATES({json.dumps(key)}, "
    assert text.startswith(head) and text.endswith(");\n")
    return json.loads(text[len(head) : -3])


def _picks(tmp: Path, i: int, threshold: float = 0.5) -> tuple[PicksReady, np.ndarray]:
    m = make_micrograph(shape=(384, 384), diameter=24.0, seed=i)
    path = tmp / "data" / f"mic_{i:03d}.mrc"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mrc(path, m.image)
    rng = np.random.default_rng(i)
    xy = np.concatenate([m.centres, rng.uniform(0, 383, size=(30, 2))])
    scores = np.concatenate([rng.uniform(0.5, 0.9, len(m.centres)), rng.uniform(0.1, 0.5, 30)])
    msg = PicksReady(
        project="p",
        session="s",
        micrograph=str(path),
        micrograph_id=f"m{i}",
        model_version="v1",
        diameter=24.0,
        threshold=threshold,
        x=xy[:, 0].tolist(),
        y=xy[:, 1].tolist(),
        scores=scores.tolist(),
        shape=(384, 384),
        complete_at=time.time(),
    )
    return msg, m.image


@contextmanager
def _worker(tmp_path: Path, **options: Any) -> Iterator[GalleryWorker]:
    """A running gallery thread (128 px pictures, micrographs under tmp_path/data), stopped on the way out."""
    worker = GalleryWorker(**{"size": 128, "max_pixels": 10**8, "roots": [tmp_path / "data"], **options})
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(60)


def _hand_over(worker: GalleryWorker, outputs: SessionOutputs, msg: PicksReady) -> None:
    """What the writer does with a PicksReady: its STAR files, then the picture; waits until it is drawn."""
    outputs.apply(msg)
    worker.picked(outputs, msg.micrograph)
    assert worker.wait_idle(60)


def test_page_data_agrees_with_the_star_files(tmp_path: Path) -> None:
    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    gallery = SessionGallery(outputs, size=128)
    for i in range(3):
        msg, image = _picks(tmp_path, i)
        outputs.apply(msg)
        gallery.add(msg.micrograph, image)
    # the picker gave up on two micrographs; one of them was replayed and picked since: one failed
    gallery.record_failure(str(tmp_path / "data" / "bad.mrc"), "not an MRC file", time.time())
    gallery.record_failure(outputs.micrographs()[0].micrograph, "transient", outputs.micrographs()[0].applied_at - 1)
    page = gallery.write_index(seen=4)
    assert page == outputs.root / GALLERY_DIR / "index.html" and "<script>" in page.read_text()
    data = _session_data(gallery)
    assert (data["project"], data["session"], data["cutoff"]) == ("p", "s", None)
    assert data["summary"] == {
        "seen": 4,
        "picked": 3,
        "failed": 1,
        "particles": outputs.counts().particles,
        "candidates": outputs.counts().candidates,
    }
    assert sum(data["histogram"]["counts"]) == outputs.counts().candidates
    assert [(f["name"], f["reason"]) for f in data["failures"]] == [("bad.mrc", "not an MRC file")]
    for m in data["micrographs"]:
        rows = starfile.read(outputs.coordinates_dir / f"{m['key']}_autopick.star")
        c = _candidates(gallery, m["key"])
        # the page's rule (score >= cutoff) on its data gives exactly the STAR file's rows
        assert sum(s >= m["cutoff"] for s in c["s"]) == m["particles"] == len(rows)
        assert m["factor"] == 3 and m["thumb"] == [128, 128]
        with Image.open(gallery.root / m["image"]) as im:
            assert im.size == (128, 128) and im.mode == "L"
        with Image.open(gallery.root / m["picks_image"]) as im:
            assert im.size == (128, 128) and im.mode == "RGB"


def test_rethreshold_redraws_the_pictures_and_the_page_follows(tmp_path: Path) -> None:
    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    gallery = SessionGallery(outputs, size=128)
    msg, image = _picks(tmp_path, 0)
    outputs.apply(msg)
    entry = gallery.add(msg.micrograph, image)
    before = np.asarray(Image.open(gallery.picks_path(entry.key)))
    outputs.set_threshold(0.2)
    assert gallery.redraw_picks() == 1
    gallery.write_index()
    after = np.asarray(Image.open(gallery.picks_path(entry.key)))
    assert np.abs(before.astype(int) - after.astype(int)).sum() > 0
    data = _session_data(gallery)
    assert data["cutoff"] == 0.2 and data["micrographs"][0]["cutoff"] == 0.2
    assert data["micrographs"][0]["particles"] == outputs.counts().particles


def test_a_micrograph_that_cannot_be_read_is_listed_without_a_picture(tmp_path: Path) -> None:
    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    gallery = SessionGallery(outputs, size=128)
    msg, _ = _picks(tmp_path, 0)
    outputs.apply(msg)
    pixels, problem = read_pixels(msg.micrograph, [tmp_path / "elsewhere"], 10**8)
    assert pixels is None and problem is not None and "outside" in problem
    gallery.add(msg.micrograph, pixels)
    gallery.write_index()
    (m,) = _session_data(gallery)["micrographs"]
    assert m["image"] is None and "could not be read" in m["image_problem"]
    assert m["particles"] == outputs.counts().particles


def test_the_worker_draws_what_the_writer_hands_over_and_catches_up_after_a_crash(tmp_path: Path) -> None:
    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")

    def seen(project: str, session: str) -> int | None:
        raise RuntimeError("ledger unreadable")  # counts are never worth failing the page for

    with _worker(tmp_path, seen=seen) as worker:
        for i in range(4):
            msg, _ = _picks(tmp_path, i)
            outputs.apply(msg)
            worker.picked(outputs, msg.micrograph)
        assert worker.wait_idle(60)
    gallery = SessionGallery(outputs, size=128)
    data = _session_data(gallery)
    assert [m["name"] for m in data["micrographs"]] == [f"mic_{i:03d}.mrc" for i in range(4)]
    assert all(m["image"] for m in data["micrographs"]) and data["summary"]["seen"] is None
    # a crash lost one micrograph's gallery files: a new writer process draws them when it first sees the session
    gallery.data_path("mic_002").unlink()
    gallery.image_path("mic_002").unlink()
    torn = gallery.root / "img" / ".mic_003.jpg.0123456789ab.tmp"  # a write cut short
    torn.write_bytes(b"half a JPEG")
    assert gallery.missing() == [str(tmp_path / "data" / "mic_002.mrc")]
    with _worker(tmp_path) as again:
        _hand_over(again, outputs, _picks(tmp_path, 4)[0])
    assert gallery.data_path("mic_002").is_file() and gallery.image_path("mic_002").is_file()
    assert not torn.exists()
    assert len(_session_data(gallery)["micrographs"]) == 5
    # nothing but the gallery was written beside the STAR files
    assert sorted(p.name for p in outputs.root.iterdir()) == [
        ".cryomae",
        "autopick.star",
        "coordinates",
        "gallery",
        "particles.star",
    ]


def test_gallery_build_draws_a_session_again_from_its_outputs(tmp_path: Path) -> None:
    from cryomae.operator.actions import gallery_build
    from cryomae.settings import Settings

    settings = Settings(
        outputs=tmp_path / "out", state=tmp_path / "state", store=tmp_path / "store", data_roots=[tmp_path / "data"]
    )
    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    for i in range(2):
        msg, _ = _picks(tmp_path, i)
        outputs.apply(msg)
    (tmp_path / "data" / "mic_001.mrc").write_bytes(b"damaged")  # its picture cannot be drawn
    result = gallery_build(settings, "p", "s")
    assert result["micrographs"] == 2 and result["page"] == str(outputs.root / GALLERY_DIR / "index.html")
    assert [u["micrograph"] for u in result["unreadable"]] == [str(tmp_path / "data" / "mic_001.mrc")]
    data = _session_data(SessionGallery(outputs))
    assert [m["image"] is not None for m in data["micrographs"]] == [True, False]


def test_the_worker_counts_what_it_could_not_draw_and_carries_on(tmp_path: Path) -> None:
    from cryomae.service import metrics

    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    unreadable = metrics.GALLERY_UNREADABLE._value.get()
    batches = metrics.GALLERY_SECONDS._sum.get()
    with _worker(tmp_path, max_pixels=100) as worker:  # every micrograph too large
        _hand_over(worker, outputs, _picks(tmp_path, 0)[0])
    assert metrics.GALLERY_UNREADABLE._value.get() == unreadable + 1
    assert metrics.GALLERY_SECONDS._sum.get() > batches
    (m,) = _session_data(SessionGallery(outputs))["micrographs"]
    assert m["image"] is None and m["particles"] == outputs.counts().particles


def test_a_repick_replaces_the_micrographs_gallery_files(tmp_path: Path) -> None:
    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    with _worker(tmp_path) as worker:
        first, _ = _picks(tmp_path, 0)
        _hand_over(worker, outputs, first)
        gallery = SessionGallery(outputs, size=128)
        (before,) = _session_data(gallery)["micrographs"]
        # a new model picks it again: other scores, a later pick
        again = first.model_copy(
            update={
                "id": "repick",
                "model_version": "v2",
                "scores": [s / 2 for s in first.scores],
                "picked_at": first.picked_at + 1,
            }
        )
        assert outputs.apply(again).outcome == "replaced"
        worker.picked(outputs, again.micrograph)
        assert worker.wait_idle(60)
    (after,) = _session_data(gallery)["micrographs"]
    assert after["key"] == before["key"] and after["model_version"] == "v2"
    assert after["version_token"] != before["version_token"]  # the page loads its pictures and candidates again
    assert _candidates(gallery, after["key"])["s"] == again.scores


def test_a_failed_batch_is_drawn_again_with_the_sessions_next_one(tmp_path: Path) -> None:
    from cryomae.service import metrics

    outputs = SessionOutputs(tmp_path / "out" / "p" / "s")
    blocker = outputs.root / GALLERY_DIR / "data"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the candidates folder goes")  # every candidates file fails to be written
    failures = metrics.GALLERY_FAILURES._value.get()
    with _worker(tmp_path) as worker:
        first, _ = _picks(tmp_path, 0)
        _hand_over(worker, outputs, first)
        assert metrics.GALLERY_FAILURES._value.get() == failures + 1
        blocker.unlink()
        _hand_over(worker, outputs, _picks(tmp_path, 1)[0])
    gallery = SessionGallery(outputs, size=128)
    assert gallery.missing() == []  # the first micrograph too, though nothing named it again
    assert [m["image"] is not None for m in _session_data(gallery)["micrographs"]] == [True, True]
