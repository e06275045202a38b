"""The RabbitMQ transport (AMQP 0-9-1 through pika), with the delivery semantics of ``cryomae.messaging.base``.

Topology (names ``<namespace>.<logical name>``):

- each work queue of ``topology.WORK_QUEUES`` is a durable quorum queue with ``x-delivery-limit`` and
  dead-lettering into its own quorum queue ``<queue>.dlq``; ``topology.SINGLE_ACTIVE`` queues also have
  ``x-single-active-consumer``. The broker's delivery limit is a backstop for consumers that die with the
  message in hand; a handler's own failures are dead-lettered explicitly, with the error as the reason.
- ``<namespace>.models`` is a durable fanout exchange; each subscriber binds a private (exclusive,
  auto-delete) queue to it, so it receives the broadcasts sent while it is connected. Its dead letters go to
  ``models.dlq``.
- any other queue (``topology.waiting(project)``) is a durable quorum queue declared when first used.

Threads: pika's ``BlockingConnection`` is not thread-safe and answers heartbeats only while it processes
events. Each consumer therefore owns a connection and a thread that does nothing but process its events;
handlers run on ``prefetch`` worker threads, and their acks, requeues and dead-letter publishes are handed back
to the connection thread with ``add_callback_threadsafe``. Publishing and the queue operations (depth, peek,
move, purge) share one more connection, under a lock, usable from any thread.

Failures: a consumer whose connection is lost reconnects with backoff and resumes; RabbitMQ redelivers the
messages that were in hand (the handlers downstream are idempotent), and a result that arrives after its
connection is gone is dropped. A publish retries over reconnects a few times, then raises ``TransientError``.

RabbitMQ closes the channel of a consumer that holds a message longer than its ``consumer_timeout`` (30 min by
default); the consumer then reconnects and the message is redelivered. Where a handler may run longer (a
training), raise ``consumer_timeout`` in ``rabbitmq.conf``.
"""

from __future__ import annotations

import functools
import queue as stdqueue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import pika
import pika.exceptions
import structlog

from cryomae.errors import ConfigError, TransientError
from cryomae.messages import Message
from cryomae.messaging import redact_url, topology
from cryomae.messaging.base import Broker, Consumer, Envelope, Handler
from cryomae.messaging.delivery import (
    CLOSE_TIMEOUT,
    DELIVERY_LIMIT,
    QUEUE_HEADER,
    REASON_HEADER,
    Outcome,
    check_headers,
    judge,
    replay_headers,
    shorten,
)

log = structlog.get_logger("cryomae.messaging")

T = TypeVar("T")

ATTEMPTS = 3  # tries of a publish or queue operation, over reconnects, before TransientError
RETRY_DELAY = 0.25  # seconds before the second try; doubles
RECONNECT_DELAY = 0.5  # seconds before a lost consumer's first reconnect; doubles up to RECONNECT_MAX_DELAY
RECONNECT_MAX_DELAY = 5.0
POLL = 0.2  # longest a consumer's connection thread waits for I/O before checking whether to stop
START_TIMEOUT = 30.0  # seconds ``consume``/``subscribe`` wait for the consumer's first connection
SOCKET_TIMEOUT = 5.0
BLOCKED_TIMEOUT = 30.0  # seconds a publish waits while RabbitMQ blocks publishers (memory/disk alarm)
PEEK_SETTLE_S = 2.0  # longest a peek waits for the messages it handed back to be ready again
PEEK_LOCK_WAIT_S = 30.0  # longest a peek waits for another process's peek at the same queue to end
RESOURCE_LOCKED = 405  # RabbitMQ's reply to a declare of an exclusive queue another connection holds
AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)


class _ChannelLostError(Exception):
    """The consumer's channel was closed or its consumer cancelled by the broker (queue deleted...)."""


def _close_quietly(connection: Any) -> None:
    """Close a pika connection that may already be closed or broken."""
    if connection is not None and connection.is_open:
        with suppress(*AMQP_ERRORS):
            connection.close()


def _death_reason(deaths: Any) -> tuple[str, str]:
    """A reason and the full source queue name from RabbitMQ's ``x-death`` header (newest death first)."""
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], Mapping):
        return "dead-lettered by RabbitMQ", ""
    latest = deaths[0]
    why = str(latest.get("reason", ""))
    source = str(latest.get("queue", ""))
    reasons = {
        "delivery_limit": f"delivery limit reached ({DELIVERY_LIMIT} deliveries)",
        "rejected": "rejected by a consumer",
        "expired": "expired",
        "maxlen": "queue length limit reached",
    }
    return reasons.get(why, f"dead-lettered by RabbitMQ ({why})"), source


