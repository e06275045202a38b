"""structlog set-up: JSON lines when not on a terminal, readable key=value lines on one, or a log file.

That default is for the long-running processes (``cryomae service``, ``cryomae run``), whose logs a collector
reads. A one-shot command prints its result for a person or a script, so its log lines are readable text
unless JSON is asked for explicitly (``--log-json``, or ``CRYOMAE_LOG_JSON`` true: ``json_asked``).

With ``file`` the log goes to that file instead of stderr (appended, JSON lines unless ``json=False``), rotated
when it reaches ``LOG_FILE_BYTES`` with ``LOG_FILE_BACKUPS`` old files kept (``FILE.1`` newest), so that a
service left running for weeks neither floods a terminal nor fills a disk.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

import structlog
from pydantic import TypeAdapter, ValidationError

LOG_FILE_BYTES = 50 * 1024 * 1024
LOG_FILE_BACKUPS = 5
_FILE_LOGGER = "cryomae.logfile"
_BOOL: TypeAdapter[bool] = TypeAdapter(bool)  # the settings' own reading of a true or false value


def json_asked(flag: bool) -> bool:
    """Whether JSON log lines were asked for explicitly: the ``--log-json`` flag, or ``CRYOMAE_LOG_JSON`` set true
    (read as the settings read it; a value that is neither true nor false asks for nothing)."""
    if flag:
        return True
    try:
        return _BOOL.validate_strings(os.environ.get("CRYOMAE_LOG_JSON", "").strip())
    except ValidationError:
        return False


def _file_logger(path: Path) -> logging.Logger:
    """A standard-library logger that writes each structlog line to a rotating file (one handler, replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(_FILE_LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)  # structlog filters by level before a line gets here
    logger.propagate = False
    return logger


def configure_logging(level: str = "INFO", json: bool | None = None, file: str | Path | None = None) -> None:
    """Configure structlog once in ``main()``; ``json=None`` chooses JSON unless the log goes to a terminal."""
    if file is not None:
        logger = _file_logger(Path(file))
        use_json = True if json is None else json

        def logger_factory(*_args: object) -> logging.Logger:  # every structlog logger writes to the one file
            return logger

    else:
        use_json = (not sys.stderr.isatty()) if json is None else json
        logger_factory = structlog.PrintLoggerFactory(file=sys.stderr)  # type: ignore[assignment]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    # pika logs every connection attempt and heartbeat at INFO through the standard library; its warnings and
    # errors are enough (the broker transport logs reconnects itself)
    logging.getLogger("pika").setLevel(logging.WARNING)
