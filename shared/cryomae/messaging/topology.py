"""Queue and exchange names: one place, shared by every service, the CLI and both transports.

Names here are logical; a transport prefixes each with its namespace (``<namespace>.<name>``, namespace
``cryomae`` by default), so that two installations, or parallel test runs, can share one RabbitMQ.
"""

from __future__ import annotations

MICROGRAPHS = "micrographs"  # MicrographReady: watcher (and CLI re-pick) -> picker
PICKS = "picks"  # PicksReady and Rethreshold -> writer (single active consumer: ordered writes)
TRAINING = "training"  # TrainRequest: CLI -> trainer
WATCHER = "watcher"  # SessionCommand: CLI -> watcher (single active consumer)
MODELS = "models"  # fanout exchange: ModelPublished -> every picker

SERVICES = ("writer", "trainer", "picker", "watcher")  # the live services, in start order (downstream first)

WORK_QUEUES = (MICROGRAPHS, PICKS, TRAINING, WATCHER)
SINGLE_ACTIVE = frozenset({PICKS, WATCHER})


def dead_letters(queue: str) -> str:
    """The dead-letter queue of a work queue."""
    return f"{queue}.dlq"


def waiting(project: str) -> str:
    """Where micrographs of a project that has no model yet wait (declared when first used)."""
    return f"waiting.{project}"


def source_of(dlq: str) -> str:
    """The work queue a dead-letter queue belongs to."""
    if not dlq.endswith(".dlq"):
        raise ValueError(f"{dlq!r} is not a dead-letter queue")
    return dlq[: -len(".dlq")]
