"""Files the watcher cannot pass on as complete (item 18), through the running services.

With a give-up time of an hour: a file that is not an MRC (under an .mrc name) and a symlink out of the data
roots are dead-lettered within seconds, with the picker's reasons; a truncated copy waits, and ``cryomae status``
shows it as "incomplete since ..." with the reader's reason meanwhile; once the copy completes it is picked and
no longer listed. On the real RabbitMQ and in the one-process mode (in-memory broker).

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime

from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.store.projects import ProjectStore
from tests.live.conftest import PROJECT, SESSION, Live, running, wait_until

GIVE_UP = 3600.0  # the watcher would publish a file that stays incomplete after an hour
QUICK = 60.0  # what "at once" must beat by far, on a slow shared machine


def test_unfixable_files_are_dead_lettered_at_once_and_a_truncated_one_is_shown_incomplete(live: Live) -> None:
    live.create_project()
    settings = live.settings(
        watch={"settle_seconds": 0.3, "check_interval": 0.1, "poll_interval": 0.5, "give_up_seconds": GIVE_UP}
    )
    folder = live.session_folder
    folder.mkdir(parents=True)
    source = live.dataset.micrographs[1]
    not_mrc = folder / "not_mrc.mrc"
    not_mrc.write_bytes(b"this is a text file, not a micrograph\n" * 100)
    outside = live.root / "elsewhere" / "mic.mrc"  # a good micrograph, but not under a data root
    outside.parent.mkdir()
    shutil.copyfile(source, outside)
    link = folder / "link.mrc"
    link.symlink_to(outside)
    truncated = folder / "truncated.mrc"
    truncated.write_bytes(source.read_bytes()[:-5000])  # a copy in progress, or one that broke off
    good = live.drop(2)
    store = ProjectStore(settings.store)

    with running(live, settings) as (app, control):
        # a model first: the picker parks the micrographs of a project without one (it reads them afterwards)
        exemplars = live.dataset.exemplars(live.root / "exemplars.star")
        ops.exemplars_add(settings, control, PROJECT, live.dataset.micrographs[0], exemplars, None)
        wait_until(lambda: store.current_version(PROJECT) is not None, what="the project's first model")
        dlq = topology.dead_letters(topology.MICROGRAPHS)
        ops.session_start(settings, control, PROJECT, SESSION, folder, "*.mrc", True)
        wait_until(lambda: app.broker.depth(dlq) == 2, QUICK, "the not-MRC file and the symlink dead-lettered")
        wait_until(lambda: live.picked() == 1, QUICK, "the good micrograph picked")

        listed = ops.dlq_list(control, topology.MICROGRAPHS, 100)
        reasons = {row["path"]: row["reason"] for row in listed["messages"]}
        resolved = folder.resolve()
        assert set(reasons) == {str(resolved / "not_mrc.mrc"), str(resolved / "link.mrc")}  # the session's names
        assert "not an MRC file" in reasons[str(resolved / "not_mrc.mrc")]
        assert "outside the configured data roots" in reasons[str(resolved / "link.mrc")]
        assert all("gave up" not in reason for reason in reasons.values())  # at the first delivery

        # the truncated one waits (it may still grow), and status says so and why
        def incomplete_files() -> list[ops.IncompleteFile]:
            report = ops.status(settings, control)
            (row,) = [s for s in report["sessions"] if (s["project"], s["session"]) == (PROJECT, SESSION)]
            assert row["incomplete"] == len(row["incomplete_files"])
            return list(row["incomplete_files"])

        wait_until(lambda: len(incomplete_files()) == 1, QUICK, "the truncated file listed as incomplete")
        (waiting,) = incomplete_files()
        assert waiting["path"] == str(resolved / "truncated.mrc")
        assert "truncated MRC file" in str(waiting["problem"])
        since = float(str(waiting["since"]))
        assert truncated.stat().st_mtime - 5 <= since <= time.time()
        report = ops.status(settings, control)
        text = ops.format_status(report)
        shown = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        assert f"{PROJECT}/{SESSION}: 1 incomplete" in text
        assert f"{resolved / 'truncated.mrc'}: incomplete since {shown} (truncated MRC file" in text
        assert app.broker.depth(dlq) == 2 and live.picked() == 1  # neither published nor dead-lettered

        # the copy completes: picked, and no longer listed
        shutil.copyfile(source, truncated)
        wait_until(lambda: live.picked() == 2, QUICK, "the completed micrograph picked")
        wait_until(lambda: incomplete_files() == [], QUICK, "the completed file no longer incomplete")
        assert "incomplete" not in ops.format_status(ops.status(settings, control))
    assert {e.micrograph for e in live.outputs().micrographs()} == {
        str(good.resolve()),
        str(resolved / "truncated.mrc"),
    }


def test_a_symlink_loop_is_shown_in_status_and_the_rest_of_the_folder_is_published(live: Live) -> None:
    """Issue 25 item 1: with a.mrc -> b.mrc -> a.mrc beside good micrographs, every good one is published and
    `cryomae status` lists the loop's entries with why they are skipped."""
    live.create_project()
    settings = live.settings(watch={"settle_seconds": 0.3, "check_interval": 0.1, "poll_interval": 0.5})
    folder = live.session_folder
    folder.mkdir(parents=True)
    for i in range(6):
        shutil.copyfile(live.dataset.micrographs[i % len(live.dataset.micrographs)], folder / f"mic_{i:02d}.mrc")
    (folder / "a.mrc").symlink_to(folder / "b.mrc")
    (folder / "b.mrc").symlink_to(folder / "a.mrc")
    problem = "cannot be examined: too many levels of symbolic links (a symlink loop)"

    with running(live, settings) as (_app, control):
        ops.session_start(settings, control, PROJECT, SESSION, folder, "*.mrc", True)

        def session() -> ops.SessionStatus:
            (row,) = [s for s in ops.status(settings, control)["sessions"] if s["session"] == SESSION]
            return row

        def listed() -> bool:  # the start command is handled by the watcher a moment after it is sent
            return any(s["session"] == SESSION for s in ops.status(settings, control)["sessions"])

        wait_until(listed, QUICK, "the session listed by status")
        wait_until(lambda: session()["seen"] == 6, QUICK, "the 6 good micrographs published")
        wait_until(lambda: session()["incomplete"] == 2, QUICK, "the loop's entries listed")
        resolved = folder.resolve()
        rows = {f["path"]: f["problem"] for f in session()["incomplete_files"]}
        assert rows == {str(resolved / "a.mrc"): problem, str(resolved / "b.mrc"): problem}
        assert f"{resolved / 'a.mrc'}: incomplete since " in ops.format_status(ops.status(settings, control))
        assert session()["seen"] == 6  # the loop's entries are never published
