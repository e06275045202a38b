"""The operator CLI and the service processes as an operator runs them: every ``cryomae`` command here is a
subprocess with the environment of the test's installation (``Live.env()``), run from its folder.

One-process mode (``cryomae run`` over the in-memory broker, the CLI reaching it through the state folder's
inbox): a whole session driven from the CLI, crash recovery after ``kill -9``, dead letters. Then the exit codes
and messages of failing commands, and the four services as separate processes over RabbitMQ.

Every ``cryomae`` process pays for importing torch (several seconds), so commands that do not depend on each
other run side by side (``cli_many``); every wait polls a condition with a deadline.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import starfile

from cryomae.io import Coordinates, write_coordinates
from cryomae.operator import actions as ops
from cryomae.operator.control import SpoolControl
from cryomae.service.inbox import INBOX
from cryomae.store.outputs import SessionOutputs
from cryomae.store.projects import ProjectStore
from cryomae.watching.ledger import read_ledger
from tests.live.conftest import (
    CLI_TIMEOUT,
    CRYOMAE,
    DIAMETER,
    PROJECT,
    SESSION,
    TINY_TRAINING,
    Dataset,
    Live,
    wait_until,
)
from tests.messaging.conftest import delete_namespace

OTHER = "other"  # a second session of the project, still watched when the first is stopped
STOP_TIMEOUT = 60.0  # seconds a service may take to exit after SIGTERM


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture
def mem(tmp_path: Path, dataset: Dataset) -> Live:
    """An installation over the in-memory broker (``cryomae run`` and the inbox)."""
    return Live(tmp_path, "memory", f"test-{uuid.uuid4().hex[:12]}", dataset)


@pytest.fixture
def rabbit(tmp_path: Path, dataset: Dataset) -> Iterator[Live]:
    """An installation over the real RabbitMQ, in a namespace of its own that is deleted afterwards."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield Live(tmp_path, "rabbitmq", namespace, dataset)
    delete_namespace(namespace, (PROJECT,))


def _env(live: Live, extra: dict[str, str] | None) -> dict[str, str]:
    return {**live.env(), **(extra or {})}


def _describe(args: Sequence[str], result: subprocess.CompletedProcess[str]) -> str:
    return f"cryomae {' '.join(args)} -> exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def cli_many(
    live: Live, *commands: Sequence[str] | tuple[Sequence[str], dict[str, str]]
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``cryomae`` commands side by side (each a list of arguments, or (arguments, extra environment));
    their results in order."""
    specs = [(c[0], c[1]) if isinstance(c, tuple) else (c, {}) for c in commands]
    procs: list[tuple[list[str], subprocess.Popen[str]]] = []
    try:
        for args, extra in specs:
            procs.append(
                (
                    list(args),
                    subprocess.Popen(
                        [*CRYOMAE, *args],
                        env=_env(live, extra),
                        cwd=live.root,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    ),
                )
            )
        results = []
        for args, proc in procs:
            try:
                out, err = proc.communicate(timeout=CLI_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"cryomae {' '.join(args)} did not finish within {CLI_TIMEOUT} s\n{err}")
            results.append(subprocess.CompletedProcess([*CRYOMAE, *args], proc.returncode, out, err))
        return results
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def cli(live: Live, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli_many(live, (args, env or {}))[0]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """The result of a command that must succeed."""
    assert result.returncode == 0, _describe(result.args[len(CRYOMAE) :], result)
    return result


def start_session(live: Live) -> subprocess.CompletedProcess[str]:
    """`cryomae session start` of the test session's folder (it must succeed)."""
    return ok(
        cli(live, "session", "start", "--project", PROJECT, "--session", SESSION, "--folder", str(live.session_folder))
    )


def add_exemplars(live: Live, exemplars: Path) -> subprocess.CompletedProcess[str]:
    """`cryomae exemplars add` of the dataset's first micrograph with these exemplars (it must succeed)."""
    args = ["--project", PROJECT, "--micrograph", str(live.dataset.micrographs[0]), "--coords", str(exemplars)]
    return ok(cli(live, "exemplars", "add", *args))


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


