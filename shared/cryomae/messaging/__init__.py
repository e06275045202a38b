"""Messaging between the live services: one ``Broker`` interface, two transports, chosen by URL.

``open_broker("memory://")`` gives the in-process transport (everything in one process on a workstation);
``open_broker("amqp://user:password@host:5672/vhost")`` gives RabbitMQ. Semantics in ``cryomae.messaging.base``.
"""

from __future__ import annotations

from cryomae.errors import ConfigError
from cryomae.messaging.base import Broker, Consumer, Envelope

__all__ = ["Broker", "Consumer", "Envelope", "open_broker", "redact_url"]


def redact_url(url: str, mask: str = "***") -> str:
    """The URL with its password replaced by ``mask`` (for logs, error messages and ``cryomae config show``)."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:{mask}@{host}"
    return f"{scheme}{sep}{netloc}{slash}{path}"


def open_broker(url: str, namespace: str = "cryomae", heartbeat: int = 30) -> Broker:
    """The transport for ``url``: ``memory://`` (or empty) in-process, ``amqp://``/``amqps://`` RabbitMQ.

    Nothing connects here; the first operation does. Any other URL raises ConfigError (password hidden).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.strip().lower()
    if scheme in ("", "memory"):
        from cryomae.messaging.memory import MemoryBroker

        return MemoryBroker(namespace)
    if scheme in ("amqp", "amqps"):
        from cryomae.messaging.rabbit import RabbitBroker  # imports pika only when RabbitMQ is used

        return RabbitBroker(url, namespace, heartbeat)
    raise ConfigError(f"broker URL {redact_url(url)!r}: expected memory://, amqp:// or amqps://")
