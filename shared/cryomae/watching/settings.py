"""The watcher's settings: how it watches, how long a file must be quiet, and where it may look."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

WatchMode = Literal["auto", "inotify", "poll"]


class WatchTuning(BaseModel):
    """How the watcher finds and judges micrographs (the service settings' ``watch`` section).

    ``mode``: ``inotify`` asks the kernel for events (immediate, cheap, blind to changes made by other machines
    on network filesystems); ``poll`` lists the session folder every ``poll_interval`` seconds (works everywhere);
    ``auto`` polls on network and FUSE filesystems and uses inotify elsewhere. In every mode a session falls back
    to polling when its inotify watch cannot be created (e.g. the watch limit is reached).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: WatchMode = Field(
        "auto", description="inotify, poll (NFS, CIFS), or auto (polls on network and FUSE filesystems)"
    )
    settle_seconds: float = Field(2.0, ge=0, description="size and mtime unchanged this long before a file counts")
    give_up_seconds: float = Field(
        600.0,
        gt=0,
        description="a settled file that still fails its completeness check and may still grow (an MRC shorter "
        "than its header declares, an empty file) is published anyway after this long unchanged, so that the "
        "picker dead-letters it with the reason; one that never can (an invalid MRC header, not an MRC, longer "
        "than its header declares, a symlink out of the data roots) is published at once",
    )
    poll_interval: float = Field(5.0, gt=0, description="seconds between folder listings in poll mode")
    rescan_interval: float = Field(
        600.0, ge=0, description="seconds between safety listings in inotify mode (lost events); 0: never"
    )
    check_interval: float = Field(0.5, gt=0, description="seconds between completeness checks of pending files")

    @model_validator(mode="after")
    def _give_up_after_settle(self) -> WatchTuning:
        if self.give_up_seconds < self.settle_seconds:
            raise ValueError(
                f"give_up_seconds ({self.give_up_seconds}) must not be shorter than settle_seconds "
                f"({self.settle_seconds})"
            )
        return self


class WatchSettings(WatchTuning):
    """The tuning plus where the watcher may look (one instance, built in ``main()`` and passed down)."""

    data_roots: list[Path] = Field(
        min_length=1, description="absolute folders; a session folder must lie under one of them"
    )

    @field_validator("data_roots")
    @classmethod
    def _absolute_roots(cls, roots: list[Path]) -> list[Path]:
        relative = [str(r) for r in roots if not r.is_absolute()]
        if relative:
            raise ValueError(f"data roots must be absolute paths: {', '.join(relative)}")
        return roots
