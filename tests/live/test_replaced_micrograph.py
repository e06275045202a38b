"""A micrograph replaced on disk after it was picked (issue 25, item 12) is not picked again by itself (the
watcher publishes a file once), but it is no longer only a log line: ``cryomae status`` lists it with the
command that re-picks it, the session page lists it among the micrographs to look at, and after
``cryomae session repick --micrograph PATH`` both lists drop it. In one process and over RabbitMQ.

Every wait polls a condition with a deadline (``wait_until``); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cryomae.errors import InputError
from cryomae.messages import SessionCommand
from cryomae.messaging import topology
from cryomae.operator import actions as ops
from cryomae.operator.actions import IncompleteFile
from tests.live.conftest import PROJECT, SESSION, Live, running, train_first_model, wait_until


def test_a_replaced_micrograph_is_shown_with_its_repick_command_until_repicked(live: Live) -> None:
    live.create_project()
    settings = live.settings()
    with running(live, settings) as (_, control):
        train_first_model(live, control)
        control.send(
            topology.WATCHER,
            SessionCommand(action="start", project=PROJECT, session=SESSION, folder=str(live.session_folder)),
        )
        target = live.drop(1)
        wait_until(lambda: live.picked() == 1, what="the micrograph picked")
        first_pick = live.outputs().entry(str(target)).picked_at

        # the acquisition software writes the micrograph again (another exposure under the same name)
        tmp = live.session_folder / ".again.part"
        shutil.copyfile(live.dataset.micrographs[2], tmp)
        os.replace(tmp, target)

        def listed() -> list[IncompleteFile]:
            (row,) = [s for s in ops.status(settings, control)["sessions"] if s["session"] == SESSION]
            return row["replaced_files"]

        wait_until(lambda: len(listed()) == 1, what="status listing the replaced micrograph")
        (replaced,) = listed()
        command = f"cryomae session repick --project {PROJECT} --session {SESSION} --micrograph {target}"
        assert replaced["path"] == str(target) and command in str(replaced["problem"]), replaced
        text = ops.format_status(ops.status(settings, control))
        assert "1 micrograph replaced" in text and command in text
        failures = live.root / "outputs" / PROJECT / SESSION / "gallery" / "failures.json"
        wait_until(
            lambda: (
                failures.is_file() and any(f["micrograph"] == str(target) for f in json.loads(failures.read_text()))
            ),
            what="the session page's list",
        )
        assert live.picked() == 1 and live.outputs().entry(str(target)).picked_at == first_pick  # not re-picked

        with pytest.raises(InputError, match=r"not a picked micrograph of proj/sess: /nowhere\.mrc"):
            ops.session_repick(settings, control, PROJECT, SESSION, False, ["/nowhere.mrc"])
        out = ops.session_repick(settings, control, PROJECT, SESSION, False, [str(target)])
        assert out["micrographs"] == 1
        wait_until(lambda: live.outputs().entry(str(target)).picked_at > first_pick, what="the re-pick written")
        wait_until(lambda: listed() == [], what="status no longer listing it")
