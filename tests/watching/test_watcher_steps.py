"""The watcher's decisions, one step at a time with a clock moved by hand (no loop thread): what is published,
when, and what is refused. Real files in tmp_path; timing-dependent detection is in test_watcher_live.py."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from structlog.testing import capture_logs

from cryomae.errors import InputError, TransientError
from cryomae.messages import MicrographReady, SessionCommand
from cryomae.watching import Watcher, parse_mountinfo
from cryomae.watching.ledger import read_incomplete

from .helpers import FakeClock, Published, SlowWrite, fast_settings, mrc_bytes, patched, wait_until, write_micrograph

SETTLE, GIVE_UP, POLL = 1.0, 10.0, 0.5


def make_watcher(root: Path, published: Published, clock: FakeClock, **overrides: object) -> Watcher:
    values: dict[str, object] = {"settle_seconds": SETTLE, "give_up_seconds": GIVE_UP, "poll_interval": POLL}
    values.update(overrides)
    return Watcher(root / "state", published, fast_settings(root, **values), clock=clock)


def settle(watcher: Watcher, clock: FakeClock, seconds: float = SETTLE + 0.1) -> None:
    """Look (first sight of new files), let the settle time pass, look again."""
    watcher.step()
    clock.advance(seconds)
    watcher.step()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "session1"
    path.mkdir(parents=True)
    return path


def test_complete_micrograph_is_published_once_with_its_details(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    path = write_micrograph(folder / "mic_0001.mrc")
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        watcher.step()
        assert published.messages == []  # found, but not yet quiet for the settle time
        clock.advance(SETTLE + 0.1)
        before = time.time()
        watcher.step()
        clock.advance(60)
        watcher.step()

    assert len(published.messages) == 1
    message = published.messages[0]
    st = path.stat()
    assert isinstance(message, MicrographReady)
    assert (message.project, message.session, message.path) == ("proj", "sess", str(path.resolve()))
    assert (message.size, message.mtime) == (st.st_size, st.st_mtime_ns / 1e9)
    assert before <= message.complete_at <= time.time()
    assert not message.repick


def test_temporary_names_and_hidden_folders_are_ignored(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    for name in [".mic_0001.mrc", "mic_0002.mrc.tmp", "mic_0003.mrc.part", "mic_0004.mrc~", ".snapshot/mic_0005.mrc"]:
        write_micrograph(folder / name)
    real = write_micrograph(folder / "mic_0006.mrc")
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        settle(watcher, clock)
        clock.advance(GIVE_UP)
        watcher.step()
        assert watcher.session_stats("proj", "sess").seen == 1
    assert published.paths() == [str(real)]


def test_partial_mrc_is_published_only_once_complete(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    content = mrc_bytes(tmp_path / "scratch")
    writer = SlowWrite(folder / "mic_0001.mrc", content)
    writer.header()
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        settle(watcher, clock)
        writer.fraction(0.3)
        settle(watcher, clock)
        writer.fraction(0.9)
        settle(watcher, clock)
        stats = watcher.session_stats("proj", "sess")
        assert (stats.pending, stats.incomplete, stats.published) == (1, 1, 0)
        assert published.messages == []  # quiet, but its header wants more bytes than it has
        writer.rest()
        watcher.step()
        assert published.messages == []  # it grew: quiet again for the settle time first
        clock.advance(SETTLE + 0.1)
        watcher.step()
        stats = watcher.session_stats("proj", "sess")
    assert [m.size for m in published.messages] == [len(content)]
    assert (stats.pending, stats.published, stats.gave_up) == (0, 1, 0)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("junk.mrc", b"plain text, not an MRC " * 20, "not an MRC file"),  # shorter than a header: may grow
        ("empty.mrc", b"", "file is empty"),
        ("empty.jpg", b"", "file is empty"),
    ],
)
def test_file_that_never_completes_is_published_after_the_give_up_time(
    tmp_path: Path, folder: Path, clock: FakeClock, name: str, content: bytes, problem: str
):
    """Published anyway, so that the picker dead-letters it with the reason instead of it waiting forever."""
    published = Published()
    (folder / name).write_bytes(content)
    with make_watcher(tmp_path, published, clock) as watcher, capture_logs() as logs:
        watcher.start_session("proj", "sess", folder, pattern=name)
        settle(watcher, clock)
        assert watcher.session_stats("proj", "sess").incomplete == 1
        clock.advance(GIVE_UP - SETTLE - 0.5)
        watcher.step()
        assert published.messages == []
        clock.advance(1.0)
        watcher.step()
        stats = watcher.session_stats("proj", "sess")
    assert published.paths() == [str(folder / name)]
    assert (stats.published, stats.gave_up) == (1, 1)
    given_up = [e for e in logs if e["event"] == "micrograph_given_up"]
    assert len(given_up) == 1
    assert problem in given_up[0]["problem"]


def test_file_replaced_after_publication_is_not_published_again(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    path = write_micrograph(folder / "mic_0001.mrc")
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        settle(watcher, clock)
        assert len(published.messages) == 1
        write_micrograph(path, rows=40, seed=1)  # another file under the same name
        with capture_logs() as logs:
            clock.advance(POLL)
            settle(watcher, clock, POLL)
            clock.advance(GIVE_UP)
            watcher.step()
        assert watcher.session_stats("proj", "sess").replaced == 1
    assert len(published.messages) == 1
    warnings = [e for e in logs if e["event"] == "published_file_replaced"]
    assert len(warnings) == 1  # once, not at every poll
    assert warnings[0]["size"] == path.stat().st_size != warnings[0]["published_size"]

    with make_watcher(tmp_path, published, clock) as restarted, capture_logs() as logs:  # the catch-up neither
        settle(restarted, clock)
        clock.advance(GIVE_UP)
        restarted.step()
    assert len(published.messages) == 1
    assert [e["path"] for e in logs if e["event"] == "published_file_replaced"] == [str(path)]


def test_a_stopped_session_publishes_nothing_more(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        watcher.step()
        write_micrograph(folder / "mic_0001.mrc")
        watcher.step()
        assert watcher.session_stats("proj", "sess").pending == 0  # the next listing is not due yet
        clock.advance(POLL)
        watcher.step()
        assert watcher.session_stats("proj", "sess").pending == 1
        assert watcher.stop_session("proj", "sess")
        assert not watcher.stop_session("proj", "sess")  # a repeated stop is harmless
        write_micrograph(folder / "mic_0002.mrc")
        settle(watcher, clock)
        clock.advance(GIVE_UP)
        watcher.step()
        assert watcher.sessions() == []
        assert watcher.session_stats("proj", "sess").state is None
    assert published.messages == []


def test_non_recursive_session_sees_only_the_top_folder(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    top = write_micrograph(folder / "mic_0001.mrc")
    write_micrograph(folder / "GridSquare_1" / "mic_0002.mrc")
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder, recursive=False)
        settle(watcher, clock)
    assert published.paths() == [str(top)]


def test_patterns_for_other_formats(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    pixels = (np.arange(32 * 48).reshape(32, 48) % 251).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "mic_0001.jpg")
    tifffile.imwrite(folder / "mic_0002.tiff", pixels)
    tifffile.imwrite(folder / "mic_0003.tif", pixels)
    write_micrograph(folder / "mic_0004.mrc")
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "jpg", folder, pattern="*.jpg")
        watcher.start_session("proj", "tif", folder, pattern="*.tif*")
        settle(watcher, clock)
    by_session = sorted((m.session, Path(m.path).name) for m in published.messages)
    assert by_session == [("jpg", "mic_0001.jpg"), ("tif", "mic_0002.tiff"), ("tif", "mic_0003.tif")]


def test_transient_publish_failure_is_retried_and_recorded_once(tmp_path: Path, folder: Path, clock: FakeClock):
    failures = [TransientError("broker unreachable")]

    def flaky(message: MicrographReady) -> None:
        if failures:
            raise failures.pop()

    published = Published(fail=flaky)
    write_micrograph(folder / "mic_0001.mrc")
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        settle(watcher, clock)
        assert failures == []  # it was tried
        stats = watcher.session_stats("proj", "sess")
        assert (stats.pending, stats.published) == (1, 0)
        watcher.step()
        assert published.messages == []  # not before the retry time
        clock.advance(POLL)
        watcher.step()
        clock.advance(POLL)
        watcher.step()
        stats = watcher.session_stats("proj", "sess")
    assert len(published.messages) == 1
    assert (stats.pending, stats.published) == (0, 1)


def test_session_folders_that_are_refused(tmp_path: Path, clock: FakeClock):
    roots = tmp_path / "data"
    inside, outside = roots / "session1", tmp_path / "elsewhere"
    inside.mkdir(parents=True)
    outside.mkdir()
    (roots / "escape").symlink_to(outside)
    (roots / "afile").write_text("x")
    with Watcher(tmp_path / "state", Published(), fast_settings(roots), clock=clock) as watcher:
        cases = [
            (outside, "outside every data root"),
            (roots / "escape", "resolves to"),
            (roots / ".." / "elsewhere", "outside every data root"),
            (roots / "missing", "does not exist"),
            (roots / "afile", "is not a folder"),
            (Path("data/session1"), "must be an absolute path"),
        ]
        for given, problem in cases:
            with pytest.raises(InputError, match=problem) as info:
                watcher.start_session("proj", "sess", given)
            assert info.value.path == given
            assert str(given) in str(info.value)
        with pytest.raises(InputError, match="invalid session name"):
            watcher.start_session("proj", "bad/name", inside)
        with pytest.raises(InputError, match="glob of file names"):
            watcher.start_session("proj", "sess", inside, pattern="sub/*.mrc")
        assert watcher.sessions() == []


NFS_MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 22 0:50 / {nfs} rw,relatime shared:9 - nfs4 fileserver:/export/em rw,vers=4.2
"""


