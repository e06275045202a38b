"""A torn message file in the one-process mode's journal (issue 25, item 4): at the next start the micrograph it
held is not lost in silence. It is dead-lettered with a reason naming the file (the message recovered where its
body survived), counted as failed in its session by ``cryomae status``, listed by ``cryomae dlq list``, and
``dlq replay`` picks it up again; the file itself is kept as ``*.bad``.
"""

from __future__ import annotations

import pytest

from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.service.app import QUEUES_JOURNAL
from tests.live.conftest import MICS_DLQ, PROJECT, SESSION, Live, ready, running, wait_until


@pytest.mark.parametrize("transport", ["memory"])
def test_a_torn_journal_file_reaches_status_and_the_dead_letters(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    kept, torn = (str(live.drop(i).resolve()) for i in range(2))
    with running(live, settings, ["writer"]) as (_, control):  # no picker: the messages stay queued
        control.send(topology.MICROGRAPHS, ready(kept))
        control.send(topology.MICROGRAPHS, ready(torn))
    files = sorted((settings.state / QUEUES_JOURNAL / topology.MICROGRAPHS).glob("*.msg"))
    assert len(files) == 2
    text = files[1].read_text()
    files[1].write_text(text[: text.index('"headers"') + 5])  # torn by a crash or a full disk, after its body

    with running(live, settings, ["writer"]) as (app, control):
        wait_until(lambda: app.broker.depth(MICS_DLQ) == 1, what="the torn file dead-lettered")
        assert app.broker.depth(topology.MICROGRAPHS) == 1  # the whole one is still queued
        report = ops.status(settings, control)
        (row,) = [s for s in report["sessions"] if (s["project"], s["session"]) == (PROJECT, SESSION)]
        assert row["failed"] == 1
        assert report["queues"] is not None and report["queues"][MICS_DLQ] == 1
        (letter,) = ops.dlq_list(control, topology.MICROGRAPHS, None)["messages"]
        assert letter["path"] == torn and letter["kind"] == "micrograph_ready"
        assert str(files[1]) in letter["reason"] and "could not be read" in letter["reason"], letter
        assert files[1].with_name(files[1].name + ".bad").is_file()
        assert ops.dlq_replay(control, topology.MICROGRAPHS, None)["replayed"] == 1
        wait_until(lambda: app.broker.depth(topology.MICROGRAPHS) == 2, what="the torn one back in its queue")
