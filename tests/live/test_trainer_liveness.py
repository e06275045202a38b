"""The trainer's liveness over RabbitMQ: ``cryomae status`` tells a training in progress from one whose trainer
process is gone, shows its request as queued, and a trainer started later trains it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from cryomae.service.heartbeats import trainer_liveness
from cryomae.store.projects import ProjectStore
from tests.live.conftest import DIAMETER, PROJECT, TINY_TRAINING, Live, wait_until
from tests.live.test_cli_ops import add_exemplars, alive_while, cli, ok, ok_json, rabbit, service
from tests.live.test_one_process_faults import SLOW_TRAINING

__all__ = ["rabbit"]  # the fixture, imported for pytest


def _project_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.strip().startswith(f"{PROJECT}:"))


@pytest.mark.rabbitmq
def test_status_shows_a_dead_trainer_and_its_queued_request(rabbit: Live, tmp_path: Path) -> None:
    live = rabbit
    store = ProjectStore(live.root / "store")
    store.create_project(PROJECT, DIAMETER, SLOW_TRAINING)
    exemplars = live.dataset.exemplars(tmp_path / "exemplars.star")

    with service(live, "service", "trainer", log_name="trainer-1") as trainer:
        add_exemplars(live, exemplars)
        wait_until(
            alive_while([trainer], lambda: (store.training_status(PROJECT) or {}).get("state") == "training"),
            what="training started",
        )
        text = ok(cli(live, "status")).stdout
        assert "trainer: running (" in text, text
        line = _project_line(text)
        assert ", training" in line and "queued" not in line, text  # in progress: its trainer is alive
        assert trainer.kill9() == -signal.SIGKILL

    # the trainer is gone: status says so, and RabbitMQ holds its request again
    def request_back() -> bool:
        data = ok_json(cli(live, "status", "--json"))
        return bool(data["queues"] and data["queues"].get("training") == 1)

    wait_until(request_back, what="the training request back in its queue")
    text = ok(cli(live, "status")).stdout
    line = _project_line(text)
    assert "training request queued" in line and "stopped" in line and "1 request in the training queue" in line, text
    assert "trainer: not running" in text, text
    assert not any(t["alive"] for t in trainer_liveness(live.root / "store"))

    # the operator makes the training quick; a new trainer takes the request and trains it
    project_file = live.root / "store" / "projects" / PROJECT / "project.json"
    record = json.loads(project_file.read_text())
    record["train_overrides"] = dict(TINY_TRAINING)
    project_file.write_text(json.dumps(record))
    with service(live, "service", "trainer", log_name="trainer-2") as again:
        wait_until(alive_while([again], lambda: store.current_version(PROJECT) is not None), what="the model")
        wait_until(
            alive_while([again], lambda: "training done" in _project_line(ok(cli(live, "status")).stdout)),
            what="status: training done",
        )
        assert again.sigterm() == 0, again.tail()
    # a trainer that stops removes its heartbeat; the killed one's stays, silent, until a day has passed
    (left,) = trainer_liveness(live.root / "store")
    assert left["pid"] == trainer.proc.pid and not left["alive"]