def test_auto_mode_polls_on_nfs_and_uses_inotify_on_a_local_disk(tmp_path: Path, clock: FakeClock):
    nfs, local = tmp_path / "nfs", tmp_path / "local"
    (nfs / "session1").mkdir(parents=True)
    local.mkdir()
    table = parse_mountinfo(NFS_MOUNTINFO.format(nfs=nfs))
    settings = fast_settings(tmp_path, mode="auto")
    with (
        Watcher(tmp_path / "state", Published(), settings, clock=clock, mounts=lambda: table) as watcher,
        capture_logs() as logs,
    ):
        watcher.start_session("proj", "remote", nfs / "session1")
        watcher.start_session("proj", "here", local)
        watcher.step()
        modes = {info.session: (info.state, info.mode, info.reason) for info in watcher.sessions()}
    assert modes["remote"][:2] == ("watching", "poll")
    assert "nfs4" in modes["remote"][2]
    assert modes["here"][:2] == ("watching", "inotify")
    assert "ext4" in modes["here"][2]
    chosen = {e["session"]: (e["mode"], e["reason"]) for e in logs if e["event"] == "session_watching"}
    assert chosen == {"remote": modes["remote"][1:], "here": modes["here"][1:]}


def test_session_commands(tmp_path: Path, folder: Path, clock: FakeClock):
    with make_watcher(tmp_path, Published(), clock) as watcher:
        watcher.handle(SessionCommand(action="start", project="proj", session="sess", folder=str(folder)))
        [info] = watcher.sessions()
        assert (info.folder, info.pattern, info.recursive, info.state) == (folder, "*.mrc", True, "pending")
        watcher.handle(SessionCommand(action="start", project="proj", session="sess", folder=str(folder)))
        assert watcher.sessions() == [info]  # a redelivered command changes nothing
        watcher.handle(
            SessionCommand(action="start", project="proj", session="sess", folder=str(folder), pattern="*.tif*")
        )
        [changed] = watcher.sessions()
        assert changed.pattern == "*.tif*"
        with pytest.raises(InputError, match="names no folder"):
            watcher.handle(SessionCommand(action="start", project="proj", session="other"))
        watcher.handle(SessionCommand(action="stop", project="proj", session="sess"))
        assert watcher.sessions() == []


