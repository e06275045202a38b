"""What every handler shares: decoding with a clear reason, the data-root check, one log line per message."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import structlog

from cryomae.errors import CryomaeError, InputError, TransientError
from cryomae.messages import Message, decode
from cryomae.messaging.base import Envelope

M = TypeVar("M", bound=Message)


def expect(env: Envelope, kinds: tuple[type[M], ...]) -> M:
    """Decode a delivery and check its kind; InputError (dead-letter) otherwise."""
    message = decode(env.body, source=f"message on {env.queue}")
    if not isinstance(message, kinds):
        names = ", ".join(k.model_fields["kind"].default for k in kinds)
        raise InputError(None, f"message on {env.queue}: kind {getattr(message, 'kind', '?')!r} is not {names}")
    return message


def inside_roots(path: str, roots: Sequence[Path]) -> Path:
    """The resolved path, if it lies under one of the data roots; InputError naming it otherwise."""
    p = Path(path)
    if not p.is_absolute():
        raise InputError(path, "micrograph path is not absolute")
    resolved = p.resolve()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise InputError(path, f"outside the configured data roots ({', '.join(str(r) for r in roots)})")
    return resolved


def outcome_of(exc: BaseException | None) -> str:
    """The outcome word of the canonical log line; mirrors the broker's decision (messaging.base)."""
    if exc is None:
        return "ok"
    if isinstance(exc, TransientError) or not isinstance(exc, CryomaeError):
        return "retry"
    return "dead_letter"


@contextmanager
def handling(log: Any, env: Envelope, **context: Any) -> Iterator[dict[str, Any]]:
    """One JSON line per handled message with its ids, duration and outcome (the handler adds to the dict)."""
    fields: dict[str, Any] = {"queue": env.queue, "delivery": env.delivery_count, **context}
    t0 = time.perf_counter()
    try:
        yield fields
    except BaseException as exc:
        fields["outcome"] = outcome_of(exc)
        fields["error"] = str(exc)
        log.warning("message", duration_s=round(time.perf_counter() - t0, 4), **fields)
        raise
    fields.setdefault("outcome", "ok")
    log.info("message", duration_s=round(time.perf_counter() - t0, 4), **fields)


def bind(log: Any, message: Message) -> Any:
    """The logger with the message's ids bound."""
    ctx = {"message_id": message.id, "kind": getattr(message, "kind", None)}
    for key in ("project", "session"):
        if hasattr(message, key):
            ctx[key] = getattr(message, key)
    return log.bind(**ctx)


def get_logger(name: str) -> Any:
    return structlog.get_logger(f"cryomae.{name}")
