"""Hostile message bodies and hostile names (issue 25, items 2 and 13).

- Every message body is decoded with bounds (``cryomae.messages.decode``): a body nested deeper than
  ``MAX_DEPTH`` levels (400 KB of brackets would make the JSON parser raise RecursionError), a number the JSON
  parser refuses, or a path with a NUL byte is an InputError naming the problem (the field, for a path), so that
  it is dead-lettered at its first delivery instead of retried.
- ``cryomae status`` and ``cryomae dlq list`` never fail on such a dead letter: it is listed with why it does not
  decode (``undecodable``), and the listing goes on.
- Every name and reason those commands print for people is escaped (``cryomae.words.escaped``): no control
  character or escape sequence reaches the terminal; ``--json`` keeps the raw values.

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cryomae.errors import InputError
from cryomae.messages import MAX_DEPTH, MicrographReady, SessionCommand, decode, nesting_depth
from cryomae.messaging import Broker, Envelope, topology
from cryomae.messaging.delivery import REASON_HEADER, judge
from cryomae.operator import actions as ops
from cryomae.service.handling import expect
from cryomae.words import escaped
from tests.live.conftest import (
    MICS_DLQ,
    PROJECT,
    RABBIT,
    SESSION,
    Live,
    publish_raw,
    raw_micrograph_ready,
    ready,
    running,
    wait_until,
)
from tests.live.test_cli_ops import cli_many, ok, ok_json

NESTED = b"[" * 200_000 + b"]" * 200_000  # 400 KB of brackets
HOSTILE_NAME = "/nowhere/\x1b[31mred\nline\x9b2J.mrc"  # ESC sequence, newline, an 8-bit CSI


# ------------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[{{{{"}', 1),  # brackets inside a string do not count
        (b'{"a": "\\"[[[[", "b": "\\\\"}', 1),  # nor after an escaped quote; an escaped backslash ends no string
        (b'{"a": "[[[[', 1),  # an unclosed string runs to the end
        (NESTED, 200_000),
        (b"[" * 40, 40),
    ],
)
def test_nesting_depth(body: bytes, depth: int) -> None:
    assert nesting_depth(body) == depth


def test_nesting_depth_is_linear_on_bodies_of_many_unclosed_strings() -> None:
    # each quote opens a string that an escaped quote never closes: a pattern that failed on an unclosed string
    # would try again at every quote (quadratic); this one matches to the end once
    assert nesting_depth(b'["' + b'\\"' * 1_000_000) == 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (NESTED, f"message nested deeper than {MAX_DEPTH} levels"),
        (b'{"a":' * 100_000, f"message nested deeper than {MAX_DEPTH} levels"),
        (b"[" * (MAX_DEPTH + 1), f"message nested deeper than {MAX_DEPTH} levels"),
        (b'{"schema_version": 1, "n": ' + b"9" * 5000 + b"}", "not JSON"),  # more digits than Python converts
        (raw_micrograph_ready("/data/a\x00.mrc"), "path: NUL byte in a path"),
        (
            SessionCommand(action="start", project="p", session="s", folder="/data")
            .body()
            .replace(b"/data", b"/d\\u0000"),
            "folder: NUL byte in a path",
        ),
    ],
    ids=["400 KB of brackets", "unclosed objects", "one level too deep", "5000 digits", "NUL in path", "NUL in folder"],
)
def test_hostile_bodies_are_input_errors_dead_lettered_at_the_first_delivery(body: bytes, words: str) -> None:
    with pytest.raises(InputError, match=words) as refused:
        decode(body, source="message on micrographs")
    assert str(refused.value).startswith("message on micrographs: ")

    def handler(env: Envelope) -> None:
        expect(env, (MicrographReady,))

    outcome = judge(handler, Envelope(topology.MICROGRAPHS, body, {}, 0))
    assert outcome.action == "dead_letter" and words in outcome.reason and "gave up" not in outcome.reason
    with pytest.raises(InputError, match=words) as bare:  # no source: the problem alone (as dlq list shows it)
        decode(body, source="")
    assert not str(bare.value).startswith("message on")


def test_a_path_with_a_nul_byte_is_refused_when_built_too() -> None:
    with pytest.raises(ValueError, match="NUL byte in a path"):
        ready("/data/a\x00b.mrc")
    assert decode(ready("/data/\x1b[31m\n.mrc").body()).path == "/data/\x1b[31m\n.mrc"  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ escaping


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/data/plain name-1.mrc", "/data/plain name-1.mrc"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        ("\x00\x7f\x9b", "\\x00\\x7f\\x9b"),
        ("abc\u202etxt.mrc", "abc\\u202etxt.mrc"),  # a right-to-left override
        ("\udcff.mrc", "\\udcff.mrc"),  # a file name that is not UTF-8 (surrogate escape)
        ("C:\\data\\é.mrc", "C:\\data\\é.mrc"),  # backslashes and letters unchanged
    ],
)
def test_escaped(text: str, shown: str) -> None:
    assert escaped(text) == shown


def _unsafe(text: str) -> list[str]:
    """Characters of ``text`` that a terminal would act on, except the newlines between lines."""
    return [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F)]


def test_dlq_list_text_escapes_names_and_reasons_and_json_keeps_them() -> None:
    hostile = Envelope(
        MICS_DLQ, ready(HOSTILE_NAME).body(), {REASON_HEADER: f"{HOSTILE_NAME}: file not found\x1b]0;pwned\x07"}, 0
    )
    deep = Envelope(MICS_DLQ, NESTED, {REASON_HEADER: "message on micrographs: message nested deeper"}, 0)
    data: ops.DeadLetters = {
        "queue": MICS_DLQ,
        "running": True,
        "depth": 2,
        "messages": [ops.describe_dead_letter(hostile), ops.describe_dead_letter(deep)],
    }
    text = ops.format_dead_letters(data)
    assert not _unsafe(text), text
    assert len(text.splitlines()) == 1 + 2 + 3, text  # a newline in a name does not start a line
    assert "/nowhere/\\x1b[31mred\\nline\\x9b2J.mrc" in text and "\\x1b]0;pwned\\x07" in text
    assert f"undecodable: message nested deeper than {MAX_DEPTH} levels" in text
    assert json.loads(ops.dumps(data))["messages"][0]["path"] == HOSTILE_NAME  # --json: the raw name


def test_status_text_escapes_incomplete_file_names() -> None:
    session: dict[str, Any] = {
        "project": PROJECT,
        "session": SESSION,
        "folder": "/data",
        "watched": True,
        "seen": 1,
        "picked": 0,
        "failed": 0,
        "particles": 0,
        "threshold": None,
        "last_seen_at": None,
        "incomplete": 1,
        "incomplete_files": [{"path": "/data/\x1b[2Jx\n.mrc", "since": 0.0, "problem": "size \x1b[0m"}],
    }
    data: dict[str, Any] = {
        "broker": "amqp://",
        "mode": "rabbitmq",
        "running": True,
        "queues": {},
        "state": "/state",
        "store": "/store",
        "trainers": [],
        "projects": [],
        "sessions": [session],
    }
    text = ops.format_status(data)  # type: ignore[arg-type]
    assert not _unsafe(text) and "/data/\\x1b[2Jx\\n.mrc: incomplete since" in text and "size \\x1b[0m" in text


# ------------------------------------------------------------------------------------------------ live


def _reason(broker: Broker, body: bytes) -> str | None:
    """The reason of the dead letter with this body in the micrographs' dead letters, if it is there."""
    for env in broker.peek(MICS_DLQ, 100):
        if env.body == body:
            return str(env.headers.get(REASON_HEADER, ""))
    return None


