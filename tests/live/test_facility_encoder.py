"""The trainer service starts every project from the facility encoder named in the settings (CRYOMAE_TRAIN__ENCODER),
and a training request whose encoder cannot be used fails with a reason that names it."""

from __future__ import annotations

import pytest

from cryomae.config import EncoderConfig
from cryomae.operator import actions as ops
from cryomae.settings import Settings, load_settings
from cryomae.training.encoder import pretrain_encoder
from tests.live.conftest import PROJECT, Live, running, wait_until

ENCODER = {"preset": "test", "epochs": 1, "regions_per_micrograph": 16, "batch_size": 16, "device": "cpu"}


@pytest.mark.parametrize("transport", ["memory"])
def test_the_trainer_starts_projects_from_the_facility_encoder_in_its_settings(live: Live) -> None:
    encoders = live.root / "store" / "encoders" / "facility"
    pretrain_encoder(live.dataset.micrographs[1:3], encoders / "v0001", EncoderConfig(**ENCODER))
    live.create_project()
    settings: Settings = live.settings(train={"encoder": str(encoders)})
    with running(live, settings, ["trainer"]) as (app, control):
        store = app.store
        exemplars = live.dataset.exemplars(live.root / "exemplars.star")
        ops.exemplars_add(settings, control, PROJECT, live.dataset.micrographs[0], exemplars, None)
        wait_until(lambda: store.current_version(PROJECT) is not None, what="the project's first model")
        version = store.current_version(PROJECT)
        assert version is not None
        manifest = store.load_version(PROJECT, version).manifest
        # an encoder that disappears: the next training fails and says which encoder it could not use
        for f in (encoders / "v0001").iterdir():
            f.unlink()
        (encoders / "v0001").rmdir()
        ops.exemplars_add(settings, control, PROJECT, live.dataset.micrographs[0], exemplars, None)
        wait_until(lambda: len(control.dead_letters("training") or []) == 1, what="the request dead-lettered")
        training = ops.status(settings, control)["projects"][0]["training"] or {}
    assert manifest["provenance"]["encoder"]["path"] == str(encoders / "v0001")
    assert manifest["provenance"]["encoder"]["micrographs"] == 2
    assert training["state"] == "failed"
    assert str(encoders) in training["error"] and "no facility encoder" in training["error"]
    assert store.versions(PROJECT) == [version]


def test_the_encoder_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYOMAE_TRAIN__ENCODER", "/store/encoders/facility")
    monkeypatch.setenv("CRYOMAE_SECRETS_DIR", "/nonexistent")
    assert load_settings().train.encoder == "/store/encoders/facility"
