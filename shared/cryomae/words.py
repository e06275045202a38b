"""Words for people: one rule for a count and its noun, so that no output says "1 versions" or "1 messages".

Torch-free and import-free: the CLI, the operator actions and the demo use it in their texts for people (the
``--json`` outputs keep their plain numbers).
"""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` with its noun: ``1 version``, ``0 versions``, ``3 versions``; ``nouns`` for irregular plurals
    (``plural(n, "request is", "requests are")``)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"
