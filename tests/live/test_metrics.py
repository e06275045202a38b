"""The metrics and health endpoint of a running process (``serve``): probes, readiness and the metrics a
session produces, checked with Prometheus's own ``promtool``."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any

import pytest

from cryomae.operator import actions as ops
from cryomae.service.app import App, serve
from cryomae.service.metrics import HealthServer
from tests.live.conftest import PROJECT, SESSION, Live, control_for, wait_until


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _samples(text: str) -> dict[str, float]:
    """Metric samples by 'name{labels}' from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.fixture
def served(live: Live) -> Any:
    live.create_project()
    app = App(live.settings(metrics_port=0))
    stop = threading.Event()
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(serve(app, stop, check_every_s=0.2)))
    thread.start()
    wait_until(lambda: app.health is not None, 30, "the HTTP endpoint")
    yield app
    stop.set()
    thread.join(60)
    assert codes == [0]  # a requested stop is a clean exit


def test_probes_and_metrics_of_a_live_session(live: Live, served: App) -> None:
    app = served
    assert app.health is not None
    port = app.health.port
    wait_until(lambda: _get(port, "/readyz")[0] == 200, 30, "readiness")
    code, body = _get(port, "/healthz")
    assert code == 200 and json.loads(body)["alive"] is True
    ready = json.loads(_get(port, "/readyz")[1])
    assert set(ready["services"]) == {"writer", "trainer", "picker", "watcher"}
    assert ready["services"]["picker"]["models_loaded"] is True  # no project has a model yet: nothing to load
    assert _get(port, "/nope")[0] == 404

    settings = app.settings
    control = control_for(live, app.broker)
    live.session_folder.mkdir(parents=True)
    ops.session_start(settings, control, PROJECT, SESSION, live.session_folder, "*.mrc", True)
    ops.exemplars_add(
        settings, control, PROJECT, live.dataset.micrographs[0], live.dataset.exemplars(live.root / "ex.star"), None
    )
    for i in range(3):
        live.drop(i)
    wait_until(lambda: live.picked() == 3, what="3 micrographs picked")
    # the writer counts a micrograph just after writing its rows
    latency_count = "cryomae_end_to_end_latency_seconds_count"
    wait_until(lambda: _samples(_get(port, "/metrics")[1].decode()).get(latency_count, 0) >= 3, 30, "the metrics")

    text = _get(port, "/metrics")[1].decode()
    samples = _samples(text)
    version = app.store.current_version(PROJECT)
    assert samples[f'cryomae_micrographs_seen_total{{project="{PROJECT}",session="{SESSION}"}}'] >= 3
    assert samples[f'cryomae_micrographs_picked_total{{project="{PROJECT}"}}'] >= 3
    assert samples[f'cryomae_model_version_info{{project="{PROJECT}",version="{version}"}}'] == 1.0
    assert samples[latency_count] >= 3
    assert samples[f'cryomae_particles_per_micrograph_count{{project="{PROJECT}"}}'] >= 3
    assert samples[f'cryomae_training_progress_ratio{{project="{PROJECT}"}}'] == 1.0
    assert samples['cryomae_trainings_total{outcome="done"}'] >= 1
    assert samples['cryomae_messages_handled_total{outcome="ok",queue="picks"}'] >= 3
    # Prometheus's own linter accepts the exposition (names, units, help texts)
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing (Debian's prometheus package; scripts/test.sh installs it)"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ({"picker": {"broker": True, "consumers": True, "models_loaded": True}}, 200),
        ({"picker": {"broker": True, "consumers": True, "models_loaded": False}}, 503),  # a model still loading
        ({"writer": {"broker": False, "consumer": True}}, 503),  # the broker connection is down
        ({}, 503),  # not started yet
    ],
)
def test_readiness_answers_from_every_check(state: dict[str, Any], code: int) -> None:
    server = HealthServer("127.0.0.1", 0, lambda: state)
    server.start()
    try:
        status, body = _get(server.port, "/readyz")
        assert status == code
        assert json.loads(body)["ready"] is (code == 200)
    finally:
        server.stop()


def test_readiness_check_that_raises_is_not_ready_and_liveness_goes_stale() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("store unreadable")

    server = HealthServer("127.0.0.1", 0, broken)
    server.start()
    try:
        status, body = _get(server.port, "/readyz")
        assert status == 503 and "store unreadable" in json.loads(body)["error"]
        code, body = _get(server.port, "/healthz")  # starting: alive, whatever the time since
        assert code == 200 and json.loads(body)["starting"] is True
        server.beat()  # the main loop turns
        assert _get(server.port, "/healthz")[0] == 200
        server.stale_after_s = 0.0  # the main loop has not checked in within the allowed time
        assert _get(server.port, "/healthz")[0] == 503
        server.stale_after_s = 60.0
        server.beat()
        assert _get(server.port, "/healthz")[0] == 200
    finally:
        server.stop()
