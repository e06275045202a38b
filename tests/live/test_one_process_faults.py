"""The one-process mode (``cryomae run`` over the in-memory broker) when it is interrupted or killed while it
trains: nothing it was asked to do is lost, an interrupt is prompt and quiet, and ``cryomae status`` tells a
training in progress from one whose trainer is gone.

Every ``cryomae`` here is a subprocess run as an operator runs it (helpers from ``test_cli_ops``).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from cryomae.service.heartbeats import trainer_liveness
from cryomae.store.projects import ProjectStore
from tests.live.conftest import DIAMETER, PROJECT, TINY_TRAINING, Live, wait_until
from tests.live.test_cli_ops import CRYOMAE, STOP_TIMEOUT, add_exemplars, alive_while, cli, mem, ok, ok_json, service
from tests.processes import ctrl_c_as_at_a_terminal

__all__ = ["mem"]  # the fixture, imported for pytest

# training long enough to be caught in the middle (minutes on two cores), with the tiny model
SLOW_TRAINING = {**TINY_TRAINING, "pretrain_epochs": 1000, "pretrain_regions": 256}


def _slow_project(live: Live) -> ProjectStore:
    store = ProjectStore(live.root / "store")
    store.create_project(PROJECT, DIAMETER, SLOW_TRAINING)
    return store


def _training_state(store: ProjectStore) -> str | None:
    status = store.training_status(PROJECT) or {}
    return status.get("state")


def _project_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(f"{PROJECT}:"))


def _interrupt(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C (SIGINT) a running command; it must exit 130 (``STOP_TIMEOUT`` is a deadline for a process that never
    stops, not a speed: how fast it stops is measured nowhere here). Its stderr."""
    if proc.poll() is not None:
        pytest.fail(f"the command had already exited with {proc.returncode}: {proc.communicate()[1]}")
    proc.send_signal(signal.SIGINT)
    try:
        _out, err = proc.communicate(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # every thread's stack to stderr (faulthandler): where it is stuck
        try:
            _out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            err = proc.communicate()[1]
        pytest.fail(f"no exit within {STOP_TIMEOUT} s of Ctrl-C; its threads:\n{err}")
    assert proc.returncode == 130, err
    return err


def test_training_survives_kill_9_and_ctrl_c_of_the_one_process_mode(mem: Live, tmp_path: Path) -> None:
    live = mem
    store = _slow_project(live)
    exemplars = live.dataset.exemplars(tmp_path / "exemplars.star")
    log_file = live.root / "logs" / "cryomae-run.log"

    # 1. kill -9 in the middle of a training
    with service(live, "run", log_name="run-1") as first:
        add_exemplars(live, exemplars)
        wait_until(alive_while([first], lambda: _training_state(store) == "training"), what="training started")
        wait_until(
            alive_while([first], lambda: any(t["alive"] for t in trainer_liveness(live.root / "store"))),
            what="the trainer's heartbeat",
        )
        status = ok(cli(live, "status")).stdout
        assert "trainer: running (" in status and "training" in _project_line(status), status
        assert first.kill9() == -signal.SIGKILL
    assert store.current_version(PROJECT) is None
    killed = (store.training_status(PROJECT) or {}).get("trainer")  # the killed process's trainer
    assert killed is not None

    # nothing runs: status says the training request waits and that no trainer runs (not "training" forever)
    text = ok(cli(live, "status")).stdout
    line = _project_line(text)
    assert "training request queued" in line and "trained again when a trainer runs" in line, text
    assert "trainer: not running" in text, text
    # and where it looked: the state folder of its settings, and how to reach the running process
    assert f"no `cryomae run` process uses the state folder {live.root / 'state'}" in text, text
    assert "run operator commands where `cryomae run` runs" in text, text
    data = ok_json(cli(live, "status", "--json"))
    assert data["running"] is False and not any(t["alive"] for t in data["trainers"])

    # 2. the restarted process trains it again (the request was journaled, not lost); Ctrl-C in the middle
    run = subprocess.Popen(
        [*CRYOMAE, "run", "--log-file", str(log_file)],
        env=live.env(),
        cwd=live.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: run.poll() is None and log_file.is_file() and '"journal_restored"' in log_file.read_text(),
            what="the journaled training request restored",
        )

        def training_again() -> bool:
            status = store.training_status(PROJECT) or {}
            return run.poll() is None and status.get("state") == "training" and status.get("trainer") != killed

        wait_until(training_again, what="training again in the new process")
    finally:
        err = _interrupt(run)
    # one line about the interrupt, the log in its file, no traceback, no abort of native threads
    assert "interrupted: stopping" in err and "Traceback" not in err and "terminate called" not in err, err
    assert len(err.strip().splitlines()) <= 3, err
    assert '"event": "services_stopped"' in log_file.read_text()
    assert "handler did not finish before stop" not in log_file.read_text()
    queued = store.training_status(PROJECT) or {}
    assert queued.get("state") == "queued" and "interrupted" in queued.get("interrupted", ""), queued
    assert "training queued (training interrupted at" in _project_line(ok(cli(live, "status")).stdout)

    # the operator makes the training quick (the trainer reads the project's settings when it starts one)
    project_file = live.root / "store" / "projects" / PROJECT / "project.json"
    record = json.loads(project_file.read_text())
    record["train_overrides"] = dict(TINY_TRAINING)
    project_file.write_text(json.dumps(record))

    # 3. a second `cryomae run` on the same state folder and metrics port is told the real reason first
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    live.extra_env["CRYOMAE_METRICS_PORT"] = str(port)
    with service(live, "run", log_name="run-3") as third:
        wait_until(
            alive_while([third], lambda: store.current_version(PROJECT) is not None),
            what="the model trained after two interruptions",
            timeout=300.0,
        )
        second = cli(live, "run")
        assert second.returncode == 2, second.stderr
        assert "in use by another" in second.stderr and "metrics" not in second.stderr, second.stderr
        wait_until(alive_while([third], lambda: _training_state(store) == "done"), what="training done")
        assert "training done" in _project_line(ok(cli(live, "status")).stdout)
        assert third.sigterm() == 0, third.tail()
    done = store.training_status(PROJECT) or {}
    assert done.get("state") == "done" and done.get("version") == store.current_version(PROJECT)


@pytest.mark.parametrize("command", [["demo", "--source", "synthetic", "--count", "4", "--interval", "0.2"]])
def test_ctrl_c_of_a_foreground_command_exits_130_with_one_line(mem: Live, command: list[str]) -> None:
    live = mem
    out = live.root / "demo"
    proc = subprocess.Popen(
        [*CRYOMAE, *command, "--out", str(out), "--preset", "test", "--set", "pretrain_epochs=200"],
        env=live.env(),
        cwd=live.root,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )
    try:
        # interrupted while the model trains
        status = out / "store" / "projects" / "demo" / "training.json"

        def training() -> bool:
            try:
                return proc.poll() is None and json.loads(status.read_text()).get("state") == "training"
            except (OSError, ValueError):  # not written yet, or being replaced
                return False

        wait_until(training, what="the demo training")
    finally:
        err = _interrupt(proc)
    assert "Traceback" not in err and "terminate called" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted", err
