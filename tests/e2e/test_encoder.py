"""The facility encoder: `cryomae encoder pretrain` (versioned, sealed, resumable) and projects trained from it.

Real MRC files and the tiny ``test`` preset: the tests check the files, the checksums, resuming and the wiring
into project training, not whether the encoder helps (tests/benchmarks/encoder_study.py measures that).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cryomae.config import EncoderConfig, TrainConfig
from cryomae.errors import CheckpointError, InputError
from cryomae.io import read_micrograph, write_mrc
from cryomae.model.layout import MANIFEST, WEIGHTS, sha256_file
from cryomae.synthetic import make_micrograph
from cryomae.training.encoder import PARTIAL_SUFFIX, load_encoder, pretrain_encoder, resolve_encoder
from cryomae.training.steps import TrainingInterruptedError
from cryomae.training.train import train_model
from tests.e2e.test_cli import cli

TINY_ENCODER = {
    "preset": "test",
    "epochs": 3,
    "scales_per_micrograph": 1,
    "regions_per_micrograph": 16,
    "batch_size": 16,
    "min_diameter": 16.0,
    "max_diameter": 32.0,
    "device": "cpu",
}
TINY_PROJECT = {
    "preset": "test",
    "device": "cpu",
    "pretrain_regions": 64,
    "pretrain_epochs": 1,
    "epochs": 1,
    "n_unlabeled": 32,
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three synthetic micrographs of two particle sizes (a facility's archive), one in a sub-folder."""
    root = tmp_path_factory.mktemp("archive")
    for i, diameter in enumerate((18.0, 28.0, 18.0)):
        m = make_micrograph(shape=(192, 192), diameter=diameter, n_particles=12, seed=10 + i)
        folder = root / ("older" if i == 2 else "")
        folder.mkdir(exist_ok=True)
        write_mrc(folder / f"mic_{i}.mrc", m.image, pixel_size=1.0)
    return root


def _files(archive: Path) -> list[Path]:
    return sorted(archive.rglob("*.mrc"))


def _weights(encoder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(encoder / WEIGHTS))


