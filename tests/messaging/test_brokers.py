"""One behavioural suite, run on both transports (in-memory and the real RabbitMQ): delivery, acks, retries,
dead letters, single active consumer, broadcast and the queue operations the CLI uses."""

from __future__ import annotations

import threading

import pytest

from cryomae.errors import InputError, TransientError
from cryomae.messages import ModelPublished, PicksReady, decode
from cryomae.messaging import Broker, Consumer, Envelope
from cryomae.messaging import topology as t
from cryomae.messaging.delivery import DELIVERY_LIMIT, QUEUE_HEADER, REASON_CHARS, REASON_HEADER

from .conftest import WAIT, Recorder, micrograph, wait_until

MICS = t.MICROGRAPHS
MICS_DLQ = t.dead_letters(t.MICROGRAPHS)


def picks(i: int) -> PicksReady:
    return PicksReady(
        project="demo",
        session="s1",
        micrograph=f"/data/demo/s1/mic_{i:04d}.mrc",
        micrograph_id=f"m{i}",
        model_version="v0001-20261124T120000Z",
        diameter=24.0,
        threshold=0.5,
        x=[10.0, 20.0],
        y=[30.0, 40.0],
        scores=[0.9, 0.2],
        shape=(512, 512),
        complete_at=1.0,
    )


def assert_next_is(broker: Broker, queue: str, expected_id: str) -> None:
    """Publishing nothing else, the next message a fresh consumer gets must be ``expected_id``: anything
    unacked earlier would have been returned to the head of the queue and come first."""
    got = Recorder()
    consumer = broker.consume(queue, got)
    first = got.wait(1)[0]
    consumer.stop(WAIT)
    assert decode(first.body).id == expected_id


def test_round_trip_acks_after_the_handler(broker: Broker) -> None:
    message = micrograph(1)
    broker.publish(MICS, message, headers={"x-trace": "abc"})
    assert broker.depth(MICS) == 1
    got = Recorder()
    consumer = broker.consume(MICS, got)
    envelope = got.wait(1)[0]
    consumer.stop(WAIT)
    assert not consumer.running
    assert decode(envelope.body) == message
    assert envelope.queue == MICS
    assert envelope.headers["x-trace"] == "abc"
    assert envelope.delivery_count == 0
    assert got.threads[0].startswith("cryomae-") and got.threads[0] != threading.main_thread().name
    marker = micrograph(2)
    broker.publish(MICS, marker)
    assert_next_is(broker, MICS, marker.id)  # the first one was acked: it does not come back
    assert broker.depth(MICS) == 0
    assert broker.depth(MICS_DLQ) == 0


def test_no_ack_while_the_handler_runs(broker: Broker) -> None:
    entered, release = threading.Event(), threading.Event()

    def blocked(envelope: Envelope) -> None:
        entered.set()
        release.wait(WAIT)

    first = broker.consume(MICS, blocked)
    message = micrograph(1)
    broker.publish(MICS, message)
    try:
        assert entered.wait(WAIT)
        assert broker.depth(MICS) == 0  # in hand: not ready, not acked either (see below)
        first.stop(timeout=0.2)  # the handler never finished: the consumer gives up on it
        assert not first.running
        wait_until(lambda: broker.depth(MICS) == 1, what="the unacked message back in its queue")
        got = Recorder()
        second = broker.consume(MICS, got)
        envelope = got.wait(1)[0]
        assert decode(envelope.body).id == message.id
        assert envelope.delivery_count == 1
    finally:
        release.set()  # the abandoned handler returns now; its late result must not count
    second.stop(WAIT)
    assert broker.depth(MICS) == 0
    assert broker.depth(MICS_DLQ) == 0
    assert len(got.envelopes) == 1


def test_input_error_dead_letters_at_first_delivery(broker: Broker) -> None:
    def reject(envelope: Envelope) -> None:
        raise InputError(decode(envelope.body).path, "not an MRC file (bad map header)")  # type: ignore[attr-defined]

    got = Recorder(reject)
    consumer = broker.consume(MICS, got)
    message = micrograph(7)
    broker.publish(MICS, message, headers={"x-trace": "t7"})
    wait_until(lambda: broker.depth(MICS_DLQ) == 1, what="the dead letter")
    consumer.stop(WAIT)
    assert got.counts == [0]
    [dead] = broker.peek(MICS_DLQ)
    assert decode(dead.body) == message
    assert dead.headers[REASON_HEADER] == f"{message.path}: not an MRC file (bad map header)"
    assert dead.headers[QUEUE_HEADER] == MICS
    assert dead.headers["x-trace"] == "t7"
    assert broker.depth(MICS) == 0


def test_transient_error_is_retried_then_dead_lettered(broker: Broker) -> None:
    def flaky(envelope: Envelope) -> None:
        raise TransientError(f"file still growing (delivery {envelope.delivery_count + 1})")

    got = Recorder(flaky)
    consumer = broker.consume(MICS, got)
    broker.publish(MICS, micrograph(1))
    wait_until(lambda: broker.depth(MICS_DLQ) == 1, what="the dead letter")
    consumer.stop(WAIT)
    assert got.counts == list(range(DELIVERY_LIMIT))
    [dead] = broker.peek(MICS_DLQ)
    assert f"file still growing (delivery {DELIVERY_LIMIT})" in dead.headers[REASON_HEADER]
    assert dead.headers[QUEUE_HEADER] == MICS
    assert broker.depth(MICS) == 0


