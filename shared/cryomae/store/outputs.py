"""The writer's per-session outputs: STAR files that RELION and cryoSPARC read as they are, kept in step with
the picks of a live session (``Picks``: what a ``PicksReady`` message carries) and with operator re-thresholds.

Layout of one session folder, ``SessionOutputs(root)``::

    root/autopick.star                     data_coordinate_files: rlnMicrographName -> rlnMicrographCoordinates
    root/particles.star                    data_particles: every pick of the session; grows by appends
    root/coordinates/<stem>_autopick.star  RELION per-micrograph autopick file (X, Y, class 0, FOM, psi 0.0)
    root/.cryomae/session.json             project, session and the session cutoff (null: each picker's own)
    root/.cryomae/micrographs/<stem>.json  ALL candidates of a micrograph with scores, the picker's cutoff, model
                                           version, message ids and times: the state every STAR file derives from
    root/.cryomae/pending.json             exists only while STAR files are being brought in line with the state

Conventions (``shared/docs/facility.md``):

- ``rlnMicrographName`` is the micrograph's path exactly as the picker sent it, or, with ``name_root`` (e.g.
  the RELION project directory), the path relative to that folder, which is how RELION's own micrographs STAR
  names them. It must equal the micrographs STAR's name, or extraction silently finds nothing.
- ``rlnMicrographCoordinates`` is the absolute path of the per-micrograph file, so RELION's extraction
  (``--coord_list autopick.star``) finds it from any working directory.
- A pick is a candidate with ``score >= cutoff``. RELION's ``--minimum_pick_fom`` keeps ``fom > value``.
- A micrograph with no picks still has its index row and a per-micrograph file holding the header and an empty
  loop (parseable by ``starfile``; RELION reads it as 0 rows, prints "no particles on micrograph" and skips
  the micrograph in extraction, exactly as it does for its own empty autopick results). Keeping the row
  records that the micrograph was processed, so on-the-fly pipelines do not re-pick it.
- The model version is a column of ``particles.star`` only, labelled ``_cryomaeModelVersion``: RELION 3.1 and
  later keep unknown labels (with a warning) and cryoSPARC ignores them, but RELION 3.0 and older stop on an
  unknown label, so the per-micrograph files that RELION extracts from carry RELION labels only. The label has
  no ``rln`` prefix so that it can never clash with a label a later RELION adds.
- Every table is a loop, also with 0 or 1 rows; lines end in LF; no blank line inside a loop (RELION ends a
  loop at a blank line).

Crash safety. The state of a micrograph is written (atomically, fsynced) before any STAR file, and a marker
``pending.json`` names what is being changed until every STAR file follows. The per-micrograph files and the
index are replaced atomically; ``particles.star`` is appended to for a new micrograph and atomically rewritten
when rows must be replaced (a re-pick, a re-threshold). Opening a session folder (and the next call after a
failed one) repairs whatever a crash left: files named by the marker are rewritten, missing files are written,
the index is rewritten, a torn last line of ``particles.star`` is cut off, and ``particles.star`` is rewritten
when it differs in any byte from what the state says. ``rebuild()`` rewrites every STAR file from the state.

Redeliveries and re-picks replace a micrograph's rows, never duplicate them. One process writes a session at a
time (the picks queue has a single active consumer); an object may be shared by threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from cryomae.errors import InputError
from cryomae.io.atomic import TEMP_FILE, atomic_output, write_json
from cryomae.io.coordinates import Coordinates, check_inside
from cryomae.io.writers import (
    AUTOPICK_SUFFIX,
    SESSION_PARTICLE_COLUMNS,
    session_particles_header,
    session_particles_rows,
    star_string,
    write_autopick_star,
    write_coordinate_index,
)
from cryomae.messages import MicrographReady
from cryomae.store.projects import version_number

INDEX_NAME = "autopick.star"
PARTICLES_NAME = "particles.star"
COORDINATES_DIR = "coordinates"
STATE_DIR = ".cryomae"

_FORMAT = 1
_MAX_STEM_BYTES = 200  # file names hold the stem plus suffixes; most filesystems allow 255 bytes
_PARTICLES_HEADER = session_particles_header()

Outcome = Literal["new", "replaced", "duplicate", "stale"]


class Picks(Protocol):
    """One micrograph's picks as the writer hands them in (``cryomae.messages.PicksReady`` is one); the store
    reads these fields and knows nothing of messages."""

    @property
    def id(self) -> str: ...
    @property
    def project(self) -> str: ...
    @property
    def session(self) -> str: ...
    @property
    def micrograph(self) -> str: ...
    @property
    def micrograph_id(self) -> str: ...
    @property
    def model_version(self) -> str: ...
    @property
    def diameter(self) -> float: ...
    @property
    def threshold(self) -> float: ...
    @property
    def x(self) -> list[float]: ...
    @property
    def y(self) -> list[float]: ...
    @property
    def scores(self) -> list[float]: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def complete_at(self) -> float: ...
    @property
    def picked_at(self) -> float: ...


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply`` did with one PicksReady.

    ``outcome``: ``new`` (first picks of the micrograph), ``replaced`` (a re-pick or a new message for it),
    ``duplicate`` (this message was applied before: nothing written) or ``stale`` (older than the picks
    already applied: nothing written). ``rows`` are the micrograph's particles in the outputs now.
    """

    micrograph: str
    name: str
    coordinate_file: Path
    outcome: Outcome
    rows: int
    previous_rows: int
    candidates: int
    threshold: float
    model_version: str
    latency_s: float
    particles_rewritten: bool

    @property
    def replaced(self) -> bool:
        return self.outcome == "replaced"