def test_session_whose_folder_is_gone_at_restart_is_retried(tmp_path: Path, folder: Path, clock: FakeClock):
    published = Published()
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
    write_micrograph(folder / "mic_0001.mrc")
    hidden = folder.with_name("unmounted")
    os.rename(folder, hidden)  # as if its filesystem were not mounted yet when the watcher restarts
    with make_watcher(tmp_path, published, clock) as watcher, capture_logs() as logs:
        watcher.step()
        [info] = watcher.sessions()
        assert info.state == "unavailable"
        assert "does not exist" in info.reason
        os.rename(hidden, folder)
        watcher.step()
        assert watcher.sessions()[0].state == "unavailable"  # not before the retry time
        clock.advance(POLL)
        settle(watcher, clock)
        assert watcher.sessions()[0].state == "watching"
    assert published.paths() == [str(folder / "mic_0001.mrc")]
    assert len([e for e in logs if e["event"] == "session_unavailable"]) == 1  # logged once, not every retry


# ------------------------------------------------------------------------------ item 18: unfixable and incomplete


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [
        ("junk.mrc", "text", "not an MRC file"),
        ("mode.mrc", "unknown_mode", "unsupported MRC mode 99"),
        ("long.mrc", "longer", "longer than its header says"),
    ],
)
def test_file_that_can_never_complete_is_published_at_once(
    tmp_path: Path, folder: Path, clock: FakeClock, name: str, kind: str, problem: str
):
    """Once settled, not after the give-up time: the picker dead-letters it with the reason at once."""
    good = mrc_bytes(tmp_path / "scratch")
    content = {
        "text": b"plain text, not an MRC " * 80,
        "unknown_mode": patched(good, 12, struct.pack("<i", 99)),
        "longer": good + bytes(100),
    }[kind]
    (folder / name).write_bytes(content)
    published = Published()
    with make_watcher(tmp_path, published, clock) as watcher, capture_logs() as logs:
        watcher.start_session("proj", "sess", folder)
        watcher.step()
        assert published.messages == []  # not before the settle time: it may still be changing
        clock.advance(SETTLE + 0.1)  # far below GIVE_UP
        watcher.step()
        stats = watcher.session_stats("proj", "sess")
        publication = watcher.publications("proj", "sess")[str(folder / name)]
    assert published.paths() == [str(folder / name)]
    assert (stats.pending, stats.incomplete, stats.published, stats.gave_up) == (0, 0, 1, 1)
    assert publication.complete is False
    [rejected] = [e for e in logs if e["event"] == "micrograph_rejected"]
    assert problem in rejected["problem"] and rejected["path"] == str(folder / name)
    assert [e for e in logs if e["event"] in ("micrograph_given_up", "micrograph_incomplete")] == []


