"""Messages between the live services: versioned, validated pydantic models.

Every message carries ``schema_version``, a unique ``id`` and its ``kind``; unknown fields are rejected, so a
message from a newer or foreign producer fails loudly (and is dead-lettered) instead of being half-read.
``decode`` turns a message body back into the right class from its ``kind``.

Flow (queue names in ``cryomae.messaging.topology``)::

    watcher --MicrographReady--> picker --PicksReady--> writer
                                        --PickFailed--> writer (the micrograph was dead-lettered: its page says so)
    CLI --TrainRequest--> trainer --ModelPublished (broadcast)--> every picker
    CLI --SessionCommand--> watcher           CLI --Rethreshold--> writer

Times are Unix seconds (``time.time()``); paths are absolute strings as the producer saw them.

Sizes are bounded: a body above ``MAX_MESSAGE_BYTES``, or nested deeper than ``MAX_DEPTH`` levels, is refused by
``decode`` before it is parsed (a body of 400 KB of brackets would make the JSON parser raise RecursionError); paths
are at most ``PATH_CHARS`` characters, with no NUL byte, and ids, versions and labels ``TEXT_CHARS``, so that a reason
or a log line quoting a message stays short. Every refusal is an ``InputError``: permanent, dead-lettered at once.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from itertools import accumulate
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from cryomae.errors import InputError

SCHEMA_VERSION: Literal[1] = 1
# Largest message body ``decode`` accepts. A PicksReady of a crowded 8k micrograph, 20,000 candidates, is about
# 1.1 MB (57 bytes per candidate): this admits some 70,000, and stays far below RabbitMQ's own message limit.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Deepest nesting of arrays and objects ``decode`` accepts; the deepest message of this project has 3 levels.
MAX_DEPTH = 32
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, description="project or session name: letters, digits, . _ -")]
# Bounds of the other strings: a path as long as Linux allows (PATH_MAX), an id, version or label far longer than
# any this project makes. With MAX_MESSAGE_BYTES they keep every reason and log line that quotes a field short.
PATH_CHARS = 4096
TEXT_CHARS = 256
Text = Annotated[str, Field(min_length=1, max_length=TEXT_CHARS)]


def _no_nul(value: str) -> str:
    """A path with a NUL byte names no file (the system refuses it): a permanent error, reported by field."""
    if "\x00" in value:
        raise PydanticCustomError("nul_in_path", "NUL byte in a path")
    return value


PathText = Annotated[str, AfterValidator(_no_nul)]
# Longest failure reason, in characters (a dead letter's reason header, a PickFailed's reason): a header must fit
# one AMQP frame (RabbitMQ: 128 KB), and a reason is read by people. Longer ones are cut by
# ``cryomae.messaging.delivery.shorten``, which keeps the start and the end.
REASON_CHARS = 4096


def new_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """Fields every message has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=TEXT_CHARS)
    created: float = Field(default_factory=time.time)

    def body(self) -> bytes:
        """The message as UTF-8 JSON (what goes over the wire)."""
        return self.model_dump_json().encode()


class MicrographReady(Message):
    """A complete micrograph in a watched session folder (watcher -> picker), or a re-pick request."""

    kind: Literal["micrograph_ready"] = "micrograph_ready"
    project: Name
    session: Name
    path: PathText = Field(min_length=1, max_length=PATH_CHARS, description="absolute path of the micrograph")
    size: int = Field(ge=0, description="bytes, when the file was judged complete")
    mtime: float
    complete_at: float = Field(description="when the watcher judged the file complete (latency starts here)")
    repick: bool = Field(False, description="a re-pick of a micrograph seen before (a new model version)")


