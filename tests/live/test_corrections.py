"""An operator's corrections from the session page become a new model and a re-picked session (issue 26), with
every ``cryomae`` a process run as an operator runs it: in the one-process mode (``cryomae run``, the in-memory
broker and its inbox) and as separate services over the real RabbitMQ. Bad corrections are refused with the
reason and store nothing; a trainer killed with SIGKILL while it trains on corrections loses nothing."""

from __future__ import annotations

import json
import signal
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryomae.gallery.layout import GALLERY_DIR
from cryomae.io.writers import write_corrections
from cryomae.model.layout import MANIFEST, read_manifest
from cryomae.store.projects import ProjectStore
from tests.live.conftest import PROJECT, SESSION, TINY_TRAINING, Live, wait_until
from tests.live.test_cli_ops import (
    Service,
    add_exemplars,
    alive_while,
    cli,
    consistent,
    mem,
    ok,
    outputs,
    picked,
    rabbit,
    resolved,
    service,
    start_session,
    tiny_project_args,
)

__all__ = ["mem", "rabbit"]  # the fixtures, imported for pytest

MICROGRAPHS = 3
# training long enough to be caught in the middle (minutes on two cores), with the tiny model
SLOW_TRAINING = {**TINY_TRAINING, "pretrain_epochs": 1000, "pretrain_regions": 256}


Marks = tuple[list[str], np.ndarray, np.ndarray]  # as the page writes them: STAR names, centres, particle flags


def _picked_session(live: Live, services: Sequence[Service], tmp_path: Path) -> str:
    """A project trained from 15 exemplars and a session of ``MICROGRAPHS`` micrographs picked with it; the
    model version."""
    ok(cli(live, "project", "create", PROJECT, *tiny_project_args()))
    start_session(live)
    dropped = [live.drop(i) for i in range(1, MICROGRAPHS + 1)]
    add_exemplars(live, live.dataset.exemplars(tmp_path / "exemplars.star"))
    wait_until(alive_while(services, lambda: picked(live) == MICROGRAPHS and consistent(live)), what="session picked")
    assert {e.micrograph for e in outputs(live).micrographs()} == {resolved(p) for p in dropped}
    version = ProjectStore(live.root / "store").current_version(PROJECT)
    assert version is not None
    return version


def _page_marks(live: Live) -> Marks:
    """The marks an operator makes on the session page: the best pick of the first micrograph marked wrong, and a
    missed particle (the true centre farthest from every pick) on the second; (names as the session's STAR files
    write them, centres, particle flags)."""
    out = outputs(live)
    first, second = out.micrographs()[:2]
    best = out.candidates(first.micrograph)
    kept = best.scores >= best.cutoff
    assert kept.any(), "the first model picked nothing on the first micrograph"
    truth = live.dataset.truth[int(Path(second.micrograph).stem.split("_")[1])]
    centres = starfile.read(truth)[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=float)
    picks = out.candidates(second.micrograph)
    picked_xy = np.stack([picks.x, picks.y], axis=1)[picks.scores >= picks.cutoff]
    gaps = np.min(np.hypot(*(centres[:, None] - picked_xy[None]).transpose(2, 0, 1)), axis=1, initial=np.inf)
    xy = np.array([[best.x[kept][0], best.y[kept][0]], centres[int(np.argmax(gaps))]])
    return [out.star_name(first.micrograph), out.star_name(second.micrograph)], xy, np.array([False, True])


def _page_file(live: Live, path: Path, marks: Marks) -> Path:
    """corrections.star as the session page writes it, with ``marks`` (``_page_marks``)."""
    write_corrections(path, *marks, PROJECT, SESSION)
    return path


def _repicked_by(live: Live, before: str) -> str | None:
    """The new current version once every micrograph of the session is picked again with it (else None)."""
    current = ProjectStore(live.root / "store").current_version(PROJECT)
    if current in (None, before):
        return None
    entries = outputs(live).micrographs()
    return current if all(e.model_version == current for e in entries) and consistent(live) else None


def _check_repicked(live: Live, first: str, counts: dict[str, int], exemplar_set: str, marks: Marks) -> None:
    """The session re-picked by the model trained on the corrections, the operator's marks holding on their
    micrographs, and what the page shows of before/after."""
    store = ProjectStore(live.root / "store")
    current = store.current_version(PROJECT)
    assert current is not None and current != first
    manifest = read_manifest(store.get_project(PROJECT).path / "models" / current / MANIFEST)
    assert manifest["exemplar_set"]["id"] == exemplar_set
    # the wrong pick is used; the missed particle is stored with the set, not trained on (corrections_missed)
    assert manifest["provenance"]["corrections"] == {"missed": 0, "wrong": 1, "micrographs": 1}
    assert manifest["negative_bank"] == {"size": 8}  # the wrong pick in its 8 dihedral views
    # the marks hold on the micrographs they were made on: the wrong pick is no candidate, the missed particle a pick
    out = outputs(live)
    by_name = {out.star_name(e.micrograph): e.micrograph for e in out.micrographs()}
    assert sorted(manifest["operator_marks"]) == sorted(by_name[name] for name in marks[0])
    for name, centre, particle in zip(*marks, strict=True):
        now = out.candidates(by_name[name])
        gaps = np.hypot(np.asarray(now.x) - centre[0], np.asarray(now.y) - centre[1])
        if particle:
            assert gaps.min() < 0.05 and now.scores[int(np.argmin(gaps))] >= now.cutoff, (name, centre)
        else:
            assert gaps.min() > manifest["geometry"]["diameter"] / 2, (name, centre)
    for entry in outputs(live).micrographs():
        assert (entry.previous_model_version, entry.previous_particles) == (first, counts[entry.micrograph])
    # the session page's data: before and after for every micrograph (the gallery is drawn beside the writer)
    page = live.root / "outputs" / PROJECT / SESSION / GALLERY_DIR / "session.js"

    def shown() -> dict[str, tuple[int, str]]:
        text = page.read_text() if page.is_file() else "{}"
        data = json.loads(text[text.index("{") : text.rindex("}") + 1])
        return {m["path"]: (m["previous_particles"], m["model_version"]) for m in data.get("micrographs", [])}

    wait_until(lambda: shown() == {m: (n, current) for m, n in counts.items()}, what="before and after on the page")


