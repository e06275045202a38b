"""Words for people: one rule for a count and its noun, so that no output says "1 versions" or "1 messages".

Torch-free and free of the project's imports: the CLI, the operator actions and the demo use it in their texts for
people (the ``--json`` outputs keep their plain numbers and the raw names). ``escaped`` shows a name from outside
(a file name, a dead letter's reason) without letting its control characters reach the terminal.
"""

from __future__ import annotations

import re

# What a terminal would act on or a reader not see: C0 controls and DEL, C1 controls (ESC's 8-bit twin, CSI,
# among them), lone surrogates (a file name that is not UTF-8: printing one fails), the line and paragraph
# separators, and the invisible format characters that reorder or hide text (bidirectional overrides, zero width).
_UNSHOWABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escaped(text: object) -> str:
    """``text`` for a terminal: every control or invisible character as a visible escape, as Python writes it
    (``\\x1b``, ``\\n``, ``\\u202e``); the rest, backslashes included, unchanged."""
    return _UNSHOWABLE.sub(_escape, str(text))


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` with its noun: ``1 version``, ``0 versions``, ``3 versions``; ``nouns`` for irregular plurals
    (``plural(n, "request is", "requests are")``)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def time_left(seconds: float) -> str:
    """An estimate of the time left, rounded as a person would say it: ``about 40 s left``, ``about 3 min left``,
    ``about 1 h 20 min left``."""
    s = max(0.0, seconds)
    if s < 57.5:  # to the nearest 5 s
        return f"about {max(5, round(s / 5) * 5)} s left"
    if s < 3570:  # to the nearest minute
        return f"about {max(1, round(s / 60))} min left"
    hours, minutes = divmod(round(s / 60), 60)
    return f"about {hours} h {minutes} min left" if minutes else f"about {hours} h left"


def training_progress(training: dict[str, object]) -> str:
    """A training's progress from its status (``training.json``): the stage and step, and the time left when the
    trainer estimated it (``pretrain 96/320, about 2 min left``); empty before the first step."""
    progress = str(training.get("progress") or "")
    eta = training.get("eta_s")
    if progress and isinstance(eta, int | float):
        return f"{progress}, {time_left(float(eta))}"
    return progress
