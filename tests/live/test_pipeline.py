"""End to end: micrographs dropped into a watched folder, exemplars registered midway, picks in the session STAR.

Runs every service in this process over the in-memory broker (``cryomae run``'s mode) and over the real
RabbitMQ (the same services, as separate processes would run them).
"""

from __future__ import annotations

import collections

import starfile

from cryomae.operator import actions as ops
from tests.live.conftest import PROJECT, SESSION, Live, running, wait_until


def _particles_by_micrograph(live: Live) -> collections.Counter[str]:
    table = starfile.read(live.root / "outputs" / PROJECT / SESSION / "particles.star")
    return collections.Counter(table["rlnMicrographName"])


def test_session_picked_end_to_end_with_exemplars_midway(live: Live) -> None:
    live.create_project()
    settings = live.settings(pick_workers=2)  # two micrographs in hand at once, as on a GPU
    with running(live, settings) as (app, control):
        live.session_folder.mkdir(parents=True)
        ops.session_start(settings, control, PROJECT, SESSION, live.session_folder, "*.mrc", True)
        for i in range(10):
            live.drop(i)
        # the first ten wait (parked) until the project has a model: nothing is picked, nothing dead-lettered
        wait_until(lambda: app.broker.depth("waiting." + PROJECT) == 10, what="10 micrographs parked")
        assert live.picked() == 0
        ops.exemplars_add(
            settings,
            control,
            PROJECT,
            live.dataset.micrographs[0],
            live.dataset.exemplars(live.root / "exemplars.star"),
            None,
        )
        for i in range(10, 20):
            live.drop(i)
        wait_until(lambda: live.picked() == 20, what="20 micrographs in the session outputs")
        report = ops.status(settings, control)

    counts = _particles_by_micrograph(live)
    names = {str(live.session_folder / p.name) for p in live.dataset.micrographs[:20]}
    entries = live.outputs().micrographs()
    assert {e.micrograph for e in entries} == names  # every micrograph once, the early ones included
    assert sum(counts.values()) == sum(e.particles for e in entries)  # no duplicate rows
    assert all(counts[e.micrograph] == e.particles for e in entries)
    assert sum(counts.values()) > 0
    index = starfile.read(live.root / "outputs" / PROJECT / SESSION / "autopick.star")
    assert sorted(index["rlnMicrographName"]) == sorted(names)
    for path in index["rlnMicrographCoordinates"]:
        starfile.read(path)  # every per-micrograph file parses
    session = next(s for s in report["sessions"] if s["session"] == SESSION)
    assert (session["seen"], session["picked"], session["failed"]) == (20, 20, 0)
    assert session["particles"] == sum(counts.values())
    project = next(p for p in report["projects"] if p["project"] == PROJECT)
    assert (project["training"] or {}).get("state") == "done" and project["current_version"] is not None


def test_failed_training_keeps_the_previous_model_and_says_why(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    with running(live, settings, ["trainer"]) as (app, control):
        store = app.store
        exemplars = live.dataset.exemplars(live.root / "exemplars.star")
        ops.exemplars_add(settings, control, PROJECT, live.dataset.micrographs[0], exemplars, None)
        wait_until(lambda: store.current_version(PROJECT) is not None, what="the first model")
        first = store.current_version(PROJECT)
        # a second exemplar set whose micrograph is damaged after it was registered
        copy = live.data / "reference-copy.mrc"  # inside a data root, as exemplar micrographs must be
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(live.dataset.micrographs[1].read_bytes())
        ops.exemplars_add(settings, control, PROJECT, copy, exemplars, None)
        copy.write_bytes(b"not an MRC file any more")
        wait_until(lambda: len(control.dead_letters("training") or []) == 1, what="the request dead-lettered")
        training = ops.status(settings, control)["projects"][0]["training"] or {}
        letters = ops.dlq_list(control, "training", 10)["messages"]
    assert store.current_version(PROJECT) == first
    assert store.versions(PROJECT) == [first]  # nothing half-written left as a version
    assert training["state"] == "failed"
    assert str(copy) in training["error"]
    assert [m["kind"] for m in letters] == ["train_request"]
    assert str(copy) in letters[0]["reason"]
