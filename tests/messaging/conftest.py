"""Fixtures for the broker tests: the same behavioural suite runs on both transports.

The RabbitMQ transport uses the real server (``CRYOMAE_TEST_AMQP_URL``, default the local one) with a unique
namespace per test, whose queues and exchange are deleted afterwards. If RabbitMQ is unreachable those tests
fail: they are never skipped.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

from cryomae.messages import MicrographReady
from cryomae.messaging import Broker, Envelope
from cryomae.messaging import topology as t
from cryomae.messaging.memory import MemoryBroker
from cryomae.messaging.rabbit import RabbitBroker

AMQP_URL = os.environ.get("CRYOMAE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
WAIT = 15.0  # seconds any awaited event may take before the test fails

BrokerFactory = Callable[..., Broker]


def wait_until(condition: Callable[[], bool], timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Recorder:
    """A handler that records every envelope it gets; ``wait(n)`` blocks until it has ``n``."""

    def __init__(self, action: Callable[[Envelope], None] | None = None) -> None:
        self.envelopes: list[Envelope] = []
        self.threads: list[str] = []
        self._action = action
        self._cond = threading.Condition()

    def __call__(self, envelope: Envelope) -> None:
        with self._cond:
            self.envelopes.append(envelope)
            self.threads.append(threading.current_thread().name)
            self._cond.notify_all()
        if self._action is not None:
            self._action(envelope)

    def wait(self, n: int, timeout: float = WAIT) -> list[Envelope]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.envelopes) >= n, timeout):
                pytest.fail(f"expected {n} deliveries within {timeout} s, got {len(self.envelopes)}")
            return list(self.envelopes)

    @property
    def counts(self) -> list[int]:
        with self._cond:
            return [e.delivery_count for e in self.envelopes]


def micrograph(i: int, project: str = "demo") -> MicrographReady:
    now = time.time()
    return MicrographReady(
        project=project,
        session="s1",
        path=f"/data/{project}/s1/mic_{i:04d}.mrc",
        size=4096 + i,
        mtime=now,
        complete_at=now,
    )


def delete_namespace(namespace: str, projects: tuple[str, ...] = ("demo",)) -> None:
    """Delete every queue and the exchange a test may have created in its namespace."""
    queues = [*t.WORK_QUEUES, t.MODELS, *(t.waiting(p) for p in projects)]
    names = {f"{namespace}.{q}" for name in queues for q in (name, t.dead_letters(name))}
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        for name in sorted(names):
            channel.queue_delete(name)
        channel.exchange_delete(f"{namespace}.{t.MODELS}")
    finally:
        connection.close()


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def broker_factory(transport: str) -> Iterator[BrokerFactory]:
    """Opens brokers of the test's transport sharing one fresh namespace (and topology); closes them after."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    opened: list[Broker] = []

    def factory(heartbeat: int = 30) -> Broker:
        broker: Broker
        broker = MemoryBroker(namespace) if transport == "memory" else RabbitBroker(AMQP_URL, namespace, heartbeat)
        opened.append(broker)
        broker.declare()
        return broker

    yield factory
    for broker in opened:
        broker.close()
    if transport == "rabbitmq":
        delete_namespace(namespace)


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Broker:
    return broker_factory()
