"""The watcher's persistent state: which files were published, and which sessions are watched.

One SQLite database (WAL mode) in the watcher's state folder, ``watcher.sqlite3``:

- ``published``: one row per (project, session, path) with the size and mtime the file had, the id of the
  MicrographReady message and when it was sent. A path with a row is never published again by the watcher, even
  when a different file later appears under the same name (re-picks are an explicit operator action).
- ``sessions``: the sessions being watched, so that a restarted watcher resumes them.
- ``incomplete`` (schema 2): the files the running watcher keeps waiting because they fail the completeness check
  (since when, wall-clock time, and why), for ``cryomae status``; a row goes when its file is published (in the
  same transaction), deleted, or its session stopped, and a starting watcher clears them all (it looks again).

Schema versions: ``PRAGMA user_version``. Opening an older ledger upgrades it in place (the schema script only
adds tables); a newer one is refused. ``read_ledger``/``read_incomplete`` read any version.

Ordering: the watcher publishes first and records afterwards. A crash between the two publishes the file again
after the restart (at least once; the picker and writer are idempotent per micrograph) rather than losing it.
``synchronous=NORMAL`` has the same consequence for a power cut: a row lost with the last WAL frames only causes
a repeat.

A lock file (``watcher.lock``, ``flock``) keeps a second watcher off the same state folder: two watchers would
publish every file twice. Keep the state folder on a local disk or a volume that honours ``flock``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryomae.errors import ConfigError, InputError

DATABASE = "watcher.sqlite3"
LOCK = "watcher.lock"
SCHEMA_VERSION = 3  # 2: the incomplete table; 3: the replaced table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS published (
    project TEXT NOT NULL,
    session TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    message_id TEXT NOT NULL,
    published_at REAL NOT NULL,
    complete INTEGER NOT NULL,
    PRIMARY KEY (project, session, path)
);
CREATE TABLE IF NOT EXISTS sessions (
    project TEXT NOT NULL,
    session TEXT NOT NULL,
    folder TEXT NOT NULL,
    pattern TEXT NOT NULL,
    recursive INTEGER NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (project, session)
);
"""
# the lists of files ``cryomae status`` shows under a session: waiting incomplete (2), replaced after a pick (3)
FILE_LISTS = ("incomplete", "replaced")
_SCHEMA += "".join(
    f"""CREATE TABLE IF NOT EXISTS {table} (
    project TEXT NOT NULL,
    session TEXT NOT NULL,
    path TEXT NOT NULL,
    since REAL NOT NULL,
    problem TEXT NOT NULL,
    PRIMARY KEY (project, session, path)
);
"""
    for table in FILE_LISTS
)


@dataclass(frozen=True)
class Publication:
    """One published file: its size and mtime then, the message id, and whether it had passed the completeness
    check (False: published for the picker to reject, after the give-up time or at once when it can never pass)."""

    path: str
    size: int
    mtime_ns: int
    message_id: str
    published_at: float
    complete: bool


@dataclass(frozen=True)
class SessionRecord:
    """A watched session as persisted."""

    project: str
    session: str
    folder: Path
    pattern: str
    recursive: bool
    started_at: float


@dataclass(frozen=True)
class IncompleteFile:
    """A file the watcher keeps waiting: it fails the completeness check (``problem``, in the reader's words)
    and may still grow; ``since``: Unix time of the last change the watcher saw."""

    path: str
    since: float
    problem: str


@dataclass(frozen=True)
class Summary:
    """Counts of a session's publications (``gave_up``: those that had not passed the completeness check)."""

    published: int
    gave_up: int
    last_published_at: float | None


