"""Names the writer could never write are refused where the watcher first sees them (issue 25, item 5).

A micrograph whose file name holds a newline or a double quote (a STAR file cannot hold them), or is longer than
200 bytes (too long for its coordinate file), is not picked first and then lost: the watcher dead-letters it in the
micrographs queue with a reason naming the problem, tells the writer for the session page, and ``cryomae status``
counts it as failed. The good micrograph beside them is published as ever. In one process and over RabbitMQ.

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import shutil

from cryomae.messages import SessionCommand
from cryomae.messaging import topology
from cryomae.operator import actions as ops
from tests.live.conftest import MICS_DLQ, PICKS_DLQ, PROJECT, SESSION, Live, running, wait_until

NAMES = {
    "newline": ("line\nbreak.mrc", "contains '\\n'"),
    "quote": ('say "cheese".mrc', "contains '\"'"),
    "long": ("x" * 230 + ".mrc", "longer than 200 bytes"),
}


def test_names_that_cannot_be_written_are_refused_at_the_watcher_and_counted(live: Live) -> None:
    live.create_project()
    good = live.drop(0)
    for name, _ in NAMES.values():
        shutil.copyfile(live.dataset.micrographs[1], live.session_folder / name)
    settings = live.settings()
    with running(live, settings, ["watcher", "writer"]) as (app, control):
        control.send(
            topology.WATCHER,
            SessionCommand(action="start", project=PROJECT, session=SESSION, folder=str(live.session_folder)),
        )
        wait_until(lambda: app.broker.depth(MICS_DLQ) == len(NAMES), what="the three names refused")
        wait_until(lambda: app.broker.depth(topology.MICROGRAPHS) == 1, what="the good micrograph published")
        letters = ops.dlq_list(control, topology.MICROGRAPHS, None)["messages"]
        for name, words in NAMES.values():
            (row,) = [r for r in letters if r.get("path") == str(live.session_folder / name)]
            assert words in str(row["reason"]), row
        (queued,) = app.broker.peek(topology.MICROGRAPHS)
        assert str(good) in queued.body.decode()

        def counts() -> tuple[int | None, int] | None:  # the ledger records a file just after it is published
            rows = [
                s
                for s in ops.status(settings, control)["sessions"]
                if (s["project"], s["session"]) == (PROJECT, SESSION)
            ]
            return (rows[0]["seen"], rows[0]["failed"]) if rows else None

        wait_until(lambda: counts() == (len(NAMES) + 1, len(NAMES)), what="status: 4 seen, 3 of them failed")
        # the session page lists them among its failures (the writer had a note of each)
        failures = live.root / "outputs" / PROJECT / SESSION / "gallery" / "failures.json"
        wait_until(lambda: failures.is_file() and len(json.loads(failures.read_text())) == len(NAMES), what="page")
        assert app.broker.depth(PICKS_DLQ) == 0