@dataclass
class Service:
    """A long-running ``cryomae`` process (``run`` or ``service NAME``) with its log (stderr) in a file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def log_lines(self) -> list[dict[str, Any]]:
        """The process's JSON log lines (other lines skipped)."""
        rows = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sigterm(self) -> int:
        """SIGTERM, then the exit code (the test fails if it does not exit in time)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {STOP_TIMEOUT} s of SIGTERM\n{self.tail()}")

    def kill9(self) -> int:
        self.proc.kill()
        return self.proc.wait(STOP_TIMEOUT)


@contextmanager
def service(live: Live, *args: str, log_name: str) -> Iterator[Service]:
    """Start ``cryomae ARGS`` in the background; it is always stopped (SIGTERM, then SIGKILL) afterwards."""
    log = live.root / "logs" / f"{log_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*CRYOMAE, *args], env=live.env(), cwd=live.root, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    svc = Service(log_name, proc, log)
    try:
        yield svc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def alive_while(services: Sequence[Service], condition: Any) -> Any:
    """A wait condition that fails at once, with the logs, when a service process has exited."""

    def check() -> bool:
        for svc in services:
            if not svc.alive():
                pytest.fail(f"{svc.name} exited with {svc.proc.returncode}\n{svc.tail()}")
        return bool(condition())

    return check


def tiny_project_args() -> list[str]:
    """``cryomae project create`` options giving the tiny training of the fixtures."""
    args = ["--diameter", str(DIAMETER), "--preset", str(TINY_TRAINING["preset"])]
    for key, value in TINY_TRAINING.items():
        if key != "preset":
            args += ["--set", f"{key}={value}"]
    return args


def drop_into(live: Live, folder: Path, index: int) -> Path:
    """Copy micrograph ``index`` into ``folder`` the way a detector does: written under another name, renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    source = live.dataset.micrographs[index]
    tmp = folder / f".{source.name}.part"
    shutil.copyfile(source, tmp)
    target = folder / source.name
    os.replace(tmp, target)
    return target


def outputs(live: Live, session: str = SESSION) -> SessionOutputs:
    return SessionOutputs(live.root / "outputs" / PROJECT / session, read_only=True)


def picked(live: Live, session: str = SESSION) -> int:
    return outputs(live, session).counts().micrographs


def particles(live: Live, session: str = SESSION) -> Any:
    """The session's particles.star as a table (pandas DataFrame)."""
    table = starfile.read(live.root / "outputs" / PROJECT / session / "particles.star")
    return table if not isinstance(table, dict) else next(iter(table.values()))


def particle_rows(live: Live, session: str = SESSION) -> list[tuple[str, float, float]]:
    table = particles(live, session)
    return [
        (str(m), float(x), float(y))
        for m, x, y in zip(table["rlnMicrographName"], table["rlnCoordinateX"], table["rlnCoordinateY"], strict=True)
    ]


def consistent(live: Live, session: str = SESSION) -> bool:
    """particles.star holds exactly the rows the state says: no duplicates, each micrograph's count."""
    entries = outputs(live, session).micrographs()
    rows = particle_rows(live, session)
    per_micrograph = collections.Counter(m for m, _, _ in rows)
    return (
        len(set(rows)) == len(rows)
        and sum(e.particles for e in entries) == len(rows)
        and all(per_micrograph[e.micrograph] == e.particles for e in entries)
        and set(per_micrograph) <= {e.micrograph for e in entries}
    )


def watched(live: Live) -> set[str]:
    """The sessions the watcher's ledger says it watches."""
    sessions, _ = read_ledger(live.root / "state" / ops.WATCHER_STATE)
    return {s.session for s in sessions}


def snapshot_written(live: Live) -> float:
    """When `cryomae run` last wrote its queue snapshot (0 when there is none)."""
    snap = SpoolControl(live.root / "state").snapshot()
    return 0.0 if snap is None else float(snap["written"])


def seen(live: Live, session: str = SESSION) -> int:
    _, summaries = read_ledger(live.root / "state" / ops.WATCHER_STATE)
    summary = summaries.get((PROJECT, session))
    return 0 if summary is None else summary.published


