"""Filesystem type lookup from mount tables, and which types the watcher polls."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from cryomae.watching.filesystems import Mount, mount_of, needs_polling, parse_mountinfo, parse_mounts, read_mounts

MOUNTINFO = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
30 22 0:40 / /data rw,relatime shared:7 - nfs4 server:/export/data rw,vers=4.2
31 30 0:41 / /data/local rw,relatime shared:8 master:2 - xfs /dev/sdb1 rw
32 22 0:42 / /mnt/my\\040share rw - cifs //nas/share rw
33 22 0:43 / /scratch rw - tmpfs tmpfs rw
34 22 0:44 / /scratch rw - fuse.sshfs user@host:/x rw
"""


def test_mountinfo_fields_and_escapes():
    mounts = parse_mountinfo(MOUNTINFO + "a line that is not mountinfo\n")
    assert [m.fs_type for m in mounts] == ["ext4", "nfs4", "xfs", "cifs", "tmpfs", "fuse.sshfs"]
    assert mounts[2].mount_point == PurePosixPath("/data/local")  # optional fields before "-" skipped
    assert mounts[3].mount_point == PurePosixPath("/mnt/my share")  # \040 is a space


@pytest.mark.parametrize(
    ("path", "fs_type"),
    [
        ("/data/session1/mics", "nfs4"),
        ("/data/local/x", "xfs"),  # the deeper mount wins
        ("/datafiles", "ext4"),  # a prefix of the name is not a parent folder
        ("/mnt/my share/grid1", "cifs"),
        ("/scratch/a", "fuse.sshfs"),  # the later of two mounts on one point hides the earlier
        ("/", "ext4"),
    ],
)
def test_mount_of_a_path(path: str, fs_type: str):
    mount = mount_of(Path(path), parse_mountinfo(MOUNTINFO))
    assert mount is not None
    assert mount.fs_type == fs_type


def test_no_mount_table_means_unknown():
    assert mount_of(Path("/data"), []) is None


def test_proc_mounts_format():
    text = "server:/export /data nfs rw,vers=3 0 0\n/dev/vda / ext4 rw 0 0\n"
    assert parse_mounts(text) == [Mount(PurePosixPath("/data"), "nfs"), Mount(PurePosixPath("/"), "ext4")]


@pytest.mark.parametrize(
    "fs_type", ["nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "ceph", "lustre", "gpfs", "beegfs", "fuse"]
)
def test_network_and_fuse_filesystems_are_polled(fs_type: str):
    assert needs_polling(fs_type)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs", "btrfs", "zfs", "tmpfs", "overlay", "fuseblk"])
def test_local_filesystems_use_inotify(fs_type: str):
    assert not needs_polling(fs_type)


def test_this_machines_mount_table_covers_every_path(tmp_path: Path):
    mount = mount_of(tmp_path.resolve(), read_mounts())
    assert mount is not None
    assert mount.fs_type