@pytest.mark.parametrize("transport", RABBIT)
def test_hostile_dead_letters_refused_at_once_and_listed_by_status_and_dlq_list(live: Live) -> None:
    live.create_project()
    (live.root / "outputs" / PROJECT / SESSION).mkdir(parents=True)  # the session status reports on
    with running(live, live.settings(), ["picker"]) as (app, control):
        nul = raw_micrograph_ready(str(live.data / "a\x00b.mrc"))
        named = ready(HOSTILE_NAME).body()
        publish_raw(live, topology.MICROGRAPHS, NESTED)
        publish_raw(live, topology.MICROGRAPHS, nul)
        publish_raw(live, topology.MICROGRAPHS, named)  # decodes; outside the data roots
        reasons: dict[bytes, str] = {}

        def all_dead() -> bool:
            for body in (NESTED, nul, named):
                if body not in reasons and (reason := _reason(app.broker, body)) is not None:
                    reasons[body] = reason
            return len(reasons) == 3

        wait_until(all_dead, what="three dead letters", timeout=60)
        assert f"message nested deeper than {MAX_DEPTH} levels" in reasons[NESTED], reasons[NESTED][:300]
        assert "path: NUL byte in a path" in reasons[nul], reasons[nul]
        assert "outside the configured data roots" in reasons[named], reasons[named]
        for reason in reasons.values():
            assert "gave up" not in reason and len(reason) < 5000  # the first delivery, short
        app.check()  # every service still running

        listed = ops.dlq_list(control, topology.MICROGRAPHS)
        rows = {m.get("path") or m.get("body", "")[:1]: m for m in listed["messages"]}
        assert rows[HOSTILE_NAME]["kind"] == "micrograph_ready"
        assert rows["["]["undecodable"] == f"message nested deeper than {MAX_DEPTH} levels"
        assert rows["{"]["undecodable"] == "invalid message (micrograph_ready.path: NUL byte in a path)"
        assert "\\x1b[31mred\\nline" in ops.format_dead_letters(listed)
        report = ops.status(live.settings(), control)
        (row,) = [s for s in report["sessions"] if (s["project"], s["session"]) == (PROJECT, SESSION)]
        assert row["failed"] == 1  # the one that decodes; the others are listed by dlq list
        assert ops.format_status(report)

        text, as_json, status = cli_many(live, ["dlq", "list"], ["dlq", "list", "--json"], ["status"])
        shown = ok(text).stdout
        assert not _unsafe(shown), shown
        assert "/nowhere/\\x1b[31mred\\nline\\x9b2J.mrc" in shown, shown
        assert f"undecodable: message nested deeper than {MAX_DEPTH} levels" in shown, shown
        assert "undecodable: invalid message (micrograph_ready.path: NUL byte in a path)" in shown, shown
        assert HOSTILE_NAME in [m.get("path") for m in ok_json(as_json)["messages"]]
        assert f"{PROJECT}/{SESSION}" in ok(status).stdout