def session_row(report: dict[str, Any], session: str) -> dict[str, Any]:
    rows = [s for s in report["sessions"] if s["project"] == PROJECT and s["session"] == session]
    assert len(rows) == 1, report["sessions"]
    return rows[0]


def project_row(report: dict[str, Any]) -> dict[str, Any]:
    rows = [p for p in report["projects"] if p["project"] == PROJECT]
    assert len(rows) == 1, report["projects"]
    return rows[0]


def resolved(path: Path) -> str:
    return str(path.resolve())


# ------------------------------------------------------------------------------------------------ one process


def test_session_operated_from_the_cli_in_one_process_mode(mem: Live, tmp_path: Path) -> None:
    live = mem
    other_folder = live.data / OTHER
    live.session_folder.mkdir(parents=True)
    other_folder.mkdir(parents=True)
    exemplars = live.dataset.exemplars(tmp_path / "exemplars.star")
    with service(live, "run", log_name="run") as run:
        # the project is created while `cryomae run` is still starting (it needs only the store)
        created = ok(cli(live, "project", "create", PROJECT, *tiny_project_args()))
        assert f"project {PROJECT}" in created.stdout
        assert ProjectStore(live.root / "store").get_project(PROJECT).diameter == DIAMETER
        started = start_session(live)
        assert f"watching {resolved(live.session_folder)} as {PROJECT}/{SESSION}" in started.stdout
        # the second session through the same inbox, without paying for another process
        ops.session_start(
            live.settings(), SpoolControl(live.root / "state"), PROJECT, OTHER, other_folder, "*.mrc", True
        )
        wait_until(alive_while([run], lambda: watched(live) == {SESSION, OTHER}), what="both sessions watched")

        dropped = [live.drop(i) for i in range(6)]
        wait_until(alive_while([run], lambda: seen(live) == 6), what="6 micrographs seen")
        added = add_exemplars(live, exemplars)
        assert "15 exemplars" in added.stdout and "training requested" in added.stdout
        # the writer records a micrograph's state before its STAR rows (crash safety): wait for both
        wait_until(
            alive_while([run], lambda: picked(live) == 6 and consistent(live)), what="6 micrographs picked and written"
        )
        assert {e.micrograph for e in outputs(live).micrographs()} == {resolved(p) for p in dropped}
        rows_before = particle_rows(live)
        assert len(rows_before) > 0

        # status reads the depths `cryomae run` writes every second: wait for one written after all was done
        done_at = time.time()
        wait_until(alive_while([run], lambda: snapshot_written(live) > done_at), what="a later queue snapshot")
        report = ok_json(cli(live, "status", "--json"))
        assert report["running"] is True and report["mode"] == "one process (in-memory broker)"
        queues = report["queues"]
        assert isinstance(queues, dict) and {"micrographs", "picks", "training", "watcher"} <= set(queues)
        assert {"micrographs.dlq", f"waiting.{PROJECT}"} <= set(queues)
        assert all(depth == 0 for depth in queues.values()), queues  # everything was done before the command ran
        row = session_row(report, SESSION)
        assert row["watched"] is True and row["folder"] == resolved(live.session_folder)
        assert (row["seen"], row["picked"], row["failed"], row["particles"]) == (6, 6, 0, len(rows_before))
        other = session_row(report, OTHER)
        assert other["watched"] is True and other["picked"] == 0
        project = project_row(report)
        assert project["current_version"] is not None and project["versions"] == [project["current_version"]]
        assert project["training"]["state"] == "done" and project["waiting"] == 0

        # re-threshold above every micrograph's own cutoff and halfway up the scores: fewer particles, exactly
        # those scoring above it. The cut lies between two written scores that are both clear of the cutoffs and
        # of each other by more than the STAR file's rounding (6 decimals), so rounding cannot matter: a pick
        # scoring exactly a micrograph's cutoff is written rounded up to just above it.
        foms = np.unique(particles(live)["rlnAutopickFigureOfMerit"].to_numpy(dtype=float))
        floor = max(max(e.picker_threshold for e in outputs(live).micrographs()), float(np.median(foms)))
        above = foms[foms > floor + 1e-5]
        gaps = np.flatnonzero(np.diff(above) > 1e-5)
        high = float((above[gaps[0]] + above[gaps[0] + 1]) / 2) if len(gaps) else floor + 1.0
        expected = int(np.count_nonzero(particles(live)["rlnAutopickFigureOfMerit"].to_numpy(dtype=float) > high))
        assert expected < len(rows_before)
        ok(cli(live, "session", "rethreshold", "--project", PROJECT, "--session", SESSION, "--threshold", repr(high)))
        wait_until(
            alive_while([run], lambda: len(particle_rows(live)) == expected and outputs(live).threshold == high),
            what=f"{expected} particles above {high}",
        )
        assert consistent(live)
        assert set(particle_rows(live)) < set(rows_before)
        # `cryomae status` shows the session's cutoff now in force (the JSON in full, the table as %g)
        assert session_row(ok_json(cli(live, "status", "--json")), SESSION)["threshold"] == high
        shown = [line.split() for line in ok(cli(live, "status")).stdout.splitlines()]
        assert [f"{PROJECT}/{SESSION}", f"{high:g}"] in [[row[0], row[-1]] for row in shown if row], shown
        assert all(fom > high - 1e-5 for fom in particles(live)["rlnAutopickFigureOfMerit"])
        ok(cli(live, "session", "rethreshold", "--project", PROJECT, "--session", SESSION, "--clear"))
        wait_until(
            alive_while(
                [run], lambda: outputs(live).threshold is None and len(particle_rows(live)) == len(rows_before)
            ),
            what="the picker cutoffs back",
        )
        assert sorted(particle_rows(live)) == sorted(rows_before) and consistent(live)

        # re-pick everything with the current model (new picks replace the old rows, never add to them) and, at
        # the same time, stop watching the session (the two do not depend on each other)
        before = {e.micrograph: e.message_id for e in outputs(live).micrographs()}
        repicked, stopped = cli_many(
            live,
            ["session", "repick", "--project", PROJECT, "--session", SESSION, "--all", "--json"],
            ["session", "stop", "--project", PROJECT, "--session", SESSION],
        )
        repick = ok_json(repicked)
        assert f"stop watching {PROJECT}/{SESSION}" in ok(stopped).stdout
        assert (repick["micrographs"], repick["missing"]) == (6, [])
        assert repick["model_version"] == project["current_version"]
        wait_until(
            alive_while([run], lambda: all(e.message_id != before[e.micrograph] for e in outputs(live).micrographs())),
            what="every micrograph re-picked",
        )
        wait_until(alive_while([run], lambda: consistent(live)), what="particles.star in line with the state")
        entries = outputs(live).micrographs()
        assert sorted(e.micrograph for e in entries) == sorted(before)
        assert outputs(live).counts().particles == len(particle_rows(live)) == sum(e.particles for e in entries)

        # the stopped session: a file dropped there afterwards is not picked, while one dropped at the same time
        # into the still-watched session is (the positive signal that the watcher had its chance)
        wait_until(alive_while([run], lambda: watched(live) == {OTHER}), what=f"{SESSION} no longer watched")
        ignored = live.drop(6)
        taken = drop_into(live, other_folder, 7)
        wait_until(alive_while([run], lambda: picked(live, OTHER) == 1), what="the file in the watched session")
        assert [e.micrograph for e in outputs(live, OTHER).micrographs()] == [resolved(taken)]
        assert resolved(ignored) not in {e.micrograph for e in outputs(live).micrographs()}
        assert picked(live) == 6 and seen(live) == 6
        # the status for people: the stopped session with its counts, the other one still watched (status reads
        # the depths `cryomae run` writes every second: wait for one written after all was done, as above)
        done_at = time.time()
        wait_until(alive_while([run], lambda: snapshot_written(live) > done_at), what="a later queue snapshot")
        text = ok(cli(live, "status")).stdout
        assert "one process (in-memory broker)" in text and "queues: all empty" in text
        assert f"{PROJECT}: model {project['current_version']} (1 version), training done" in text
        table = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith(f"{PROJECT}/")}
        # the cutoff column: both sessions back at each micrograph's automatic cutoff (after --clear)
        n, n_other = (str(outputs(live, name).counts().particles) for name in (SESSION, OTHER))
        assert table[f"{PROJECT}/{SESSION}"] == ["no", "6", "6", "0", n, "automatic"]
        assert table[f"{PROJECT}/{OTHER}"] == ["yes", "1", "1", "0", n_other, "automatic"]
        assert resolved(ignored) not in {e.micrograph for e in outputs(live).micrographs()}

        assert run.sigterm() == 0, run.tail()
    assert not list((live.root / "state" / INBOX).glob("*.json"))  # every request was carried out