class RabbitBroker(Broker):
    """RabbitMQ behind the ``Broker`` interface; nothing connects until first use."""

    def __init__(self, url: str, namespace: str = "cryomae", heartbeat: int = 30) -> None:
        self.url = url
        self.namespace = namespace
        self.heartbeat = heartbeat
        self._shown_url = redact_url(url)
        self._lock = threading.Lock()  # guards the shared connection below and the bookkeeping
        self._connection: Any = None  # pika.BlockingConnection
        self._channel: Any = None  # its confirmed channel for publishing
        self._declared: set[str] = set()  # logical queues (and the exchange) known to exist
        self._consumers: list[_RabbitConsumer] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"RabbitBroker({self._shown_url!r}, namespace={self.namespace!r})"

    # -- names and parameters --------------------------------------------------------------------------------

    def full(self, logical: str) -> str:
        """The RabbitMQ name of a logical queue or exchange."""
        return f"{self.namespace}.{logical}"

    def logical(self, full: str) -> str:
        prefix = f"{self.namespace}."
        return full[len(prefix) :] if full.startswith(prefix) else full

    def parameters(self, role: str) -> pika.URLParameters:
        try:
            params = pika.URLParameters(self.url)
        except Exception as exc:  # noqa: BLE001 -- pika raises assorted types for a malformed URL
            raise ConfigError(f"broker URL {self._shown_url!r}: {exc}") from None
        params.heartbeat = self.heartbeat
        params.socket_timeout = SOCKET_TIMEOUT
        params.blocked_connection_timeout = BLOCKED_TIMEOUT
        params.connection_attempts = 1
        params.client_properties = {"connection_name": f"cryomae {self.namespace} {role}"}
        return params

    def queue_arguments(self, logical: str) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-queue-type": "quorum"}
        if logical in topology.WORK_QUEUES:
            # RabbitMQ dead-letters when a message is returned more than x-delivery-limit times, i.e. after
            # x-delivery-limit + 1 deliveries: DELIVERY_LIMIT deliveries in all.
            arguments["x-delivery-limit"] = DELIVERY_LIMIT - 1
            arguments["x-dead-letter-exchange"] = ""
            arguments["x-dead-letter-routing-key"] = self.full(topology.dead_letters(logical))
            if logical in topology.SINGLE_ACTIVE:
                arguments["x-single-active-consumer"] = True
        return arguments

    def ensure_queue(self, channel: Any, logical: str) -> None:
        """Declare a logical queue (and a work queue's DLQ first) with its arguments; idempotent."""
        if logical in topology.WORK_QUEUES:
            self.ensure_queue(channel, topology.dead_letters(logical))
        try:
            channel.queue_declare(self.full(logical), durable=True, arguments=self.queue_arguments(logical))
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 406:  # PRECONDITION_FAILED: exists with other arguments
                raise ConfigError(
                    f"RabbitMQ queue {self.full(logical)!r} exists with different settings ({exc.reply_text}); "
                    "delete it or use another namespace"
                ) from None
            raise

    def ensure_exchange(self, channel: Any) -> None:
        channel.exchange_declare(self.full(topology.MODELS), exchange_type="fanout", durable=True)
        self.ensure_queue(channel, topology.dead_letters(topology.MODELS))

    def envelope(self, logical: str, properties: Any, body: bytes, delivery_count: int | None = None) -> Envelope:
        """An Envelope from a delivery; a message RabbitMQ itself dead-lettered gets a reason from ``x-death``."""
        headers = dict(properties.headers or {})
        if delivery_count is None:
            delivery_count = int(headers.get("x-delivery-count", 0))
        if REASON_HEADER not in headers and "x-death" in headers:
            reason, source = _death_reason(headers["x-death"])
            headers[REASON_HEADER] = reason
            headers.setdefault(QUEUE_HEADER, self.logical(source))
        return Envelope(logical, body, headers, delivery_count)

    # -- the shared connection -------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Drop the shared connection (caller holds the lock); the next use opens a new one."""
        connection, self._connection, self._channel = self._connection, None, None
        _close_quietly(connection)

    def _shared(self) -> tuple[Any, Any]:
        """The shared connection and its confirmed channel, (re)opened as needed (caller holds the lock)."""
        if self._connection is not None and self._connection.is_open:
            self._connection.process_data_events(0)  # notices a close by the broker, answers heartbeats
        if self._connection is None or not self._connection.is_open or not self._channel.is_open:
            self._reset()
            self._connection = pika.BlockingConnection(self.parameters("publisher"))
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        return self._connection, self._channel

    def _retry(self, what: str, operation: Callable[[Any, Any], T]) -> T:
        """Run ``operation(connection, channel)`` under the lock, reconnecting between tries."""
        delay = RETRY_DELAY
        last: BaseException | None = None
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(delay)  # a pause between reconnect attempts, not synchronisation
                delay *= 2
            with self._lock:
                if self._closed:
                    raise TransientError(f"{what}: the broker connection is closed")
                try:
                    connection, channel = self._shared()
                    return operation(connection, channel)
                except pika.exceptions.UnroutableError as exc:
                    self._declared.clear()  # a queue was deleted behind our back: declare again
                    last = exc
                except AMQP_ERRORS as exc:
                    last = exc
                    self._reset()
            log.warning("RabbitMQ operation failed", what=what, attempt=attempt + 1, error=repr(last))
        raise TransientError(f"{what}: RabbitMQ at {self._shown_url} failed {ATTEMPTS} times (last: {last!r})")

    @contextmanager
    def _scratch(self, connection: Any) -> Iterator[Any]:
        """A channel of its own for one operation (a passive declare of a missing queue closes its channel)."""
        channel = connection.channel()
        try:
            yield channel
        finally:
            if channel.is_open:
                channel.close()

    @contextmanager
    def _peek_lock(self, connection: Any, logical: str) -> Iterator[None]:
        """One peek at a queue at a time, across processes: a peek holds the messages it reads unacknowledged for a
        moment, and a second peek meanwhile (``dlq list`` and ``status`` run side by side) would list fewer. The
        lock is an exclusive queue: RabbitMQ lets one connection declare it and refuses the others (405) until it
        is deleted, which it is at the end of the peek, or when its connection closes (a process that dies)."""
        name = self.full(f"{logical}.peek-lock")
        deadline = time.monotonic() + PEEK_LOCK_WAIT_S
        while True:
            channel = connection.channel()
            try:
                channel.queue_declare(name, exclusive=True)
                break
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != RESOURCE_LOCKED or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)  # another process peeks: polling the broker is the only way to learn it ended
        try:
            yield
        finally:
            if channel.is_open:
                with suppress(pika.exceptions.AMQPError):
                    channel.queue_delete(name)
                channel.close()

    def _ready_count(self, channel: Any, logical: str) -> int | None:
        """Ready messages of a queue, or None where it does not exist (closes ``channel`` then)."""
        try:
            return int(channel.queue_declare(self.full(logical), passive=True).method.message_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise

    def _known(self, channel: Any, logical: str) -> None:
        if logical not in self._declared:
            self.ensure_queue(channel, logical)
            self._declared.add(logical)

    @staticmethod
    def _properties(message: Message, headers: Mapping[str, Any] | None) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message.id,
            type=str(getattr(message, "kind", type(message).__name__)),
            timestamp=int(message.created),
            headers=check_headers(headers) or None,
        )

    # -- Broker ----------------------------------------------------------------------------------------------

    def declare(self) -> None:
        def operation(connection: Any, channel: Any) -> None:
            for name in topology.WORK_QUEUES:
                self.ensure_queue(channel, name)
                self._declared.add(name)
            self.ensure_exchange(channel)
            self._declared.add(topology.MODELS)

        self._retry("declare the topology", operation)

    def publish(self, queue: str, message: Message, headers: Mapping[str, Any] | None = None) -> None:
        body, properties = message.body(), self._properties(message, headers)

        def operation(connection: Any, channel: Any) -> None:
            self._known(channel, queue)
            channel.basic_publish("", self.full(queue), body, properties, mandatory=True)

        self._retry(f"publish to {queue}", operation)

    def broadcast(self, message: Message) -> None:
        body, properties = message.body(), self._properties(message, None)

        def operation(connection: Any, channel: Any) -> None:
            if topology.MODELS not in self._declared:
                self.ensure_exchange(channel)
                self._declared.add(topology.MODELS)
            channel.basic_publish(self.full(topology.MODELS), "", body, properties)  # no subscriber is fine

        self._retry("broadcast", operation)

    def consume(self, queue: str, handler: Handler, prefetch: int = 1) -> Consumer:
        return self._start(_RabbitConsumer(self, queue, handler, prefetch, broadcast=False))

    def subscribe(self, handler: Handler) -> Consumer:
        return self._start(_RabbitConsumer(self, topology.MODELS, handler, 1, broadcast=True))

    def _start(self, consumer: _RabbitConsumer) -> _RabbitConsumer:
        with self._lock:
            if self._closed:
                raise TransientError(f"consume {consumer.name}: the broker connection is closed")
            self._consumers = [c for c in self._consumers if c.running]
            self._consumers.append(consumer)
        consumer.start()
        return consumer

    def depth(self, queue: str) -> int:
        def operation(connection: Any, channel: Any) -> int:
            with self._scratch(connection) as scratch:
                return self._ready_count(scratch, queue) or 0

        return self._retry(f"depth of {queue}", operation)

    def peek(self, queue: str, limit: int | None = 100) -> list[Envelope]:
        """Messages are fetched without an ack, then handed back (nack with requeue), and peek returns once the
        queue holds as many ready messages as before it (or after ``PEEK_SETTLE_S``): a depth or a second peek right
        after sees them all.

        Each peek counts as a delivery on a quorum queue: harmless on dead-letter and waiting queues (no delivery
        limit), but peeking a work queue brings its messages nearer their delivery limit.
        """

        def operation(connection: Any, channel: Any) -> list[Envelope]:
            found: list[Envelope] = []
            with self._peek_lock(connection, queue), self._scratch(connection) as scratch:
                ready = self._ready_count(scratch, queue)
                if ready is None:  # no such queue (its channel is closed now): nothing to peek at
                    return found
                while limit is None or len(found) < limit:
                    method, properties, body = scratch.basic_get(self.full(queue), auto_ack=False)
                    if method is None:
                        break
                    found.append(self.envelope(queue, properties, body))
                if found:
                    scratch.basic_nack(delivery_tag=0, multiple=True, requeue=True)
                    # a quorum queue takes requeued messages back a moment after the nack: wait (bounded) until
                    # they are ready again, so that a depth or a listing right after a peek sees them all
                    deadline = time.monotonic() + PEEK_SETTLE_S
                    while (self._ready_count(scratch, queue) or 0) < ready and time.monotonic() < deadline:
                        time.sleep(0.01)  # polling the broker's count: it says when the requeue is done
            return found

        return self._retry(f"peek at {queue}", self._tolerate_missing(operation, []))

    def move(self, source: str, target: str, limit: int | None = None) -> int:
        """Each message is published to ``target`` (confirmed), then acked in ``source``.

        At most the messages ready when the move starts are moved. A failure midway can leave a message in
        both queues; that is safe because every handler is idempotent.
        """
        if source == target:
            return 0

        def operation(connection: Any, channel: Any) -> int:
            moved = 0
            with self._scratch(connection) as scratch:
                ready = self._ready_count(scratch, source)
                if not ready:
                    return 0
                self._known(channel, target)
                wanted = ready if limit is None else min(limit, ready)
                while moved < wanted:
                    method, properties, body = scratch.basic_get(self.full(source), auto_ack=False)
                    if method is None:
                        break
                    properties.headers = replay_headers(properties.headers or {}) or None
                    channel.basic_publish("", self.full(target), body, properties, mandatory=True)
                    scratch.basic_ack(method.delivery_tag)
                    moved += 1
            return moved

        return self._retry(f"move {source} to {target}", operation)

    def purge(self, queue: str) -> int:
        def operation(connection: Any, channel: Any) -> int:
            with self._scratch(connection) as scratch:
                if self._ready_count(scratch, queue) is None:
                    return 0
                return int(scratch.queue_purge(self.full(queue)).method.message_count)

        return self._retry(f"purge {queue}", operation)

    def _tolerate_missing(self, operation: Callable[[Any, Any], T], empty: T) -> Callable[[Any, Any], T]:
        def guarded(connection: Any, channel: Any) -> T:
            try:
                return operation(connection, channel)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == 404:
                    return empty
                raise

        return guarded

    def close(self) -> None:
        """Stop every consumer (letting each finish the message in hand), then close the shared connection."""
        with self._lock:
            self._closed = True
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.stop(CLOSE_TIMEOUT)
        with self._lock:
            self._reset()

    @property
    def connected(self) -> bool:
        """RabbitMQ answers on the shared connection, and every running consumer is connected."""
        with self._lock:
            if self._closed:
                return False
            try:
                self._shared()
            except AMQP_ERRORS:
                self._reset()
                return False
            consumers = [c for c in self._consumers if c.running]
        return all(c.connected for c in consumers)


