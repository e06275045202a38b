"""A corpus of bad files and bad messages thrown at the running services over the real RabbitMQ.

Each kind ends one of three ways, and the test checks which: **dead-lettered** at its first delivery with a
reason that names the problem, **picked** (a good input in an unusual form), or **refused at the door** (the
operator's command fails with a message and sends nothing). Between kinds nothing restarts; at the end every
service is still healthy and a good micrograph sent last is picked.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cryomae.errors import CryomaeError
from cryomae.io import read_micrograph, write_mrc
from cryomae.messages import Message, PickFailed, PicksReady, Rethreshold, SessionCommand, TrainRequest
from cryomae.messaging import topology
from cryomae.messaging.delivery import REASON_HEADER
from cryomae.operator import actions as ops
from cryomae.operator.control import Control
from cryomae.service.app import App
from cryomae.store.projects import ProjectStore
from tests.live.conftest import (
    PROJECT,
    RABBIT,
    SESSION,
    Live,
    publish_raw,
    ready,
    running,
    start_session,
    train_first_model,
    wait_until,
)


@dataclass(frozen=True)
class Ctx:
    live: Live
    app: App
    control: Control
    folder: Path  # inside a data root, not watched
    outside: Path  # not under any data root
    version: str  # the project's model version


@dataclass(frozen=True)
class Case:
    """One kind of bad input: ``send`` delivers it (or tries to) and returns the body it sent, if any."""

    name: str
    outcome: str  # dead, picked or refused
    queue: str  # where it goes (its dead letters are in queue.dlq)
    words: str  # what the reason (or the refusal) must say
    send: Callable[[Ctx], bytes | None]


def _now() -> float:
    return time.time()


def _publish(ctx: Ctx, queue: str, message: Message) -> bytes:
    ctx.control.send(queue, message)
    return message.body()


def _fields(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "schema_version": 1,
        "id": uuid.uuid4().hex,
        "created": _now(),
        "kind": "micrograph_ready",
        "project": PROJECT,
        "session": SESSION,
        "path": "/nowhere/x.mrc",
        "size": 1,
        "mtime": _now(),
        "complete_at": _now(),
    }
    fields.update(changes)
    return fields


def _file(ctx: Ctx, name: str, write: Callable[[Path], object]) -> bytes:
    """Write a bad file inside the data root and ask the picker for it."""
    path = ctx.folder / name
    write(path)
    return _publish(ctx, topology.MICROGRAPHS, ready(path))


def _good_image(ctx: Ctx) -> np.ndarray:
    return read_micrograph(ctx.live.dataset.micrographs[3]).data


def _header(nx: int, ny: int, nz: int, mode: int, stamp: bytes = b"\x44\x44\x00\x00", tag: bytes = b"MAP ") -> bytes:
    header = bytearray(1024)
    struct.pack_into("<10i", header, 0, nx, ny, nz, mode, 0, 0, 0, nx, ny, nz)
    struct.pack_into("<3i", header, 64, 1, 2, 3)
    header[208:212] = tag
    header[212:216] = stamp
    return bytes(header)


def _sparse(path: Path, header: bytes, data_bytes: int) -> None:
    """A header followed by a hole of ``data_bytes`` (no disk, no memory)."""
    path.write_bytes(header)
    os.truncate(path, len(header) + data_bytes)


def _mrc_bytes(ctx: Ctx) -> bytes:
    return ctx.live.dataset.micrographs[3].read_bytes()


def _picks(ctx: Ctx, **changes: object) -> PicksReady:
    mic = str(ctx.live.dataset.micrographs[3].resolve())
    fields: dict[str, object] = {
        "project": PROJECT,
        "session": SESSION,
        "micrograph": mic,
        "micrograph_id": uuid.uuid4().hex,
        "model_version": ctx.version,
        "diameter": 24.0,
        "threshold": 0.5,
        "x": [10.0],
        "y": [10.0],
        "scores": [0.9],
        "shape": (256, 256),
        "complete_at": _now(),
    }
    fields.update(changes)
    return PicksReady(**fields)


def _symlink_out(ctx: Ctx) -> bytes:
    target = ctx.outside / "secret.mrc"
    target.write_bytes(_mrc_bytes(ctx))
    link = ctx.folder / "link_out.mrc"
    link.symlink_to(target)
    return _publish(ctx, topology.MICROGRAPHS, ready(link))


class _RefusedError(Exception):
    """How a refused case reports its message to the runner."""


def _outside_copy(ctx: Ctx) -> Path:
    """A good micrograph, but not under any data root."""
    path = ctx.outside / "x.mrc"
    path.write_bytes(_mrc_bytes(ctx))
    return path


def _refused(action: Callable[[Ctx], object]) -> Callable[[Ctx], bytes | None]:
    def send(ctx: Ctx) -> bytes | None:
        try:
            action(ctx)
        except (CryomaeError, ValueError) as exc:
            raise _RefusedError(str(exc)) from None
        pytest.fail("the bad request was accepted")

    return send


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (its pixels never follow): a decompression bomb's shape."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))


def _raw_picks(c: Ctx, **changes: object) -> bytes:
    """A picks body with fields set after validation (what a foreign producer could send)."""
    body = json.loads(_picks(c).body())
    body.update(changes)
    return publish_raw(c.live, P, json.dumps(body).encode())


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _raw(c: Ctx, queue: str, body: bytes) -> bytes:
    return publish_raw(c.live, queue, body)


M, P, T, W = topology.MICROGRAPHS, topology.PICKS, topology.TRAINING, topology.WATCHER

FILE_CASES = [
    # ---------------------------------------------------------------------------------------- bad files
    Case(
        "truncated MRC",
        "dead",
        M,
        "truncated MRC file",
        lambda c: _file(c, "truncated.mrc", lambda p: p.write_bytes(_mrc_bytes(c)[:-5000])),
    ),
    Case(
        "text file named .mrc",
        "dead",
        M,
        "not an MRC file",
        lambda c: _file(c, "text.mrc", lambda p: p.write_text("a log file, not a micrograph\n" * 60)),
    ),
    Case("empty file", "dead", M, "file is empty", lambda c: _file(c, "empty.mrc", lambda p: p.write_bytes(b""))),
    Case(
        "NaN pixels",
        "dead",
        M,
        "NaN",
        lambda c: _file(
            c, "nan.mrc", lambda p: write_mrc(p, np.full((128, 128), np.nan, np.float32), dtype=np.float32)
        ),
    ),
    Case(
        "infinite pixels",
        "dead",
        M,
        "infinite",
        lambda c: _file(
            c,
            "inf.mrc",
            lambda p: write_mrc(p, np.where(np.eye(128) > 0, np.inf, 1.0).astype(np.float32), dtype=np.float32),
        ),
    ),
    Case(
        "constant image",
        "dead",
        M,
        "constant",
        lambda c: _file(c, "constant.mrc", lambda p: write_mrc(p, np.ones((128, 128), np.float32), dtype=np.float32)),
    ),
    Case(
        "stack of images",
        "dead",
        M,
        "stack",
        lambda c: _file(c, "stack.mrc", lambda p: p.write_bytes(_header(64, 64, 3, 2) + bytes(64 * 64 * 3 * 4))),
    ),
    Case(
        "complex MRC mode",
        "dead",
        M,
        "unsupported MRC mode 4",
        lambda c: _file(c, "complex.mrc", lambda p: p.write_bytes(_header(64, 64, 1, 4) + bytes(64 * 64 * 8))),
    ),
    Case(
        "unknown machine stamp",
        "dead",
        M,
        "machine stamp",
        lambda c: _file(
            c, "stamp.mrc", lambda p: p.write_bytes(_header(64, 64, 1, 2, stamp=b"\x99\x99\0\0") + bytes(64 * 64 * 4))
        ),
    ),
    Case(
        "longer than its header",
        "dead",
        M,
        "longer than its header",
        lambda c: _file(c, "long.mrc", lambda p: p.write_bytes(_mrc_bytes(c) + bytes(4096))),
    ),
    Case(
        "smaller than one window",
        "dead",
        M,
        "smaller than one picking window",
        lambda c: _file(
            c,
            "tiny.mrc",
            lambda p: write_mrc(p, np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), dtype=np.float32),
        ),
    ),
    Case(
        "header of 100000 x 100000 px",
        "dead",
        M,
        "exceeds the limit",
        lambda c: _file(c, "huge.mrc", lambda p: _sparse(p, _header(100_000, 100_000, 1, 0), 10**10)),
    ),
    Case(
        "unsupported file type",
        "dead",
        M,
        "unsupported micrograph file type",
        lambda c: _file(c, "notes.txt", lambda p: p.write_text("hello")),
    ),
    Case(
        "corrupt JPEG",
        "dead",
        M,
        "cannot decode image",
        lambda c: _file(c, "broken.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + b"junk" * 100)),
    ),
    Case(
        "corrupt TIFF",
        "dead",
        M,
        "TIFF",
        lambda c: _file(c, "broken.tif", lambda p: p.write_bytes(b"II*\x00" + b"\xff" * 200)),
    ),
    Case("a folder named .mrc", "dead", M, "not a regular file", lambda c: _file(c, "folder.mrc", lambda p: p.mkdir())),
    Case("missing file", "dead", M, "file not found", lambda c: _publish(c, M, ready(c.folder / "never_written.mrc"))),
    Case(
        "path outside the data roots",
        "dead",
        M,
        "outside the configured data roots",
        lambda c: _publish(c, M, ready(_outside_copy(c))),
    ),
    Case("symlink out of the data roots", "dead", M, "outside the configured data roots", _symlink_out),
    Case("relative path", "dead", M, "not absolute", lambda c: _publish(c, M, ready("data/sess/mic.mrc"))),
    Case(
        "/etc/shadow as a micrograph",
        "dead",
        M,
        "outside the configured data roots",
        lambda c: _publish(c, M, ready("/etc/shadow")),
    ),
    # issue 25: more kinds of file
    Case(
        "an extended header of 1 GB",
        "dead",
        M,
        "extended header of 1073741824 bytes",
        lambda c: _file(
            c,
            "ext.mrc",
            lambda p: p.write_bytes(
                _header(64, 64, 1, 2)[:92] + struct.pack("<i", 1 << 30) + _header(64, 64, 1, 2)[96:]
            ),
        ),
    ),
    Case(
        "a header of 0 sections",
        "dead",
        M,
        "0 sections",
        lambda c: _file(c, "nz0.mrc", lambda p: p.write_bytes(_header(64, 64, 0, 2))),
    ),
    Case(
        "a header 0 pixels wide",
        "dead",
        M,
        "image is empty",
        lambda c: _file(c, "nx0.mrc", lambda p: p.write_bytes(_header(0, 64, 1, 2))),
    ),
    Case(
        "a negative size",
        "dead",
        M,
        "negative size",
        lambda c: _file(c, "negative.mrc", lambda p: p.write_bytes(_header(-64, 64, 1, 2) + bytes(4096))),
    ),
    Case(
        "complex int16 MRC mode",
        "dead",
        M,
        "unsupported MRC mode 3",
        lambda c: _file(c, "mode3.mrc", lambda p: p.write_bytes(_header(64, 64, 1, 3) + bytes(64 * 64 * 4))),
    ),
    Case(
        "4-bit packed MRC mode",
        "dead",
        M,
        "unsupported MRC mode 101",
        lambda c: _file(c, "mode101.mrc", lambda p: p.write_bytes(_header(64, 64, 1, 101) + bytes(64 * 32))),
    ),
    Case(
        "shorter than an MRC header",
        "dead",
        M,
        "shorter than the 1024-byte MRC header",
        lambda c: _file(c, "short.mrc", lambda p: p.write_bytes(_mrc_bytes(c)[:600])),
    ),
    Case(
        "no MAP tag, right length",
        "dead",
        M,
        "no 'MAP' identifier",
        lambda c: _file(
            c, "nomap.mrc", lambda p: p.write_bytes(_header(64, 64, 1, 2, tag=b"XXXX") + bytes(64 * 64 * 4))
        ),
    ),
    Case(
        "a constant 16-bit PNG",
        "dead",
        M,
        "constant",
        lambda c: _file(c, "flat.png", lambda p: Image.fromarray(np.full((128, 128), 7, np.uint16)).save(p)),
    ),
    Case(
        "a TIFF stack of 3 images",
        "dead",
        M,
        "stack of 3 images",
        lambda c: _file(
            c, "stack.tif", lambda p: tifffile.imwrite(p, np.ones((3, 64, 64), np.float32), photometric="minisblack")
        ),
    ),
    Case(
        "a TIFF with NaN pixels",
        "dead",
        M,
        "NaN",
        lambda c: _file(c, "nan.tif", lambda p: tifffile.imwrite(p, np.full((64, 64), np.nan, np.float32))),
    ),
    Case(
        "a PNG header of 100000 x 100000 px",
        "dead",
        M,
        "exceeds the limit",
        lambda c: _file(c, "bomb.png", lambda p: _png_header_only(p, 100_000, 100_000)),
    ),
    Case(
        "one row of pixels",
        "dead",
        M,
        "smaller than one picking window",
        lambda c: _file(
            c,
            "row.mrc",
            lambda p: write_mrc(
                p, np.random.default_rng(1).normal(size=(1, 4096)).astype(np.float32), dtype=np.float32
            ),
        ),
    ),
    Case(
        "a named pipe named .mrc",
        "dead",
        M,
        "not a regular file",
        lambda c: _file(c, "fifo.mrc", lambda p: os.mkfifo(p)),
    ),
    Case(
        "a dangling symlink",
        "dead",
        M,
        "file not found",
        lambda c: _file(c, "dangling.mrc", lambda p: p.symlink_to(c.folder / "never_there.mrc")),
    ),
    Case(
        "a symlink to /dev/zero",
        "dead",
        M,
        "outside the configured data roots",
        lambda c: _file(c, "zero.mrc", lambda p: p.symlink_to("/dev/zero")),
    ),
]

MESSAGE_CASES = [
    # ---------------------------------------------------------------------------------------- bad messages
    Case("not JSON", "dead", M, "not JSON", lambda c: publish_raw(c.live, M, b"\x00\x01 not json {")),
    Case("a JSON array", "dead", M, "expected a JSON object", lambda c: publish_raw(c.live, M, b"[1, 2, 3]")),
    Case(
        "unknown schema version",
        "dead",
        M,
        "schema_version 99",
        lambda c: publish_raw(c.live, M, json.dumps(_fields(schema_version=99)).encode()),
    ),
    Case(
        "unknown kind",
        "dead",
        M,
        "invalid message",
        lambda c: publish_raw(c.live, M, json.dumps(_fields(kind="pwn")).encode()),
    ),
    Case(
        "an extra field",
        "dead",
        M,
        "Extra inputs are not permitted",
        lambda c: publish_raw(c.live, M, json.dumps(_fields(shell="rm -rf /")).encode()),
    ),
    Case(
        "a hostile project name",
        "dead",
        M,
        "project",
        lambda c: publish_raw(c.live, M, json.dumps(_fields(project="../../etc")).encode()),
    ),
    Case(
        "a 10 MB string",
        "dead",
        M,
        "exceeds the",
        lambda c: publish_raw(c.live, M, json.dumps(_fields(path="/data/" + "x" * 10_000_000)).encode()),
    ),
    Case(
        "wrong kind for the queue",
        "dead",
        M,
        "is not micrograph_ready",
        lambda c: _publish(c, M, TrainRequest(project=PROJECT, exemplar_set="x")),
    ),
    Case(
        "picks naming /etc/shadow",
        "dead",
        P,
        "/etc/shadow",
        lambda c: _publish(c, P, _picks(c, micrograph="/etc/shadow")),
    ),
    Case("picks of an unknown project", "dead", P, "ghost", lambda c: _publish(c, P, _picks(c, project="ghost"))),
    Case(
        "picks of an unknown model version",
        "dead",
        P,
        "v9999",
        lambda c: _publish(c, P, _picks(c, model_version="v9999-forged")),
    ),
    Case(
        "picks with mismatched lengths",
        "dead",
        P,
        "differ in length",
        lambda c: publish_raw(c.live, P, _picks(c).body().replace(b'"x":[10.0]', b'"x":[10.0,11.0]')),
    ),
    Case(
        "training of an unknown exemplar set",
        "dead",
        T,
        "no exemplar set",
        lambda c: _publish(c, T, TrainRequest(project=PROJECT, exemplar_set="20200101T000000Z-ffffff")),
    ),
    Case(
        "training of an unknown project",
        "dead",
        T,
        "no project 'ghost'",
        lambda c: _publish(c, T, TrainRequest(project="ghost", exemplar_set="x")),
    ),
    Case(
        "watching a folder outside the roots",
        "dead",
        W,
        "outside",
        lambda c: _publish(
            c, W, SessionCommand(action="start", project=PROJECT, session="evil", folder=str(c.outside))
        ),
    ),
    Case(
        "re-threshold of a session that has no outputs",
        "dead",
        P,
        "no outputs",
        lambda c: _publish(c, P, Rethreshold(project=PROJECT, session="never", threshold=0.5)),
    ),
    # issue 25: more kinds of message
    Case("an empty body", "dead", M, "not JSON", lambda c: _raw(c, M, b"")),
    Case("a JSON string", "dead", M, "expected a JSON object", lambda c: _raw(c, M, b'"hello"')),
    Case(
        "nested 40 levels deep",
        "dead",
        M,
        "nested deeper than",
        lambda c: _raw(c, M, json.dumps(_fields(path=_nested(40))).encode()),
    ),
    Case(
        "a NUL byte in the path",
        "dead",
        M,
        "NUL byte",
        lambda c: _raw(c, M, json.dumps(_fields(path="/data/sess/a\u0000b.mrc")).encode()),
    ),
    Case(
        "a NaN literal",
        "dead",
        M,
        "finite number",
        lambda c: _raw(c, M, json.dumps(_fields()).replace('"size": 1', '"size": NaN').encode()),
    ),
    Case(
        "a negative file size in the message",
        "dead",
        M,
        "size",
        lambda c: _raw(c, M, json.dumps(_fields(size=-5)).encode()),
    ),
    Case(
        "a missing field",
        "dead",
        M,
        "Field required",
        lambda c: _raw(c, M, json.dumps({k: v for k, v in _fields().items() if k != "path"}).encode()),
    ),
    Case(
        "a 300-character project name",
        "dead",
        M,
        "project",
        lambda c: _raw(c, M, json.dumps(_fields(project="p" * 300)).encode()),
    ),
    Case(
        "picks with a negative shape",
        "dead",
        P,
        "the message says the micrograph is 256x-256 px",
        lambda c: _raw_picks(c, shape=[-256, 256]),
    ),
    Case(
        "picks outside the micrograph",
        "dead",
        P,
        "outside",
        lambda c: _publish(c, P, _picks(c, x=[5000.0], y=[10.0])),
    ),
    Case(
        "picks claiming a 1e12 px micrograph",
        "dead",
        P,
        "the file is 256x256 px",
        lambda c: _publish(c, P, _picks(c, shape=(10**12, 10**12), x=[9e11], y=[9e11])),
    ),
    Case(
        "picks picked a year ahead",
        "dead",
        P,
        "in the future",
        lambda c: _publish(c, P, _picks(c, picked_at=_now() + 365 * 86400)),
    ),
    Case(
        "picks with a quote in the model version",
        "dead",
        P,
        "not a published version",
        lambda c: _publish(c, P, _picks(c, model_version='v0001"x')),
    ),
    Case(
        "picks of a session never started",
        "dead",
        P,
        "session proj/nosuch was never started",
        lambda c: _publish(c, P, _picks(c, session="nosuch")),
    ),
    Case(
        "a failure note naming /etc/shadow",
        "dead",
        P,
        "outside the configured data roots",
        lambda c: _publish(
            c, P, PickFailed(project=PROJECT, session=SESSION, micrograph="/etc/shadow", micrograph_id="x", reason="x")
        ),
    ),
    Case(
        "a session command that is neither start nor stop",
        "dead",
        W,
        "action",
        lambda c: _raw(
            c,
            W,
            json.dumps(
                {
                    "schema_version": 1,
                    "id": uuid.uuid4().hex,
                    "created": _now(),
                    "kind": "session_command",
                    "action": "explode",
                    "project": PROJECT,
                    "session": "s",
                    "folder": str(c.folder),
                }
            ).encode(),
        ),
    ),
    Case(
        "a session start for no project",
        "dead",
        W,
        "no project 'ghost'",
        lambda c: _publish(c, W, SessionCommand(action="start", project="ghost", session="s", folder=str(c.folder))),
    ),
    Case(
        "a training request naming ../../etc",
        "dead",
        T,
        "invalid exemplar set id '../../etc'",
        lambda c: _raw(
            c,
            T,
            json.dumps(
                {
                    "schema_version": 1,
                    "id": uuid.uuid4().hex,
                    "created": _now(),
                    "kind": "train_request",
                    "project": PROJECT,
                    "exemplar_set": "../../etc",
                }
            ).encode(),
        ),
    ),
]

PICKED_AND_REFUSED = [
    # ---------------------------------------------------------------------------------------- picked
    Case(
        "an int16 MRC",
        "picked",
        M,
        "",
        lambda c: _file(
            c, "good_int16.mrc", lambda p: write_mrc(p, np.clip(_good_image(c) * 1000, -30000, 30000), dtype=np.int16)
        ),
    ),
    Case(
        "a 16-bit PNG",
        "picked",
        M,
        "",
        lambda c: _file(
            c,
            "good.png",
            lambda p: Image.fromarray(
                np.clip((_good_image(c) - _good_image(c).min()) * 3000, 0, 65535).astype(np.uint16)
            ).save(p),
        ),
    ),
    Case(
        "a float32 TIFF",
        "picked",
        M,
        "",
        lambda c: _file(c, "good.tif", lambda p: tifffile.imwrite(p, _good_image(c).astype(np.float32))),
    ),
    # ---------------------------------------------------------------------------------------- refused at the door
    Case(
        "a session folder outside the roots",
        "refused",
        W,
        "outside",
        _refused(lambda c: ops.session_start(c.live.settings(), c.control, PROJECT, "evil", c.outside, "*.mrc", True)),
    ),
    Case(
        "exemplars on a micrograph outside the roots",
        "refused",
        T,
        "outside",
        _refused(
            lambda c: ops.exemplars_add(
                c.live.settings(),
                c.control,
                PROJECT,
                _outside_copy(c),
                c.live.dataset.exemplars(c.live.root / "ex.star"),
                None,
            )
        ),
    ),
    Case(
        "an invalid session name",
        "refused",
        P,
        "invalid session name",
        _refused(lambda c: ops.session_rethreshold(c.live.settings(), c.control, PROJECT, "../x", 0.5)),
    ),
]
CASES = FILE_CASES + MESSAGE_CASES + PICKED_AND_REFUSED
# the picked ones are files in unusual forms; the refused ones, a file and two requests
FILES = len(FILE_CASES) + sum(c.outcome == "picked" for c in PICKED_AND_REFUSED) + 1
MESSAGES = len(MESSAGE_CASES) + 2


def test_the_corpus_has_at_least_40_kinds_of_file_and_35_of_message() -> None:
    assert FILES >= 40 and MESSAGES >= 35, (FILES, MESSAGES)
    assert {c.outcome for c in CASES} == {"dead", "picked", "refused"}
    assert len({c.name for c in CASES}) == len(CASES)


def _letter(ctx: Ctx, queue: str, body: bytes) -> str | None:
    """The reason of the dead letter with this body in ``queue``'s dead letters, if it is there."""
    for env in ctx.app.broker.peek(topology.dead_letters(queue), 200):
        if env.body == body:
            return str(env.headers.get(REASON_HEADER, ""))
    return None