def test_one_process_mode_recovers_parked_micrographs_after_kill_9(mem: Live, tmp_path: Path) -> None:
    live = mem
    live.create_project()
    live.session_folder.mkdir(parents=True)
    spool = SpoolControl(live.root / "state")
    # written before any process runs: the request waits in the inbox for `cryomae run`
    ops.session_start(live.settings(), spool, PROJECT, SESSION, live.session_folder, "*.mrc", True)
    dropped: list[Path] = []
    with service(live, "run", log_name="run-1") as first:
        wait_until(alive_while([first], lambda: watched(live) == {SESSION}), what="session watched")
        dropped = [live.drop(i) for i in range(5)]
        # no model yet: all five are parked in the in-memory waiting queue, which dies with the process
        wait_until(
            alive_while([first], lambda: seen(live) == 5 and (spool.depths() or {}).get(f"waiting.{PROJECT}") == 5),
            what="5 micrographs parked",
        )
        assert first.kill9() == -signal.SIGKILL
    assert picked(live) == 0

    exemplars = live.dataset.exemplars(tmp_path / "exemplars.star")
    with service(live, "run", log_name="run-2") as second:
        # the exemplars are registered while the new process starts (their training request waits in the inbox)
        add_exemplars(live, exemplars)
        wait_until(alive_while([second], lambda: picked(live) == 5), what="the 5 micrographs picked after restart")
        wait_until(alive_while([second], lambda: consistent(live)), what="consistent outputs")
        assert second.sigterm() == 0, second.tail()

    assert {e.micrograph for e in outputs(live).micrographs()} == {resolved(p) for p in dropped}
    # the parked micrographs were in the in-memory queues' journal, not lost with the killed process
    restored = [r for r in second.log_lines() if r.get("event") == "journal_restored"]
    assert [r["messages"].get(f"waiting.{PROJECT}") for r in restored] == [5], second.tail()
    # picked exactly once each: one successful pick per micrograph across both processes
    picks = collections.Counter(
        r["micrograph"]
        for svc in (first, second)
        for r in svc.log_lines()
        if r.get("event") == "message"
        and r.get("queue") == "micrographs"
        and r.get("outcome") == "ok"
        and r.get("model_version") is not None
    )
    assert picks == {resolved(p): 1 for p in dropped}, picks
    assert seen(live) == 5  # the watcher did not publish them again


