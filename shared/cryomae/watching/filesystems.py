"""Which filesystem a folder is on, and whether inotify can see changes there.

inotify reports changes made through this machine's kernel only: on NFS, SMB, cluster filesystems and most
FUSE filesystems a micrograph written by another machine (the motion-correction host) produces no event, so the
watcher must poll there. The mount table comes from ``/proc/self/mountinfo`` (``/proc/mounts`` as a fallback);
the parsers take text so that tests can feed a fake table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Network, cluster and host-shared filesystems on which inotify misses changes made elsewhere.
POLL_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "smb",
        "9p",
        "ceph",
        "lustre",
        "gpfs",
        "beegfs",
        "glusterfs",
        "afs",
        "panfs",
        "wekafs",
        "orangefs",
        "pvfs2",
        "ocfs2",
        "gfs2",
        "virtiofs",
        "vboxsf",
        "davfs",
        "fuse",
    }
)
# FUSE filesystems backed by a local block device: inotify works for them.
LOCAL_FUSE = frozenset({"fuseblk", "fuse.fuse-overlayfs"})

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    """One entry of the mount table: where it is mounted and its filesystem type (e.g. ``nfs4``)."""

    mount_point: PurePosixPath
    fs_type: str


def _unescape(field: str) -> str:
    """Undo the kernel's octal escapes in mount points (``\\040`` for a space)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/<pid>/mountinfo``: field 5 is the mount point, the type follows the ``-`` separator."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue  # not a mountinfo line
        if separator + 1 < len(fields):
            mounts.append(Mount(PurePosixPath(_unescape(fields[4])), fields[separator + 1]))
    return mounts


def parse_mounts(text: str) -> list[Mount]:
    """Parse ``/proc/mounts`` (fstab format: source, mount point, type, options, ...)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(PurePosixPath(_unescape(fields[1])), fields[2]))
    return mounts


def read_mounts() -> list[Mount]:
    """This process's mount table; empty when neither proc file can be read (not Linux)."""
    for source, parse in (("/proc/self/mountinfo", parse_mountinfo), ("/proc/mounts", parse_mounts)):
        try:
            text = Path(source).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            continue
        return parse(text)
    return []


def mount_of(path: Path, mounts: Sequence[Mount]) -> Mount | None:
    """The mount holding ``path`` (absolute, resolved): the deepest mount point above it, the last one mounted
    when several share that point (a later mount hides an earlier one)."""
    target = PurePosixPath(path)
    best: Mount | None = None
    for mount in mounts:
        if target.is_relative_to(mount.mount_point) and (
            best is None or len(mount.mount_point.parts) >= len(best.mount_point.parts)
        ):
            best = mount
    return best


def needs_polling(fs_type: str) -> bool:
    """Whether inotify may miss changes on this filesystem type (network, cluster, host-shared or FUSE)."""
    if fs_type in LOCAL_FUSE:
        return False
    return fs_type in POLL_FILESYSTEMS or fs_type.startswith("fuse.")