@dataclass(frozen=True)
class ThresholdResult:
    """What ``set_threshold`` did: the session cutoff now, how many micrographs' rows changed, particles now."""

    threshold: float | None
    micrographs_changed: int
    particles: int


@dataclass(frozen=True)
class SessionCounts:
    micrographs: int
    particles: int
    candidates: int
    threshold: float | None


@dataclass(frozen=True)
class MicrographEntry:
    """One micrograph of the session as the outputs hold it (``threshold`` is the cutoff in force)."""

    micrograph: str
    name: str
    coordinate_file: Path
    particles: int
    candidates: int
    threshold: float
    picker_threshold: float
    model_version: str
    message_id: str
    complete_at: float  # when the watcher judged the file complete
    picked_at: float
    applied_at: float  # when its rows were written: latency = applied_at - complete_at
    key: str  # names its files: coordinates/<key>_autopick.star, the gallery's images
    diameter: float  # particle diameter in pixels, as the picker sent it
    shape: tuple[int, int]  # micrograph (rows, columns)
    # before its last re-pick by another model version (e.g. one trained on an operator's corrections): that
    # version and the particles it kept at the cutoff then in force; None for a micrograph picked once
    previous_model_version: str | None = None
    previous_particles: int | None = None


@dataclass(frozen=True)
class Candidates:
    """Every candidate of one micrograph (original pixels, x = column) with its score; ``cutoff`` in force."""

    x: np.ndarray  # [N] float64
    y: np.ndarray  # [N]
    scores: np.ndarray  # [N]
    cutoff: float


