"""The picker: MicrographReady -> PicksReady with the project's current model (held by ``ModelCache``).

A micrograph of a project that has no model yet is parked in the project's waiting queue (kept, not dropped,
not dead-lettered); when a model is published (broadcast), or at start-up and every model check for projects
that have one, the waiting queue is moved back onto the work queue. A micrograph that cannot be read, one above
``max_pixels`` (refused before it is read), one smaller than a picking window, or a path outside the data roots,
is dead-lettered with the reason by the broker (InputError).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cryomae.config import PickConfig
from cryomae.device import resolve_device
from cryomae.errors import CheckpointError, CryomaeError, InputError
from cryomae.io import read_micrograph
from cryomae.io.micrographs import MAX_MICROGRAPH_PIXELS
from cryomae.io.roots import inside_roots
from cryomae.messages import MicrographReady, ModelPublished, PickFailed, PicksReady
from cryomae.messaging import topology
from cryomae.messaging.base import Broker, Consumer, Envelope
from cryomae.messaging.delivery import REASON_CHARS, shorten
from cryomae.model.checkpoint import TrainedModel
from cryomae.picking.marks import honour_marks, marks_on
from cryomae.picking.picker import pick_micrograph, session_cutoff
from cryomae.picking.threshold import SessionCutoff
from cryomae.service import metrics
from cryomae.service.handling import get_logger, handling, outcome_of
from cryomae.store.projects import ProjectStore

log = get_logger("picker")
NO_CANDIDATES_THRESHOLD = 1.0  # the cutoff sent for a micrograph without candidates: the highest cosine score
SESSIONS_REMEMBERED = 1024  # sessions whose auto cutoff the picker follows at once (least recently used forgotten)


class Picker:
    """Handles micrograph messages and model broadcasts; ``start`` binds both to the broker."""

    def __init__(
        self,
        broker: Broker,
        store: ProjectStore,
        roots: list[Path],
        cfg: PickConfig,
        device: str = "auto",
        model_check_seconds: float = 10.0,
        workers: int | None = None,
        max_pixels: int | None = MAX_MICROGRAPH_PIXELS,
    ) -> None:
        self.broker = broker
        self.max_pixels = max_pixels  # largest micrograph read (``read_micrograph``)
        self.store = store
        self.roots = roots
        self.cfg = cfg
        self.device: torch.device = resolve_device(device)
        self.cache = ModelCache(store, self.device, check_interval_s=model_check_seconds)
        self.model_check_seconds = model_check_seconds
        # on a GPU, a second micrograph's reading and peak finding (CPU) overlap with one's scoring (GPU)
        self.workers = workers if workers is not None else (2 if self.device.type == "cuda" else 1)
        self._consumers: list[Consumer] = []
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        self._versions: dict[str, str] = {}  # model version in use per project (metrics)
        self._versions_lock = threading.Lock()
        # the auto cutoff of each (project, session, model version), following the session's micrographs
        self._sessions: OrderedDict[tuple[str, str, str], SessionCutoff] = OrderedDict()
        self._sessions_lock = threading.Lock()

    # -------------------------------------------------------------------------------------------- handlers

    def handle(self, env: Envelope) -> None:
        """Pick one micrograph and publish every candidate with the cutoff (acked by the broker afterwards)."""
        with handling(log, env, (MicrographReady,)) as h:
            msg, out = h.message, h.fields
            out["micrograph"] = msg.path
            try:
                self._pick(msg, out)
            except Exception as exc:
                metrics.MICROGRAPHS_FAILED.labels(metrics.failure_reason(exc)).inc()
                if outcome_of(exc, env.delivery_count) == "dead_letter":
                    self._tell_writer(msg, exc)
                raise

    def _tell_writer(self, msg: MicrographReady, exc: BaseException) -> None:
        """The micrograph is about to be dead-lettered: tell the writer, for the session page (best effort). Not
        for a path outside the data roots (a forged or misrouted message): no session page shows it, and the writer
        would refuse the note."""
        try:
            inside_roots(msg.path, self.roots)
        except InputError:
            return
        note = PickFailed(
            project=msg.project,
            session=msg.session,
            micrograph=msg.path,
            micrograph_id=msg.id,
            reason=shorten(str(exc), REASON_CHARS),
        )
        try:
            self.broker.publish(topology.PICKS, note)
        except Exception as error:  # noqa: BLE001 (the dead letter keeps the reason; only the page misses it)
            log.warning("pick_failed_not_sent", micrograph=msg.path, error=str(error))

    def _pick(self, msg: MicrographReady, out: dict[str, Any]) -> None:
        path = inside_roots(msg.path, self.roots)
        got = self.cache.get(msg.project)
        if got is None:
            self.broker.publish(topology.waiting(msg.project), msg)
            out["outcome"] = "parked"
            if self.store.current_version(msg.project) is not None:  # a model appeared meanwhile
                self.release(msg.project)
            return
        version, trained = got
        self._in_use(msg.project, version)
        t0 = time.perf_counter()
        image = read_micrograph(path, self.max_pixels)
        t1 = time.perf_counter()
        try:
            session = self._session_cutoff(msg.project, msg.session, version, trained)
            result = pick_micrograph(trained, image.data, self.cfg, self.device, session)
        except InputError as exc:  # smaller than one window: name the file
            raise exc.located(path) from None
        # an operator's marks on this micrograph, if the model was trained on them, hold whatever it scores
        result, honoured = honour_marks(result, marks_on(trained.manifest, str(path)), trained.geometry.diameter)
        xy = result.candidates_xy
        # no candidate (all too near the edges): the cutoff is infinite, which JSON cannot carry; any selects none
        threshold = result.threshold if math.isfinite(result.threshold) else NO_CANDIDATES_THRESHOLD
        picks = PicksReady(
            project=msg.project,
            session=msg.session,
            micrograph=str(path),
            micrograph_id=msg.id,
            model_version=version,
            diameter=trained.geometry.diameter,
            threshold=threshold,
            x=[float(v) for v in xy[:, 0]],
            y=[float(v) for v in xy[:, 1]],
            scores=[float(v) for v in result.candidate_scores],
            shape=(int(image.shape[0]), int(image.shape[1])),
            complete_at=msg.complete_at,
            timings={"read_s": t1 - t0, **{f"{k}_s": v for k, v in result.timings.items()}},
        )
        self.broker.publish(topology.PICKS, picks)
        n_picks = int(result.selected.sum())
        metrics.PICK_SECONDS.observe(time.perf_counter() - t0)
        metrics.MICROGRAPHS_PICKED.labels(msg.project).inc()
        metrics.PARTICLES_PER_MICROGRAPH.labels(msg.project).observe(n_picks)
        out.update(model_version=version, picks=n_picks, candidates=len(xy), cutoff_rule=result.cutoff_rule)
        if honoured["dropped"] or honoured["added"]:
            out.update(marks_dropped=honoured["dropped"], marks_added=honoured["added"])

    def _session_cutoff(self, project: str, session: str, version: str, trained: TrainedModel) -> SessionCutoff:
        """The session's auto cutoff for this model version, new (seeded by the model's reference cutoff) at its
        first micrograph. In memory only: after a restart a session starts again from the reference's cut."""
        key = (project, session, version)
        with self._sessions_lock:
            cut = self._sessions.get(key)
            if cut is None:
                cut = self._sessions[key] = session_cutoff(self.cfg, trained)
                while len(self._sessions) > SESSIONS_REMEMBERED:
                    self._sessions.popitem(last=False)
            else:
                self._sessions.move_to_end(key)
            return cut

    def _in_use(self, project: str, version: str) -> None:
        """Export the model version in use for a project (one label set per project)."""
        with self._versions_lock:
            old = self._versions.get(project)
            if old == version:
                return
            if old is not None:
                metrics.MODEL_VERSION.remove(project, old)
            metrics.MODEL_VERSION.labels(project, version).set(1)
            self._versions[project] = version

    def on_model(self, env: Envelope) -> None:
        """A new model version: reload it at the next micrograph and release the project's parked ones."""
        with handling(log, env, (ModelPublished,)) as h:
            h.fields["version"] = h.message.version
            self.cache.invalidate(h.message.project)
            h.fields["released"] = self.release(h.message.project)

    def release(self, project: str) -> int:
        """Move a project's parked micrographs back to the work queue."""
        moved = self.broker.move(topology.waiting(project), topology.MICROGRAPHS)
        if moved:
            log.info("released_parked", project=project, micrographs=moved)
        return moved

    def sweep(self) -> int:
        """Release parked micrographs of every project that has a model (start-up, and each model check)."""
        total = 0
        for project in self.store.projects():
            if self.store.current_version(project.name) is not None:
                total += self.release(project.name)
        return total

    # -------------------------------------------------------------------------------------------- running

    def preload(self) -> None:
        """Load the current model of every project that has one (readiness waits for this)."""
        for project in self.store.projects():
            try:
                got = self.cache.get(project.name)
            except CryomaeError as exc:  # a broken model must not stop the picker; its micrographs fail alone
                log.error("model_preload_failed", project=project.name, error=str(exc))
                continue
            if got is not None:
                self._in_use(project.name, got[0])

    def models_loaded(self) -> bool:
        """Whether every project's current model is in hand (as of the store now)."""
        return all(
            self.cache.loaded(p.name) is not None
            for p in self.store.projects()
            if self.store.current_version(p.name) is not None
        )

    def start(self) -> None:
        self.preload()
        self._consumers.append(self.broker.subscribe(self.on_model))
        self.sweep()
        self._consumers.append(self.broker.consume(topology.MICROGRAPHS, self.handle, prefetch=self.workers))
        self._sweeper = threading.Thread(target=self._sweep_loop, name="picker-sweep", daemon=True)
        self._sweeper.start()
        log.info("picker_started", device=str(self.device), workers=self.workers, roots=[str(r) for r in self.roots])

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.model_check_seconds):
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 -- the broker may be down a moment; the next sweep retries
                log.warning("sweep_failed", error=str(exc))

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        for consumer in self._consumers:
            consumer.stop(timeout)
        self._consumers.clear()

    def ready(self) -> dict[str, Any]:
        return {
            "broker": self.broker.connected,
            "consumers": bool(self._consumers) and all(c.running for c in self._consumers),
            "models_loaded": self.models_loaded(),
        }


