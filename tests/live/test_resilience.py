"""Resilience of the live services: processes killed mid-stream, poison input, and a broker restart.

- Crash safety (RabbitMQ): the picker and the writer run as ``cryomae service`` processes and are killed with
  SIGKILL while a stream of micrographs flows, then restarted; every micrograph ends up in the outputs exactly
  once, every STAR file parses, and nothing is dead-lettered.
- Poison input (both transports): unreadable micrographs, a path outside the data roots and a malformed message
  go to ``micrographs.dlq`` at their first delivery with a reason naming the problem; the good micrographs sent
  after them are picked; a fixed one is replayed and picked; the dead-letter queue is purged.
- Broker restart (RabbitMQ): ``rabbitmqctl stop_app``/``start_app`` while a watched session is being picked;
  the session finishes with every micrograph exactly once.

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryomae.io import write_mrc
from cryomae.messages import SessionStarted
from cryomae.messaging import Broker, topology
from cryomae.messaging.rabbit import RabbitBroker
from cryomae.operator import actions as ops
from cryomae.service.app import App
from tests.live.conftest import (
    CRYOMAE,
    PROJECT,
    RABBIT,
    SESSION,
    Live,
    control_for,
    publish_raw,
    ready,
    running,
    start_session,
    train_first_model,
    wait_until,
)
from tests.messaging.conftest import AMQP_URL

STREAM = 20  # micrographs per stream
STOP_TIMEOUT = 60.0  # seconds a service process may take to exit after SIGTERM


# ------------------------------------------------------------------------------------------------ helpers


def _dead_letter_depths(broker: Broker) -> dict[str, int]:
    return {topology.dead_letters(q): broker.depth(topology.dead_letters(q)) for q in topology.WORK_QUEUES}


def _star_rows(path: Path) -> int:
    """Rows of a single-table STAR file, after checking it parses (an empty loop reads as no table)."""
    table = starfile.read(path)
    if isinstance(table, dict):
        assert len(table) <= 1, f"{path}: expected one table, got {list(table)}"
        table = next(iter(table.values()), pd.DataFrame())
    return len(table)


def _assert_exactly_once(live: Live, expected: set[str]) -> int:
    """Every expected micrograph once in the session outputs, rows consistent across every STAR file; the number
    of particles."""
    root = live.root / "outputs" / PROJECT / SESSION
    entries = live.outputs().micrographs()
    assert sorted(e.micrograph for e in entries) == sorted(expected)  # each micrograph once, no other
    particles = starfile.read(root / "particles.star")
    assert isinstance(particles, pd.DataFrame)
    per_micrograph = collections.Counter(particles["rlnMicrographName"])
    assert set(per_micrograph) <= {e.name for e in entries}
    for entry in entries:
        assert per_micrograph[entry.name] == entry.particles, entry.micrograph  # no duplicated or missing rows
    assert len(particles) == sum(e.particles for e in entries) > 0
    index = starfile.read(root / "autopick.star")
    assert isinstance(index, pd.DataFrame)
    assert sorted(index["rlnMicrographName"]) == sorted(e.name for e in entries)  # each micrograph once
    files = dict(zip(index["rlnMicrographName"], index["rlnMicrographCoordinates"], strict=True))
    for entry in entries:
        assert _star_rows(Path(files[entry.name])) == entry.particles, files[entry.name]
    return len(particles)


def _stage(live: Live, indices: Sequence[int]) -> list[Path]:
    """Micrographs copied into the session folder (nothing watches it), resolved as the picker names them."""
    return [live.drop(i).resolve() for i in indices]


class Service:
    """One ``cryomae service NAME`` process, its output in a log file."""

    def __init__(self, live: Live, name: str, tag: str) -> None:
        self.name = name
        self.log = live.root / f"{name}-{tag}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*CRYOMAE, "service", name],
                env=live.env(),
                cwd=live.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            text = ""
        return f"--- {self.name} (exit {self.proc.poll()}) ---\n{text[-chars:]}"

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def sigterm(self) -> int:
        """SIGTERM and wait; the exit code (killed if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"{self.name} did not exit within {STOP_TIMEOUT} s of SIGTERM\n{self.tail()}")
        return self.proc.returncode


@contextmanager
def _reaped() -> Iterator[list[Service]]:
    """A list to put started services in; every one still running at the end gets SIGTERM, then SIGKILL."""
    started: list[Service] = []
    try:
        yield started
    finally:
        for svc in started:
            if svc.alive():
                svc.proc.send_signal(signal.SIGTERM)
        for svc in started:
            try:
                svc.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()


def _while_alive(services: Sequence[Service], condition: Callable[[], bool]) -> Callable[[], bool]:
    """``condition``, failing at once (with the logs) when one of the services has exited."""

    def check() -> bool:
        dead = [s for s in services if not s.alive()]
        if dead:
            pytest.fail("service exited early:\n" + "\n".join(s.tail() for s in dead))
        return condition()

    return check


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60).stdout