class Ledger:
    """The state database of one watcher; thread-safe (one connection behind a lock). Close it when done."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DATABASE
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(state_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(state_dir, f"cannot use the watcher state folder: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise ConfigError(
                f"{state_dir}: the state folder is in use by another watcher ({LOCK} is locked); "
                "run one watcher per state folder"
            ) from None
        self._lock = threading.Lock()
        try:
            self._db = self._open()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open(self) -> sqlite3.Connection:
        """Connect, switch to WAL and create or check the schema; a foreign or newer file is an InputError."""
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise InputError(self.path, f"state database has schema {version}, newer than {SCHEMA_VERSION}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # one transaction: a reader in another process sees either no schema (user_version 0) or all of it
            db.executescript(f"BEGIN;\n{_SCHEMA}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise InputError(self.path, f"not a usable watcher state database ({exc})") from None
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the database and release the state folder (idempotent)."""
        with self._lock:
            if self._lock_fd < 0:
                return
            self._db.close()
            os.close(self._lock_fd)
            self._lock_fd = -1

    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def _transaction(self, *statements: tuple[str, tuple[object, ...]]) -> list[int]:
        """Run statements in one transaction (all or none); their row counts. Call with the lock held."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            counts = [self._db.execute(sql, args).rowcount for sql, args in statements]
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return counts

    def record(self, project: str, session: str, publication: Publication) -> None:
        """Remember a publication (replacing an older row for the same path); the file is no longer incomplete."""
        p = publication
        with self._lock:
            self._transaction(
                (
                    "INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (project, session, p.path, p.size, p.mtime_ns, p.message_id, p.published_at, int(p.complete)),
                ),
                ("DELETE FROM incomplete WHERE project = ? AND session = ? AND path = ?", (project, session, p.path)),
            )

    def note_incomplete(self, project: str, session: str, path: str, since: float, problem: str) -> None:
        """List a file as waiting incomplete (replacing its earlier row)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO incomplete VALUES (?, ?, ?, ?, ?)", (project, session, path, since, problem)
            )

    def note_replaced(self, project: str, session: str, path: str, since: float, problem: str) -> None:
        """List a published file that was replaced on disk afterwards (``since``: when the watcher saw it)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO replaced VALUES (?, ?, ?, ?, ?)", (project, session, path, since, problem)
            )

    def clear_incomplete(self, project: str | None = None, session: str | None = None, path: str | None = None) -> None:
        """Unlist one file (all three given), or every file (none given)."""
        with self._lock:
            if project is None:
                self._db.execute("DELETE FROM incomplete")
            else:
                self._db.execute(
                    "DELETE FROM incomplete WHERE project = ? AND session = ? AND path = ?", (project, session, path)
                )

    def publications(self, project: str, session: str) -> dict[str, Publication]:
        """Every publication of a session, by path."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, message_id, published_at, complete FROM published "
                "WHERE project = ? AND session = ?",
                (project, session),
            ).fetchall()
        return {row[0]: Publication(row[0], row[1], row[2], row[3], row[4], bool(row[5])) for row in rows}

    def summary(self, project: str, session: str) -> Summary:
        """How many files a session has published, how many of them after the give-up time, and the last time."""
        with self._lock:
            published, gave_up, last = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(1 - complete), 0), MAX(published_at) FROM published "
                "WHERE project = ? AND session = ?",
                (project, session),
            ).fetchone()
        return Summary(int(published), int(gave_up), last)

    def save_session(self, record: SessionRecord) -> None:
        """Persist a watched session (replacing its earlier settings)."""
        r = record
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (r.project, r.session, str(r.folder), r.pattern, int(r.recursive), r.started_at),
            )

    def drop_session(self, project: str, session: str) -> bool:
        """Forget a watched session and its incomplete files (its publications stay); whether it was there."""
        with self._lock:
            dropped, _ = self._transaction(
                ("DELETE FROM sessions WHERE project = ? AND session = ?", (project, session)),
                ("DELETE FROM incomplete WHERE project = ? AND session = ?", (project, session)),
            )
        return dropped > 0

    def sessions(self) -> list[SessionRecord]:
        """The persisted sessions, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT project, session, folder, pattern, recursive, started_at FROM sessions ORDER BY started_at"
            ).fetchall()
        return [SessionRecord(r[0], r[1], Path(r[2]), r[3], bool(r[4]), r[5]) for r in rows]


@contextmanager
def _reading(state_dir: Path) -> Iterator[tuple[sqlite3.Connection | None, int]]:
    """The ledger opened read-only, without the lock, with its schema version; (None, 0) when there is none.
    An SQLite error inside the block is an InputError naming the file."""
    path = state_dir / DATABASE
    if not path.is_file():
        yield None, 0
        return
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise InputError(path, f"cannot read the watcher state database ({exc})") from None
    try:
        yield db, int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        raise InputError(path, f"cannot read the watcher state database ({exc})") from None
    finally:
        db.close()


def read_ledger(state_dir: Path) -> tuple[list[SessionRecord], dict[tuple[str, str], Summary]]:
    """The watched sessions and every session's publication counts, read without taking the lock (for
    ``cryomae status`` in another process while the watcher runs); empty when there is no ledger yet or its
    schema is still being written."""
    with _reading(state_dir) as (db, version):
        if db is None or version == 0:  # no ledger, or its schema not yet committed by the watcher
            return [], {}
        rows = db.execute(
            "SELECT project, session, folder, pattern, recursive, started_at FROM sessions ORDER BY started_at"
        ).fetchall()
        counts = db.execute(
            "SELECT project, session, COUNT(*), COALESCE(SUM(1 - complete), 0), MAX(published_at) FROM published "
            "GROUP BY project, session"
        ).fetchall()
    sessions = [SessionRecord(r[0], r[1], Path(r[2]), r[3], bool(r[4]), r[5]) for r in rows]
    return sessions, {(c[0], c[1]): Summary(int(c[2]), int(c[3]), c[4]) for c in counts}


def read_incomplete(state_dir: Path) -> dict[tuple[str, str], list[IncompleteFile]]:
    """The files each session's watcher keeps waiting as incomplete, by (project, session), each list by path;
    read without the lock, like ``read_ledger``. Empty when there is no ledger, its schema is not yet written, or
    it predates the list (schema 1: a watcher of an older version is running)."""
    return _read_files(state_dir, "incomplete", 2)


def read_replaced(state_dir: Path) -> dict[tuple[str, str], list[IncompleteFile]]:
    """The published files each session's watcher saw replaced on disk afterwards (not picked again), by
    (project, session); read without the lock, like ``read_ledger``. Empty before schema 3."""
    return _read_files(state_dir, "replaced", 3)


def _read_files(state_dir: Path, table: str, since_version: int) -> dict[tuple[str, str], list[IncompleteFile]]:
    """The rows of ``incomplete`` or ``replaced`` by (project, session), each list by path."""
    if table not in FILE_LISTS:
        raise ValueError(f"no file list {table!r}")
    with _reading(state_dir) as (db, version):
        if db is None or version < since_version:
            return {}
        rows = db.execute(
            f"SELECT project, session, path, since, problem FROM {table} ORDER BY project, session, path"
        ).fetchall()
    listed: dict[tuple[str, str], list[IncompleteFile]] = {}
    for project, session, file, since, problem in rows:
        listed.setdefault((project, session), []).append(IncompleteFile(file, since, problem))
    return listed