def test_dead_letters_listed_and_purged_from_the_cli(mem: Live, tmp_path: Path) -> None:
    live = mem
    live.extra_env["CRYOMAE_WATCH__GIVE_UP_SECONDS"] = "1"
    live.create_project()
    live.session_folder.mkdir(parents=True)
    spool = SpoolControl(live.root / "state")
    settings = live.settings()
    ops.session_start(settings, spool, PROJECT, SESSION, live.session_folder, "*.mrc", True)
    ops.exemplars_add(
        settings, spool, PROJECT, live.dataset.micrographs[0], live.dataset.exemplars(tmp_path / "exemplars.star"), None
    )
    store = ProjectStore(live.root / "store")
    with service(live, "run", log_name="run") as run:
        wait_until(alive_while([run], lambda: store.current_version(PROJECT) is not None), what="a model")
        wait_until(alive_while([run], lambda: watched(live) == {SESSION}), what="session watched")
        bad = live.session_folder / "not_an_image.mrc"
        tmp = live.session_folder / ".not_an_image.part"
        tmp.write_text("this is a log file, not an MRC micrograph\n" * 20)
        os.replace(tmp, bad)
        good = live.drop(1)
        wait_until(alive_while([run], lambda: picked(live) == 1), what="the good micrograph picked")
        wait_until(
            alive_while([run], lambda: len(spool.dead_letters("micrographs") or []) == 1),
            what="the bad file dead-lettered",
        )

        listing, refused, report = cli_many(live, ["dlq", "list", "--json"], ["dlq", "purge"], ["status", "--json"])
        letters = ok_json(listing)
        assert (letters["queue"], letters["running"], letters["depth"]) == ("micrographs.dlq", True, 1)
        (letter,) = letters["messages"]
        assert letter["path"] == resolved(bad) and letter["kind"] == "micrograph_ready"
        assert letter["reason"] and bad.name in letter["reason"], letter
        assert refused.returncode == 2 and "--yes" in refused.stderr, _describe(["dlq", "purge"], refused)
        assert not list((live.root / "state" / INBOX).glob("*.json"))  # the refused purge asked for nothing
        assert len(spool.dead_letters("micrographs") or []) == 1
        row = session_row(ok_json(report), SESSION)
        assert (row["seen"], row["picked"], row["failed"]) == (2, 1, 1)
        assert [e.micrograph for e in outputs(live).micrographs()] == [resolved(good)]

        purged = ok(cli(live, "dlq", "purge", "--yes"))
        assert "purge requested" in purged.stdout
        wait_until(alive_while([run], lambda: spool.dead_letters("micrographs") == []), what="dead letters purged")
        after = ok_json(cli(live, "dlq", "list", "--json"))
        assert (after["depth"], after["messages"]) == (0, [])
        assert run.sigterm() == 0, run.tail()

    # a purge lasts: the next start neither restores nor re-sends the purged file
    with service(live, "run", log_name="run-2") as again:
        later = live.drop(2)
        wait_until(alive_while([again], lambda: picked(live) == 2), what="a file dropped after the restart picked")
        wait_until(alive_while([again], lambda: spool.dead_letters("micrographs") == []), what="a fresh snapshot")
        handled = [r.get("micrograph") for r in again.log_lines() if r.get("event") == "message"]
        assert resolved(bad) not in handled and resolved(later) in handled, again.tail()
        assert again.sigterm() == 0, again.tail()