def _picked_more(live: Live, picked: int) -> Callable[[], bool]:
    return lambda: live.picked() > picked


def _wait_for_letter(ctx: Ctx, queue: str, body: bytes, what: str) -> str:
    """The reason of the dead letter with this body, once it is there. Waiting for this body, not for one more
    dead letter: on RabbitMQ a count can be off for a moment, because a peek hands its messages back only when
    its channel has closed."""
    found: list[str] = []

    def there() -> bool:
        reason = _letter(ctx, queue, body)
        if reason is not None:
            found.append(reason)
        return reason is not None

    wait_until(there, what=what, timeout=60)
    return found[0]


@pytest.mark.parametrize("transport", RABBIT)
def test_every_kind_of_bad_input_ends_dead_lettered_picked_or_refused(live: Live) -> None:
    live.create_project()
    live.session_folder.mkdir(parents=True)
    outside = live.root / "outside"
    outside.mkdir()
    folder = live.data / "poison"
    folder.mkdir(parents=True)
    with running(live, live.settings()) as (app, control):
        start_session(live, control)
        version = train_first_model(live, control)
        ctx = Ctx(live, app, control, folder, outside, version)
        outcomes: dict[str, str] = {}
        for case in CASES:
            picked = live.picked()
            if case.outcome == "refused":
                with pytest.raises(_RefusedError) as refusal:
                    case.send(ctx)
                assert case.words in str(refusal.value), (case.name, str(refusal.value))
                assert all(app.broker.depth(q) == 0 for q in topology.WORK_QUEUES), case.name  # nothing sent
                outcomes[case.name] = "refused"
                continue
            body = case.send(ctx)
            assert body is not None
            if case.outcome == "picked":
                wait_until(_picked_more(live, picked), what=f"{case.name} picked", timeout=60)
                outcomes[case.name] = "picked"
                continue
            reason = _wait_for_letter(ctx, case.queue, body, f"{case.name} dead-lettered")
            assert case.words in reason, (case.name, reason)
            assert "gave up" not in reason and len(reason) < 5000, (case.name, reason[:300])  # first delivery, short
            outcomes[case.name] = "dead"
            app.check()  # every service still running
        assert outcomes == {c.name: c.outcome for c in CASES}
        # still healthy: every readiness check holds and a good micrograph sent last is picked
        health = app.ready()
        assert all(all(v for v in checks.values()) for checks in health.values()), health
        last = live.drop(5).resolve()
        picked = live.picked()
        control.send(topology.MICROGRAPHS, ready(last))
        wait_until(lambda: live.picked() == picked + 1, what="the good micrograph sent last")
        # nothing was written for the unknown project or the forged session
        assert not (live.root / "outputs" / "ghost").exists()
        assert not (live.root / "outputs" / PROJECT / "never").exists()
        assert not ProjectStore(live.root / "store").get_project(PROJECT).path.joinpath("..", "ghost").exists()
