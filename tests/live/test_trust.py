"""What the services trust, attacked over the real RabbitMQ (issue 12, items 13, 14 and 15).

- A model version whose ``manifest.json`` was edited (the particle diameter 24 -> 97) is refused by the picker:
  its micrographs are dead-lettered with a reason naming the manifest and the checksum mismatch, nothing is
  picked with the edited value, and restoring the manifest and replaying the dead letters picks them (item 13).
- Exemplar micrographs must lie inside the data roots (resolved, so a real symlink inside a root pointing outside
  is refused): ``exemplars add`` refuses them at the door (library and CLI), and the trainer dead-letters a
  training request whose stored micrograph now resolves outside the roots, publishing no model (item 14).
- The writer checks a picks message before it creates anything: the project exists, the model version is one of
  its published versions, the micrograph is an existing regular file inside the data roots (resolved). A message
  naming ``/etc/shadow``, an unknown project or version, a missing file, a directory or a symlink leading outside
  is dead-lettered with a reason naming the problem, and no output folder appears for it (item 15).

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from cryomae.errors import InputError
from cryomae.messages import PickFailed, PicksReady, Rethreshold, TrainRequest
from cryomae.messaging import topology
from cryomae.model.checkpoint import MANIFEST, save_model
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import PRESETS
from cryomae.operator import actions as ops
from cryomae.operator.control import Control
from cryomae.preprocess import Geometry
from cryomae.store.projects import ProjectStore
from tests.live.conftest import (
    CLI_TIMEOUT,
    CRYOMAE,
    DIAMETER,
    MICS_DLQ,
    PICKS_DLQ,
    PROJECT,
    RABBIT,
    SESSION,
    Live,
    publish_raw,
    ready,
    running,
    start_session,
    wait_until,
)

TRAINING_DLQ = topology.dead_letters(topology.TRAINING)


# ------------------------------------------------------------------------------------------------ helpers


def _reasons(control: Control, queue: str) -> list[ops.DeadLetter]:
    """The dead letters of a work queue as ``cryomae dlq list`` shows them."""
    listed = ops.dlq_list(control, queue, 100)
    assert listed["running"], listed
    return list(listed["messages"])


def _outside(live: Live, index: int = 0) -> Path:
    """A good micrograph copied outside every data root."""
    target = live.root / "elsewhere" / f"mic_{index:03d}.mrc"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(live.dataset.micrographs[index], target)
    return target


# ------------------------------------------------------------------------------------------------ item 13


@pytest.mark.parametrize("transport", RABBIT)
def test_a_changed_manifest_is_refused_by_the_picker_with_a_clear_reason(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    store = ProjectStore(settings.store)
    micrograph = live.drop(1).resolve()
    with running(live, settings, ["trainer"]) as (_, control):
        exemplars = live.dataset.exemplars(live.root / "exemplars.star")
        ops.exemplars_add(settings, control, PROJECT, live.dataset.micrographs[0], exemplars, None)
        wait_until(lambda: store.current_version(PROJECT) is not None, what="the project's first model")
    version = store.current_version(PROJECT)
    assert version is not None
    manifest = store.get_project(PROJECT).path / "models" / version / MANIFEST
    original = manifest.read_text()
    edited = json.loads(original)
    assert edited["geometry"]["diameter"] == DIAMETER
    edited["geometry"]["diameter"] = 97.0  # the reported attack: far fewer particles, silently
    manifest.write_text(json.dumps(edited, indent=2) + "\n")

    with running(live, settings, ["writer", "picker"]) as (app, control):
        start_session(live, control)
        assert app.ready()["picker"]["models_loaded"] is False, "a picker whose model is refused is not ready"
        control.send(topology.MICROGRAPHS, ready(micrograph))
        wait_until(lambda: app.broker.depth(MICS_DLQ) == 1, what="the micrograph dead-lettered")
        (row,) = _reasons(control, topology.MICROGRAPHS)
        reason = str(row["reason"])
        assert "manifest.json was changed after the model was written (checksum mismatch)" in reason, row
        assert str(manifest) in reason, row
        assert row["path"] == str(micrograph)
        # the picker told the writer (for the session page), which wrote no STAR rows for it
        wait_until(lambda: app.broker.depth(topology.PICKS) == 0, what="the writer took the failure note")
        assert live.picked() == 0, "nothing picked with the edited manifest"
        assert app.broker.depth(PICKS_DLQ) == 0

        # what the operator does: restore the manifest (or retrain), then replay the dead letters
        manifest.write_text(original)
        wait_until(lambda: app.broker.depth(MICS_DLQ) == 1, what="the listed dead letter back in its queue")
        assert ops.dlq_replay(control, topology.MICROGRAPHS, None)["replayed"] == 1
        wait_until(lambda: live.picked() == 1, what="the replayed micrograph picked with the intact model")
        (entry,) = live.outputs().micrographs()
        assert entry.model_version == version and entry.particles > 0
        assert app.broker.depth(MICS_DLQ) == 0


# ------------------------------------------------------------------------------------------------ item 14


@pytest.mark.parametrize("transport", RABBIT)
def test_exemplar_micrographs_outside_the_data_roots_are_refused_at_the_door(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    store = ProjectStore(settings.store)
    exemplars = live.dataset.exemplars(live.root / "exemplars.star")
    outside = _outside(live)
    live.data.mkdir(parents=True, exist_ok=True)
    link = live.data / "link.mrc"
    link.symlink_to(outside)  # a real symlink inside a root, leading outside
    with running(live, settings, ["trainer"]) as (app, control):
        with pytest.raises(InputError, match="outside the configured data roots") as info:
            ops.exemplars_add(settings, control, PROJECT, outside, exemplars, None)
        assert info.value.path == outside
        with pytest.raises(InputError, match="outside the configured data roots") as info:
            ops.exemplars_add(settings, control, PROJECT, link, exemplars, None)
        assert info.value.path == link and f"resolves to {outside}" in str(info.value)

        # the CLI says the same, with the file, and asks for nothing
        result = subprocess.run(
            [*CRYOMAE, "exemplars", "add", "--project", PROJECT, "--micrograph", str(link), "--coords", str(exemplars)],
            env=live.env(),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert str(link) in result.stderr and "outside the configured data roots" in result.stderr, result.stderr

        assert store.exemplar_sets(PROJECT) == []
        assert app.broker.depth(topology.TRAINING) == 0 and app.broker.depth(TRAINING_DLQ) == 0
        assert store.current_version(PROJECT) is None and store.training_status(PROJECT) is None


@pytest.mark.parametrize("transport", RABBIT)
def test_a_training_request_for_a_micrograph_now_outside_the_roots_is_dead_lettered(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    store = ProjectStore(settings.store)
    exemplars = live.dataset.exemplars(live.root / "exemplars.star")
    inside = live.data / "exemplars" / "mic_000.mrc"
    inside.parent.mkdir(parents=True)
    shutil.copyfile(live.dataset.micrographs[0], inside)
    stored = ops.exemplars_add(settings, None, PROJECT, inside, exemplars, None)  # accepted: inside a root
    # later the file becomes a real symlink to an identical copy outside the roots (same bytes, same checksum)
    outside = _outside(live)
    inside.unlink()
    inside.symlink_to(outside)
    with running(live, settings, ["trainer"]) as (app, control):
        control.send(topology.TRAINING, TrainRequest(project=PROJECT, exemplar_set=stored["exemplar_set"]))
        wait_until(lambda: app.broker.depth(TRAINING_DLQ) == 1, what="the training request dead-lettered")
        (row,) = _reasons(control, topology.TRAINING)
        reason = str(row["reason"])
        assert str(inside) in reason and "outside the configured data roots" in reason, row
        assert f"resolves to {outside}" in reason, row
        assert row["exemplar_set"] == stored["exemplar_set"]
        assert "gave up" not in reason, "dead-lettered at the first delivery, not retried"
        assert store.current_version(PROJECT) is None, "nothing was trained from outside the roots"
        status = store.training_status(PROJECT)
        assert status is not None and status["state"] == "failed"
        assert "outside the configured data roots" in str(status["error"])


# ------------------------------------------------------------------------------------------------ item 15


def _published_version(live: Live) -> str:
    """A model version published in the store (untrained: the writer never loads it)."""
    store = ProjectStore(live.root / "store")
    torch.manual_seed(0)
    model = MaskedAutoencoder(PRESETS["test"])
    geometry = Geometry(diameter=DIAMETER, box_factor=1.5, img_size=PRESETS["test"].img_size)
    with store.staged_version(PROJECT) as (version, folder):
        save_model(folder, model, torch.randn(4, model.features(torch.zeros(1, 1, 24, 24)).shape[1]), geometry, {})
    return version


def _picks(
    micrograph: str, version: str, project: str = PROJECT, session: str = SESSION, **changes: object
) -> PicksReady:
    fields: dict[str, object] = {
        "project": project,
        "session": session,
        "micrograph": micrograph,
        "micrograph_id": uuid.uuid4().hex,
        "model_version": version,
        "diameter": DIAMETER,
        "threshold": 0.5,
        "x": [40.0, 120.0],
        "y": [50.0, 130.0],
        "scores": [0.9, 0.7],
        "shape": (256, 256),
        "complete_at": time.time(),
    }
    fields.update(changes)
    if "x" in changes:
        fields["scores"] = [0.9] * len(changes["x"])  # type: ignore[arg-type]
    return PicksReady(**fields)


def _raw_picks(micrograph: str, version: str, project: str) -> bytes:
    """A PicksReady body built by hand, so that a name this side would refuse still reaches the queue."""
    body = json.loads(_picks(micrograph, version).model_dump_json())
    body["project"] = project
    return json.dumps(body).encode()


def test_the_writer_refuses_picks_it_cannot_trust_before_creating_anything(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    version = _published_version(live)
    good = live.drop(2).resolve()
    missing = live.session_folder / "missing.mrc"
    folder = live.session_folder / "a_folder.mrc"
    folder.mkdir()
    link = live.session_folder / "link.mrc"
    link.symlink_to(_outside(live, 3))  # a real symlink inside a root, leading outside
    outputs = live.root / "outputs"
    poison = {
        "/etc/shadow": (_picks("/etc/shadow", version), "outside the configured data roots"),
        "ghost": (_picks(str(good), version, project="ghost"), "no project 'ghost'"),
        "version": (_picks(str(good), "v0099-20260101T000000Z"), "not a published version of project"),
        "relative": (_picks("data/sess/mic_002.mrc", version), "not absolute"),
        "missing": (_picks(str(missing), version), "does not exist"),
        "folder": (_picks(str(folder), version), "not a regular file"),
        "link": (_picks(str(link), version), "outside the configured data roots"),
        "rethreshold": (Rethreshold(project=PROJECT, session="nosuch", threshold=0.3), "no outputs for session"),
        "rethreshold-ghost": (Rethreshold(project="ghost", session=SESSION, threshold=0.3), "no project 'ghost'"),
        # issue 25, item 7: the micrograph's real size, not the message's, bounds the coordinates
        "huge shape": (
            _picks(str(good), version, shape=(10**12, 10**12), x=[9e11], y=[9e11]),
            "the file is 256x256 px",
        ),
        "coordinates outside": (
            _picks(str(good), version, session="other", x=[300.0], y=[10.0]),
            "outside",
        ),
        "a session never started": (_picks(str(good), version, session="unknown"), "was never started"),
        "failure of /etc/shadow": (
            PickFailed(project=PROJECT, session="other", micrograph="/etc/shadow", micrograph_id="x", reason="forged"),
            "outside the configured data roots",
        ),
    }
    with running(live, settings, ["writer"]) as (app, control):
        start_session(live, control)
        for message, _ in poison.values():
            control.send(topology.PICKS, message)
        expected = len(poison)
        if live.transport == "rabbitmq":
            # a name that would be a path: refused when the body is decoded, before any folder is made
            publish_raw(live, topology.PICKS, _raw_picks(str(good), version, "../escape"))
            expected += 1
        control.send(topology.PICKS, _picks(str(good), version))
        index = outputs / PROJECT / SESSION / "autopick.star"
        wait_until(
            lambda: index.is_file() and str(good) in index.read_text(), what="the good picks written after the poison"
        )
        wait_until(lambda: app.broker.depth(PICKS_DLQ) == expected, timeout=30.0, what=f"{expected} dead letters")

        rows = _reasons(control, topology.PICKS)
        assert len(rows) == expected
        for name, (message, words) in poison.items():
            (row,) = [r for r in rows if r.get("id") == message.id]
            reason = str(row["reason"])
            assert words in reason, (name, row)
            if isinstance(message, PicksReady | PickFailed):
                assert message.micrograph in reason or message.project in reason, (name, row)
            assert "gave up" not in reason, (name, row)  # at the first delivery: an input error
        if live.transport == "rabbitmq":
            (raw,) = [r for r in rows if "id" not in r]
            assert "project" in str(raw["reason"]), raw

        # nothing was created for what was refused, and the good micrograph alone is in the outputs
        assert sorted(p.name for p in outputs.iterdir()) == [PROJECT]
        assert sorted(p.name for p in (outputs / PROJECT).iterdir()) == [SESSION]
        assert not (live.root / "escape").exists()
        assert [e.micrograph for e in live.outputs().micrographs()] == [str(good)]
        text = index.read_text()
        assert "/etc/shadow" not in text and str(link) not in text and str(good) in text
        assert app.ready()["writer"]["consumer"] is True


def test_one_micrograph_written_two_ways_is_one_row(live: Live) -> None:
    """Issue 25, item 7: ``sess//mic.mrc`` and ``sess/./mic.mrc`` are the same micrograph: one row in the index and
    one coordinate file, the second message replacing the first."""
    live.create_project()
    version = _published_version(live)
    good = live.drop(1).resolve()
    doubled = str(good.parent) + "//" + good.name
    dotted = str(good.parent) + "/./" + good.name
    with running(live, live.settings(), ["writer"]) as (app, control):
        start_session(live, control)
        control.send(topology.PICKS, _picks(doubled, version, picked_at=time.time() - 5))
        control.send(topology.PICKS, _picks(dotted, version, x=[60.0], y=[60.0]))
        wait_until(
            lambda: [(e.micrograph, e.particles) for e in live.outputs().micrographs()] == [(str(good), 1)],
            what="one row for the micrograph, with the second message's one pick",
        )
        coordinates = list((live.root / "outputs" / PROJECT / SESSION).rglob("*_autopick.star"))
        assert len(coordinates) == 1, coordinates
        assert app.broker.depth(PICKS_DLQ) == 0


def test_a_repick_by_a_newer_model_replaces_the_rows_whatever_the_pickers_clock(live: Live) -> None:
    """Issue 25, item 8, through the writer: v0002's picks with an older ``picked_at`` than v0001's replace them,
    v0001's arriving later are stale, and a ``picked_at`` a year ahead is dead-lettered, never pinning the rows."""
    live.create_project()
    first, second = _published_version(live), _published_version(live)
    good = str(live.drop(1).resolve())
    now = time.time()
    with running(live, live.settings(), ["writer"]) as (app, control):
        start_session(live, control)
        control.send(topology.PICKS, _picks(good, first, picked_at=now))
        control.send(topology.PICKS, _picks(good, second, picked_at=now - 600, x=[60.0], y=[60.0]))
        control.send(topology.PICKS, _picks(good, first, picked_at=now + 60))
        future = _picks(good, second, picked_at=now + 365 * 86400, x=[70.0, 80.0, 90.0], y=[70.0, 80.0, 90.0])
        control.send(topology.PICKS, future)
        wait_until(lambda: app.broker.depth(PICKS_DLQ) == 1, what="the future picks dead-lettered")
        (entry,) = live.outputs().micrographs()
        assert (entry.model_version, entry.particles) == (second, 1)
        (row,) = _reasons(control, topology.PICKS)
        assert row.get("id") == future.id and "in the future" in str(row["reason"]), row