def test_symlink_resolving_outside_the_data_roots_is_published_at_once(tmp_path: Path, clock: FakeClock):
    root = tmp_path / "data"
    folder = root / "session1"
    folder.mkdir(parents=True)
    target = tmp_path / "elsewhere" / "junk.mrc"  # outside the roots; would wait the give-up time as junk
    target.parent.mkdir()
    target.write_bytes(b"\x00" * 700)
    (folder / "escape.mrc").symlink_to(target)
    good = write_micrograph(tmp_path / "elsewhere" / "good.mrc")
    (folder / "good_escape.mrc").symlink_to(good)  # complete, but not the watcher's to pass on as such
    published = Published()
    settings = fast_settings(root, settle_seconds=SETTLE, give_up_seconds=GIVE_UP, poll_interval=POLL)
    with Watcher(tmp_path / "state", published, settings, clock=clock) as watcher, capture_logs() as logs:
        watcher.start_session("proj", "sess", folder)
        settle(watcher, clock)
        publications = watcher.publications("proj", "sess")
    # published under the session's name (the picker resolves it and refuses it with its own reason)
    assert sorted(published.paths()) == [str(folder / "escape.mrc"), str(folder / "good_escape.mrc")]
    assert [p.complete for p in publications.values()] == [False, False]
    rejected = {e["path"]: e["problem"] for e in logs if e["event"] == "micrograph_rejected"}
    assert set(rejected) == set(published.paths())
    assert str(target) in rejected[str(folder / "escape.mrc")]
    assert all("outside the data roots" in problem for problem in rejected.values())


