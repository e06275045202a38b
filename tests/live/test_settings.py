"""The services' settings: environment, nesting, .env, secrets folder, validation and the redacted view."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cryomae.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CRYOMAE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CRYOMAE_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.chdir(tmp_path)


def test_environment_with_nesting_and_options_on_top(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRYOMAE_BROKER__URL", "amqp://cryomae@rabbit:5672/facility")
    monkeypatch.setenv("CRYOMAE_PICK__THRESHOLD", "robust")
    monkeypatch.setenv("CRYOMAE_WATCH__MODE", "poll")
    monkeypatch.setenv("CRYOMAE_DATA_ROOTS", f'["{tmp_path}"]')
    monkeypatch.setenv("CRYOMAE_STORE", "/srv/store")
    s = load_settings(store=Path("/override/store"))
    assert s.broker.url == "amqp://cryomae@rabbit:5672/facility"
    assert s.broker.namespace == "cryomae"  # nested defaults kept when one nested value is set
    assert s.pick.threshold == "robust"
    assert s.watch_settings().mode == "poll" and s.watch_settings().data_roots == [tmp_path.resolve()]
    assert s.store == Path("/override/store")  # the CLI's option wins over the environment


def test_dotenv_file_may_hold_other_tools_variables_but_nested_typos_fail(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("DATA_DIR=/x\nCRYOMAE_OUTPUTS=/srv/outputs\n")
    assert load_settings().outputs == Path("/srv/outputs")
    (tmp_path / ".env").write_text("CRYOMAE_WATCH__SETLE_SECONDS=3\n")
    with pytest.raises(ValidationError, match=r"(?i)setle_seconds"):
        load_settings()


def test_password_from_the_secrets_folder_is_used_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "cryomae_broker_password").write_text("s3cr:et/\n")
    monkeypatch.setenv("CRYOMAE_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("CRYOMAE_BROKER__URL", "amqp://cryomae@rabbit:5672/")
    s = load_settings()
    assert s.broker_url() == "amqp://cryomae:s3cr%3Aet%2F@rabbit:5672/"
    shown = s.redacted()
    assert "s3cr" not in str(shown) and shown["broker_password"] == "********"


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRYOMAE_BROKER__URL", "redis://localhost")
    with pytest.raises(ValidationError, match=r"memory://, amqp:// or amqps://"):
        load_settings()
    monkeypatch.setenv("CRYOMAE_BROKER__URL", "memory://")
    monkeypatch.setenv("CRYOMAE_PICK__STRIDE_FRACTION", "5")
    with pytest.raises(ValidationError, match="stride_fraction"):
        load_settings()


def test_picker_works_on_one_micrograph_at_a_time_on_a_cpu_unless_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cryomae.messaging import open_broker
    from cryomae.service.picker import Picker
    from cryomae.store.projects import ProjectStore

    broker = open_broker("memory://", "workers-test")
    store = ProjectStore(tmp_path / "store")
    s = load_settings(device="cpu")
    assert s.pick_workers is None
    assert Picker(broker, store, s.roots(), s.pick, s.device, workers=s.pick_workers).workers == 1
    monkeypatch.setenv("CRYOMAE_PICK_WORKERS", "3")
    s = load_settings(device="cpu")
    assert Picker(broker, store, s.roots(), s.pick, s.device, workers=s.pick_workers).workers == 3
    monkeypatch.setenv("CRYOMAE_PICK_WORKERS", "0")
    with pytest.raises(ValidationError, match="pick_workers"):
        load_settings()


def test_metrics_listen_on_this_host_only_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    # item 17: /metrics and /healthz have no authentication and name projects and model versions; a workstation
    # keeps them to itself, the container images and the chart open them (CRYOMAE_METRICS_HOST=0.0.0.0)
    assert load_settings().metrics_host == "127.0.0.1"
    monkeypatch.setenv("CRYOMAE_METRICS_HOST", "0.0.0.0")
    assert load_settings().metrics_host == "0.0.0.0"


@pytest.mark.parametrize("section", ["pick", "train"])
def test_one_device_setting_every_service_honours(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, section: str
) -> None:
    # CRYOMAE_PICK__DEVICE and CRYOMAE_TRAIN__DEVICE used to load and then do nothing: now they are refused with
    # a reason that names the one setting, and CRYOMAE_DEVICE reaches both the picker and the trainer
    from cryomae.service.app import App

    monkeypatch.setenv(f"CRYOMAE_{section.upper()}__DEVICE", "cuda:7")
    with pytest.raises(ValidationError, match=r"CRYOMAE_DEVICE"):
        load_settings()
    monkeypatch.delenv(f"CRYOMAE_{section.upper()}__DEVICE")
    monkeypatch.setenv("CRYOMAE_DEVICE", "cpu")
    s = load_settings(store=tmp_path / "store", outputs=tmp_path / "out", state=tmp_path / "state")
    app = App(s, services=["picker", "trainer"])
    try:
        app.build()
        picker, trainer = app.services["picker"], app.services["trainer"]
        assert str(picker.device) == "cpu" and trainer.device == "cpu"  # type: ignore[attr-defined]
    finally:
        app.stop()
