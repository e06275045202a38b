"""The writer's gallery thread: keeps each session's page (``cryomae.gallery.page``) in step with its STAR files.

The writer hands over what changed (``picked``, ``rethresholded``) and goes on at once: reading a micrograph and
drawing its pictures happen here, in a thread of its own, so the STAR files are never held up by them and the
writer's throughput is the same with the gallery on. Work for the same micrograph coalesces; the page's index is
written once per batch, so a backlog costs one index write, not one per micrograph.

Nothing here can break the outputs: the gallery writes only under ``<session>/gallery``, and a micrograph that
cannot be read (moved, truncated, outside the data roots now) gets an entry that says so instead of a picture.
A session first seen by this process is checked for micrographs without their gallery files (a crash between
the STAR files and the pictures), and those are drawn then.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryomae.gallery.page import SessionGallery, read_pixels
from cryomae.messages import PickFailed
from cryomae.service import metrics
from cryomae.service.handling import get_logger
from cryomae.service.lru import OpenSessions
from cryomae.service.watcher import WATCHER_STATE
from cryomae.store.outputs import SessionOutputs
from cryomae.watching.ledger import read_ledger

log = get_logger("gallery")

SeenSource = Callable[[str, str], int | None]  # (project, session) -> micrographs the watcher published


@dataclass
class _Work:
    outputs: SessionOutputs
    micrographs: dict[str, None] = field(default_factory=dict)  # ordered set
    failures: list[PickFailed] = field(default_factory=list)
    redraw: bool = False


class GalleryWorker:
    """Draws the galleries of the sessions the writer writes. ``size``: picture pixels; ``max_pixels``: the
    largest micrograph read; ``roots``: the data roots a micrograph must still lie in; ``seen``: the count of
    micrographs seen, for the page's summary (``seen_in_ledger``)."""

    def __init__(
        self,
        *,
        size: int,
        max_pixels: int,
        roots: Sequence[Path],
        seen: SeenSource | None = None,
    ) -> None:
        self.size = size
        self.max_pixels = max_pixels
        self.roots = [Path(r).resolve() for r in roots]
        self.seen = seen
        self._work: dict[Path, _Work] = {}
        self._galleries: OpenSessions[Path, SessionGallery] = OpenSessions()  # idle ones closed (service.lru)
        self._busy = False
        self._stopping = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ the writer's side

    def _queue(self, outputs: SessionOutputs) -> _Work:
        work = self._work.get(outputs.root)
        if work is None:
            work = self._work[outputs.root] = _Work(outputs)
        work.outputs = outputs  # the writer's latest (it reopens a session it had closed for being idle)
        return work

    def picked(self, outputs: SessionOutputs, micrograph: str) -> None:
        """A micrograph's picks were written (new or re-picked): draw it and write the index."""
        with self._changed:
            self._queue(outputs).micrographs[micrograph] = None
            self._changed.notify_all()

    def failed(self, outputs: SessionOutputs, note: PickFailed) -> None:
        """A micrograph of the session was dead-lettered by the picker: list it as failed and write the index."""
        with self._changed:
            self._queue(outputs).failures.append(note)
            self._changed.notify_all()

    def rethresholded(self, outputs: SessionOutputs) -> None:
        """The session's cutoff changed: draw every micrograph's picks again and write the index."""
        with self._changed:
            self._queue(outputs).redraw = True
            self._changed.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until everything handed over so far is on disk; False when ``timeout`` ran out first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._work and not self._busy, timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gallery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work handed over (within ``timeout``), then end the thread."""
        self.wait_idle(timeout)
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._work or self._stopping)
                if self._stopping and not self._work:
                    return
                batch, self._work, self._busy = self._work, {}, True
            try:
                for root, work in batch.items():
                    self._update(root, work)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()

    def _update(self, root: Path, work: _Work) -> None:
        started = time.monotonic()
        try:
            fresh = self._galleries.peek(root) is None  # only this thread opens galleries
            gallery = self._galleries.get(root, lambda: SessionGallery(work.outputs, self.size))
            gallery.outputs = work.outputs  # the writer's open outputs (it reopens a session it had closed)
            if fresh:  # first seen by this process, or again after it was idle: also what a crash left undrawn
                gallery.remove_temp_files()
                work.micrographs.update(dict.fromkeys(gallery.missing()))
            for note in work.failures:
                gallery.record_failure(note.micrograph, note.reason, note.failed_at)
            for micrograph in work.micrographs:
                gallery.add(micrograph, self._pixels(micrograph))
            if work.redraw:
                gallery.redraw_picks()
            gallery.write_index(self._seen(gallery))
        except Exception as exc:  # noqa: BLE001 (the gallery never stops the writer; the STAR files are written)
            self._galleries.discard(root)  # the next batch of this session draws what this one left undrawn
            metrics.GALLERY_FAILURES.inc()
            log.error("gallery_failed", session=str(root), error=f"{type(exc).__name__}: {exc}")
            return
        metrics.GALLERY_SECONDS.observe(time.monotonic() - started)
        log.debug(
            "gallery_written",
            session=str(root),
            micrographs=len(work.micrographs),
            redraw=work.redraw,
            seconds=round(time.monotonic() - started, 3),
        )

    def _pixels(self, micrograph: str) -> np.ndarray | None:
        pixels, problem = read_pixels(micrograph, self.roots, self.max_pixels)
        if problem is not None:
            metrics.GALLERY_UNREADABLE.inc()
            log.warning("gallery_unreadable", micrograph=micrograph, error=problem)
        return pixels

    def _seen(self, gallery: SessionGallery) -> int | None:
        if self.seen is None or gallery.outputs.owner is None:
            return None
        try:
            return self.seen(*gallery.outputs.owner)
        except Exception as exc:  # noqa: BLE001 (a count for a page: never worth failing it)
            log.warning("gallery_seen_unknown", error=f"{type(exc).__name__}: {exc}")
            return None


def seen_in_ledger(state: Path, project: str, session: str) -> int | None:
    """Micrographs the watcher published for a session, from its ledger in the state folder ``state`` (one process,
    or a shared state volume); None where the ledger does not know the session."""
    _, summaries = read_ledger(state / WATCHER_STATE)
    summary = summaries.get((project, session))
    return None if summary is None else summary.published