def test_pretrain_writes_sealed_versions_in_the_store_and_lists_them(archive: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    broken = tmp_path / "extra" / "truncated.mrc"  # a damaged archive file is skipped and named, not fatal
    broken.parent.mkdir()
    broken.write_bytes((archive / "mic_0.mrc").read_bytes()[:2000])
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_ENCODER.items() if k not in ("preset", "epochs", "device")]
    args = ("encoder", "pretrain", archive, broken, "--store", store, "--preset", "test", "--epochs", 2, *sets)
    code, out, err = cli(*args, "--device", "cpu")
    assert code == 0, err
    first = store / "encoders" / "facility" / "v0001"
    assert f"facility encoder written to {first}" in out
    assert "pre-training a facility encoder on 4 micrographs" in out
    assert sorted(p.name for p in first.iterdir()) == [MANIFEST, WEIGHTS]
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["kind"] == "encoder" and manifest["preset"]["name"] == "test"
    assert manifest["micrographs"]["count"] == 3
    assert [s.split(":")[0] for s in manifest["micrographs"]["skipped"]] == [str(broken)]
    assert len(manifest["loss_per_epoch"]) == 2 and all(np.isfinite(manifest["loss_per_epoch"]))
    assert manifest["weights"]["sha256"] == sha256_file(first / WEIGHTS)
    assert not (first.parent / f"v0001{PARTIAL_SUFFIX}").exists(), "the resume state goes once the encoder is written"
    # a second run is the next version; the newest complete version is what a folder of versions resolves to
    code, out, err = cli(*args, "--device", "cpu")
    assert code == 0, err
    assert resolve_encoder(store / "encoders" / "facility") == first.parent / "v0002"
    (first.parent / "v0003").mkdir()  # a version being written (no manifest yet) is never chosen
    assert resolve_encoder(store / "encoders" / "facility") == first.parent / "v0002"
    code, out, err = cli("encoder", "list", "--store", store, "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [r["encoder"] for r in listed] == [str(first), str(first.parent / "v0002")]
    assert {r["micrographs"] for r in listed} == {3}


def test_pretrain_with_no_readable_micrograph_fails_naming_them(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(b"not an MRC file")
    with pytest.raises(InputError, match=r"none of the micrographs could be read.*bad\.mrc"):
        pretrain_encoder([bad], tmp_path / "enc", EncoderConfig(**TINY_ENCODER))
    code, _, err = cli("encoder", "pretrain", tmp_path / "empty-folder-that-is-missing", "--out", tmp_path / "e2")
    assert code == 1 and "not found" in err


def test_an_interrupted_pretraining_resumes_to_the_same_encoder(archive: Path, tmp_path: Path) -> None:
    cfg = EncoderConfig(**TINY_ENCODER)
    straight = pretrain_encoder(_files(archive), tmp_path / "straight", cfg)
    # the same run, stopped during its second epoch (as Ctrl-C or a stopping service would), then run again
    cancel = threading.Event()
    steps_per_epoch = 3  # 3 micrographs x 1 size x 16 regions / batch 16

    def stop_in_epoch_two(stage: str, step: int, total: int, losses: dict[str, float]) -> None:
        if step == steps_per_epoch + 1:
            cancel.set()

    out = tmp_path / "resumed"
    with pytest.raises(TrainingInterruptedError):
        pretrain_encoder(_files(archive), out, cfg, on_progress=stop_in_epoch_two, cancel=cancel)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["epochs_done"] == 1 and not out.exists()
    pretrain_encoder(_files(archive), out, cfg)
    assert not partial.exists()
    a, b = _weights(straight), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming gives exactly the uninterrupted run's weights"
    assert (
        json.loads((out / MANIFEST).read_text())["loss_per_epoch"]
        == json.loads((straight / MANIFEST).read_text())["loss_per_epoch"]
    )
    # a partial run of other settings is not resumed: it starts over (and gives that setting's own result)
    with pytest.raises(TrainingInterruptedError):
        pretrain_encoder(_files(archive), out, cfg, on_progress=stop_in_epoch_two, cancel=cancel)
    other = cfg.model_copy(update={"seed": 1})
    pretrain_encoder(_files(archive), out, other)
    fresh = pretrain_encoder(_files(archive), tmp_path / "fresh-seed-1", other)
    assert all(torch.equal(_weights(out)[k], _weights(fresh)[k]) for k in a)


def test_a_changed_encoder_is_refused(archive: Path, tmp_path: Path) -> None:
    enc = pretrain_encoder(_files(archive)[:1], tmp_path / "enc", EncoderConfig(**{**TINY_ENCODER, "epochs": 1}))
    manifest = json.loads((enc / MANIFEST).read_text())
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / WEIGHTS).write_bytes((enc / WEIGHTS).read_bytes())
    (edited / MANIFEST).write_text(json.dumps({**manifest, "preset": {**manifest["preset"], "depth": 3}}))
    with pytest.raises(CheckpointError, match="changed after the model was written"):
        load_encoder(edited)
    damaged = (enc / WEIGHTS).read_bytes()
    (enc / WEIGHTS).write_bytes(damaged[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_encoder(enc)
    with pytest.raises(CheckpointError, match="no facility encoder here"):
        load_encoder(tmp_path / "nothing")


def test_project_training_starts_from_the_encoder_and_names_it(archive: Path, tmp_path: Path) -> None:
    enc = pretrain_encoder(_files(archive), tmp_path / "encoders" / "v0001", EncoderConfig(**TINY_ENCODER))
    encoder = load_encoder(tmp_path / "encoders")
    mic = read_micrograph(_files(archive)[0])
    xy = np.array([[40.0, 50.0], [100.0, 120.0], [150.0, 60.0]])
    # no training at all: the project's model is the encoder itself
    cfg = TrainConfig(**{**TINY_PROJECT, "pretrain_epochs": 0, "epochs": 0, "encoder": str(tmp_path / "encoders")})
    trained, info = train_model(mic, xy, 18.0, cfg)
    state = trained.model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in encoder.state.items())
    assert info["provenance"]["encoder"] == {"path": str(enc), "checksum": encoder.checksum, "micrographs": 3}
    # with training, it starts there: the result differs from training from random weights
    cfg = TrainConfig(**{**TINY_PROJECT, "encoder": str(enc)})
    from_encoder, _ = train_model(mic, xy, 18.0, cfg)
    scratch, info = train_model(mic, xy, 18.0, TrainConfig(**TINY_PROJECT))
    assert info["provenance"]["encoder"] is None
    assert not torch.equal(from_encoder.bank, scratch.bank)
    # an encoder of another preset cannot be a project's start
    with pytest.raises(InputError, match="preset 'test', the project trains preset 'fast'"):
        train_model(mic, xy, 18.0, TrainConfig(**{**TINY_PROJECT, "preset": "fast", "encoder": str(enc)}))


def test_cryomae_train_takes_an_encoder(archive: Path, tmp_path: Path) -> None:
    enc = pretrain_encoder(_files(archive), tmp_path / "enc", EncoderConfig(**{**TINY_ENCODER, "epochs": 1}))
    coords = tmp_path / "ex.csv"
    coords.write_text("x,y\n40,50\n100,120\n150,60\n")
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY_PROJECT.items()]
    model = tmp_path / "model"
    code, _, err = cli(
        "train", _files(archive)[0], "--coords", coords, "--diameter", 18, "--out", model, *sets, "--encoder", enc
    )
    assert code == 0, err
    manifest = json.loads((model / MANIFEST).read_text())
    assert manifest["hyperparameters"]["encoder"] == str(enc)
    assert manifest["provenance"]["encoder"]["checksum"] == load_encoder(enc).checksum
    code, _, err = cli(
        "train",
        _files(archive)[0],
        "--coords",
        coords,
        "--diameter",
        18,
        "--out",
        model,
        *sets,
        "--encoder",
        tmp_path / "none",
    )
    assert code == 1 and "no facility encoder here" in err
