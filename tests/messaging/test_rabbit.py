"""RabbitMQ-only behaviour: the declared topology, heartbeats during long work, an unreachable server, and a
broker restart under a running consumer."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cryomae.errors import TransientError
from cryomae.messages import decode
from cryomae.messaging import Broker, Envelope
from cryomae.messaging import topology as t
from cryomae.messaging.delivery import DELIVERY_LIMIT
from cryomae.messaging.rabbit import RabbitBroker

from .conftest import WAIT, BrokerFactory, Recorder, micrograph, wait_until

pytestmark = pytest.mark.rabbitmq
RABBIT = [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.parametrize("transport", RABBIT)
def test_declare_is_idempotent_and_makes_quorum_queues(broker_factory: BrokerFactory) -> None:
    broker = broker_factory()  # declares once
    broker.declare()  # and again: same arguments, no error
    namespace = broker.namespace  # type: ignore[attr-defined]
    listed = json.loads(rabbitmqctl("list_queues", "-q", "name", "type", "durable", "arguments", "--formatter", "json"))
    queues = {q["name"][len(namespace) + 1 :]: q for q in listed if q["name"].startswith(f"{namespace}.")}
    expected = {*t.WORK_QUEUES, *map(t.dead_letters, t.WORK_QUEUES), t.dead_letters(t.MODELS)}
    assert set(queues) == expected
    assert all(q["type"] == "quorum" and q["durable"] for q in queues.values())
    for name in t.WORK_QUEUES:
        arguments = {key: value for key, _type, value in queues[name]["arguments"]}
        assert arguments["x-delivery-limit"] == DELIVERY_LIMIT - 1
        assert arguments["x-dead-letter-routing-key"] == f"{namespace}.{name}.dlq"
        assert arguments.get("x-single-active-consumer", False) == (name in t.SINGLE_ACTIVE)


@pytest.mark.parametrize("transport", RABBIT)
def test_peeks_from_two_processes_at_once_each_list_every_message(broker_factory: BrokerFactory) -> None:
    """``cryomae dlq list`` and ``cryomae status`` side by side each peek at the dead letters over a connection of
    their own: each must list all of them (a peek holds what it reads unacknowledged for a moment; before the peek
    lock, the other listing then missed those)."""
    first, second = broker_factory(), broker_factory()
    dlq = t.dead_letters(t.MICROGRAPHS)
    messages = [micrograph(i) for i in range(5)]
    for message in messages:
        first.publish(dlq, message)
    sent = sorted(m.id for m in messages)
    barrier = threading.Barrier(2)

    def listing(broker: Broker) -> list[list[str]]:
        seen = []
        for _ in range(20):
            barrier.wait(WAIT)  # both peek at the same moment, every round
            seen.append(sorted(decode(e.body).id for e in broker.peek(dlq, 100)))
        return seen

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(listing, (first, second)))
    assert all(ids == sent for seen in results for ids in seen), results
    assert first.depth(dlq) == 5


@pytest.mark.parametrize("transport", RABBIT)
def test_a_peek_hands_every_message_back_before_it_returns(broker_factory: BrokerFactory) -> None:
    """An operator's listing (``dlq list``, ``status``) peeks at a dead-letter queue; right after it the messages are
    ready again, so a depth or a second listing never misses them (a quorum queue requeues a moment after the nack:
    before, about one peek in five was followed by a depth of 0)."""
    broker = broker_factory()
    dlq = t.dead_letters(t.MICROGRAPHS)
    sent = [micrograph(i) for i in range(3)]
    for message in sent:
        broker.publish(dlq, message)
    for _ in range(100):
        assert [decode(e.body).id for e in broker.peek(dlq, 100)] == [m.id for m in sent]
        assert broker.depth(dlq) == 3
    assert broker.peek(t.dead_letters(t.PICKS), 100) == []  # an empty queue: nothing to hand back


@pytest.mark.parametrize("transport", RABBIT)
def test_long_handler_keeps_the_connection(broker_factory: BrokerFactory) -> None:
    """A handler busy for longer than two heartbeats: the connection thread keeps answering heartbeats."""
    broker = broker_factory(heartbeat=1)
    never = threading.Event()

    def long_work(envelope: Envelope) -> None:
        if decode(envelope.body).id == first.id:
            never.wait(5.0)  # real work time: RabbitMQ drops a silent connection after ~4 s at heartbeat 1

    got = Recorder(long_work)
    consumer = broker.consume(t.MICROGRAPHS, got)
    first, second = micrograph(1), micrograph(2)
    broker.publish(t.MICROGRAPHS, first)
    got.wait(1)
    broker.publish(t.MICROGRAPHS, second)
    got.wait(2)
    assert consumer.connected  # type: ignore[attr-defined]
    consumer.stop(WAIT)
    # A lost connection would have redelivered the first message (delivery_count 1) before the second one.
    assert [(decode(e.body).id, e.delivery_count) for e in got.envelopes] == [(first.id, 0), (second.id, 0)]
    assert broker.depth(t.MICROGRAPHS) == 0


def test_unreachable_server_raises_transient_error() -> None:
    broker = RabbitBroker("amqp://guest:s3cret@127.0.0.1:1/%2F", namespace="test-unreachable")
    try:
        assert not broker.connected
        with pytest.raises(TransientError) as publish_error:
            broker.publish(t.MICROGRAPHS, micrograph(1))
        with pytest.raises(TransientError) as consume_error:
            broker.consume(t.MICROGRAPHS, Recorder())
    finally:
        broker.close()
    for error in (publish_error.value, consume_error.value):
        assert "s3cret" not in str(error)
    assert "127.0.0.1:1" in str(publish_error.value)


@pytest.mark.parametrize("transport", RABBIT)
def test_consumer_survives_a_broker_restart(broker_factory: BrokerFactory) -> None:
    """``rabbitmqctl stop_app``/``start_app`` under a running consumer: it reconnects and every message is handled.

    Restarting RabbitMQ briefly disturbs anything else using it; this is the only test that does.
    """
    broker = broker_factory()
    stopped = threading.Event()
    before = [micrograph(i) for i in range(3)]

    def in_hand_during_restart(envelope: Envelope) -> None:
        if decode(envelope.body).id == before[0].id and envelope.delivery_count == 0:
            stopped.wait(WAIT)  # still working when RabbitMQ goes away: the ack has nowhere to go

    got = Recorder(in_hand_during_restart)
    consumer = broker.consume(t.MICROGRAPHS, got)
    for message in before:
        broker.publish(t.MICROGRAPHS, message)
    got.wait(1)
    rabbitmqctl("stop_app")
    try:
        stopped.set()
        wait_until(lambda: not consumer.connected, what="the consumer to notice")  # type: ignore[attr-defined]
        assert not broker.connected
        with pytest.raises(TransientError):
            broker.publish(t.MICROGRAPHS, micrograph(99))
    finally:
        rabbitmqctl("start_app")
    after = [micrograph(i) for i in range(10, 13)]
    started = time.monotonic()
    while True:  # the server takes a moment to accept publishes again: retry the first one with a deadline
        try:
            broker.publish(t.MICROGRAPHS, after[0])
            break
        except TransientError:
            if time.monotonic() - started > 30:
                raise
    for message in after[1:]:
        broker.publish(t.MICROGRAPHS, message)
    wait_until(lambda: consumer.connected, timeout=30, what="the consumer to reconnect")  # type: ignore[attr-defined]
    wait_until(
        lambda: {m.id for m in before + after} <= {decode(e.body).id for e in got.envelopes},
        timeout=30,
        what="every message handled",
    )
    assert broker.connected
    consumer.stop(WAIT)
    assert broker.depth(t.MICROGRAPHS) == 0
    redelivered = [e.delivery_count for e in got.envelopes if decode(e.body).id == before[0].id]
    assert redelivered[0] == 0 and max(redelivered) >= 1  # the message in hand at the restart came back