def test_incomplete_files_are_in_the_ledger_while_they_wait(tmp_path: Path, folder: Path, clock: FakeClock):
    """What `cryomae status` reads: each file waiting as incomplete, since when and why; gone once it is
    published, deleted, its session stopped, or the watcher restarted without it."""
    state = tmp_path / "state"
    writer = SlowWrite(folder / "slow.mrc", mrc_bytes(tmp_path / "scratch"))
    writer.header()
    writer.fraction(0.5)
    (folder / "empty.mrc").touch()
    published = Published()
    with make_watcher(tmp_path, published, clock) as watcher:
        watcher.start_session("proj", "sess", folder)
        assert read_incomplete(state) == {}
        before = time.time()
        watcher.step()
        clock.advance(SETTLE + 0.1)
        watcher.step()
        rows = {r.path: r for r in read_incomplete(state)[("proj", "sess")]}
        assert set(rows) == {str(folder / "slow.mrc"), str(folder / "empty.mrc")}
        assert "truncated MRC file" in rows[str(folder / "slow.mrc")].problem
        assert rows[str(folder / "empty.mrc")].problem == "file is empty (0 bytes)"
        for row in rows.values():  # wall-clock time of the last change the watcher saw, not its own clock
            assert before - (SETTLE + 0.1) - 1 <= row.since <= time.time() - (SETTLE + 0.1)
        assert watcher.session_stats("proj", "sess").incomplete == 2

        writer.rest()  # the copy finishes: published, and no longer incomplete
        settle(watcher, clock)
        assert published.paths() == [str(folder / "slow.mrc")]
        assert [r.path for r in read_incomplete(state)[("proj", "sess")]] == [str(folder / "empty.mrc")]
        (folder / "empty.mrc").unlink()  # deleted: gone from the list
        clock.advance(POLL)
        watcher.step()
        assert read_incomplete(state) == {}

        (folder / "empty2.mrc").touch()  # stopping the session drops its waiting files
        clock.advance(POLL)
        settle(watcher, clock)
        assert [r.path for r in read_incomplete(state)[("proj", "sess")]] == [str(folder / "empty2.mrc")]
        watcher.stop_session("proj", "sess")
        assert read_incomplete(state) == {}

        watcher.start_session("proj", "sess", folder)
        clock.advance(POLL)
        settle(watcher, clock)
        assert len(read_incomplete(state)[("proj", "sess")]) == 1
    assert len(read_incomplete(state)[("proj", "sess")]) == 1  # still waiting while no watcher runs
    (folder / "empty2.mrc").unlink()
    with make_watcher(tmp_path, published, clock):
        assert read_incomplete(state) == {}  # a restarted watcher looks again; nothing stale stays listed


LOOP = "cannot be examined: too many levels of symbolic links (a symlink loop)"
DANGLING = "cannot be examined: its symlink leads nowhere (a dangling symlink)"