def test_unexpected_exception_is_retried_until_it_succeeds(broker: Broker) -> None:
    def once(envelope: Envelope) -> None:
        if envelope.delivery_count == 0:
            raise RuntimeError("GPU busy")

    got = Recorder(once)
    consumer = broker.consume(MICS, got)
    broker.publish(MICS, micrograph(1))
    got.wait(2)
    consumer.stop(WAIT)
    assert got.counts == [0, 1]
    marker = micrograph(2)
    broker.publish(MICS, marker)
    assert_next_is(broker, MICS, marker.id)
    assert broker.depth(MICS_DLQ) == 0


def test_consumer_that_never_finishes_is_bounded_by_the_delivery_limit(broker: Broker) -> None:
    """A message that kills its consumer every time (here: abandoned by stop) ends in the DLQ with a reason."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    def stuck(envelope: Envelope) -> None:
        entered.release()
        release.wait(WAIT)

    broker.publish(MICS, micrograph(1))
    try:
        for _ in range(DELIVERY_LIMIT):
            consumer = broker.consume(MICS, stuck)
            assert entered.acquire(timeout=WAIT)
            consumer.stop(timeout=0)
        wait_until(lambda: broker.depth(MICS_DLQ) == 1, what="the dead letter")
    finally:
        release.set()
    [dead] = broker.peek(MICS_DLQ)
    assert dead.headers[REASON_HEADER] == f"delivery limit reached ({DELIVERY_LIMIT} deliveries)"
    assert dead.headers[QUEUE_HEADER] == MICS
    assert broker.depth(MICS) == 0


def test_single_active_consumer(broker: Broker) -> None:
    assert t.PICKS in t.SINGLE_ACTIVE
    first, second = Recorder(), Recorder()
    a = broker.consume(t.PICKS, first)
    b = broker.consume(t.PICKS, second)
    sent = [picks(i) for i in range(4)]
    for message in sent:
        broker.publish(t.PICKS, message)
    first.wait(4)
    a.stop(WAIT)
    assert second.envelopes == []
    assert [decode(e.body).id for e in first.envelopes] == [m.id for m in sent]  # in order
    later = picks(9)
    broker.publish(t.PICKS, later)
    assert decode(second.wait(1)[0].body).id == later.id  # the waiting consumer took over
    b.stop(WAIT)
    assert len(first.envelopes) == 4


def test_broadcast_reaches_every_subscriber(broker: Broker) -> None:
    one, two = Recorder(), Recorder()

    def refuse(envelope: Envelope) -> None:
        raise InputError(None, "unknown project")

    def fail(envelope: Envelope) -> None:
        raise TransientError("model store unreachable")

    flaky = Recorder(fail)
    subscribers = [broker.subscribe(handler) for handler in (one, two, refuse, flaky)]
    message = ModelPublished(project="demo", version="v0002-20261124T130000Z")
    broker.broadcast(message)
    for got in (one, two):
        [envelope] = got.wait(1)
        assert decode(envelope.body) == message
        assert envelope.queue == t.MODELS
    dlq = t.dead_letters(t.MODELS)
    wait_until(lambda: broker.depth(dlq) == 2, what="the refused and the failing broadcast dead-lettered")
    for subscriber in subscribers:
        subscriber.stop(WAIT)
    assert flaky.counts == list(range(DELIVERY_LIMIT))
    reasons = sorted(e.headers[REASON_HEADER] for e in broker.peek(dlq))
    assert reasons[0].startswith("model store unreachable") and reasons[1] == "unknown project"
    broker.broadcast(ModelPublished(project="demo", version="v0003-20261124T140000Z"))  # nobody listens: fine
    assert len(one.envelopes) == len(two.envelopes) == 1


def test_concurrent_handlers_up_to_prefetch(broker: Broker) -> None:
    both = threading.Barrier(2, timeout=WAIT)  # passes only if two handlers run at the same time

    def together(envelope: Envelope) -> None:
        both.wait()

    got = Recorder(together)
    consumer = broker.consume(MICS, got, prefetch=2)
    broker.publish(MICS, micrograph(1))
    broker.publish(MICS, micrograph(2))
    got.wait(2)
    consumer.stop(WAIT)
    assert got.counts == [0, 0]
    assert len(set(got.threads)) == 2


def test_peek_move_and_purge(broker: Broker) -> None:
    def reject(envelope: Envelope) -> None:
        raise InputError(None, "corrupt")

    consumer = broker.consume(MICS, reject)
    sent = [micrograph(i) for i in range(3)]
    for message in sent:
        broker.publish(MICS, message, headers={"x-trace": message.id})
    wait_until(lambda: broker.depth(MICS_DLQ) == 3, what="three dead letters")
    consumer.stop(WAIT)

    listed = broker.peek(MICS_DLQ)
    assert [decode(e.body).id for e in listed] == [m.id for m in sent]
    assert all(e.headers[REASON_HEADER] == "corrupt" for e in listed)
    assert len(broker.peek(MICS_DLQ, limit=2)) == 2
    wait_until(lambda: broker.depth(MICS_DLQ) == 3, what="peeked messages ready again")  # peeking leaves them

    assert broker.move(MICS_DLQ, MICS, limit=2) == 2
    wait_until(lambda: (broker.depth(MICS_DLQ), broker.depth(MICS)) == (1, 2), what="two moved")
    replayed = broker.peek(MICS)
    moved = {decode(e.body).id for e in replayed}  # which two: RabbitMQ may reorder messages a peek returned
    assert len(moved) == 2 and moved <= {m.id for m in sent}
    assert all(REASON_HEADER not in e.headers and QUEUE_HEADER not in e.headers for e in replayed)
    assert all(e.headers["x-trace"] == decode(e.body).id for e in replayed)
    assert broker.move(MICS_DLQ, MICS) == 1

    waiting = t.waiting("demo")  # declared on first use
    parked = [micrograph(i) for i in range(10, 12)]
    for message in parked:
        broker.publish(waiting, message)
    assert broker.depth(waiting) == 2
    assert broker.move(waiting, MICS) == 2
    wait_until(lambda: broker.depth(MICS) == 5, what="five messages in the work queue")
    assert broker.purge(MICS) == 5
    assert broker.depth(MICS) == broker.depth(MICS_DLQ) == broker.depth(waiting) == 0

    never = t.waiting("nobody")
    assert (broker.depth(never), broker.peek(never), broker.move(never, MICS), broker.purge(never)) == (0, [], 0, 0)


def test_closed_broker_refuses_to_publish(broker: Broker) -> None:
    assert broker.connected
    broker.close()
    assert not broker.connected
    with pytest.raises(TransientError, match="closed"):
        broker.publish(MICS, micrograph(1))


def test_headers_amqp_cannot_carry_are_refused(broker: Broker) -> None:
    with pytest.raises(TypeError, match=r"'timing\.pick'"):
        broker.publish(MICS, micrograph(1), headers={"timing": {"pick": 1.5}})
    assert broker.depth(MICS) == 0


def test_stop_from_inside_a_handler(broker: Broker) -> None:
    """A handler may stop its own consumer: stop returns at once, and the message is still acked."""
    consumers: list[Consumer] = []

    def stop_myself(envelope: Envelope) -> None:
        consumers[0].stop()

    got = Recorder(stop_myself)
    consumers.append(broker.consume(MICS, got))
    broker.publish(MICS, micrograph(1))
    got.wait(1)
    wait_until(lambda: not consumers[0].running, what="the consumer to stop")
    marker = micrograph(2)
    broker.publish(MICS, marker)
    assert_next_is(broker, MICS, marker.id)
    assert len(got.envelopes) == 1


def test_long_reasons_are_cut_to_a_few_kb_naming_their_length(broker: Broker) -> None:
    """A reason too long for an AMQP header (RabbitMQ's frame is 128 KB) keeps its start and its end."""
    reasons = {
        "input": "/data/" + "x" * 1_000_000 + ".mrc: not an MRC file",
        "transient": "still growing " + "y" * 1_000_000 + " (try later)",
    }

    def reject(envelope: Envelope) -> None:
        if decode(envelope.body).size % 2:  # type: ignore[attr-defined]
            raise InputError(None, reasons["input"])
        raise TransientError(reasons["transient"])

    got = Recorder(reject)
    consumer = broker.consume(MICS, got)
    for i in (1, 2):
        broker.publish(MICS, micrograph(i))  # sizes 4097 (odd: input error) and 4098 (transient)
    wait_until(lambda: broker.depth(MICS_DLQ) == 2, what="two dead letters")
    consumer.stop(WAIT)
    assert sorted(got.counts) == [0, *range(DELIVERY_LIMIT)]  # the input error once, the transient one 5 times
    letters = broker.peek(MICS_DLQ)
    dead = {decode(e.body).size % 2: str(e.headers[REASON_HEADER]) for e in letters}  # type: ignore[attr-defined]
    for parity, key in ((1, "input"), (0, "transient")):
        reason, original = dead[parity], reasons[key]
        assert len(reason) <= REASON_CHARS, key
        assert reason.startswith(original[:100]), key
        assert f"{len(original)} characters" in reason, key
    assert dead[1].endswith(".mrc: not an MRC file")
    assert dead[0].endswith(f"(try later) (gave up after {DELIVERY_LIMIT} deliveries)")


def test_peek_without_a_limit_returns_every_message(broker: Broker) -> None:
    for i in range(105):
        broker.publish(MICS_DLQ, micrograph(i))
    assert len(broker.peek(MICS_DLQ, None)) == 105
    wait_until(lambda: broker.depth(MICS_DLQ) == 105, what="peeked messages ready again")
    assert len(broker.peek(MICS_DLQ)) == 100  # the default