class PicksReady(Message):
    """Every candidate of one micrograph with its score, and the cutoff (picker -> writer).

    The writer keeps all candidates so that a session can be re-thresholded without re-picking; the picks
    are the candidates with ``score >= threshold``. Coordinates are original micrograph pixels (x = column).
    """

    kind: Literal["picks_ready"] = "picks_ready"
    project: Name
    session: Name
    micrograph: PathText = Field(min_length=1, max_length=PATH_CHARS, description="absolute path of the micrograph")
    micrograph_id: str = Field(max_length=TEXT_CHARS, description="id of the MicrographReady message that was picked")
    model_version: str = Field(max_length=TEXT_CHARS)
    diameter: float = Field(gt=0)
    threshold: float = Field(allow_inf_nan=False, description="the cutoff: a finite score")
    x: list[float]
    y: list[float]
    scores: list[float]
    shape: tuple[int, int] = Field(description="micrograph (rows, columns)")
    complete_at: float
    picked_at: float = Field(default_factory=time.time)
    timings: dict[Text, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_lengths(self) -> PicksReady:
        if not len(self.x) == len(self.y) == len(self.scores):
            raise ValueError(f"x, y and scores differ in length: {len(self.x)}, {len(self.y)}, {len(self.scores)}")
        return self


class PickFailed(Message):
    """A micrograph the picker gave up on: its MicrographReady was dead-lettered with ``reason`` (picker -> writer);
    also one the watcher refused by its name, or saw replaced on disk after it was picked (watcher -> writer).

    Only for the session page (its "failed" count and list); the STAR files do not change. Sent once; a later
    successful pick of the same micrograph (a replay, a re-pick) takes it off the list.
    """

    kind: Literal["pick_failed"] = "pick_failed"
    project: Name
    session: Name
    micrograph: PathText = Field(min_length=1, max_length=PATH_CHARS, description="the micrograph's path as sent")
    micrograph_id: str = Field(max_length=TEXT_CHARS, description="id of the MicrographReady that was dead-lettered")
    reason: str = Field(max_length=REASON_CHARS, description="why: the dead letter's reason")
    failed_at: float = Field(default_factory=time.time)


class TrainRequest(Message):
    """Train a project's model on a stored exemplar set (CLI -> trainer)."""

    kind: Literal["train_request"] = "train_request"
    project: Name
    exemplar_set: str = Field(
        min_length=1, max_length=TEXT_CHARS, description="id of the exemplar set in the project store"
    )
    repick_session: Name | None = Field(
        None, description="once the new version is published, re-pick this session's micrographs with it"
    )


class ModelPublished(Message):
    """A new model version is current for a project (trainer -> every picker, broadcast)."""

    kind: Literal["model_published"] = "model_published"
    project: Name
    version: str = Field(min_length=1, max_length=TEXT_CHARS)


class SessionCommand(Message):
    """Start or stop watching a session folder (CLI -> watcher)."""

    kind: Literal["session_command"] = "session_command"
    action: Literal["start", "stop"]
    project: Name
    session: Name
    folder: PathText = Field("", max_length=PATH_CHARS, description="absolute path of the session folder (start)")
    pattern: str = Field("*.mrc", max_length=TEXT_CHARS, description="glob of micrograph file names")
    recursive: bool = True


class Rethreshold(Message):
    """Change a session's cutoff without re-picking; the writer rewrites its STAR files (CLI -> writer)."""

    kind: Literal["rethreshold"] = "rethreshold"
    project: Name
    session: Name
    threshold: float | None = Field(description="a fixed score cutoff, or None to go back to the picker's own")


class SessionStarted(Message):
    """A session is being watched (watcher -> writer, ahead of its picks on the same queue): the writer makes its
    outputs folder and from then on accepts picks, failures and re-thresholds of it, and of no session it was not
    told of."""

    kind: Literal["session_started"] = "session_started"
    project: Name
    session: Name
    folder: PathText = Field(min_length=1, max_length=PATH_CHARS, description="absolute path of the session folder")


AnyMessage = Annotated[
    MicrographReady
    | PicksReady
    | PickFailed
    | TrainRequest
    | ModelPublished
    | SessionCommand
    | Rethreshold
    | SessionStarted,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)


# A JSON string: from its quote to the closing one, or to the end of the body when it is not closed (so that the
# pattern always matches where it starts, and stripping the strings stays linear whatever the body).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\[\s\S][^"\\]*+)*+"?')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def nesting_depth(body: bytes) -> int:
    """How deep the arrays and objects of a JSON body nest (brackets inside strings do not count), in linear time and
    without recursion: what ``decode`` checks before the parser, which recurses, sees the body."""
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def _refused(source: str, problem: str) -> InputError:
    """The InputError of a body ``decode`` refuses: ``source: problem``, or the problem alone without a source."""
    return InputError(None, f"{source}: {problem}" if source else problem)


def decode(body: bytes | str, source: str = "message") -> Message:
    """Parse and validate a message body; InputError names what is wrong (for the dead-letter reason), after
    ``source`` (none when empty).

    A body above ``MAX_MESSAGE_BYTES`` or nested deeper than ``MAX_DEPTH`` levels is refused before it is parsed;
    a field the model refuses is named in the reason (``path: NUL byte in a path``). Whatever the body, the only
    exception is InputError, which is permanent (``cryomae.messaging.delivery.fate``)."""
    raw = body.encode(errors="surrogatepass") if isinstance(body, str) else bytes(body)
    if len(raw) > MAX_MESSAGE_BYTES:
        raise _refused(source, f"message body of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    if nesting_depth(raw) > MAX_DEPTH:
        raise _refused(source, f"message nested deeper than {MAX_DEPTH} levels")
    try:
        data = json.loads(body)
    except ValueError as exc:  # not JSON, not UTF-8, or a number of more than 4300 digits
        raise _refused(source, f"not JSON ({exc})") from None
    except RecursionError:  # not reached after the depth check; kept so that no body can make decode fail otherwise
        raise _refused(source, f"message nested deeper than {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise _refused(source, f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise _refused(source, f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        message: Message = _ADAPTER.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise _refused(source, f"invalid message ({problems})") from None
    return message


def valid_name(value: str) -> bool:
    """Whether a project or session name is acceptable (also used by the CLI before sending)."""
    return re.fullmatch(NAME_PATTERN, value) is not None


def check_name(value: str, what: str) -> str:
    """``value`` when it is a valid name (``NAME_PATTERN``: names become folder names), else an InputError naming
    ``what`` ("project name", "session name", ...) and the rule."""
    if not valid_name(value):
        rule = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        raise InputError(None, f"invalid {what} {value!r}: use {rule}")
    return value