def _good_and_broken(folder: Path, start: int = 0) -> list[str]:
    """20 good micrographs beside a symlink loop (a.mrc -> b.mrc -> a.mrc) and a dangling symlink; the good paths."""
    good = [str(write_micrograph(folder / f"mic_{i:02d}.mrc", seed=i)) for i in range(start, start + 20)]
    (folder / "a.mrc").symlink_to(folder / "b.mrc")
    (folder / "b.mrc").symlink_to(folder / "a.mrc")
    (folder / "gone.mrc").symlink_to(folder / "nowhere.mrc")
    return sorted(good)


def _problems(state: Path) -> dict[str, str]:
    return {r.path: r.problem for r in read_incomplete(state).get(("proj", "sess"), [])}


def test_entries_that_cannot_be_examined_are_reported_and_the_rest_of_the_folder_is_picked(
    tmp_path: Path, folder: Path, clock: FakeClock
):
    """Issue 25 item 1: a symlink loop (or a dangling symlink) no longer stops the listing; each such entry is
    skipped, logged once and listed for `cryomae status`, on polling and at catch-up after a restart."""
    state = tmp_path / "state"
    good = _good_and_broken(folder)
    broken = {str(folder / "a.mrc"): LOOP, str(folder / "b.mrc"): LOOP, str(folder / "gone.mrc"): DANGLING}
    published = Published()
    with make_watcher(tmp_path, published, clock) as watcher, capture_logs() as logs:
        watcher.start_session("proj", "sess", folder)
        settle(watcher, clock)  # the catch-up scan, then the settle time
        assert sorted(published.paths()) == good
        assert _problems(state) == broken
        for _ in range(3):  # polled again: still listed, logged once
            clock.advance(POLL)
            watcher.step()
        assert _problems(state) == broken
    warned = [(e["path"], e["problem"]) for e in logs if e["event"] == "micrograph_unexaminable"]
    assert sorted(warned) == sorted(broken.items())
    assert sorted(published.paths()) == good  # the broken entries are never published

    # at catch-up after a restart, with 20 more good files that arrived meanwhile
    more = _good_and_broken(folder / "later", start=20)
    again = Published()
    with make_watcher(tmp_path, again, clock) as watcher:
        settle(watcher, clock)
        assert sorted(again.paths()) == more
        later = {str(folder / "later" / name): problem for name, problem in [("a.mrc", LOOP), ("gone.mrc", DANGLING)]}
        later[str(folder / "later" / "b.mrc")] = LOOP
        assert _problems(state) == broken | later

        # repaired or removed: no longer listed, and a repaired one is picked
        (folder / "a.mrc").unlink()
        write_micrograph(folder / "a.mrc", seed=99)
        (folder / "b.mrc").unlink()
        clock.advance(POLL)
        settle(watcher, clock)
        assert again.paths()[-1] == str(folder / "a.mrc")
        assert set(_problems(state)) == {str(folder / "gone.mrc"), *later}


def test_a_symlink_loop_announced_by_inotify_is_reported(tmp_path: Path, folder: Path, clock: FakeClock):
    """On live events (inotify, no periodic rescan): the loop's entries are reported, the good files published."""
    state = tmp_path / "state"
    published = Published()
    with make_watcher(tmp_path, published, clock, mode="inotify") as watcher:
        watcher.start_session("proj", "sess", folder)
        watcher.step()  # the catch-up of an empty folder; from now on only events tell
        good = _good_and_broken(folder)

        def caught_up() -> bool:
            clock.advance(SETTLE + 0.1)
            watcher.step()
            return sorted(published.paths()) == good and len(_problems(state)) == 3

        wait_until(caught_up, "the good files published and the broken ones reported")
        assert _problems(state)[str(folder / "a.mrc")] == LOOP
        assert _problems(state)[str(folder / "gone.mrc")] == DANGLING
