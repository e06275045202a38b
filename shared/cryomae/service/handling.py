"""What every handler shares: decoding with a clear reason, one log line per message (the data-root rule is in
``cryomae.io.roots``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from cryomae.errors import InputError
from cryomae.messages import Message, decode
from cryomae.messaging.base import Envelope
from cryomae.messaging.delivery import fate, shorten
from cryomae.service import metrics

M = TypeVar("M", bound=Message)
LOG_FIELD_CHARS = 4096  # longest text field of the per-message log line (``shorten``)


def expect(env: Envelope, kinds: tuple[type[M], ...]) -> M:
    """Decode a delivery and check its kind; InputError (dead-letter) otherwise."""
    message = decode(env.body, source=f"message on {env.queue}")
    if not isinstance(message, kinds):
        names = ", ".join(k.model_fields["kind"].default for k in kinds)
        raise InputError(None, f"message on {env.queue}: kind {getattr(message, 'kind', '?')!r} is not {names}")
    return message


def outcome_of(exc: BaseException | None, delivery_count: int = 0) -> str:
    """The outcome word of the canonical log line: the broker's decision (``messaging.delivery.fate``) in the
    log's words (ok, retry, dead_letter)."""
    return {"ack": "ok", "requeue": "retry", "dead_letter": "dead_letter"}[fate(exc, delivery_count)]


@dataclass
class Handled(Generic[M]):
    """What a handler works with inside ``handling``: the decoded message, its bound logger, the log fields."""

    message: M
    log: Any
    fields: dict[str, Any]


@contextmanager
def handling(log: Any, env: Envelope, kinds: tuple[type[M], ...]) -> Iterator[Handled[M]]:
    """Decode a delivery and handle it with one JSON log line (ids, duration, outcome and what the handler adds
    to ``fields``) and the message metrics (``cryomae.service.metrics``). A body that does not decode is logged
    and counted too (and dead-lettered by the broker). Text fields longer than ``LOG_FIELD_CHARS`` are cut."""
    fields: dict[str, Any] = {"queue": env.queue, "delivery": env.delivery_count}
    t0 = time.perf_counter()
    bound = log
    try:
        message = expect(env, kinds)
        bound = bind(log, message, env.queue)
        yield Handled(message, bound, fields)
    except BaseException as exc:
        fields["outcome"] = outcome_of(exc, env.delivery_count)
        fields["error"] = str(exc)
        bound.warning("message", duration_s=round(time.perf_counter() - t0, 4), **_bounded(fields))
        count(env.queue, fields["outcome"])
        raise
    fields.setdefault("outcome", "ok")
    bound.info("message", duration_s=round(time.perf_counter() - t0, 4), **_bounded(fields))
    count(env.queue, fields["outcome"])


def _bounded(fields: dict[str, Any]) -> dict[str, Any]:
    """The log fields with every text longer than ``LOG_FIELD_CHARS`` cut (``shorten``)."""
    return {k: shorten(v, LOG_FIELD_CHARS) if isinstance(v, str) else v for k, v in fields.items()}


def count(queue: str, outcome: str) -> None:
    """Count a handled message (and a dead letter) for the metrics."""
    metrics.MESSAGES_HANDLED.labels(queue, outcome).inc()
    if outcome == "dead_letter":
        metrics.DEAD_LETTERED.labels(queue).inc()


def bind(log: Any, message: Message, queue: str | None = None) -> Any:
    """The logger with the message's ids bound (and, given the queue, its wait in the queue observed)."""
    if queue is not None:
        metrics.QUEUE_WAIT.labels(queue).observe(max(0.0, time.time() - message.created))
    ctx = {"message_id": message.id, "kind": getattr(message, "kind", None)}
    for key in ("project", "session"):
        if hasattr(message, key):
            ctx[key] = getattr(message, key)
    return log.bind(**ctx)


def pid_running(pid: Any) -> bool:
    """Whether a process of this machine runs with that pid; True when it cannot tell (no pid, another user's)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def get_logger(name: str) -> Any:
    return structlog.get_logger(f"cryomae.{name}")
