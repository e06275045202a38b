"""Delivery rules, the same for both transports: what becomes of a message after its handler ran (acknowledge,
requeue or dead-letter, ``fate`` and ``judge``), the delivery limit, the dead-letter headers and the reason's
length, and which headers a message may carry. ``cryomae.messaging.memory`` and ``cryomae.messaging.rabbit``
apply them; the services' per-message log line reads ``fate`` too, so the log says what the broker does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import structlog

from cryomae.errors import CryomaeError, TransientError
from cryomae.messages import REASON_CHARS
from cryomae.messaging.base import Envelope, Handler

log = structlog.get_logger("cryomae.messaging")

DELIVERY_LIMIT = 5
REASON_HEADER = "x-cryomae-reason"
QUEUE_HEADER = "x-cryomae-queue"


def shorten(text: str, limit: int = REASON_CHARS) -> str:
    """``text`` when it has at most ``limit`` characters; otherwise its start and its end around a note of the
    original length, ``limit`` characters in all, never fewer than the note (a reason names the file first and
    the problem last)."""
    if len(text) <= limit:
        return text
    note = f" … [{len(text)} characters in all, cut here] … "
    keep = max(0, limit - len(note))
    head, tail = keep - keep // 2, keep // 2
    return text[:head] + note + (text[-tail:] if tail else "")


CLOSE_TIMEOUT = 30.0  # seconds ``close`` lets each consumer finish the message in hand
# Headers that describe an earlier dead-lettering; dropped when a message is moved (replayed).
DEATH_HEADERS = frozenset(
    {
        REASON_HEADER,
        QUEUE_HEADER,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)


Action = Literal["ack", "requeue", "dead_letter"]


def retryable(exc: BaseException) -> bool:
    """A ``TransientError`` or an exception that is not ours is retried; any other ``CryomaeError`` is bad input."""
    return isinstance(exc, TransientError) or not isinstance(exc, CryomaeError)


def fate(exc: BaseException | None, delivery_count: int) -> Action:
    """The rule: no exception, acknowledge; a ``CryomaeError`` that is not a ``TransientError`` (bad input),
    dead-letter now; a ``TransientError`` or any other exception, requeue, unless this was delivery number
    ``DELIVERY_LIMIT`` (``delivery_count`` counts the earlier ones), then dead-letter."""
    if exc is None:
        return "ack"
    if retryable(exc):
        return "dead_letter" if delivery_count + 1 >= DELIVERY_LIMIT else "requeue"
    return "dead_letter"


@dataclass(frozen=True)
class Outcome:
    """What becomes of a delivered message once its handler has run."""

    action: Action
    reason: str = ""


def judge(handler: Handler, envelope: Envelope) -> Outcome:
    """Run ``handler`` and decide the message's fate (``fate``), with the reason: the error's text, ``shorten``-ed,
    and "(gave up after N deliveries)" when a retryable failure reached the delivery limit."""
    try:
        handler(envelope)
    except Exception as exc:
        action = fate(exc, envelope.delivery_count)
        deliveries = envelope.delivery_count + 1
        ours = isinstance(exc, CryomaeError)
        if not ours:  # possibly a bug: the traceback is logged; retried like a transient failure
            log.exception("handler failed unexpectedly", queue=envelope.queue, deliveries=deliveries)
        error = (str(exc) or type(exc).__name__) if ours else f"{type(exc).__name__}: {exc}"
        if action == "requeue":
            log.warning("message requeued", queue=envelope.queue, deliveries=deliveries, error=shorten(error))
            return Outcome("requeue", shorten(error))
        suffix = f" (gave up after {deliveries} deliveries)" if retryable(exc) else ""
        reason = shorten(error, REASON_CHARS - len(suffix)) + suffix
        log.warning("message dead-lettered", queue=envelope.queue, reason=reason)
        return Outcome("dead_letter", reason)
    return Outcome("ack")


_HEADER_TYPES = (str, bytes, int, Decimal, datetime, type(None))  # what AMQP (pika) can carry; bool is an int


def check_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of message headers, refusing values AMQP cannot carry (so both transports accept the same)."""

    def check(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                check(f"{key}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                check(f"{key}[{i}]", v)
        elif not isinstance(value, _HEADER_TYPES):
            raise TypeError(f"header {key!r}: a {type(value).__name__} cannot be sent in AMQP headers (use a string)")

    for key, value in (headers or {}).items():
        check(str(key), value)
    return dict(headers or {})


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers of a moved message: the application's own, without those of an earlier dead-lettering."""
    return {k: v for k, v in headers.items() if k not in DEATH_HEADERS}
