"""The writer: PicksReady and Rethreshold -> the session's STAR files (``cryomae.store.outputs``); PickFailed -> the
session page's list of failed micrographs.

The picks queue has a single active consumer, so one writer writes a session at a time even with several
replicas. One ``SessionOutputs`` per session stays open (opening one checks its particles STAR in full).

The writer trusts no message: before it creates anything it checks that the project exists in the project store,
that the session was started (the watcher's ``SessionStarted``, ahead of its picks on this queue, makes the
session's folder; no other message can), that the picks come from one of the project's published model versions,
and that the micrograph (resolved, so a symlink is followed) is an existing regular file inside the data roots whose
header gives the size the message claims (the names were checked at decoding; the path is normalised). What fails
is dead-lettered (InputError) with the reason.

Out of space on the output disk, the writer keeps the message and writes it when space returns
(``cryomae.service.diskspace``): nothing is dead-lettered or counted, and ``/readyz`` says the disk is full.

With a ``GalleryWorker`` each session's page (``<session>/gallery/index.html``) follows its STAR files, drawn in
the worker's thread after the STAR files are written (``cryomae.service.gallery``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cryomae.errors import InputError
from cryomae.io.micrographs import micrograph_shape
from cryomae.io.roots import inside_roots
from cryomae.messages import Message, PickFailed, PicksReady, Rethreshold, SessionStarted
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Consumer, Envelope
from cryomae.service import metrics
from cryomae.service.diskspace import SpaceWait, StillNoSpaceError
from cryomae.service.gallery import GalleryWorker
from cryomae.service.handling import get_logger, handling
from cryomae.service.lru import OpenSessions
from cryomae.store.outputs import SessionOutputs, check_picks
from cryomae.store.projects import ProjectStore

log = get_logger("writer")
T = TypeVar("T")


def normalised(msg: Message) -> Message:
    """The message with its micrograph path written one way (``os.path.normpath``: ``s2//m04.mrc`` and
    ``s2/./m04.mrc`` are ``s2/m04.mrc``), so that one micrograph has one row and one coordinate file."""
    micrograph = getattr(msg, "micrograph", None)
    if isinstance(micrograph, str) and micrograph and os.path.normpath(micrograph) != micrograph:
        return msg.model_copy(update={"micrograph": os.path.normpath(micrograph)})
    return msg


class Writer:
    """Applies picks and threshold changes to per-session outputs under ``outputs/<project>/<session>``."""

    def __init__(
        self,
        broker: Broker,
        outputs: Path,
        *,
        store: ProjectStore,
        roots: Sequence[Path],
        gallery: GalleryWorker | None = None,
    ) -> None:
        self.broker = broker
        self.gallery = gallery  # keeps each session's page in step, in its own thread (None: no gallery)
        self.outputs = outputs
        self.store = store  # read only: which projects and model versions exist
        self.roots = [Path(r).resolve() for r in roots]  # the data roots the micrographs must lie in
        # sessions written recently; an idle one is closed and read back when it is busy again (service.lru)
        self._sessions: OpenSessions[tuple[str, str], SessionOutputs] = OpenSessions()
        self._consumer: Consumer | None = None
        self._stopping = threading.Event()
        self.space = SpaceWait("writer", self._stopping)  # a full output disk: wait, don't fail (diskspace)
        self.deferred = 0  # messages published again after waiting ``space.hold_s`` for disk space

    def session(self, project: str, session: str) -> SessionOutputs:
        return self._sessions.get((project, session), lambda: SessionOutputs(self.outputs / project / session))

    def check(self, msg: PicksReady | Rethreshold | PickFailed | SessionStarted) -> None:
        """Refuse a message that names what does not exist or lies outside the data roots (InputError, so the
        broker dead-letters it with the reason), before any folder or file is created for it."""
        # project and session names were checked when the message was decoded (``messages.Name``)
        if isinstance(msg, SessionStarted):
            self.store.get_project(msg.project)  # InputError: no project '...' in <store>
            folder = inside_roots(msg.folder, self.roots, "; sessions are watched only under them")
            if not folder.is_dir():
                raise InputError(msg.folder, "the session folder is not a folder")
            return
        if isinstance(msg, PickFailed):
            self.store.get_project(msg.project)  # InputError: no project '...' in <store>
            # a failure is about a micrograph the picker was asked for: under the data roots, as picks are (it may
            # be gone or unreadable: that may be why it failed)
            inside_roots(msg.micrograph, self.roots, "; failures are shown only for micrographs under them")
            self._check_started(msg.project, msg.session)
            return
        if isinstance(msg, Rethreshold):
            self.store.get_project(msg.project)  # InputError: no project '...' in <store>
            folder = self.outputs / msg.project / msg.session
            if not folder.is_dir():
                raise InputError(folder, f"no outputs for session {msg.project}/{msg.session}; nothing to re-threshold")
            return
        source = f"picks of {msg.micrograph}"
        try:
            self.store.get_project(msg.project)
        except InputError as e:
            raise InputError(None, f"{source}: {e}") from None
        if msg.model_version not in self.store.versions(msg.project):
            raise InputError(
                None,
                f"{source}: model version {msg.model_version!r} is not a published version of project "
                f"{msg.project!r} (in {self.store.root})",
            )
        path = inside_roots(msg.micrograph, self.roots, "; picks are written only for micrographs under them")
        if not path.exists():
            raise InputError(msg.micrograph, "the micrograph does not exist (nothing to write picks for)")
        if not path.is_file():
            raise InputError(msg.micrograph, f"not a regular file ({path}); picks are written for micrograph files")
        actual = micrograph_shape(path)
        if actual is None:
            raise InputError(msg.micrograph, "its size cannot be read from its header; picks are not written for it")
        if tuple(msg.shape) != actual:
            raise InputError(
                msg.micrograph,
                f"{source}: the message says the micrograph is {msg.shape[1]}x{msg.shape[0]} px, the file is "
                f"{actual[1]}x{actual[0]} px (width x height)",
            )
        check_picks(msg)  # numbers, names, coordinates inside the micrograph: before anything is created
        self._check_started(msg.project, msg.session)

    def _check_started(self, project: str, session: str) -> None:
        """InputError unless the session was started (``SessionStarted``, or outputs written before it existed):
        a picks message cannot make a session folder of its own."""
        if not (self.outputs / project / session).is_dir():
            raise InputError(
                None,
                f"session {project}/{session} was never started (`cryomae session start`); outputs are written only "
                "for started sessions",
            )

    def handle(self, env: Envelope) -> None:
        with handling(log, env, (PicksReady, Rethreshold, PickFailed, SessionStarted)) as h:
            msg, out = normalised(h.message), h.fields
            assert isinstance(msg, (PicksReady, Rethreshold, PickFailed, SessionStarted))
            self.check(msg)  # before anything is created for it
            if isinstance(msg, SessionStarted):  # its folder and empty STAR files: picks of it are written from now
                out["folder"] = msg.folder
                self._on_disk(msg, out, lambda s: s.start(msg.project, msg.session))
                return
            if isinstance(msg, PickFailed):  # for the session page only: the STAR files do not change
                out["micrograph"] = msg.micrograph
                if self.gallery is not None:
                    self.gallery.failed(self.session(msg.project, msg.session), msg)
                return
            if isinstance(msg, Rethreshold):
                out["threshold"] = msg.threshold
                done = self._on_disk(msg, out, lambda s: s.apply_rethreshold(msg.project, msg.session, msg.threshold))
                if done is None:
                    return
                outputs, changed = done
                out.update(micrographs_changed=changed.micrographs_changed, particles=changed.particles)
                if self.gallery is not None:
                    self.gallery.rethresholded(outputs)
                return
            assert isinstance(msg, PicksReady)
            out.update(micrograph=msg.micrograph, model_version=msg.model_version)
            written = self._on_disk(msg, out, lambda s: s.apply(msg))
            if written is None:
                return
            outputs, result = written
            out.update(result=result.outcome, rows=result.rows, latency_s=round(result.latency_s, 3))
            if self.gallery is not None and result.outcome in ("new", "replaced"):
                self.gallery.picked(outputs, msg.micrograph)
            metrics.MICROGRAPHS_WRITTEN.labels(msg.project, result.outcome).inc()
            if result.outcome == "new":
                metrics.PARTICLES_WRITTEN.labels(msg.project).inc(result.rows)
                metrics.LATENCY.observe(result.latency_s)

    def _on_disk(
        self,
        msg: PicksReady | Rethreshold | SessionStarted,
        out: dict[str, Any],
        write: Callable[[SessionOutputs], T],
    ) -> tuple[SessionOutputs, T] | None:
        """``write`` on the message's session outputs, waiting for disk space (``self.space``): (outputs, its result),
        or None when the disk stayed full for as long as a delivery may be held. Then the message is published again
        (it comes back after those ahead of it) and this delivery acknowledged, so that waiting counts no delivery."""

        def attempt() -> tuple[SessionOutputs, T]:
            outputs = self.session(msg.project, msg.session)
            return outputs, write(outputs)

        try:
            return self.space.run(attempt, self.outputs / msg.project / msg.session)
        except StillNoSpaceError:
            self.broker.publish(topology.PICKS, msg)
            self.deferred += 1
            out["result"] = "deferred_disk_full"
            return None

    def start(self) -> None:
        if self.gallery is not None:
            self.gallery.start()
        self._consumer = self.broker.consume(topology.PICKS, self.handle, prefetch=1)
        log.info("writer_started", outputs=str(self.outputs))

    def stop(self, timeout: float | None = None) -> None:
        self._stopping.set()  # a wait for disk space ends (the message is requeued)
        if self._consumer is not None:
            self._consumer.stop(timeout)
        if self.gallery is not None:
            self.gallery.stop(timeout)  # finishes the pictures of what was written

    def ready(self) -> dict[str, Any]:
        return {
            "broker": self.broker.connected,
            "consumer": self._consumer is not None and self._consumer.running,
            **self.space.state(),
        }
