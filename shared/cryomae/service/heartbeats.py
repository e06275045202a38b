"""The trainers' heartbeat files, ``<store>/.trainers/<id>.json``: a running trainer (``cryomae.service.trainer``)
rewrites its own every ``HEARTBEAT_S`` seconds, and ``trainer_liveness`` reads them all, so that ``cryomae status``
can tell a training in progress from one whose trainer is gone. Apart from the trainer so that reading them costs
no torch: the operator's commands import this, never the trainer.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from cryomae.service.handling import pid_running

HEARTBEAT_S = 5.0  # how often a running trainer refreshes its heartbeat file
HEARTBEAT_STALE_S = 3 * HEARTBEAT_S  # a heartbeat older than this: that trainer is not running
HEARTBEATS = ".trainers"  # folder of the heartbeat files in the project store
HEARTBEAT_KEEP_S = 24 * 3600.0  # a starting trainer deletes the heartbeats of trainers silent for longer


def heartbeat_file(store_root: Path, trainer: str) -> Path:
    """The heartbeat file of the trainer with id ``trainer``."""
    return Path(store_root) / HEARTBEATS / f"{trainer}.json"


def trainer_liveness(store_root: Path, now: float | None = None) -> list[dict[str, Any]]:
    """Every trainer heartbeat in the store: id, host, pid, age_s, alive, and the request in hand (if any)."""
    now = time.time() if now is None else now
    rows = []
    folder = Path(store_root) / HEARTBEATS
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            age = max(0.0, now - float(data["time"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        alive = age <= HEARTBEAT_STALE_S and not _gone(data)
        rows.append({**data, "age_s": round(age, 1), "alive": alive})
    return rows


def _gone(heartbeat: dict[str, Any]) -> bool:
    """Whether a heartbeat's process is known to have ended (it ran on this host and its pid is gone)."""
    if heartbeat.get("host") != socket.gethostname():
        return False  # another host (a pod): only the heartbeat's age tells
    return not pid_running(heartbeat.get("pid"))