# ------------------------------------------------------------------------------------------------ failures


def test_exit_codes_and_messages(mem: Live, tmp_path: Path) -> None:
    live = mem
    live.create_project()
    outside = tmp_path / "outside.star"
    inside = live.dataset.exemplars(tmp_path / "inside.star")
    write_coordinates(outside, Coordinates(np.array([[40.0, 40.0], [1000.0, 1000.0]])))  # the image is 256x256
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "cryomae_broker_password").write_text("hunter2-from-file")
    mic = str(live.dataset.micrographs[0])
    results = cli_many(
        live,
        ["exemplars", "add", "--project", PROJECT, "--micrograph", mic, "--coords", str(outside)],
        ["exemplars", "add", "--project", "missing", "--micrograph", mic, "--coords", str(inside)],
        ["service", "picker"],
        ["status", "--broker", "amqp://guest:guest@127.0.0.1:1/"],
        (["config", "show"], {"CRYOMAE_PICK__STRIDE_FRACTION": "5"}),
        # a password in the secrets folder and another in the URL: neither is shown
        (
            ["config", "show", "--broker", "amqp://cryo:pw-in-url@mq.example:5672/"],
            {"CRYOMAE_SECRETS_DIR": str(secrets)},
        ),
        ["session", "rethreshold", "--project", PROJECT, "--session", SESSION, "--threshold", "high"],
        ["preview", mic, "--picks", str(tmp_path / "nope.star"), "--out", str(tmp_path / "p.png")],
        ["--help"],
    )
    outside_coords, missing, service_alone, unreachable, invalid, shown, threshold, no_picks, usage = results

    assert outside_coords.returncode == 1, _describe(["exemplars", "add"], outside_coords)
    assert "outside.star" in outside_coords.stderr and outside_coords.stderr.startswith("error:")
    assert not (live.root / "state" / INBOX).is_dir() or not list((live.root / "state" / INBOX).glob("*.json"))
    assert missing.returncode == 1 and "'missing'" in missing.stderr, _describe(["exemplars", "add"], missing)

    assert service_alone.returncode == 2 and "needs RabbitMQ" in service_alone.stderr, service_alone.stderr
    assert unreachable.returncode == 3, _describe(["status"], unreachable)
    assert "127.0.0.1:1" in unreachable.stderr and "guest:guest" not in unreachable.stderr
    assert invalid.returncode == 2 and "stride_fraction" in invalid.stderr, invalid.stderr

    # a bad value names the valid choices; a missing file is named as missing; help text without markup
    assert threshold.returncode == 2 and "expected a score" in threshold.stderr and "auto" in threshold.stderr, (
        threshold.stderr
    )
    assert "could not convert" not in threshold.stderr
    assert no_picks.returncode == 1 and "nope.star: pick file not found" in no_picks.stderr, no_picks.stderr
    assert "--diameter" not in no_picks.stderr
    assert ok(usage).stdout.startswith("usage: cryomae") and "``" not in usage.stdout

    config = ok_json(shown)
    assert config["broker_password"] == "********"  # read from the secrets folder, then hidden
    assert config["broker"]["url"] == "amqp://cryo:********@mq.example:5672/"
    assert config["store"] == str(live.root / "store")  # the environment's settings are the ones shown
    assert "hunter2-from-file" not in shown.stdout + shown.stderr and "pw-in-url" not in shown.stdout + shown.stderr


