"""The in-memory broker's journal: what a stopped (or killed) process had queued or in hand is there again at
the next start, with its delivery count; what was acknowledged, dead-lettered elsewhere or purged is not."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from cryomae.errors import ConfigError, InputError
from cryomae.messages import MicrographReady, decode
from cryomae.messaging import topology as t
from cryomae.messaging.base import Envelope
from cryomae.messaging.delivery import DELIVERY_LIMIT, REASON_HEADER
from cryomae.messaging.journal import Journal
from cryomae.messaging.memory import MemoryBroker
from tests.messaging.conftest import Recorder, micrograph, wait_until


def _broker(folder: Path) -> MemoryBroker:
    broker = MemoryBroker("journal-test", Journal(folder))
    broker.declare()
    return broker


def _holding(event: threading.Event) -> Callable[[Envelope], None]:
    """A handler that keeps its message in hand until ``event`` is set (a process that dies meanwhile)."""

    def handle(envelope: Envelope) -> None:
        event.wait(30)

    return handle


def micrograph_of(envelope: Envelope) -> str:
    message = decode(envelope.body)
    assert isinstance(message, MicrographReady)
    return message.path


def _paths(envelopes: list[Envelope]) -> list[str]:
    return [e.body.decode().split('"path":"')[1].split('"')[0] for e in envelopes]


def test_queued_messages_and_headers_survive_a_restart_in_order(tmp_path: Path) -> None:
    first = _broker(tmp_path)
    headers = {
        "x-note": "kept",
        "x-bytes": b"\x00\x01",
        "x-number": Decimal("1.5"),
        "x-when": datetime(2026, 1, 2, tzinfo=UTC),
        "x-nested": {"a": [1, "b"]},
    }
    for i in range(3):
        first.publish(t.MICROGRAPHS, micrograph(i), headers if i == 0 else None)
    first.close()

    second = _broker(tmp_path)
    assert second.restored == {t.MICROGRAPHS: 3}
    (head, *_) = second.peek(t.MICROGRAPHS)
    assert dict(head.headers) == headers
    got = Recorder()
    consumer = second.consume(t.MICROGRAPHS, got)
    assert _paths(got.wait(3)) == [micrograph(i).path for i in range(3)]
    consumer.stop(5)
    second.close()
    assert _broker(tmp_path).restored == {}  # acknowledged: gone for good


def test_a_message_in_hand_when_the_process_stops_is_delivered_again_with_its_count(tmp_path: Path) -> None:
    first = _broker(tmp_path)
    first.publish(t.TRAINING, micrograph(0))
    release = threading.Event()
    got = Recorder(_holding(release))
    first.consume(t.TRAINING, got)
    got.wait(1)
    # the process dies with the message in hand: nothing is acknowledged (the handler never returns)
    assert first.journal is not None
    first.journal.close()

    second = _broker(tmp_path)
    assert second.restored == {t.TRAINING: 1}
    again = Recorder()
    consumer = second.consume(t.TRAINING, again)
    (envelope,) = again.wait(1)
    assert envelope.delivery_count == 1  # its first delivery counted, as RabbitMQ counts a redelivery
    consumer.stop(5)
    release.set()
    second.close()


def test_a_message_that_kills_its_process_every_time_reaches_the_delivery_limit(tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    broker.publish(t.MICROGRAPHS, micrograph(0))
    hold = threading.Event()
    for _ in range(DELIVERY_LIMIT):
        got = Recorder(_holding(hold))
        broker.consume(t.MICROGRAPHS, got)
        got.wait(1)
        assert broker.journal is not None
        broker.journal.close()  # killed with the message in hand
        broker = _broker(tmp_path)
    letters = Recorder()
    broker.consume(t.dead_letters(t.MICROGRAPHS), letters)
    broker.consume(t.MICROGRAPHS, Recorder())
    (letter,) = letters.wait(1)
    assert "delivery limit" in str(letter.headers[REASON_HEADER])
    hold.set()
    broker.close()


def test_dead_letters_moves_and_purges_last_across_restarts(tmp_path: Path) -> None:
    broker = _broker(tmp_path)

    def refuse(env: Envelope) -> None:
        raise InputError(None, "not a micrograph")

    consumer = broker.consume(t.MICROGRAPHS, refuse)
    for i in range(3):
        broker.publish(t.MICROGRAPHS, micrograph(i))
    dlq = t.dead_letters(t.MICROGRAPHS)
    wait_until(lambda: broker.depth(dlq) == 3, what="3 dead letters")
    consumer.stop(5)
    broker.close()

    broker = _broker(tmp_path)
    assert broker.restored == {dlq: 3}
    assert "not a micrograph" in str(broker.peek(dlq)[0].headers[REASON_HEADER])
    assert broker.move(dlq, t.MICROGRAPHS, 1) == 1
    broker.close()

    broker = _broker(tmp_path)
    assert broker.restored == {dlq: 2, t.MICROGRAPHS: 1}
    assert REASON_HEADER not in broker.peek(t.MICROGRAPHS)[0].headers  # replayed without its old reason
    assert broker.purge(dlq) == 2
    broker.close()

    assert _broker(tmp_path).restored == {t.MICROGRAPHS: 1}  # the purge lasted


def test_one_process_per_journal(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    with pytest.raises(ConfigError, match="in use by another"):
        Journal(tmp_path)
    first.close()
    Journal(tmp_path).close()


def test_an_unreadable_journal_file_is_set_aside_not_fatal(tmp_path: Path) -> None:
    broker = _broker(tmp_path)
    broker.publish(t.MICROGRAPHS, micrograph(0))
    broker.publish(t.MICROGRAPHS, micrograph(1))
    broker.close()
    first = sorted((tmp_path / t.MICROGRAPHS).glob("*.msg"))[0]
    first.write_text("{ torn")
    again = _broker(tmp_path)
    assert again.restored == {t.MICROGRAPHS: 1}
    assert first.with_name(first.name + ".bad").is_file()
    assert _paths(again.peek(t.MICROGRAPHS)) == [micrograph(1).path]
    # not silently: a dead letter of its queue says which file and why, with what was left of it
    (letter,) = again.peek(t.dead_letters(t.MICROGRAPHS))
    reason = str(letter.headers[REASON_HEADER])
    assert str(first) in reason and "could not be read" in reason and first.name + ".bad" in reason, reason
    assert letter.body == b"{ torn"
    again.close()
    third = _broker(tmp_path)  # set aside once: not dead-lettered again at the next start
    assert third.depth(t.dead_letters(t.MICROGRAPHS)) == 1
    third.close()


@pytest.mark.parametrize(
    ("folder", "dlq"),
    [
        (t.MICROGRAPHS, t.dead_letters(t.MICROGRAPHS)),
        (t.waiting("proj"), t.dead_letters(t.MICROGRAPHS)),  # micrographs waiting for a first model
        (t.dead_letters(t.PICKS), t.dead_letters(t.PICKS)),  # a dead letter stays one
    ],
)
def test_a_torn_journal_file_gives_back_its_message_as_a_dead_letter_that_replays(
    tmp_path: Path, folder: str, dlq: str
) -> None:
    """Torn after its body (the headers lost): the message is recovered whole, dead-lettered with the reason, and
    `dlq replay` sends it back to be handled."""
    broker = _broker(tmp_path)
    sent = micrograph(3)
    broker.publish(folder, sent)
    broker.close()
    (path,) = (tmp_path / folder).glob("*.msg")
    text = path.read_text()
    path.write_text(text[: text.index('"headers"') + 12])
    again = _broker(tmp_path)
    if folder != dlq:
        assert again.depth(folder) == 0
    (letter,) = again.peek(dlq)
    assert micrograph_of(letter) == sent.path  # the message itself, recovered from the torn file
    assert str(path) in str(letter.headers[REASON_HEADER])
    assert again.move(dlq, t.source_of(dlq)) == 1
    assert _paths(again.peek(t.source_of(dlq))) == [sent.path]
    again.close()
