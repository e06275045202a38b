"""The single-workstation transport: every queue inside one process, with RabbitMQ's delivery semantics.

``MemoryBroker`` gives the services the same queues, retry limit, dead-letter queues, single-active-consumer
queues and broadcast as ``RabbitBroker`` (see ``cryomae.messaging.base``), so that watcher, picker, writer and
trainer can run as threads of one process without a RabbitMQ server. It is thread-safe: one lock guards every
queue, and consumers wait on its condition variable (no polling).

Given a ``Journal`` (``cryomae.messaging.journal``; the one-process mode keeps it in the state folder), every
message of a queue is also on disk from the moment ``publish`` returns until it is acknowledged, dead-lettered
elsewhere or purged, so a stop, a crash or kill -9 loses nothing: at the next start the queues are as they
were, and the messages that were in hand are delivered again (their delivery counts kept). Without a journal
(tests of the transport itself), messages live in memory only.

The delivery rules (``judge``, the delivery limit, the headers) are ``cryomae.messaging.delivery``'s, shared
with the RabbitMQ transport.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from cryomae.errors import TransientError
from cryomae.messages import Message
from cryomae.messaging import topology
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
)
from cryomae.messaging.journal import Journal

log = structlog.get_logger("cryomae.messaging")


@dataclass
class _Item:
    body: bytes
    headers: dict[str, Any]
    deliveries: int = 0  # deliveries so far
    file: Path | None = None  # its journal file, if journaled


@dataclass
class _Queue:
    single_active: bool = False
    ready: deque[_Item] = field(default_factory=deque)
    consumers: list[_MemoryConsumer] = field(default_factory=list)  # in arrival order; [0] is the active one


class MemoryBroker(Broker):
    """All queues in this process, journaled on disk when given a ``journal`` (see the module docstring)."""

    def __init__(self, namespace: str = "cryomae", journal: Journal | None = None) -> None:
        self.namespace = namespace
        self.journal = journal
        self._cond = threading.Condition()
        self._queues: dict[str, _Queue] = {}
        self._subscriptions: list[_Queue] = []
        self._consumers: list[_MemoryConsumer] = []
        self._closed = False
        self.restored: dict[str, int] = {}  # messages per queue found in the journal at start-up
        if journal is not None:
            with self._cond:
                for name, stored in journal.load().items():
                    queue = self._queue(name)
                    for path, s in stored:
                        item = _Item(s.body, s.headers, s.deliveries, path)
                        if s.deliveries >= DELIVERY_LIMIT and name in topology.WORK_QUEUES:
                            # in hand at its last allowed delivery when the process died: as RabbitMQ does with
                            # a message whose consumers keep dying, it is dead-lettered, not delivered again
                            reason = f"delivery limit reached ({s.deliveries} deliveries)"
                            self._dead_letter(name, item, reason, queue)
                        else:
                            queue.ready.append(item)
                    self.restored[name] = len(stored)
                for bad in journal.unreadable:
                    self._dead_letter_unreadable(bad.queue, bad.reason, bad.body)
            if self.restored:
                log.info("journal_restored", folder=str(journal.folder), messages=self.restored)

    def __repr__(self) -> str:
        return f"MemoryBroker(namespace={self.namespace!r})"

    # -- queues (callers hold self._cond) --------------------------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(single_active=name in topology.SINGLE_ACTIVE)
        return queue

    def _store(self, queue: str, item: _Item) -> _Item:
        """Journal a new item of ``queue`` (when there is a journal) before it is queued."""
        if self.journal is not None:
            try:
                item.file = self.journal.add(queue, item.body, item.headers, item.deliveries)
            except OSError as exc:
                raise TransientError(f"cannot journal a message of {queue} in {self.journal.folder}: {exc}") from exc
        return item

    def _forget_item(self, item: _Item) -> None:
        """An item leaves its queue for good (acknowledged, moved, dead-lettered or purged)."""
        if self.journal is not None and item.file is not None:
            try:
                self.journal.remove(item.file)
            except OSError as exc:  # it is delivered once more after a restart: at least once, never lost
                log.warning("journal_remove_failed", file=str(item.file), error=str(exc))
            item.file = None

    def _dead_letter_unreadable(self, folder: str, reason: str, body: bytes) -> None:
        """A journal file that could not be read, as a dead letter: of its queue (a work queue), of the queue whose
        dead letters it was among, or, from a project's waiting queue (micrographs waiting for a first model),
        of the micrographs queue. ``dlq list`` shows it with the reason; replay sends it back where it can."""
        if folder.endswith(".dlq"):
            source = topology.source_of(folder)
        else:
            source = folder if folder in topology.WORK_QUEUES else topology.MICROGRAPHS
        dlq = topology.dead_letters(source)
        try:
            letter = self._store(dlq, _Item(body, {REASON_HEADER: reason, QUEUE_HEADER: source}))
        except TransientError as exc:
            log.error("dead_letter_not_journaled", queue=source, error=str(exc))
            return
        self._queue(dlq).ready.append(letter)

    def _dead_letter(self, source: str, item: _Item, reason: str, home: _Queue) -> None:
        """Move ``item`` (taken from ``home``, the queue named ``source``) to the dead letters of ``source``."""
        dlq = topology.dead_letters(source)
        headers = {**item.headers, REASON_HEADER: reason, QUEUE_HEADER: source}
        try:
            letter = self._store(dlq, _Item(item.body, headers))
        except TransientError as exc:  # kept where it was: delivered again later rather than lost
            log.error("dead_letter_not_journaled", queue=source, error=str(exc))
            home.ready.append(item)
            self._cond.notify_all()
            return
        self._queue(dlq).ready.append(letter)
        self._forget_item(item)
        self._cond.notify_all()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise TransientError(f"{what}: the in-memory broker is closed")

    # -- Broker ----------------------------------------------------------------------------------------------

    def declare(self) -> None:
        with self._cond:
            for name in topology.WORK_QUEUES:
                self._queue(name)
                self._queue(topology.dead_letters(name))
            self._queue(topology.dead_letters(topology.MODELS))

    def publish(self, queue: str, message: Message, headers: Mapping[str, Any] | None = None) -> None:
        with self._cond:
            self._check_open(f"publish to {queue}")
            item = self._store(queue, _Item(message.body(), check_headers(headers)))
            self._queue(queue).ready.append(item)
            self._cond.notify_all()

    def broadcast(self, message: Message) -> None:
        with self._cond:
            self._check_open("broadcast")
            body = message.body()
            for subscription in self._subscriptions:
                subscription.ready.append(_Item(body, {}))
            self._cond.notify_all()

    def consume(self, queue: str, handler: Handler, prefetch: int = 1) -> Consumer:
        with self._cond:
            self._check_open(f"consume {queue}")
            return self._start(queue, self._queue(queue), handler, prefetch)

    def subscribe(self, handler: Handler) -> Consumer:
        with self._cond:
            self._check_open("subscribe")
            private = _Queue()
            self._subscriptions.append(private)
            return self._start(topology.MODELS, private, handler, 1)

    def _start(self, name: str, queue: _Queue, handler: Handler, prefetch: int) -> _MemoryConsumer:
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        consumer = _MemoryConsumer(self, name, queue, handler, prefetch)
        queue.consumers.append(consumer)
        self._consumers.append(consumer)
        consumer.start()
        return consumer

    def _forget(self, consumer: _MemoryConsumer) -> None:
        """Called by a stopping consumer (holding the lock): the next one of its queue becomes active."""
        consumer.queue.consumers.remove(consumer)
        if consumer.queue in self._subscriptions:
            self._subscriptions.remove(consumer.queue)
        if consumer in self._consumers:
            self._consumers.remove(consumer)
        self._cond.notify_all()

    def depth(self, queue: str) -> int:
        with self._cond:
            found = self._queues.get(queue)
            return 0 if found is None else len(found.ready)

    def peek(self, queue: str, limit: int | None = 100) -> list[Envelope]:
        with self._cond:
            found = self._queues.get(queue)
            items = [] if found is None else list(found.ready)[:limit]
            return [Envelope(queue, item.body, dict(item.headers), item.deliveries) for item in items]

    def move(self, source: str, target: str, limit: int | None = None) -> int:
        with self._cond:
            self._check_open(f"move {source} to {target}")
            found = self._queues.get(source)
            if found is None or source == target:
                return 0
            count = len(found.ready) if limit is None else min(limit, len(found.ready))
            destination = self._queue(target)
            for _ in range(count):
                item = found.ready[0]
                destination.ready.append(self._store(target, _Item(item.body, replay_headers(item.headers))))
                found.ready.popleft()
                self._forget_item(item)
            self._cond.notify_all()
            return count

    def purge(self, queue: str) -> int:
        with self._cond:
            found = self._queues.get(queue)
            if found is None:
                return 0
            count = len(found.ready)
            for item in found.ready:
                self._forget_item(item)
            found.ready.clear()
            return count

    def close(self) -> None:
        with self._cond:
            self._closed = True
            consumers = list(self._consumers)
        for consumer in consumers:
            consumer.stop(CLOSE_TIMEOUT)
        if self.journal is not None:
            with self._cond:
                self.journal.close()

    @property
    def connected(self) -> bool:
        return not self._closed


class _MemoryConsumer(Consumer):
    """``prefetch`` worker threads taking messages from one queue; all state is guarded by the broker's lock."""

    def __init__(self, broker: MemoryBroker, name: str, queue: _Queue, handler: Handler, prefetch: int) -> None:
        self.broker = broker
        self.name = name
        self.queue = queue
        self._handler = handler
        self._cond = broker._cond
        self._stopping = False
        self._stopped = False
        # Messages being handled, by ticket, with the worker handling each; a ticket gone from here was
        # abandoned by ``stop`` (its handler's result is then ignored).
        self._in_hand: dict[int, tuple[_Item, threading.Thread]] = {}
        self._tickets = 0
        self._workers = [
            threading.Thread(target=self._work, name=f"cryomae-memory-{name}-{i}", daemon=True) for i in range(prefetch)
        ]

    def start(self) -> None:
        for worker in self._workers:
            worker.start()

    def _may_take(self) -> bool:
        active = not self.queue.single_active or self.queue.consumers[0] is self
        return active and bool(self.queue.ready)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._may_take():
                    self._cond.wait()
                if self._stopping:
                    return
                item = self.queue.ready.popleft()
                self._tickets += 1
                ticket = self._tickets
                self._in_hand[ticket] = (item, threading.current_thread())
                envelope = Envelope(self.name, item.body, dict(item.headers), item.deliveries)
                item.deliveries += 1
                if item.file is not None and self.broker.journal is not None:
                    try:
                        item.file = self.broker.journal.delivered(item.file, item.deliveries)
                    except OSError as exc:
                        log.warning("journal_delivery_not_counted", file=str(item.file), error=str(exc))
            outcome = judge(self._handler, envelope)
            with self._cond:
                if self._in_hand.pop(ticket, None) is not None:
                    self._settle(item, outcome)
                self._cond.notify_all()

    def _settle(self, item: _Item, outcome: Outcome) -> None:
        if outcome.action == "requeue":
            self.queue.ready.appendleft(item)  # like a RabbitMQ quorum queue: a returned message goes first
        elif outcome.action == "dead_letter":
            self.broker._dead_letter(self.name, item, outcome.reason, self.queue)
        else:
            self.broker._forget_item(item)

    def _abandon(self, item: _Item) -> None:
        """A message whose handler did not finish before ``stop`` gave up: as if its consumer had died."""
        if item.deliveries >= DELIVERY_LIMIT:
            self.broker._dead_letter(
                self.name, item, f"delivery limit reached ({item.deliveries} deliveries)", self.queue
            )
        else:
            self.queue.ready.appendleft(item)

    def stop(self, timeout: float | None = None) -> None:
        """Take no more messages, wait up to ``timeout`` for those in hand, then return any left to the queue.

        A handler still running after ``timeout`` is abandoned: its message is redelivered (or dead-lettered at
        the delivery limit) and the handler's eventual result is ignored. Called from one of this consumer's
        own handlers, it does not wait for that handler, whose message is settled when it returns.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.current_thread()
        with self._cond:
            if self._stopped:
                return
            self._stopping = True
            self._cond.notify_all()
            while others := [ticket for ticket, (_, worker) in self._in_hand.items() if worker is not me]:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            for ticket in others:
                log.warning("handler did not finish before stop; message returned", queue=self.name)
                self._abandon(self._in_hand.pop(ticket)[0])
            self.broker._forget(self)
            self._stopped = True

    @property
    def running(self) -> bool:
        return not self._stopped

    @property
    def connected(self) -> bool:
        """Always true while running: there is no connection to lose."""
        return not self._stopped