def _correct(live: Live, services: Sequence[Service], tmp_path: Path) -> None:
    first = _picked_session(live, services, tmp_path)
    counts = {e.micrograph: e.particles for e in outputs(live).micrographs()}
    marks = _page_marks(live)
    path = _page_file(live, tmp_path / "corrections.star", marks)
    done = ok(cli(live, "exemplars", "correct", "--project", PROJECT, "--session", SESSION, "--from", str(path)))
    assert "1 missed particle and 1 wrong pick on 2 micrographs" in done.stdout, done.stdout
    assert f"session {SESSION} is re-picked with it" in done.stdout, done.stdout
    exemplar_set = ProjectStore(live.root / "store").exemplar_sets(PROJECT)[-1]
    assert exemplar_set.base is not None and exemplar_set.wrong == 1
    wait_until(alive_while(services, lambda: _repicked_by(live, first) is not None), what="the session re-picked")
    latest = max(ProjectStore(live.root / "store").exemplar_sets(PROJECT), key=lambda s: s.created)
    _check_repicked(live, first, counts, latest.id, marks)


def test_corrections_retrain_and_repick_in_one_process_mode(mem: Live, tmp_path: Path) -> None:
    live = mem
    live.session_folder.mkdir(parents=True)
    with service(live, "run", log_name="run") as run:
        _correct(live, [run], tmp_path)


@pytest.mark.rabbitmq
def test_corrections_retrain_and_repick_over_rabbitmq(rabbit: Live, tmp_path: Path) -> None:
    live = rabbit
    live.session_folder.mkdir(parents=True)
    names = ("writer", "picker", "trainer", "watcher")
    with ExitStack() as stack:
        services = [stack.enter_context(service(live, "service", name, log_name=name)) for name in names]
        _correct(live, services, tmp_path)


def test_bad_corrections_are_refused_and_a_killed_trainer_loses_nothing(mem: Live, tmp_path: Path) -> None:
    live = mem
    live.session_folder.mkdir(parents=True)
    store = ProjectStore(live.root / "store")
    with service(live, "run", log_name="run-1") as run:
        first = _picked_session(live, [run], tmp_path)
        names, xy, flags = marks = _page_marks(live)
        good = _page_file(live, tmp_path / "corrections.star", marks)
        sets = [s.id for s in store.exemplar_sets(PROJECT)]
        command = ["exemplars", "correct", "--project", PROJECT, "--session", SESSION, "--from"]
        far = xy.copy()
        far[0, 0] = 100000.0
        bad = {
            "unknown": (["nope.mrc", names[1]], xy, flags, PROJECT, "not a picked micrograph of proj/sess: nope.mrc"),
            "outside the image": (names, far, flags, PROJECT, "outside the 256x256 image"),
            "wrong project": (names, xy, flags, "other", "the corrections are for other/sess, not for proj/sess"),
            "duplicated": (
                [*names, names[1]],
                np.concatenate([xy, xy[1:] + 1.0]),
                [*flags, True],
                PROJECT,
                "mark the same particle",
            ),
        }
        for case, (case_names, case_xy, case_flags, project, reason) in bad.items():
            path = tmp_path / f"{case.replace(' ', '_')}.star"
            write_corrections(path, case_names, case_xy, np.array(case_flags), project, SESSION)
            result = cli(live, *command, str(path))
            assert result.returncode == 1 and reason in result.stderr, (case, result.stderr)
        # outside the data roots: the same file, for an installation whose roots no longer hold the session
        env = {"CRYOMAE_DATA_ROOTS": json.dumps([str(tmp_path / "elsewhere")])}
        result = cli(live, *command, str(good), env=env)
        assert result.returncode == 1 and "outside the configured data roots" in result.stderr, result.stderr
        assert [s.id for s in store.exemplar_sets(PROJECT)] == sets  # nothing stored

        # training on corrections made slow enough to be caught in the middle, then kill -9
        project_file = store.get_project(PROJECT).path / "project.json"
        record = json.loads(project_file.read_text())
        project_file.write_text(json.dumps({**record, "train_overrides": SLOW_TRAINING}))
        counts = {e.micrograph: e.particles for e in outputs(live).micrographs()}
        ok(cli(live, *command, str(good)))
        corrections = max(store.exemplar_sets(PROJECT), key=lambda s: s.created)
        assert corrections.base is not None

        def training_corrections() -> bool:
            status = store.training_status(PROJECT) or {}
            return status.get("state") == "training" and status.get("exemplar_set") == corrections.id

        wait_until(alive_while([run], training_corrections), what="training on the corrections")
        assert run.kill9() == -signal.SIGKILL
    assert store.current_version(PROJECT) == first  # nothing half-published

    # the restarted process trains on the corrections again (the request was journaled) and re-picks the session
    project_file.write_text(json.dumps({**record, "train_overrides": dict(TINY_TRAINING)}))
    with service(live, "run", log_name="run-2") as again:
        wait_until(alive_while([again], lambda: _repicked_by(live, first) is not None), what="the session re-picked")
    _check_repicked(live, first, counts, corrections.id, marks)
