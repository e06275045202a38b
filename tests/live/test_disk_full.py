"""A full output disk (issue 25, item 3), on a real filesystem: a 1 MiB tmpfs mounted over the outputs folder and
filled to its last byte.

The writer keeps the message in hand and waits for space with backoff: nothing is dead-lettered or counted as a
bad input, ``/readyz`` (the writer's readiness) says the disk is full and names the path, ``cryomae status`` says
so, and the picks are written by themselves once space is freed. A disk that stays full longer than a delivery
may be held makes the writer publish the message again and acknowledge it, so waiting never counts a delivery.

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.service import metrics
from cryomae.service.writer import Writer
from tests.live.conftest import PICKS_DLQ, PROJECT, SESSION, Live, running, start_session, wait_until
from tests.live.test_trust import _picks, _published_version


@contextmanager
def tmpfs(folder: Path, size_kib: int = 1024) -> Iterator[Path]:
    """A small real filesystem at ``folder`` (needs root, as the test machines run)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder``'s filesystem until it has no byte left; the filler file."""
    filler = folder / "filler.bin"
    error: OSError | None = None
    with open(filler, "wb", buffering=0) as f:
        while error is None:
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                error = exc
    assert error.errno == errno.ENOSPC
    while True:  # the last partial block
        try:
            with open(filler, "ab", buffering=0) as f:
                f.write(b"\0")
        except OSError:
            return filler


def _written(live: Live) -> list[str]:
    index = live.root / "outputs" / PROJECT / SESSION / "autopick.star"
    return [e.micrograph for e in live.outputs().micrographs()] if index.is_file() else []


def test_a_full_output_disk_waits_and_resumes_by_itself(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    version = _published_version(live)
    first, second, third = (str(live.drop(i).resolve()) for i in range(3))
    with tmpfs(live.root / "outputs") as outputs, running(live, settings, ["writer"]) as (app, control):
        writer = app.services["writer"]
        assert isinstance(writer, Writer)
        start_session(live, control)
        control.send(topology.PICKS, _picks(first, version))
        wait_until(lambda: _written(live) == [first], what="the first picks written")

        filler = fill(outputs)
        control.send(topology.PICKS, _picks(second, version))
        wait_until(lambda: writer.ready()["disk_space"] is False, what="the writer waiting for disk space")
        state = app.ready()["writer"]
        assert "No space left on device" in state["disk_full"]["reason"], state
        assert str(outputs) in state["disk_full"]["reason"], state
        assert metrics.REGISTRY.get_sample_value("cryomae_disk_full", {"service": "writer"}) == 1
        report = ops.status(settings, control)
        (disk,) = [d for d in report["disks"] if d["path"] == str(outputs)]
        assert disk["full"] and disk["free_bytes"] == 0
        assert "disk FULL: " + str(outputs) in ops.format_status(report)
        assert app.broker.depth(PICKS_DLQ) == 0  # not a bad input: nothing dead-lettered
        assert _written(live) == [first]

        filler.unlink()  # space is back: the held message is written, nothing replayed by hand
        wait_until(lambda: _written(live) == [first, second], what="the held picks written once space returned")
        wait_until(lambda: writer.ready()["disk_space"] is True, what="the writer ready again")
        assert metrics.REGISTRY.get_sample_value("cryomae_disk_full", {"service": "writer"}) == 0
        assert not ops.status(settings, control)["disks"][0]["full"]

        # a disk full for longer than a delivery may be held: the message goes round, never counted
        writer.space.hold_s = 0.3
        writer.space.first_wait_s = writer.space.max_wait_s = 0.05
        filler = fill(outputs)
        control.send(topology.PICKS, _picks(third, version))
        wait_until(lambda: writer.deferred >= 3, what="the message published again three times")
        assert app.broker.depth(PICKS_DLQ) == 0
        filler.unlink()
        wait_until(lambda: _written(live) == [first, second, third], what="the third picks written")
        assert app.broker.depth(PICKS_DLQ) == 0
        wait_until(lambda: app.broker.depth(topology.PICKS) == 0, what="no copy left in the picks queue")
        assert writer.space.episodes == 2
        assert _written(live) == [first, second, third]  # each micrograph once
