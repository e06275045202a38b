"""``service.lru.OpenSessions``: what the writer and its gallery keep open per session is bounded by count and by
idle time (issue 25, item 11), and an evicted session is opened again, from disk, when it is busy again."""

from __future__ import annotations

from pathlib import Path

from cryomae.service.lru import OpenSessions
from cryomae.store.outputs import SessionOutputs
from tests.store.test_outputs import picks


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_least_recently_used_goes_beyond_max_open_and_the_idle_ones_after_idle_s() -> None:
    clock = Clock()
    opened: list[str] = []
    cache: OpenSessions[str, object] = OpenSessions(max_open=3, idle_s=100.0, clock=clock)

    def get(key: str) -> object:
        def open_() -> object:
            opened.append(key)
            return object()

        return cache.get(key, open_)

    a = get("a")
    get("b")
    get("c")
    assert get("a") is a and opened == ["a", "b", "c"]  # still open: not opened again
    get("d")  # 4 > 3: "b", the least recently used, goes
    assert len(cache) == 3 and cache.peek("b") is None and cache.peek("a") is a
    clock.now = 150.0
    get("d")  # "a" and "c" unused for 150 s > 100 s
    assert len(cache) == 1 and cache.evicted == 3
    assert get("a") is not a and opened == ["a", "b", "c", "d", "a"]  # opened again


def test_a_session_closed_for_being_idle_is_read_back_with_everything_written(tmp_path: Path) -> None:
    clock = Clock()
    cache: OpenSessions[str, SessionOutputs] = OpenSessions(max_open=1, idle_s=60.0, clock=clock)

    def session(name: str) -> SessionOutputs:
        return cache.get(name, lambda: SessionOutputs(tmp_path / name))

    first = session("s1")
    first.apply(picks("/data/s1/a.mrc", [0.9, 0.8]))
    session("s2").apply(picks("/data/s2/a.mrc", [0.9]))  # s1 closed: one open at most
    assert cache.peek("s1") is None
    again = session("s1")
    assert again is not first and again.counts().micrographs == 1 and again.counts().particles == 2
    assert again.apply(picks("/data/s1/a.mrc", [0.9, 0.8])).outcome in ("duplicate", "replaced")
