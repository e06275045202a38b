"""An inotify watch on one session folder (watchdog), forwarding the paths that may have changed.

Only events that can mean "a file arrived or grew" are asked for: created, modified, closed after writing, moved
(the destination: a rename into place), and folders created or moved in (listed for what they hold). Reading a
file (the watcher's own header checks, the picker) produces none of these, so checks cannot feed back into events.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
    FileSystemMovedEvent,
)
from watchdog.observers.api import BaseObserver

EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]
ObserverFactory = Callable[[], BaseObserver]


class _Forwarder(FileSystemEventHandler):
    """Calls ``on_file`` or ``on_folder`` with the path an event leaves behind."""

    def __init__(self, on_file: Callable[[Path], None], on_folder: Callable[[Path], None]) -> None:
        self._on_file = on_file
        self._on_folder = on_folder

    def dispatch(self, event: FileSystemEvent) -> None:
        raw = event.dest_path if isinstance(event, FileSystemMovedEvent) else event.src_path
        path = Path(os.fsdecode(raw))
        if isinstance(event, DirCreatedEvent | DirMovedEvent):
            self._on_folder(path)
        elif not event.is_directory:
            self._on_file(path)


def watch_folder(
    folder: Path,
    recursive: bool,
    on_file: Callable[[Path], None],
    on_folder: Callable[[Path], None],
    observer_factory: ObserverFactory,
) -> BaseObserver:
    """Start an observer with one watch on ``folder``; OSError when the watch cannot be created (e.g. the
    inotify watch limit), with nothing left running."""
    observer = observer_factory()
    observer.start()  # started first, so that a failing watch raises here rather than on its own thread
    try:
        observer.schedule(_Forwarder(on_file, on_folder), str(folder), recursive=recursive, event_filter=EVENTS)
    except BaseException:
        stop_observer(observer)
        raise
    return observer


def stop_observer(observer: BaseObserver, timeout: float = 5.0) -> None:
    """Stop an observer and wait for its threads."""
    observer.stop()
    if observer.is_alive():
        observer.join(timeout)
