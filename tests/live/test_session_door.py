"""A session start for a project that is not in the store is refused at the door (issue 25, item 6).

The CLI refuses it (``cryomae session start``: "no project ..."); a command that reaches the watcher queue anyway
(another producer, a project deleted since) is refused by the watcher with the same rule
(``ProjectStore.get_project``): dead-lettered at the first delivery with a reason naming the project and how to
create it, before its folder is watched, so no micrograph of it is published. A valid session started after it is
watched and published as ever. In one process (memory) and over the real RabbitMQ.

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import shutil

from cryomae.messages import MicrographReady, SessionCommand, decode
from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.service.watcher import WatcherService
from tests.live.conftest import MICS_DLQ, PROJECT, SESSION, Live, running, wait_until

WATCHER_DLQ = topology.dead_letters(topology.WATCHER)


def test_a_session_start_for_no_project_is_dead_lettered_and_nothing_of_it_published(live: Live) -> None:
    ghost_folder = live.data / "ghost_session"
    ghost_folder.mkdir(parents=True)
    for source in live.dataset.micrographs[:3]:
        shutil.copyfile(source, ghost_folder / source.name)
    live.create_project()  # the valid project; "ghost" is not in the store
    good = [live.drop(i) for i in (3, 4)]

    with running(live, live.settings(), ["watcher"]) as (app, control):
        ghost = SessionCommand(action="start", project="ghost", session="lost", folder=str(ghost_folder))
        control.send(topology.WATCHER, ghost)
        wait_until(lambda: app.broker.depth(WATCHER_DLQ) == 1, what="the start for no project dead-lettered")

        listed = ops.dlq_list(control, topology.WATCHER, 10)
        (row,) = listed["messages"]
        assert row.get("id") == ghost.id, row
        reason = str(row["reason"])
        assert "no project 'ghost'" in reason and "cryomae project create ghost" in reason, row
        assert "gave up" not in reason, row  # at the first delivery: an input error

        # a valid session started after it is watched and its micrographs published
        control.send(
            topology.WATCHER,
            SessionCommand(action="start", project=PROJECT, session=SESSION, folder=str(live.session_folder)),
        )
        wait_until(lambda: app.broker.depth(topology.MICROGRAPHS) == len(good), what="the valid session published")

        published = [decode(env.body) for env in app.broker.peek(topology.MICROGRAPHS)]
        assert all(isinstance(m, MicrographReady) for m in published), published
        assert sorted(m.path for m in published if isinstance(m, MicrographReady)) == sorted(str(p) for p in good)
        assert {(m.project, m.session) for m in published if isinstance(m, MicrographReady)} == {(PROJECT, SESSION)}
        assert app.broker.depth(MICS_DLQ) == 0
        service = app.services["watcher"]
        assert isinstance(service, WatcherService)
        assert [(s.project, s.session) for s in service.watcher.sessions()] == [(PROJECT, SESSION)]
        assert app.broker.depth(WATCHER_DLQ) == 1
        assert service.ready()["consumer"] is True
