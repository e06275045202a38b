"""The watcher's SQLite ledger: publications and sessions survive a reopen, WAL mode, one watcher per state
folder, and a clear error for a file that is not a ledger."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cryomae.errors import ConfigError, InputError
from cryomae.watching.ledger import (
    DATABASE,
    SCHEMA_VERSION,
    IncompleteFile,
    Ledger,
    Publication,
    SessionRecord,
    read_incomplete,
    read_ledger,
)


def test_publications_and_sessions_survive_a_reopen(tmp_path: Path):
    ledger = Ledger(tmp_path / "state")
    first = Publication("/data/s1/a.mrc", 1024, 5_000_000_000, "id-a", 100.0, True)
    second = Publication("/data/s1/b.mrc", 0, 6_000_000_000, "id-b", 101.0, False)
    ledger.record("p1", "s1", first)
    ledger.record("p1", "s1", second)
    ledger.record("p1", "s2", Publication("/data/s2/a.mrc", 1, 1, "id-c", 99.0, True))
    ledger.save_session(SessionRecord("p1", "s1", Path("/data/s1"), "*.mrc", True, 50.0))
    ledger.save_session(SessionRecord("p1", "s2", Path("/data/s2"), "*.tif*", False, 40.0))
    assert ledger.journal_mode() == "wal"
    ledger.close()
    ledger.close()  # idempotent

    reopened = Ledger(tmp_path / "state")
    try:
        assert reopened.publications("p1", "s1") == {first.path: first, second.path: second}
        summary = reopened.summary("p1", "s1")
        assert (summary.published, summary.gave_up, summary.last_published_at) == (2, 1, 101.0)
        assert reopened.summary("p1", "nothing").published == 0
        assert [(r.session, r.pattern, r.recursive) for r in reopened.sessions()] == [
            ("s2", "*.tif*", False),
            ("s1", "*.mrc", True),
        ]
        assert reopened.drop_session("p1", "s2")
        assert not reopened.drop_session("p1", "s2")
        assert [r.session for r in reopened.sessions()] == ["s1"]
        assert len(reopened.publications("p1", "s2")) == 1  # publications outlive the session
    finally:
        reopened.close()


def test_a_second_watcher_cannot_use_the_same_state_folder(tmp_path: Path):
    ledger = Ledger(tmp_path)
    try:
        with pytest.raises(ConfigError, match="in use by another watcher"):
            Ledger(tmp_path)
    finally:
        ledger.close()
    Ledger(tmp_path).close()  # free again once closed


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path):
    (tmp_path / DATABASE).write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(InputError, match="not a usable watcher state database") as info:
        Ledger(tmp_path)
    assert info.value.path == tmp_path / DATABASE
    with pytest.raises(InputError, match="not a usable"):
        Ledger(tmp_path)  # the same error again, not "in use": the failed attempt released its lock


def test_status_reads_a_ledger_whose_schema_is_not_written_yet_as_empty(tmp_path: Path):
    # what `cryomae status` can meet in the moment a starting watcher has created the file: WAL on, a table or
    # none, the schema version not yet committed; before the fix this raised "no such table: sessions"
    db = sqlite3.connect(tmp_path / DATABASE, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    assert read_ledger(tmp_path) == ([], {})
    db.execute("CREATE TABLE sessions (project TEXT)")
    assert read_ledger(tmp_path) == ([], {})
    db.close()
    (tmp_path / DATABASE).unlink()

    ledger = Ledger(tmp_path)
    try:
        assert read_ledger(tmp_path) == ([], {})
        ledger.save_session(SessionRecord("p1", "s1", Path("/data/s1"), "*.mrc", True, 50.0))
        ledger.record("p1", "s1", Publication("/data/s1/a.mrc", 1, 1, "id-a", 60.0, False))
        sessions, counts = read_ledger(tmp_path)
        assert [(r.project, r.session) for r in sessions] == [("p1", "s1")]
        assert counts[("p1", "s1")].gave_up == 1
    finally:
        ledger.close()


def test_incomplete_files_are_listed_until_published_cleared_or_their_session_dropped(tmp_path: Path):
    ledger = Ledger(tmp_path)
    try:
        ledger.note_incomplete("p1", "s1", "/data/s1/a.mrc", 100.0, "truncated MRC file: ...")
        ledger.note_incomplete("p1", "s1", "/data/s1/b.mrc", 101.0, "file is empty (0 bytes)")
        ledger.note_incomplete("p1", "s1", "/data/s1/a.mrc", 102.0, "truncated MRC file: later")  # replaced
        ledger.note_incomplete("p1", "s2", "/data/s2/c.mrc", 103.0, "file is empty (0 bytes)")
        listed = read_incomplete(tmp_path)
        assert listed[("p1", "s1")] == [
            IncompleteFile("/data/s1/a.mrc", 102.0, "truncated MRC file: later"),
            IncompleteFile("/data/s1/b.mrc", 101.0, "file is empty (0 bytes)"),
        ]
        # a publication clears the file in the same transaction
        ledger.record("p1", "s1", Publication("/data/s1/a.mrc", 1, 1, "id-a", 110.0, True))
        assert [f.path for f in read_incomplete(tmp_path)[("p1", "s1")]] == ["/data/s1/b.mrc"]
        ledger.clear_incomplete("p1", "s1", "/data/s1/b.mrc")
        assert set(read_incomplete(tmp_path)) == {("p1", "s2")}
        ledger.save_session(SessionRecord("p1", "s2", Path("/data/s2"), "*.mrc", True, 50.0))
        assert ledger.drop_session("p1", "s2")
        assert read_incomplete(tmp_path) == {}
        ledger.note_incomplete("p1", "s3", "/data/s3/d.mrc", 104.0, "file is empty (0 bytes)")
        assert not ledger.drop_session("p1", "s3")  # not a watched session, but its files are dropped
        assert read_incomplete(tmp_path) == {}
        ledger.note_incomplete("p1", "s3", "/data/s3/d.mrc", 104.0, "file is empty (0 bytes)")
        ledger.clear_incomplete()  # all of them (a watcher starting looks at every file again)
        assert read_incomplete(tmp_path) == {}
    finally:
        ledger.close()


def test_a_schema_1_ledger_is_read_and_upgraded(tmp_path: Path):
    """A ledger written before the incomplete list existed: status reads it (no incomplete files) while an
    older watcher still runs, and a new watcher upgrades it in place, keeping its publications and sessions."""
    db = sqlite3.connect(tmp_path / DATABASE, isolation_level=None)
    db.executescript(
        """
        CREATE TABLE published (project TEXT NOT NULL, session TEXT NOT NULL, path TEXT NOT NULL,
            size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, message_id TEXT NOT NULL, published_at REAL NOT NULL,
            complete INTEGER NOT NULL, PRIMARY KEY (project, session, path));
        CREATE TABLE sessions (project TEXT NOT NULL, session TEXT NOT NULL, folder TEXT NOT NULL,
            pattern TEXT NOT NULL, recursive INTEGER NOT NULL, started_at REAL NOT NULL,
            PRIMARY KEY (project, session));
        INSERT INTO published VALUES ('p1', 's1', '/data/s1/a.mrc', 1, 1, 'id-a', 60.0, 1);
        INSERT INTO sessions VALUES ('p1', 's1', '/data/s1', '*.mrc', 1, 50.0);
        PRAGMA user_version=1;
        """
    )
    db.close()
    assert read_incomplete(tmp_path) == {}
    sessions, counts = read_ledger(tmp_path)
    assert [r.session for r in sessions] == ["s1"] and counts[("p1", "s1")].published == 1

    ledger = Ledger(tmp_path)
    try:
        assert list(ledger.publications("p1", "s1")) == ["/data/s1/a.mrc"]
        ledger.note_incomplete("p1", "s1", "/data/s1/b.mrc", 70.0, "file is empty (0 bytes)")
        assert [f.path for f in read_incomplete(tmp_path)[("p1", "s1")]] == ["/data/s1/b.mrc"]
    finally:
        ledger.close()
    check = sqlite3.connect(tmp_path / DATABASE)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    check.close()
