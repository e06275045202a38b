"""Choosing a transport from a URL."""

from __future__ import annotations

import pytest

from cryomae.errors import ConfigError
from cryomae.messaging import open_broker, redact_url
from cryomae.messaging.memory import MemoryBroker
from cryomae.messaging.rabbit import RabbitBroker


@pytest.mark.parametrize("url", ["memory://", "", "MEMORY://"])
def test_memory_urls(url: str) -> None:
    broker = open_broker(url, namespace="site-a")
    assert isinstance(broker, MemoryBroker)
    assert broker.namespace == "site-a"


@pytest.mark.parametrize("url", ["amqp://guest:guest@rabbit:5672/%2F", "amqps://user@rabbit.example.org/cryo"])
def test_amqp_urls_give_rabbitmq_without_connecting(url: str) -> None:
    broker = open_broker(url, namespace="site-a", heartbeat=10)
    assert isinstance(broker, RabbitBroker)
    assert (broker.url, broker.namespace, broker.heartbeat) == (url, "site-a", 10)
    broker.close()


@pytest.mark.parametrize("url", ["redis://admin:hunter2@cache:6379/0", "admin:hunter2@rabbit:5672", "rabbit"])
def test_other_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match="expected memory://, amqp:// or amqps://") as error:
        open_broker(url)
    assert "hunter2" not in str(error.value)
    assert redact_url(url) in str(error.value)


def test_redact_url() -> None:
    assert redact_url("amqp://guest:guest@127.0.0.1:5672/%2F") == "amqp://guest:***@127.0.0.1:5672/%2F"
    assert redact_url("amqp://guest@host/v") == "amqp://guest@host/v"
    assert redact_url("memory://") == "memory://"