# ---------------------------------------------------------------------------------------------- model cache


@dataclass
class _Entry:
    """One project's cached model; fields are guarded by ModelCache._lock, loading by ``loading``."""

    loading: threading.Lock = field(default_factory=threading.Lock)
    version: str | None = None  # loaded version
    model: TrainedModel | None = None
    current: str | None = None  # what current.json said at the last check
    checked_at: float = -math.inf
    generation: int = 0  # bumped by invalidate()
    checked_generation: int = -1
    failed: str | None = None  # a version that failed to load; not retried until current changes or invalidate


class ModelCache:
    """Each project's current model for a picker: loaded once, reloaded when the current version changes.

    ``current.json`` is read at most every ``check_interval_s`` seconds per project, or at the next ``get`` after
    ``invalidate`` (call it when a ModelPublished arrives). A new version is loaded without holding any lock that
    other callers wait on: while one thread loads, the others keep getting the previous model, and the reference
    is swapped when loading is done. If the new version fails to load (corrupt, deleted) and a previous model is
    in hand, the error is logged and the previous model stays in use; with no previous model the error is raised.
    """

    def __init__(
        self,
        store: ProjectStore,
        device: torch.device | str = "cpu",
        check_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.device = device
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def invalidate(self, project: str) -> None:
        """Make the next ``get`` re-read the project's current version."""
        with self._lock:
            entry = self._entries.setdefault(project, _Entry())
            entry.generation += 1
            entry.failed = None

    def loaded(self, project: str) -> str | None:
        """The version in hand for a project (None: nothing loaded yet); reads no file."""
        with self._lock:
            entry = self._entries.get(project)
            return None if entry is None or entry.model is None else entry.version

    def get(self, project: str) -> tuple[str, TrainedModel] | None:
        """(version, model) of the project's current model, or None before its first model is published."""
        with self._lock:
            entry = self._entries.setdefault(project, _Entry())
        target = self._current(project, entry)
        if target is None:
            return None
        with self._lock:
            held = (entry.version, entry.model) if entry.model is not None and entry.version is not None else None
            if held is not None and (held[0] == target or entry.failed == target):
                return held
        if held is not None:
            if not entry.loading.acquire(blocking=False):
                return held  # another thread is loading the new version; keep picking with the previous one
        else:
            entry.loading.acquire()  # nothing to pick with until the first load is done
        try:
            return self._load(project, entry, target)
        finally:
            entry.loading.release()

    def _current(self, project: str, entry: _Entry) -> str | None:
        """The current version, from current.json when due (the file is read outside the lock)."""
        now = self._clock()
        with self._lock:
            generation = entry.generation
            due = generation != entry.checked_generation or now - entry.checked_at >= self.check_interval_s
            if not due:
                return entry.current
        current = self.store.current_version(project)
        with self._lock:
            if current != entry.current:
                entry.failed = None
            entry.current, entry.checked_at, entry.checked_generation = current, now, generation
        return current

    def _load(self, project: str, entry: _Entry, target: str) -> tuple[str, TrainedModel]:
        """Load ``target`` (caller holds entry.loading) and swap it in; keep the previous model if it fails."""
        with self._lock:
            held = (entry.version, entry.model) if entry.model is not None and entry.version is not None else None
            if held is not None and (held[0] == target or entry.failed == target):
                return held  # loaded (or failed) by another thread while this one waited
        t0 = time.perf_counter()
        try:
            model = self.store.load_version(project, target, self.device)
        except CheckpointError as e:
            if held is None:
                raise
            with self._lock:
                entry.failed = target
            log.error("model_load_failed", project=project, version=target, kept=held[0], error=str(e))
            return held
        with self._lock:
            entry.version, entry.model = target, model
        log.info("model_loaded", project=project, version=target, seconds=round(time.perf_counter() - t0, 3))
        return target, model