# ------------------------------------------------------------------------------------------------ RabbitMQ


@pytest.mark.rabbitmq
def test_services_as_processes_over_rabbitmq(rabbit: Live, tmp_path: Path) -> None:
    live = rabbit
    live.session_folder.mkdir(parents=True)
    exemplars = live.dataset.exemplars(tmp_path / "exemplars.star")
    names = ("writer", "picker", "trainer", "watcher")
    with ExitStack() as stack:
        services = [stack.enter_context(service(live, "service", name, log_name=name)) for name in names]
        live.create_project()  # `cryomae project create` is exercised in the one-process test
        # published straight to RabbitMQ (the queue is declared if the watcher has not done it yet)
        start_session(live)
        wait_until(alive_while(services, lambda: watched(live) == {SESSION}), what="session watched")
        dropped = [live.drop(i) for i in range(4)]
        wait_until(alive_while(services, lambda: seen(live) == 4), what="4 micrographs seen")
        added = add_exemplars(live, exemplars)
        assert "training requested (sent)" in added.stdout
        wait_until(alive_while(services, lambda: picked(live) == 4), what="4 micrographs picked")
        wait_until(alive_while(services, lambda: consistent(live)), what="consistent outputs")
        assert {e.micrograph for e in outputs(live).micrographs()} == {resolved(p) for p in dropped}

        report = ok_json(cli(live, "status", "--json"))
        assert report["mode"] == "rabbitmq" and report["running"] is True
        assert "guest:guest" not in json.dumps(report)
        queues = report["queues"]
        assert isinstance(queues, dict) and {"micrographs", "picks", "training", "watcher"} <= set(queues)
        assert all(isinstance(depth, int) for depth in queues.values())
        assert queues["micrographs.dlq"] == 0 and queues[f"waiting.{PROJECT}"] == 0
        row = session_row(report, SESSION)
        assert (row["watched"], row["seen"], row["picked"], row["failed"]) == (True, 4, 4, 0)
        assert row["particles"] == len(particle_rows(live)) > 0
        project = project_row(report)
        assert project["training"]["state"] == "done" and project["current_version"] is not None

        codes = {svc.name: svc.sigterm() for svc in reversed(services)}  # watcher first, as App.stop does
        assert codes == dict.fromkeys(names, 0), "\n".join(svc.tail(1500) for svc in services)