@dataclass(frozen=True)
class _Delivery:
    generation: int  # which connection it came on
    tag: int
    properties: Any
    body: bytes


class _RabbitConsumer(Consumer):
    """One connection thread (events, acks) and ``prefetch`` worker threads (handlers) for one queue."""

    def __init__(self, broker: RabbitBroker, name: str, handler: Handler, prefetch: int, broadcast: bool) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.broker = broker
        self.name = name  # logical queue (topology.MODELS for a subscription)
        self._handler = handler
        self._prefetch = prefetch
        self._broadcast = broadcast
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = threading.Event()  # the first connection succeeded or failed
        self._start_error: BaseException | None = None
        self._deadline: float | None = None  # when a stopping consumer gives up on the message in hand
        self._generation = 0  # bumped at every connect and disconnect: stale results are dropped
        self._connection: Any = None  # pika.BlockingConnection of the current generation
        self._channel: Any = None
        self._was_connected = False
        self._busy = 0  # handlers running (or results not yet settled) on the current connection
        self._connected = False
        self._counts: dict[str, int] = {}  # earlier deliveries by message id (subscriptions: classic queue)
        self._deliveries: stdqueue.Queue[_Delivery | None] = stdqueue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"cryomae-amqp-{name}", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, name=f"cryomae-handler-{name}-{i}", daemon=True)
            for i in range(prefetch)
        ]

    def start(self) -> None:
        """Start the threads and wait for the first connection; TransientError if it fails."""
        self._thread.start()
        for worker in self._workers:
            worker.start()
        if not self._started.wait(START_TIMEOUT) or self._start_error is not None:
            self.stop(0)
            raise TransientError(
                f"consume {self.name}: cannot connect to RabbitMQ at {self.broker._shown_url} ({self._start_error!r})"
            )

    # -- connection thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = RECONNECT_DELAY
        try:
            while not self._stop.is_set():
                try:
                    self._session()
                except (*AMQP_ERRORS, _ChannelLostError) as exc:
                    error: BaseException = exc
                except Exception as exc:  # a bug must not kill the consumer silently: log it and reconnect
                    log.exception("consumer connection thread failed", queue=self.name)
                    error = exc
                else:
                    return  # stopped
                if not self._started.is_set():
                    self._start_error = error
                    return
                if self._was_connected:
                    delay = RECONNECT_DELAY
                log.warning("consumer connection lost; reconnecting", queue=self.name, delay=delay, error=repr(error))
                if self._stop.wait(delay):  # wakes at once on stop
                    return
                delay = min(2 * delay, RECONNECT_MAX_DELAY)
        finally:
            self._connected = False
            self._started.set()
            for _ in self._workers:
                self._deliveries.put(None)

    def _session(self) -> None:
        """One connection: consume until asked to stop (then drain) or until the connection fails."""
        self._was_connected = False
        connection = pika.BlockingConnection(self.broker.parameters(f"consumer {self.name}"))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            source = self._prepare(channel)
            channel.basic_qos(prefetch_count=self._prefetch)
            tag = channel.basic_consume(source, self._on_message)
            with self._lock:
                self._generation += 1
                self._busy = 0
                self._counts.clear()
                self._connection, self._channel = connection, channel
                self._connected = self._was_connected = True
            if self._started.is_set():
                log.info("consumer reconnected", queue=self.name)
            self._started.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=POLL)
                if not channel.is_open or tag not in channel.consumer_tags:
                    raise _ChannelLostError(f"channel of {self.name} closed or its consumer cancelled by RabbitMQ")
            channel.basic_cancel(tag)
            while self._busy > 0 and (self._deadline is None or time.monotonic() < self._deadline):
                connection.process_data_events(time_limit=POLL)
            if self._busy > 0:
                log.warning("handler did not finish before stop; RabbitMQ redelivers its message", queue=self.name)
        finally:
            with self._lock:
                self._generation += 1
                self._connection = self._channel = None
                self._connected = False
            _close_quietly(connection)

    def _prepare(self, channel: Any) -> str:
        """Declare what this consumer needs and return the RabbitMQ queue to consume."""
        if not self._broadcast:
            self.broker.ensure_queue(channel, self.name)
            self.broker.ensure_queue(channel, topology.dead_letters(self.name))
            return self.broker.full(self.name)
        self.broker.ensure_exchange(channel)
        private = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(private, self.broker.full(topology.MODELS))
        return str(private)

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._deliveries.put(_Delivery(self._generation, method.delivery_tag, properties, body))

    def _settle(self, delivery: _Delivery, outcome: Outcome, channel: Any) -> None:
        """On the connection thread: ack, requeue or dead-letter one delivery."""
        with self._lock:
            if delivery.generation != self._generation:
                return
            self._busy -= 1
            if self._broadcast:  # the private classic queue counts no deliveries: count them here
                key = str(delivery.properties.message_id)
                if outcome.action == "requeue":
                    self._counts[key] = self._counts.get(key, 0) + 1
                else:
                    self._counts.pop(key, None)
        if outcome.action == "ack":
            channel.basic_ack(delivery.tag)
        elif outcome.action == "requeue":
            channel.basic_nack(delivery.tag, requeue=True)
        else:
            self._dead_letter(channel, delivery, outcome.reason)

    def _dead_letter(self, channel: Any, delivery: _Delivery, reason: str) -> None:
        headers = {k: v for k, v in (delivery.properties.headers or {}).items() if k != "x-delivery-count"}
        headers.update({REASON_HEADER: shorten(reason), QUEUE_HEADER: self.name})  # a header fits one frame
        properties = pika.BasicProperties(
            content_type=delivery.properties.content_type,
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=delivery.properties.message_id,
            type=delivery.properties.type,
            timestamp=delivery.properties.timestamp,
            headers=headers,
        )
        target = self.broker.full(topology.dead_letters(self.name))
        try:
            channel.basic_publish("", target, delivery.body, properties, mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            log.error("dead-lettering failed; message requeued", queue=self.name, error=repr(exc))
            channel.basic_nack(delivery.tag, requeue=True)
            return
        channel.basic_ack(delivery.tag)

    # -- worker threads --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            delivery = self._deliveries.get()
            if delivery is None:
                return
            with self._lock:
                if self._stop.is_set() or delivery.generation != self._generation:
                    continue  # not started: RabbitMQ returns it to the queue when the connection closes
                self._busy += 1
                count = self._counts.get(str(delivery.properties.message_id), 0) if self._broadcast else None
            envelope = self.broker.envelope(self.name, delivery.properties, delivery.body, count)
            outcome = judge(self._handler, envelope)
            self._hand_back(delivery, outcome)

    def _hand_back(self, delivery: _Delivery, outcome: Outcome) -> None:
        """Schedule the settlement on the connection thread, unless that connection is gone."""
        with self._lock:
            current = delivery.generation == self._generation
            connection, channel = (self._connection, self._channel) if current else (None, None)
        try:
            if connection is not None:
                connection.add_callback_threadsafe(functools.partial(self._settle, delivery, outcome, channel))
                return
        except AMQP_ERRORS:
            pass
        log.warning("connection lost before the result; RabbitMQ redelivers the message", queue=self.name)

    # -- Consumer --------------------------------------------------------------------------------------------

    def stop(self, timeout: float | None = None) -> None:
        """Take no more messages, wait up to ``timeout`` for the one in hand to be settled, then disconnect.

        A handler still running after ``timeout`` is abandoned: the connection closes, RabbitMQ redelivers
        its message, and the handler's eventual result is dropped. Called from one of this consumer's own
        handlers, it returns at once; that handler's message is settled when the handler returns.
        """
        with self._lock:
            if not self._stop.is_set():
                self._deadline = None if timeout is None else time.monotonic() + timeout
                self._stop.set()
        if threading.current_thread() in (self._thread, *self._workers):
            return
        if self._thread.is_alive():
            self._thread.join(None if timeout is None else timeout + SOCKET_TIMEOUT + 2 * POLL)

    @property
    def running(self) -> bool:
        """True until the consumer has disconnected for good (a stopping one runs while it drains)."""
        return self._thread.is_alive()

    @property
    def connected(self) -> bool:
        """Whether the consumer's connection is up and consuming now."""
        return self._connected
