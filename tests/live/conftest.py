"""Fixtures for the live-service tests: settings in a temporary folder, synthetic micrographs with known
centres, a tiny training configuration, and RabbitMQ namespaces that are deleted afterwards.

Tests marked ``rabbitmq`` talk to the real server (``CRYOMAE_TEST_AMQP_URL``, default the local one); they are
never skipped. Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pytest
import starfile

from cryomae.io import Coordinates, write_coordinates, write_mrc
from cryomae.messages import MicrographReady
from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.operator.control import BrokerControl, Control, SpoolControl
from cryomae.service.app import App
from cryomae.settings import Settings
from cryomae.store.outputs import SessionOutputs
from cryomae.store.projects import ProjectStore
from cryomae.synthetic import make_micrograph
from tests.messaging.conftest import AMQP_URL, delete_namespace

PROJECT = "proj"
SESSION = "sess"
DIAMETER = 24.0
# training small enough for a test (about a second on two CPU cores); picking quality is not judged here
TINY_TRAINING = {
    "preset": "test",
    "box_factor": 1.5,
    "pretrain_regions": 128,
    "pretrain_epochs": 1,
    "epochs": 2,
    "n_unlabeled": 64,
}
WAIT = 120.0  # seconds a whole pipeline may take before a test fails
RABBIT = [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]  # parametrize ``transport`` with RabbitMQ only
PIPELINE = ["writer", "trainer", "picker"]  # no watcher: tests that send the micrograph messages themselves
CLI_TIMEOUT = 120.0  # seconds one CLI command may take (the machine may be busy; train and pick load torch)
_SCRIPT = Path(sys.executable).with_name("cryomae")
CRYOMAE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "cryomae.operator.cli"]
MICS_DLQ = topology.dead_letters(topology.MICROGRAPHS)
PICKS_DLQ = topology.dead_letters(topology.PICKS)


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Dataset:
    """Synthetic micrographs (MRC) with their true centres (STAR), written once per test session."""

    folder: Path
    micrographs: list[Path]
    truth: list[Path]

    def exemplars(self, out: Path, n: int = 15) -> Path:
        """A coordinate file with the first ``n`` true centres of the first micrograph."""
        table = starfile.read(self.truth[0])
        write_coordinates(out, Coordinates(table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()[:n]))
        return out


def make_dataset(folder: Path, count: int) -> Dataset:
    """``count`` synthetic 256 x 256 micrographs (MRC) with their ground truth (STAR) in ``folder``."""
    mics, truth = [], []
    for i in range(count):
        m = make_micrograph(shape=(256, 256), diameter=DIAMETER, n_particles=20, seed=100 + i)
        mics.append(folder / f"mic_{i:03d}.mrc")
        truth.append(folder / f"mic_{i:03d}.star")
        write_mrc(mics[-1], m.image, pixel_size=2.0)
        write_coordinates(truth[-1], Coordinates(m.centres))
    return Dataset(folder, mics, truth)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return make_dataset(tmp_path_factory.mktemp("live-data"), 24)


@dataclass
class Live:
    """One test's installation: folders, settings and helpers; ``namespace`` isolates its RabbitMQ queues."""

    root: Path
    transport: str
    namespace: str
    dataset: Dataset
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def session_folder(self) -> Path:
        return self.data / SESSION

    @property
    def broker_url(self) -> str:
        return "memory://" if self.transport == "memory" else AMQP_URL

    def settings(self, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "broker": {"url": self.broker_url, "namespace": self.namespace, "heartbeat": 10},
            "store": self.root / "store",
            "outputs": self.root / "outputs",
            "state": self.root / "state",
            "data_roots": [self.data, self.dataset.folder],
            "watch": {"settle_seconds": 0.3, "check_interval": 0.1, "poll_interval": 0.5},
            "device": "cpu",
            "model_check_seconds": 1.0,
            "broker_wait_seconds": 30.0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def env(self) -> dict[str, str]:
        """Environment for a ``cryomae`` subprocess with the same settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOMAE_")}
        env.update(
            {
                "CRYOMAE_BROKER__URL": self.broker_url,
                "CRYOMAE_BROKER__NAMESPACE": self.namespace,
                "CRYOMAE_BROKER__HEARTBEAT": "10",
                "CRYOMAE_STORE": str(self.root / "store"),
                "CRYOMAE_OUTPUTS": str(self.root / "outputs"),
                "CRYOMAE_STATE": str(self.root / "state"),
                "CRYOMAE_DATA_ROOTS": f'["{self.data}", "{self.dataset.folder}"]',
                "CRYOMAE_WATCH__SETTLE_SECONDS": "0.3",
                "CRYOMAE_WATCH__CHECK_INTERVAL": "0.1",
                "CRYOMAE_DEVICE": "cpu",
                "CRYOMAE_MODEL_CHECK_SECONDS": "1",
                "CRYOMAE_SECRETS_DIR": str(self.root / "no-secrets"),
                "CRYOMAE_LOG_JSON": "true",
                "CRYOMAE_METRICS_PORT": "0",
                **self.extra_env,
            }
        )
        return env

    def create_project(self) -> None:
        ProjectStore(self.root / "store").create_project(PROJECT, DIAMETER, TINY_TRAINING)

    def drop(self, index: int) -> Path:
        """Copy micrograph ``index`` into the session folder the way a detector does: written, then renamed."""
        self.session_folder.mkdir(parents=True, exist_ok=True)
        source = self.dataset.micrographs[index]
        tmp = self.session_folder / f".{source.name}.part"
        shutil.copyfile(source, tmp)
        target = self.session_folder / source.name
        os.replace(tmp, target)
        return target

    def outputs(self) -> SessionOutputs:
        return SessionOutputs(self.root / "outputs" / PROJECT / SESSION, read_only=True)

    def picked(self) -> int:
        return self.outputs().counts().micrographs


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def live(tmp_path: Path, transport: str, dataset: Dataset) -> Iterator[Live]:
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield Live(tmp_path, transport, namespace, dataset)
    if transport == "rabbitmq":
        delete_namespace(namespace, (PROJECT,))


def control_for(live: Live, broker: object | None = None) -> Control:
    """How an operator reaches this installation: the given broker (same process), or RabbitMQ, or the inbox."""
    from cryomae.messaging import Broker, open_broker

    store = ProjectStore(live.root / "store")
    if isinstance(broker, Broker):
        return BrokerControl(broker, store)
    if live.transport == "memory":
        return SpoolControl(live.root / "state")
    return BrokerControl(open_broker(live.broker_url, live.namespace), store)


@contextmanager
def running(live: Live, settings: Settings, services: list[str] | None = None) -> Iterator[tuple[App, Control]]:
    """The installation's services started in this process (all, or ``services``) with the operator's way in;
    stopped on the way out, whatever happened."""
    app = App(settings) if services is None else App(settings, services)
    app.start()
    try:
        yield app, control_for(live, app.broker)
    finally:
        app.stop()


def start_session(live: Live, control: Control, session: str = SESSION) -> None:
    """Tell the writer of the test session, as the watcher does when it starts watching one (``SessionStarted``):
    for tests that send picks or micrographs themselves, without a watcher."""
    from cryomae.messages import SessionStarted

    live.session_folder.mkdir(parents=True, exist_ok=True)
    control.send(topology.PICKS, SessionStarted(project=PROJECT, session=session, folder=str(live.session_folder)))


def train_first_model(live: Live, control: Control) -> str:
    """Register exemplars and let the running trainer make the project's first model; its version."""
    settings = live.settings()
    store = ProjectStore(settings.store)
    exemplars = live.dataset.exemplars(live.root / "exemplars.star")
    ops.exemplars_add(settings, control, PROJECT, live.dataset.micrographs[0], exemplars, None)
    wait_until(lambda: store.current_version(PROJECT) is not None, what="the project's first model")
    version = store.current_version(PROJECT)
    assert version is not None
    return version


def ready(path: str | Path, **changes: object) -> MicrographReady:
    """A MicrographReady of the test project and session (size and mtime from the file when it exists)."""
    p = Path(path)
    stat = p.stat() if p.is_absolute() and p.exists() else None
    fields: dict[str, object] = {
        "project": PROJECT,
        "session": SESSION,
        "path": str(path),
        "size": stat.st_size if stat else 1,
        "mtime": stat.st_mtime if stat else time.time(),
        "complete_at": time.time(),
    }
    fields.update(changes)
    return MicrographReady(**fields)


def raw_micrograph_ready(path: str) -> bytes:
    """A MicrographReady body built by hand, so that no bound or check of this side stops it before the queue
    (``json`` escapes a NUL byte as \\u0000, as any producer would)."""
    now = time.time()
    fields = {
        "schema_version": 1,
        "id": uuid.uuid4().hex,
        "created": now,
        "kind": "micrograph_ready",
        "project": PROJECT,
        "session": SESSION,
        "path": path,
        "size": 1,
        "mtime": now,
        "complete_at": now,
    }
    return json.dumps(fields).encode()


def publish_raw(live: Live, queue: str, body: bytes) -> bytes:
    """Bytes straight to a RabbitMQ queue, persistent, as a foreign or hostile producer might send them."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "", f"{live.namespace}.{queue}", body, pika.BasicProperties(delivery_mode=2), mandatory=True
        )
    finally:
        connection.close()
    return body
