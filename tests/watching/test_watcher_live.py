"""The watcher running on its own thread against real folders: detection by inotify and by polling, files
written in parts, renames into place, restarts, sessions started and stopped while running, the fallback when
an inotify watch cannot be made, and a publish failure that must end the loop."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify import InotifyObserver

from cryomae.io import validate_mrc_complete
from cryomae.messages import MicrographReady
from cryomae.watching import Watcher

from .helpers import Published, SlowWrite, fast_settings, mrc_bytes, wait_until, write_micrograph


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "session1"
    path.mkdir(parents=True)
    return path


def watching(watcher: Watcher, session: str = "sess") -> None:
    """Wait until the loop has taken the session up (its watch or first listing is in place)."""
    wait_until(
        lambda: any(i.session == session and i.state == "watching" for i in watcher.sessions()), f"{session} watched"
    )


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_new_micrograph_is_detected_and_published(tmp_path: Path, folder: Path, mode: str):
    """Written after the session is watched and with no periodic rescan: only the mode itself can find it."""
    published = Published()
    with Watcher(tmp_path / "state", published, fast_settings(tmp_path, mode=mode)) as watcher:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        watching(watcher)
        assert watcher.sessions()[0].mode == mode
        path = write_micrograph(folder / "GridSquare_1" / "mic_0001.mrc")
        [message] = published.wait_for(1)
        assert watcher.running
    assert (message.path, message.size) == (str(path), path.stat().st_size)


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_micrograph_written_in_parts_is_published_only_when_complete(tmp_path: Path, folder: Path, mode: str):
    published = Published()
    content = mrc_bytes(tmp_path / "scratch", rows=64, cols=64)
    writer = SlowWrite(folder / "mic_0001.mrc", content)
    with Watcher(tmp_path / "state", published, fast_settings(tmp_path, mode=mode)) as watcher:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        watching(watcher)
        writer.header()
        writer.fraction(0.5)
        wait_until(lambda: watcher.session_stats("proj", "sess").incomplete == 1, "the half file to settle")
        assert published.messages == []
        writer.rest()
        [message] = published.wait_for(1)
    assert message.size == len(content) == writer.path.stat().st_size
    assert validate_mrc_complete(message.path)


def test_files_renamed_into_place_are_published_under_their_final_name(tmp_path: Path, folder: Path):
    published = Published()
    outside = tmp_path / "staging"
    with Watcher(tmp_path / "state", published, fast_settings(tmp_path, mode="inotify")) as watcher:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        watching(watcher)
        partial = write_micrograph(folder / "mic_0001.mrc.part")
        elsewhere = write_micrograph(outside / "mic_0002.mrc")
        (folder / "GridSquare_2").mkdir()
        os.rename(partial, folder / "mic_0001.mrc")
        os.rename(elsewhere, folder / "GridSquare_2" / "mic_0002.mrc")
        published.wait_for(2)
        wait_until(lambda: watcher.session_stats("proj", "sess").published == 2, "both recorded")
        assert watcher.session_stats("proj", "sess").seen == 2
    assert sorted(published.paths()) == [str(folder / "GridSquare_2" / "mic_0002.mrc"), str(folder / "mic_0001.mrc")]


def test_restart_publishes_only_what_arrived_meanwhile(tmp_path: Path, folder: Path):
    settings = fast_settings(tmp_path, mode="inotify")
    first = Published()
    with Watcher(tmp_path / "state", first, settings) as watcher:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        watching(watcher)
        write_micrograph(folder / "mic_0001.mrc")
        write_micrograph(folder / "mic_0002.mrc")
        first.wait_for(2)
        wait_until(lambda: watcher.session_stats("proj", "sess").published == 2, "both recorded")
    arrived = write_micrograph(folder / "mic_0003.mrc")  # while no watcher runs

    second = Published()
    with Watcher(tmp_path / "state", second, settings) as restarted:
        [info] = restarted.sessions()  # resumed from the state folder, without a new start command
        assert (info.project, info.session, info.folder) == ("proj", "sess", folder)
        restarted.start()
        [message] = second.wait_for(1)
        wait_until(lambda: restarted.session_stats("proj", "sess").published == 3, "the catch-up recorded")
        later = write_micrograph(folder / "mic_0004.mrc")
        second.wait_for(2)
        stats = restarted.session_stats("proj", "sess")
    assert message.path == str(arrived)
    assert second.paths() == [str(arrived), str(later)]
    assert (stats.seen, stats.published, stats.pending) == (4, 4, 0)


def test_sessions_start_and_stop_while_running(tmp_path: Path):
    published = Published()
    a, b = tmp_path / "data" / "a", tmp_path / "data" / "b"
    a.mkdir(parents=True)
    b.mkdir()
    with Watcher(tmp_path / "state", published, fast_settings(tmp_path, mode="inotify")) as watcher:
        watcher.start()
        watcher.start_session("proj", "a", a)
        watching(watcher, "a")
        first = write_micrograph(a / "mic_0001.mrc")
        published.wait_for(1)
        assert watcher.stop_session("proj", "a")
        assert [i.session for i in watcher.sessions()] == []
        while_stopped = write_micrograph(a / "mic_0002.mrc")
        watcher.start_session("proj", "b", b)
        watching(watcher, "b")
        other = write_micrograph(b / "mic_0001.mrc")
        published.wait_for(2)
        assert published.paths() == [str(first), str(other)]  # nothing from the stopped session
        watcher.start_session("proj", "a", a)  # started again: its catch-up finds the file it missed
        published.wait_for(3)
        wait_until(lambda: watcher.session_stats("proj", "a").published == 2, "a's catch-up recorded")
    assert published.paths() == [str(first), str(other), str(while_stopped)]


def test_session_folder_deleted_and_made_again_is_watched_again(tmp_path: Path, folder: Path):
    published = Published()
    with Watcher(tmp_path / "state", published, fast_settings(tmp_path, mode="inotify")) as watcher:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        watching(watcher)
        shutil.rmtree(folder)
        wait_until(lambda: watcher.sessions()[0].state == "unavailable", "the loss to be noticed")
        assert "does not exist" in watcher.sessions()[0].reason
        folder.mkdir()
        watching(watcher)
        path = write_micrograph(folder / "mic_0001.mrc")
        published.wait_for(1)
        assert watcher.sessions()[0].mode == "inotify"
    assert published.paths() == [str(path)]


class _WatchLimitReached(InotifyObserver):
    """An observer whose watches fail as they do when fs.inotify.max_user_watches is exhausted."""

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def test_failed_inotify_watch_falls_back_to_polling(tmp_path: Path, folder: Path):
    published = Published()
    settings = fast_settings(tmp_path, mode="inotify")
    with Watcher(tmp_path / "state", published, settings, observer_factory=_WatchLimitReached) as watcher:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        watching(watcher)
        [info] = watcher.sessions()
        path = write_micrograph(folder / "mic_0001.mrc")
        published.wait_for(1)
    assert info.mode == "poll"
    assert "inotify watch limit reached" in info.reason
    assert published.paths() == [str(path)]


def test_publish_error_that_is_not_transient_ends_the_loop(tmp_path: Path, folder: Path):
    def broken(message: MicrographReady) -> None:
        raise RuntimeError(f"cannot publish {message.path}")

    watcher = Watcher(tmp_path / "state", Published(fail=broken), fast_settings(tmp_path))
    try:
        watcher.start()
        watcher.start_session("proj", "sess", folder)
        path = write_micrograph(folder / "mic_0001.mrc")
        with pytest.raises(RuntimeError, match="cannot publish"):
            watcher.join(timeout=10)
        assert not watcher.running
        assert watcher.session_stats("proj", "sess").published == 0  # not recorded: published again after a restart
    finally:
        with pytest.raises(RuntimeError, match=str(path)):
            watcher.close()