# ------------------------------------------------------------------------------------------------ crash safety


@pytest.mark.parametrize("transport", RABBIT)
def test_picker_and_writer_killed_mid_stream_lose_and_duplicate_nothing(live: Live) -> None:
    """``kill -9`` of both service processes after the first rows are written, then a restart: RabbitMQ
    redelivers what was in hand, the writer repairs what the kill left, and re-picks replace rows."""
    live.create_project()
    settings = live.settings()
    trainer = App(settings, ["trainer"])
    trainer.start()
    try:
        train_first_model(live, control_for(live, trainer.broker))
    finally:
        trainer.stop()

    micrographs = _stage(live, range(STREAM))
    expected = {str(p) for p in micrographs}
    broker = RabbitBroker(AMQP_URL, live.namespace)
    try:
        broker.declare()
        broker.publish(  # as the watcher tells the writer of a session it watches
            topology.PICKS,
            SessionStarted(project=PROJECT, session=SESSION, folder=str(live.session_folder)),
        )
        for path in micrographs:
            broker.publish(topology.MICROGRAPHS, ready(path))
        with _reaped() as started:
            first = [Service(live, "writer", "first"), Service(live, "picker", "first")]
            started += first
            # kill as soon as the first rows are written: the stream is still flowing
            wait_until(_while_alive(first, lambda: live.picked() > 0), what="the first micrographs written")
            for svc in first:
                svc.kill9()
            assert [svc.proc.returncode for svc in first] == [-signal.SIGKILL] * 2
            at_kill = live.picked()  # the writer is dead: its outputs no longer change
            assert 0 < at_kill < STREAM, f"the kill did not land mid-stream ({at_kill} of {STREAM} written)"
            left = broker.depth(topology.MICROGRAPHS) + broker.depth(topology.PICKS)
            assert left > 0  # messages still queued (and those in hand, returned by RabbitMQ once it notices)

            second = [Service(live, "writer", "second"), Service(live, "picker", "second")]
            started += second
            wait_until(
                _while_alive(
                    second,
                    lambda: (
                        live.picked() == STREAM
                        and broker.depth(topology.MICROGRAPHS) == 0
                        and broker.depth(topology.PICKS) == 0
                    ),
                ),
                what=f"all {STREAM} micrographs written after the restart",
            )
            writer, picker = second
            assert picker.sigterm() == 0, picker.tail()  # the picker first: its result reaches the writer
            wait_until(lambda: broker.depth(topology.PICKS) == 0, what="the picker's last result written")
            assert writer.sigterm() == 0, writer.tail()
        assert broker.depth(topology.MICROGRAPHS) == 0 and broker.depth(topology.PICKS) == 0
        dead = _dead_letter_depths(broker)
        assert dead == dict.fromkeys(dead, 0)  # nothing dead-lettered: a kill is not a reason to give up
    finally:
        broker.close()
    _assert_exactly_once(live, expected)
    print(f"killed after {at_kill} of {STREAM} micrographs were written; {left} messages were left")


# ------------------------------------------------------------------------------------------------ poison input


