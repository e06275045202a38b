"""The picker service follows each session's auto cutoff separately (cryomae.picking.threshold.SessionCutoff)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cryomae.config import PickConfig
from cryomae.messaging import open_broker
from cryomae.model.checkpoint import TrainedModel
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import PRESETS
from cryomae.preprocess import Geometry
from cryomae.service import picker as picker_module
from cryomae.service.picker import Picker
from cryomae.store.projects import ProjectStore


def _model(calibration: dict[str, object]) -> TrainedModel:
    preset = PRESETS["test"]
    geo = Geometry(diameter=16.0, box_factor=1.0, img_size=preset.img_size)
    return TrainedModel(MaskedAutoencoder(preset), torch.zeros(1, 1), geo, {"calibration": calibration})


def test_each_session_and_model_version_has_its_own_cutoff_seeded_by_the_reference(tmp_path: Path) -> None:
    picker = Picker(
        open_broker("memory://", "cutoffs-test"), ProjectStore(tmp_path / "store"), [tmp_path], PickConfig()
    )
    trained = _model({"rule": "gmm", "reference_cutoff": 0.31, "candidates": 900, "picks": 300})
    first = picker._session_cutoff("p", "s1", "v1", trained)
    assert list(first.history) == [0.31]
    assert picker._session_cutoff("p", "s1", "v1", trained) is first  # the same session goes on
    other = picker._session_cutoff("p", "s2", "v1", trained)
    newer = picker._session_cutoff("p", "s1", "v2", _model({"rule": "robust", "candidates": 900, "picks": 40}))
    assert other is not first and newer is not first and not newer.history  # no trusted reference cut: no seed
    rng = np.random.default_rng(0)
    first.cut(np.concatenate([rng.normal(0.0, 0.1, 700), rng.normal(0.5, 0.1, 300)]))
    assert len(first.history) == 2 and list(other.history) == [0.31]  # what one session learns stays there


def test_the_least_recently_used_sessions_are_forgotten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(picker_module, "SESSIONS_REMEMBERED", 3)
    picker = Picker(open_broker("memory://", "cutoffs-lru"), ProjectStore(tmp_path / "store"), [tmp_path], PickConfig())
    trained = _model({"rule": "gmm", "reference_cutoff": 0.2, "candidates": 10, "picks": 3})
    kept = picker._session_cutoff("p", "a", "v1", trained)
    for name in ("b", "c"):
        picker._session_cutoff("p", name, "v1", trained)
    assert picker._session_cutoff("p", "a", "v1", trained) is kept  # used again: now the most recent
    picker._session_cutoff("p", "d", "v1", trained)  # one too many: "b" goes
    assert set(picker._sessions) == {("p", n, "v1") for n in ("a", "c", "d")}