@dataclass(frozen=True)
class _Record:
    """The stored state of one micrograph (one JSON file); ``key`` names its files."""

    key: str
    seq: int
    micrograph: str
    message_id: str
    micrograph_id: str
    model_version: str
    threshold: float
    diameter: float
    shape: tuple[int, int]
    complete_at: float
    picked_at: float
    applied_at: float
    x: np.ndarray  # [N] float64
    y: np.ndarray  # [N]
    scores: np.ndarray  # [N]
    previous_model_version: str | None = None  # see MicrographEntry
    previous_particles: int | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": _FORMAT}
        for field in fields(self):
            value = getattr(self, field.name)
            data[field.name] = value.tolist() if isinstance(value, np.ndarray) else value
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_json(cls, path: Path, data: Any) -> _Record:
        """Validate a stored record; a damaged one is an InputError naming the file."""

        def bad(problem: str) -> InputError:
            return InputError(path, f"damaged session state: {problem}")

        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise bad(f"expected a JSON object with format {_FORMAT}")
        try:
            arrays = {k: np.asarray(data[k], dtype=np.float64).reshape(-1) for k in ("x", "y", "scores")}
            shape = data["shape"]
            record = cls(
                key=str(data["key"]),
                seq=int(data["seq"]),
                micrograph=str(data["micrograph"]),
                message_id=str(data["message_id"]),
                micrograph_id=str(data["micrograph_id"]),
                model_version=str(data["model_version"]),
                threshold=float(data["threshold"]),
                diameter=float(data["diameter"]),
                shape=(int(shape[0]), int(shape[1])),
                complete_at=float(data["complete_at"]),
                picked_at=float(data["picked_at"]),
                applied_at=float(data["applied_at"]),
                **arrays,
                previous_model_version=(
                    None if data.get("previous_model_version") is None else str(data["previous_model_version"])
                ),
                previous_particles=None if data.get("previous_particles") is None else int(data["previous_particles"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise bad(f"{type(exc).__name__}: {exc}") from None
        if not len(record.x) == len(record.y) == len(record.scores):
            raise bad("x, y and scores differ in length")
        if record.key != path.stem:
            raise bad(f"key {record.key!r} does not match the file name")
        return record


def check_micrograph_name(micrograph: str) -> None:
    """InputError naming the problem when picks of this micrograph path could never be written: it names no file,
    its file name is longer than ``_MAX_STEM_BYTES`` bytes (the coordinate file's name is made from it), or it holds
    what a STAR file cannot (quotes, newlines, tabs, control characters). The one rule for the writer and for the
    watcher, which refuses such a file where it first sees it."""
    where = Path(micrograph)
    file_name = where.name
    if file_name in ("", ".", "..") or not Path(file_name).stem:
        raise InputError(where, "the micrograph path does not name a file")
    if len(Path(file_name).stem.encode()) > _MAX_STEM_BYTES:
        raise InputError(where, f"file name longer than {_MAX_STEM_BYTES} bytes, too long for its coordinate file")
    star_string(where, micrograph, "micrograph name")


FUTURE_SLACK_S = 3600.0  # a picks message may be this far ahead of the writer's clock (clocks of other machines)


def older(msg: Picks, old: _Record) -> bool:
    """Whether ``msg`` is older than the micrograph's current picks and must not replace them: picks of an older
    model version are; of a newer one are not, whatever the pickers' clocks say. Of the same version, one picked
    before the current picks is (a redelivery overtaken by a re-pick); times far in the future are refused before
    this (``check_picks``), so that none can pin a micrograph's rows."""
    new_n, old_n = version_number(msg.model_version), version_number(old.model_version)
    if new_n is not None and old_n is not None and new_n != old_n:
        return new_n < old_n
    return msg.picked_at < old.picked_at


def check_picks(msg: Picks, name: str | None = None) -> None:
    """InputError naming the problem when a picks message could not be written as it is: its micrograph name (or
    ``name``, its rlnMicrographName), model version, numbers (NaN, infinite), shape or coordinates (outside the
    shape). The writer calls it before it creates anything for the message; ``apply`` again before writing."""
    where = Path(msg.micrograph)
    check_micrograph_name(msg.micrograph)
    star_string(where, msg.micrograph if name is None else name, "micrograph name")
    star_string(where, msg.model_version, "model version")
    for label in ("threshold", "diameter", "complete_at", "picked_at"):
        if not math.isfinite(getattr(msg, label)):
            raise InputError(where, f"PicksReady {msg.id}: {label} is {getattr(msg, label)}")
    rows, cols = msg.shape
    if rows <= 0 or cols <= 0:
        raise InputError(where, f"PicksReady {msg.id}: micrograph shape {msg.shape} is not positive")
    for label, values in (("x", msg.x), ("y", msg.y), ("scores", msg.scores)):
        arr = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            i = int(np.argmax(bad))
            kind = "NaN" if np.isnan(arr[i]) else "infinite"
            raise InputError(where, f"PicksReady {msg.id}: {label}[{i}] is {kind} ({bad.sum()} bad values)")
    check_inside(Coordinates(np.stack([msg.x, msg.y], axis=1).reshape(-1, 2)), msg.shape, where)
    for label in ("picked_at", "complete_at"):
        ahead = getattr(msg, label) - time.time()
        if ahead > FUTURE_SLACK_S:
            raise InputError(
                where,
                f"PicksReady {msg.id}: {label} is {ahead / 3600:.1f} h in the future (a wrong clock, or a forged "
                "message: it would pin the micrograph's rows)",
            )


class SessionOutputs:
    """The STAR outputs of one session folder, e.g. ``<outputs>/<project>/<session>/``.

    Opening creates the folder and repairs what a crash left (see the module docstring); with ``read_only``
    (``cryomae status`` beside a running writer) it only reads the state, changes nothing and refuses to write.
    ``name_root``: write
    ``rlnMicrographName`` relative to this folder instead of the path as sent. ``clock`` gives the time for
    latencies and records (``time.time`` by default).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        name_root: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.index_path = self.root / INDEX_NAME
        self.particles_path = self.root / PARTICLES_NAME
        self.coordinates_dir = self.root / COORDINATES_DIR
        self._state_dir = self.root / STATE_DIR
        self._records_dir = self._state_dir / "micrographs"
        self._session_file = self._state_dir / "session.json"
        self._pending_file = self._state_dir / "pending.json"
        self._name_root = None if name_root is None else Path(os.path.normpath(os.path.abspath(name_root)))
        self._clock = clock
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}  # by micrograph path, in arrival (seq) order
        self._rows: dict[str, int] = {}  # rows in the micrograph's STAR files now
        self._blocks: dict[str, str] = {}  # rendered particles.star rows per micrograph (a cache)
        self._threshold: float | None = None
        self._owner: tuple[str, str] | None = None  # (project, session) of the messages applied here
        self._pending = False
        self.read_only = read_only
        if read_only:
            if self._records_dir.is_dir():
                self._load()
            return
        for folder in (self.coordinates_dir, self._records_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_temp_files()
        self._load()
        self._repair(self._read_pending())

    # ------------------------------------------------------------------------------------------ public API

    @property
    def threshold(self) -> float | None:
        """The session cutoff, or None when each micrograph keeps its picker's own."""
        return self._threshold

    def apply(self, msg: Picks) -> ApplyResult:
        """Write one micrograph's picks (new, or replacing its rows); a redelivery or an older message is a no-op.

        Raises InputError (before anything is written) for a message that cannot be written: NaN or infinite
        values, coordinates outside the micrograph, a name STAR cannot hold, another session's message.
        """
        with self._lock:
            self._recover()
            self._check_owner(msg.project, msg.session)
            name = self._check_picks(msg)
            old = self._records.get(msg.micrograph)
            if old is not None and (old.message_id == msg.id or older(msg, old)):
                rows = self._rows[msg.micrograph]
                outcome: Outcome = "duplicate" if old.message_id == msg.id else "stale"
                return self._result(old, name, outcome, rows, rows, msg.complete_at, False)
            record = self._record(msg, old)
            self._begin([record.key])
            previous = self._rows.get(record.micrograph, 0)
            try:
                self._own(msg.project, msg.session)
                self._save_record(record)
                old_block = None if old is None else self._block(old)
                self._records[record.micrograph] = record
                self._blocks.pop(record.micrograph, None)
                rows = self._write_coordinates(record)
                rewritten = False
                if old is None:
                    self._write_index()
                    self._append_particles(record)
                elif self._block(record) != old_block:
                    self._write_particles()
                    rewritten = True
            except OSError:
                # a write failed (a full disk): forget the change in memory, so that the same message applied
                # again (when there is space) is new, not a duplicate; the files are repaired first (_recover)
                self._forget(record, old)
                raise
            self._end()
            outcome = "new" if old is None else "replaced"
            return self._result(record, name, outcome, rows, previous, msg.complete_at, rewritten)

    def start(self, project: str, session: str) -> None:
        """Bind a new session folder to its project and session (``session.json``); an owned one must match."""
        with self._lock:
            self._check_owner(project, session)
            self._own(project, session)

    def apply_rethreshold(self, project: str, session: str, threshold: float | None) -> ThresholdResult:
        """Apply an operator's re-threshold; it must be for this folder's project and session."""
        with self._lock:
            self._check_owner(project, session)
            result = self.set_threshold(threshold)
            self._own(project, session)
            return result

    def set_threshold(self, value: float | None) -> ThresholdResult:
        """Set the session cutoff (None: back to each micrograph's picker cutoff) without re-picking.

        The kept candidates are cut again; only micrographs whose rows change get their file rewritten, then
        ``particles.star`` once. The cutoff persists and applies to micrographs that arrive later.
        """
        if value is not None and (isinstance(value, bool) or not math.isfinite(value)):
            raise InputError(self.root, f"threshold must be a finite number or None, got {value!r}")
        with self._lock:
            self._recover()
            new = None if value is None else float(value)
            if new == self._threshold:
                return ThresholdResult(new, 0, sum(self._rows.values()))
            self._begin(None)
            self._save_session(new)  # on disk before in memory: a failure here leaves both as they were
            self._threshold = new
            changed = 0
            for record in self._records.values():
                if int(np.count_nonzero(self._keep(record))) != self._rows[record.micrograph]:
                    self._blocks.pop(record.micrograph, None)
                    self._write_coordinates(record)
                    changed += 1
            if changed:
                self._write_particles()
            self._end()
            return ThresholdResult(new, changed, sum(self._rows.values()))

    def counts(self) -> SessionCounts:
        """Micrographs written, particles in the outputs, candidates kept, and the session cutoff."""
        with self._lock:
            candidates = sum(len(r.scores) for r in self._records.values())
            return SessionCounts(len(self._records), sum(self._rows.values()), candidates, self._threshold)

    def micrographs(self) -> list[MicrographEntry]:
        """Every micrograph of the session in arrival order."""
        with self._lock:
            return [self._entry(r) for r in self._records.values()]

    def entry(self, micrograph: str) -> MicrographEntry:
        """One micrograph of the session (KeyError when it has none here)."""
        with self._lock:
            return self._entry(self._records[micrograph])

    def star_name(self, micrograph: str) -> str:
        """The micrograph's ``rlnMicrographName`` exactly as this session's STAR files write it (unquoted)."""
        return self._name(micrograph)

    @property
    def owner(self) -> tuple[str, str] | None:
        """(project, session) of the messages written here; None before the first."""
        return self._owner

    def _entry(self, r: _Record) -> MicrographEntry:
        return MicrographEntry(
            micrograph=r.micrograph,
            name=self._name(r.micrograph),
            coordinate_file=self._coordinate_file(r),
            particles=self._rows[r.micrograph],
            candidates=len(r.scores),
            threshold=self._cutoff(r),
            picker_threshold=r.threshold,
            model_version=r.model_version,
            message_id=r.message_id,
            complete_at=r.complete_at,
            picked_at=r.picked_at,
            applied_at=r.applied_at,
            key=r.key,
            diameter=r.diameter,
            shape=r.shape,
            previous_model_version=r.previous_model_version,
            previous_particles=r.previous_particles,
        )

    def candidates(self, micrograph: str) -> Candidates:
        """All candidates of a micrograph of this session (KeyError when it has none here)."""
        with self._lock:
            r = self._records[micrograph]
            return Candidates(r.x, r.y, r.scores, self._cutoff(r))

    def rebuild(self) -> SessionCounts:
        """Rewrite every STAR file of the session from the stored state."""
        with self._lock:
            self._begin(None)
            for record in self._records.values():
                self._write_coordinates(record)
            self._write_index()
            self._blocks.clear()
            self._write_particles()
            self._end()
            return self.counts()

    # ------------------------------------------------------------------------------------------ validation

    def _check_owner(self, project: str, session: str) -> None:
        if self._owner is not None and (project, session) != self._owner:
            theirs = f"{self._owner[0]}/{self._owner[1]}"
            raise InputError(self.root, f"message for {project}/{session}, but these are the outputs of {theirs}")

    def _check_picks(self, msg: Picks) -> str:
        """Validate a PicksReady before anything is written; returns its rlnMicrographName."""
        name = self._name(msg.micrograph)
        check_picks(msg, name)
        return name

    def _name(self, micrograph: str) -> str:
        """rlnMicrographName of a micrograph: the path as sent, or relative to ``name_root``."""
        if self._name_root is None:
            return micrograph
        path = Path(os.path.normpath(micrograph))
        if not path.is_absolute():
            raise InputError(micrograph, "a relative micrograph path cannot be named relative to name_root")
        try:
            return path.relative_to(self._name_root).as_posix()
        except ValueError:
            raise InputError(
                micrograph, f"lies outside name_root {self._name_root}, so it has no name relative to it"
            ) from None

    # ------------------------------------------------------------------------------------------ state

    def _record(self, msg: Picks, old: _Record | None) -> _Record:
        """The stored form of a message; a re-pick keeps the micrograph's key and place, and a re-pick by another
        model version remembers the version before and its particles (what the page shows as before/after)."""
        before: dict[str, Any] = {}
        if old is not None and old.model_version != msg.model_version:
            before = {"previous_model_version": old.model_version, "previous_particles": self._rows[old.micrograph]}
        elif old is not None:
            before = {
                "previous_model_version": old.previous_model_version,
                "previous_particles": old.previous_particles,
            }
        return _Record(
            key=self._new_key(msg.micrograph) if old is None else old.key,
            seq=max((r.seq for r in self._records.values()), default=0) + 1 if old is None else old.seq,
            micrograph=msg.micrograph,
            message_id=msg.id,
            micrograph_id=msg.micrograph_id,
            model_version=msg.model_version,
            threshold=float(msg.threshold),
            diameter=float(msg.diameter),
            shape=(int(msg.shape[0]), int(msg.shape[1])),
            complete_at=float(msg.complete_at),
            picked_at=float(msg.picked_at),
            applied_at=float(self._clock()),
            x=np.asarray(msg.x, dtype=np.float64).reshape(-1),
            y=np.asarray(msg.y, dtype=np.float64).reshape(-1),
            scores=np.asarray(msg.scores, dtype=np.float64).reshape(-1),
            **before,
        )

    def _new_key(self, micrograph: str) -> str:
        """The micrograph's stem, or stem + hash when another micrograph has it (compared case-blind, for SMB)."""
        stem = Path(Path(micrograph).name).stem
        taken = {r.key.casefold() for r in self._records.values()}
        digest = hashlib.sha1(micrograph.encode()).hexdigest()
        for key in (stem, f"{stem}_{digest[:8]}", f"{stem}_{digest}"):
            if key.casefold() not in taken:
                return key
        raise InputError(micrograph, "no free coordinate file name for this micrograph")  # needs a SHA-1 clash

    def _load(self) -> None:
        if self._session_file.exists():
            data = _read_json(self._session_file)
            threshold = data.get("threshold")
            if data.get("format") != _FORMAT or not (threshold is None or isinstance(threshold, int | float)):
                raise InputError(self._session_file, "damaged session state: bad format or threshold")
            self._threshold = None if threshold is None else float(threshold)
            if data.get("project") is not None:
                self._owner = (str(data["project"]), str(data.get("session")))
        records = [_Record.from_json(p, _read_json(p)) for p in self._records_dir.glob("*.json")]
        for record in sorted(records, key=lambda r: r.seq):
            if record.micrograph in self._records:
                raise InputError(self._records_dir, f"damaged session state: {record.micrograph} stored twice")
            self._records[record.micrograph] = record
            self._rows[record.micrograph] = int(np.count_nonzero(self._keep(record)))

    def _save_record(self, record: _Record) -> None:
        _write_json(self._records_dir / f"{record.key}.json", record.to_json())

    def _save_session(self, threshold: float | None, owner: tuple[str, str] | None = None) -> None:
        project, session = owner or self._owner or (None, None)
        data = {"format": _FORMAT, "project": project, "session": session, "threshold": threshold}
        _write_json(self._session_file, data)

    def _own(self, project: str, session: str) -> None:
        """Bind the folder to the first message's project and session (kept in session.json)."""
        if self._owner is None:
            self._save_session(self._threshold, (project, session))
            self._owner = (project, session)

    # ------------------------------------------------------------------------------------------ crash repair

    def _begin(self, keys: list[str] | None) -> None:
        """Mark STAR files as about to change (``None``: all of them) before the state changes."""
        if self.read_only:
            raise InputError(self.root, "opened read-only: the session's outputs cannot be changed from here")
        _write_json(self._pending_file, {"format": _FORMAT, "keys": keys, "all": keys is None})
        self._pending = True

    def _end(self) -> None:
        self._pending_file.unlink(missing_ok=True)
        self._pending = False

    def _read_pending(self) -> tuple[bool, set[str]]:
        """(all, keys) of an unfinished change left by a crash; (False, empty) when there is none."""
        if not self._pending_file.exists():
            return False, set()
        try:
            data = json.loads(self._pending_file.read_text(encoding="utf-8"))
            return bool(data["all"]), set(data["keys"] or [])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return True, set()  # unreadable marker: treat everything as changed

    def _forget(self, record: _Record, old: _Record | None) -> None:
        """Undo an unfinished ``apply`` in memory and, as far as the disk allows, its record file."""
        self._blocks.pop(record.micrograph, None)
        if old is None:
            self._records.pop(record.micrograph, None)
            self._rows.pop(record.micrograph, None)
            (self._records_dir / f"{record.key}.json").unlink(missing_ok=True)
        else:
            self._records[record.micrograph] = old
            # if this fails too, the newer record stays on disk: after a restart the message counts as applied
            with contextlib.suppress(OSError):
                self._save_record(old)

    def _recover(self) -> None:
        """After a call that failed half-way in this process, bring every STAR file in line first."""
        if self._pending:
            self._repair((True, set()))

    def _repair(self, pending: tuple[bool, set[str]]) -> None:
        """Rewrite what a crash may have left stale, cut a torn line, and make particles.star match the state."""
        every, keys = pending
        for record in self._records.values():
            if every or record.key in keys or not self._coordinate_file(record).exists():
                self._write_coordinates(record)
        self._write_index()
        self._sync_particles()
        self._end()

    def _sync_particles(self) -> None:
        expected = self._particles_text().encode()
        try:
            data = self.particles_path.read_bytes()
        except FileNotFoundError:
            self._write_particles()
            return
        if data == expected:
            return
        keep = _complete_length(data)
        if keep < len(data):
            _truncate(self.particles_path, keep)
            data = data[:keep]
        if data != expected:
            self._write_particles()

    def _remove_temp_files(self) -> None:
        for folder in (self.root, self.coordinates_dir, self._state_dir, self._records_dir):
            for path in folder.iterdir():
                if TEMP_FILE.match(path.name) and path.is_file():
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ STAR files

    def _cutoff(self, record: _Record) -> float:
        return record.threshold if self._threshold is None else self._threshold

    def _keep(self, record: _Record) -> np.ndarray:
        return record.scores >= self._cutoff(record)  # [N] bool

    def _coordinate_file(self, record: _Record) -> Path:
        return self.coordinates_dir / f"{record.key}{AUTOPICK_SUFFIX}"

    def _write_coordinates(self, record: _Record) -> int:
        """Replace the micrograph's autopick file (atomic); returns its row count."""
        keep = self._keep(record)
        xy = np.stack([record.x[keep], record.y[keep]], axis=1).reshape(-1, 2)  # [n, 2]
        write_autopick_star(self._coordinate_file(record), xy, record.scores[keep])
        self._rows[record.micrograph] = int(keep.sum())
        return self._rows[record.micrograph]

    def _write_index(self) -> None:
        entries = [(self._name(r.micrograph), str(self._coordinate_file(r))) for r in self._records.values()]
        write_coordinate_index(self.index_path, entries)

    def _block(self, record: _Record) -> str:
        """The micrograph's rows of particles.star (cached until its record or the cutoff changes)."""
        block = self._blocks.get(record.micrograph)
        if block is None:
            keep = self._keep(record)
            name = star_string(self.particles_path, self._name(record.micrograph), "micrograph name")
            version = star_string(self.particles_path, record.model_version, "model version")
            block = session_particles_rows(name, version, record.x[keep], record.y[keep], record.scores[keep])
            self._blocks[record.micrograph] = block
        return block

    def _particles_text(self) -> str:
        return _PARTICLES_HEADER + "".join(self._block(r) for r in self._records.values())

    def _write_particles(self) -> None:
        """Replace particles.star atomically with every micrograph's rows."""
        text = self._particles_text()
        with atomic_output(self.particles_path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    def _append_particles(self, record: _Record) -> None:
        """Add a new micrograph's rows at the end of particles.star (no rewrite), fsynced."""
        if not self.particles_path.exists():
            self._write_particles()
            return
        block = self._block(record)
        if block:
            with open(self.particles_path, "a", encoding="utf-8", newline="\n") as f:
                f.write(block)
                f.flush()
                os.fsync(f.fileno())

    def _result(
        self, record: _Record, name: str, outcome: Outcome, rows: int, previous: int, complete_at: float, rw: bool
    ) -> ApplyResult:
        return ApplyResult(
            micrograph=record.micrograph,
            name=name,
            coordinate_file=self._coordinate_file(record),
            outcome=outcome,
            rows=rows,
            previous_rows=previous,
            candidates=len(record.scores),
            threshold=self._cutoff(record),
            model_version=record.model_version,
            latency_s=float(self._clock()) - complete_at,
            particles_rewritten=rw,
        )


# ---------------------------------------------------------------------------------------------- helpers


def _complete_length(data: bytes) -> int:
    """Bytes of ``data`` up to its last complete row: drops an unterminated line or a row of the wrong width."""
    end = data.rfind(b"\n") + 1
    start = data.rfind(b"\n", 0, max(end - 1, 0)) + 1
    line = data[start:end].decode("utf-8", errors="replace").strip()
    if line and not line.startswith(("_", "#", "loop_", "data_")) and _fields(line) != len(SESSION_PARTICLE_COLUMNS):
        return start
    return end


def _fields(line: str) -> int:
    """Number of STAR tokens on a line (double-quoted strings count once); -1 for an unbalanced quote."""
    try:
        return len(shlex.split(line, posix=True))
    except ValueError:
        return -1


def _truncate(path: Path, length: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(length)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically and make the rename durable (fsync of the folder), so order on disk is kept."""
    write_json(path, data, allow_nan=False, durable=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"damaged session state: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(path, "damaged session state: expected a JSON object")
    return data


def repick_messages(
    outputs: SessionOutputs,
    project: str,
    session: str,
    current: str,
    every: bool = False,
    micrographs: Sequence[str] = (),
) -> tuple[list[MicrographReady], list[str]]:
    """The re-pick requests of a session: its micrographs picked with another model version than ``current``
    (``every``: all; ``micrographs``: these, whatever their model), and the micrographs no longer on disk.
    InputError names a wanted micrograph the session never picked. The one rule for ``cryomae session repick``
    and for the trainer's re-pick after a model trained on a session's corrections."""
    entries = outputs.micrographs()
    wanted = {os.path.normpath(m) for m in micrographs}
    unknown = sorted(wanted - {e.micrograph for e in entries})
    if unknown:
        raise InputError(None, f"not a picked micrograph of {project}/{session}: {', '.join(unknown)}")
    messages, missing = [], []
    for entry in entries:
        if wanted and entry.micrograph not in wanted:
            continue
        if not wanted and not every and entry.model_version == current:
            continue
        try:
            stat = os.stat(entry.micrograph)
        except OSError:
            missing.append(entry.micrograph)
            continue
        messages.append(
            MicrographReady(
                project=project,
                session=session,
                path=entry.micrograph,
                size=stat.st_size,
                mtime=stat.st_mtime,
                complete_at=stat.st_mtime,
                repick=True,
            )
        )
    return messages, missing