def test_poison_micrographs_are_dead_lettered_with_reasons_and_the_pipeline_goes_on(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    folder = live.session_folder
    folder.mkdir(parents=True)
    # the poison, written before anything runs
    source = live.dataset.micrographs[1]
    truncated = folder / "truncated.mrc"
    truncated.write_bytes(source.read_bytes()[:-5000])
    not_mrc = folder / "not_mrc.mrc"
    not_mrc.write_bytes(b"this is a text file, not a micrograph\n" * 100)
    nan = folder / "nan.mrc"
    write_mrc(nan, np.full((256, 256), np.nan, dtype=np.float32), pixel_size=2.0, dtype=np.float32)
    outside = live.root / "elsewhere" / "mic.mrc"  # a good micrograph, but not under a data root
    outside.parent.mkdir()
    shutil.copyfile(source, outside)
    good = _stage(live, [2, 3])

    with running(live, settings) as (app, control):
        start_session(live, control)
        train_first_model(live, control)
        dlq = topology.dead_letters(topology.MICROGRAPHS)
        # the one to be fixed goes first, alone: it stays the first dead letter whatever the order of the others
        control.send(topology.MICROGRAPHS, ready(truncated))
        wait_until(lambda: app.broker.depth(dlq) == 1, what="the truncated micrograph dead-lettered")
        first = ops.dlq_list(control, topology.MICROGRAPHS, 100)
        assert (first["queue"], first["running"], first["depth"], len(first["messages"])) == (dlq, True, 1, 1)
        wait_until(lambda: app.broker.depth(dlq) == 1, what="the listed dead letter back in its queue")
        for path in (not_mrc, nan, outside):
            control.send(topology.MICROGRAPHS, ready(path))
        poison = 4
        if live.transport == "rabbitmq":
            # a body that is no message at all; the in-memory broker only carries Message objects, and the
            # one-process inbox refuses such a request before it reaches a queue, so this case is RabbitMQ's
            publish_raw(live, topology.MICROGRAPHS, b"\x00\x01 not json {")
            poison += 1
        for path in good:
            control.send(topology.MICROGRAPHS, ready(path))
        wait_until(lambda: live.picked() == len(good), what="the good micrographs sent after the poison picked")
        wait_until(lambda: app.broker.depth(dlq) == poison, what=f"{poison} dead letters")

        # the truncated file is replaced by a complete one; replaying the first dead letter picks it
        shutil.copyfile(live.dataset.micrographs[4], truncated)
        replayed = ops.dlq_replay(control, topology.MICROGRAPHS, 1)
        assert replayed["replayed"] == 1
        wait_until(lambda: live.picked() == len(good) + 1, what="the replayed micrograph picked")
        assert app.broker.depth(dlq) == poison - 1  # the others left alone

        listed = ops.dlq_list(control, topology.MICROGRAPHS, 100)
        assert (listed["running"], listed["depth"]) == (True, poison - 1)
        rows = [*first["messages"], *listed["messages"]]
        assert len(rows) == poison
        by_path = {row["path"]: row for row in rows if "path" in row}
        assert set(by_path) == {str(truncated), str(not_mrc), str(nan), str(outside)}
        assert first["messages"][0]["path"] == str(truncated)
        expected_words = {
            truncated: "truncated MRC file",
            not_mrc: "not an MRC file",
            nan: "65536 NaN pixels",
            outside: "outside the configured data roots",
        }
        for path, words in expected_words.items():
            row = by_path[str(path)]
            assert str(path) in row["reason"] and words in row["reason"], row
            assert row["queue"] == topology.MICROGRAPHS and row["kind"] == "micrograph_ready", row
            assert "gave up" not in row["reason"], row  # dead-lettered at the first delivery, not retried
        if live.transport == "rabbitmq":
            (malformed,) = [row for row in rows if "path" not in row]
            assert "not JSON" in malformed["reason"] and malformed["queue"] == topology.MICROGRAPHS, malformed
            assert "not json {" in malformed["body"]

        purged = ops.dlq_purge(control, topology.MICROGRAPHS)
        assert purged["purged"] == poison - 1
        after = ops.dlq_list(control, topology.MICROGRAPHS, 100)
        assert (after["depth"], after["messages"]) == (0, [])
        assert app.broker.depth(topology.MICROGRAPHS) == 0
    _assert_exactly_once(live, {str(p) for p in [*good, truncated]})


# ------------------------------------------------------------------------------------------------ broker restart


@pytest.mark.parametrize("transport", RABBIT)
def test_session_finishes_exactly_once_across_a_broker_restart(live: Live) -> None:
    """Restarting RabbitMQ briefly disturbs anything else using it (as ``tests/messaging/test_rabbit.py`` does)."""
    live.create_project()
    settings = live.settings()
    with running(live, settings) as (app, control):
        train_first_model(live, control)
        live.session_folder.mkdir(parents=True)
        ops.session_start(settings, control, PROJECT, SESSION, live.session_folder, "*.mrc", True)
        half = STREAM // 2
        dropped = [live.drop(i) for i in range(half)]
        wait_until(lambda: live.picked() > 0, what="the first micrographs picked")
        rabbitmqctl("stop_app")
        try:
            wait_until(lambda: not app.broker.connected, timeout=30, what="the services to notice")
            at_stop = live.picked()
            # the rest arrives while RabbitMQ is down: the watcher cannot publish them until it is back
            dropped += [live.drop(i) for i in range(half, STREAM)]
        finally:
            rabbitmqctl("start_app")
        assert at_stop < STREAM
        wait_until(lambda: live.picked() == STREAM, what=f"all {STREAM} micrographs picked after the restart")
        wait_until(
            lambda: app.broker.depth(topology.MICROGRAPHS) == 0 and app.broker.depth(topology.PICKS) == 0,
            timeout=30,
            what="the queues drained",
        )
        report = ops.status(settings, control)
        dead = _dead_letter_depths(app.broker)
    particles = _assert_exactly_once(live, {str(p.resolve()) for p in dropped})
    assert dead == dict.fromkeys(dead, 0)
    session = next(s for s in report["sessions"] if s["session"] == SESSION)
    assert (session["seen"], session["picked"], session["failed"], session["particles"]) == (
        STREAM,
        STREAM,
        0,
        particles,
    )
    print(f"RabbitMQ stopped after {at_stop} of {STREAM} micrographs were picked")
