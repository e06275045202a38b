"""The watcher's library: finds complete micrographs in session folders and publishes each exactly once.

``Watcher`` (``cryomae.watching.watcher``) is the whole API a service needs; ``WatchSettings`` configures it.
The pieces: which files count (``candidates``), when a file is complete (``completeness``), the persistent
ledger of published files and watched sessions (``ledger``), the filesystem type and so inotify or polling
(``filesystems``), the inotify watch (``inotify``) and session folders and reports (``sessions``).
"""

from cryomae.config import WatchMode, WatchSettings, WatchTuning
from cryomae.watching.filesystems import Mount, parse_mountinfo, parse_mounts, read_mounts
from cryomae.watching.sessions import SessionInfo, SessionStats, check_folder
from cryomae.watching.watcher import Publish, Watcher

__all__ = [
    "Mount",
    "Publish",
    "SessionInfo",
    "SessionStats",
    "WatchMode",
    "WatchSettings",
    "WatchTuning",
    "Watcher",
    "check_folder",
    "parse_mountinfo",
    "parse_mounts",
    "read_mounts",
]
