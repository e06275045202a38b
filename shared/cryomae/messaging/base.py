"""The broker interface every service is written against, with two transports behind it.

``RabbitBroker`` (``cryomae.messaging.rabbit``) talks AMQP 0-9-1 to RabbitMQ through pika; ``MemoryBroker``
(``cryomae.messaging.memory``) is the single-workstation transport: the same queues, the same delivery,
retry and dead-letter semantics, inside one process. ``open_broker(url)`` picks one from a URL.

Delivery semantics (both transports):

- ``publish`` is persistent and confirmed: when it returns, the broker has the message. A failure to
  publish raises ``TransientError``.
- A consumer's handler runs on a worker thread (never on the connection's thread, so heartbeats go on
  during long work). The message is acknowledged only after the handler returns normally, i.e. after the
  work is done and its result published.
- The exception decides what happens otherwise: ``InputError`` (or any ``CryomaeError`` that is not a
  ``TransientError``): the message is dead-lettered at once with the error text as the reason.
  ``TransientError`` or any other exception: the message is returned to its queue and redelivered, at most
  ``DELIVERY_LIMIT`` deliveries in all; after that it is dead-lettered with the last error as the reason.
  A process that dies mid-message (kill -9) leaves the message unacknowledged: it is redelivered, and the
  delivery limit also bounds a message that kills its consumer every time.
- Queue names given to a broker are the logical names of ``cryomae.messaging.topology``; the transport
  prefixes them with its namespace.
- A dead-lettered message keeps its body; the reason is in the ``x-cryomae-reason`` header, the queue it came
  from in ``x-cryomae-queue``. A reason longer than ``REASON_CHARS`` is cut in the middle (``shorten``).

The rules themselves (``fate``, ``judge``, the limit, the headers) are written once, in
``cryomae.messaging.delivery``, and both transports apply them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryomae.messages import Message


@dataclass(frozen=True)
class Envelope:
    """One delivered message as the handler sees it."""

    queue: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    delivery_count: int = 0  # earlier deliveries of this message (0 on the first)


Handler = Callable[[Envelope], None]


class Consumer(abc.ABC):
    """A running subscription; ``stop`` lets the message in hand finish (and be acked) before returning."""

    @abc.abstractmethod
    def stop(self, timeout: float | None = None) -> None: ...

    @property
    @abc.abstractmethod
    def running(self) -> bool: ...


class Broker(abc.ABC):
    """Queues, publishing and consuming, independent of the transport."""

    @abc.abstractmethod
    def declare(self) -> None:
        """Declare the topology (``cryomae.messaging.topology``); idempotent, safe at every start."""

    @abc.abstractmethod
    def publish(self, queue: str, message: Message, headers: Mapping[str, Any] | None = None) -> None:
        """Send a persistent message to a work queue and wait for the broker's confirm."""

    @abc.abstractmethod
    def broadcast(self, message: Message) -> None:
        """Send a message to every current subscriber of the broadcast (new model versions)."""

    @abc.abstractmethod
    def consume(self, queue: str, handler: Handler, prefetch: int = 1) -> Consumer:
        """Start consuming a work queue in the background with the semantics in the module docstring."""

    @abc.abstractmethod
    def subscribe(self, handler: Handler) -> Consumer:
        """Receive every broadcast from now on (a private queue per subscriber)."""

    @abc.abstractmethod
    def depth(self, queue: str) -> int:
        """Messages ready in a queue (not counting those being worked on)."""

    @abc.abstractmethod
    def peek(self, queue: str, limit: int | None = 100) -> list[Envelope]:
        """Up to ``limit`` messages of a queue (every one when None), left in the queue (for listing dead letters)."""

    @abc.abstractmethod
    def move(self, source: str, target: str, limit: int | None = None) -> int:
        """Move messages from one queue to another (publish confirmed, then ack); returns how many moved.

        Used to replay dead letters and to release micrographs parked until a project has a model.
        """

    @abc.abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every ready message of a queue; returns how many."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether the transport is up (readiness)."""
