"""The project's error hierarchy.

``InputError`` is permanent: the input itself is wrong (a corrupt micrograph, a coordinate outside the
image) and retrying cannot help; services dead-letter it with the message as the reason. ``TransientError``
may succeed on retry (a file still being written, a broker hiccup).
"""

from __future__ import annotations

from pathlib import Path


class CryomaeError(Exception):
    """Base class of every error this project raises on purpose."""


class InputError(CryomaeError):
    """A bad input file or value; the message names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)

    def located(self, path: str | Path) -> InputError:
        """This error, naming ``path`` when it names no file yet (a library error whose caller knows the file)."""
        return self if self.path is not None else InputError(path, self.problem)


class ConfigError(CryomaeError):
    """An invalid combination of settings or options."""


class CheckpointError(CryomaeError):
    """A model directory that is missing, incomplete or fails its checksum."""


class TransientError(CryomaeError):
    """A failure that may succeed when retried."""
