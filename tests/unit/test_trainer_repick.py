"""The trainer's re-pick after a model trained on corrections: the session's micrographs of older versions are asked
for again, and outputs it cannot read leave the published version standing (logged, not a failed training)."""

from __future__ import annotations

import json
from pathlib import Path

from cryomae.config import TrainConfig
from cryomae.messages import MicrographReady, decode
from cryomae.messaging import open_broker, topology
from cryomae.service.trainer import Trainer
from cryomae.store.outputs import SessionOutputs
from cryomae.store.projects import ProjectStore
from tests.store.test_outputs import picks


def _trainer(tmp_path: Path) -> Trainer:
    broker = open_broker("memory://", "test")
    return Trainer(broker, ProjectStore(tmp_path / "store"), TrainConfig(), roots=[tmp_path], outputs=tmp_path / "out")


def test_the_session_is_asked_for_again_with_the_new_version(tmp_path: Path) -> None:
    micrograph = tmp_path / "grid" / "FoilHole_1_Data_1.mrc"
    micrograph.parent.mkdir()
    micrograph.write_bytes(b"\0" * 64)
    outputs = SessionOutputs(tmp_path / "out" / "proj" / "s1")
    outputs.apply(picks(str(micrograph), [0.9, 0.2], version="v0001-20261207T000000Z"))
    trainer = _trainer(tmp_path)
    assert trainer._repick("proj", "s1", "v0002-20261207T010000Z") == 1
    (letter,) = trainer.broker.peek(topology.MICROGRAPHS)
    message = decode(letter.body)
    assert isinstance(message, MicrographReady) and message.repick and message.path == str(micrograph)
    assert trainer._repick("proj", "s1", "v0001-20261207T000000Z") == 0  # picked by that version already
    assert trainer._repick("proj", "other", "v0002-20261207T010000Z") == 0  # no outputs: nothing to re-pick


def test_outputs_it_cannot_read_do_not_fail_the_training(tmp_path: Path) -> None:
    folder = tmp_path / "out" / "proj" / "s1"
    SessionOutputs(folder).apply(picks("/data/grid1/FoilHole_1_Data_1.mrc", [0.9]))
    state = folder / ".cryomae" / "micrographs" / "FoilHole_1_Data_1.json"
    state.write_text(json.dumps({"format": 1, "key": "FoilHole_1_Data_1"})[:-1], encoding="utf-8")  # torn
    trainer = _trainer(tmp_path)
    assert trainer._repick("proj", "s1", "v0002-20261207T010000Z") == 0
    assert trainer.broker.depth(topology.MICROGRAPHS) == 0
