"""Model directories: safetensors weights + JSON manifest, verified on load, replaced atomically."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cryomae.errors import CheckpointError
from cryomae.model.checkpoint import BANK_KEY, MANIFEST, WEIGHTS, load_model, save_model
from cryomae.model.layout import FORMAT_VERSION, manifest_checksum, write_manifest
from cryomae.model.mae import MaskedAutoencoder
from cryomae.model.presets import PRESETS
from cryomae.preprocess import Geometry

GEO = Geometry(diameter=18.0, box_factor=1.5, img_size=24)


def _save(
    out: Path, preset: str = "test", seed: int = 0, bank_rows: int = 16
) -> tuple[MaskedAutoencoder, torch.Tensor]:
    torch.manual_seed(seed)
    model = MaskedAutoencoder(PRESETS[preset])
    geo = Geometry(GEO.diameter, GEO.box_factor, PRESETS[preset].img_size)
    bank = model.features(torch.randn(bank_rows, 1, geo.img_size, geo.img_size))
    assert save_model(out, model, bank, geo, {"hyperparameters": {"seed": seed}, "note": "unit test"}) == out
    return model, bank


def _rehash(out):
    """Record the weights file's current checksum in the manifest (and seal it again), so only the content can be
    wrong."""
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["weights"]["sha256"] = hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()
    write_manifest(out / MANIFEST, manifest)


def test_round_trip_restores_weights_bank_geometry_and_preset(tmp_path):
    out = tmp_path / "model"
    model, bank = _save(out)
    loaded = load_model(out)
    original, restored = model.state_dict(), loaded.model.state_dict()
    assert set(original) == set(restored)
    for key, value in original.items():
        assert torch.equal(value, restored[key]), key
    assert torch.equal(loaded.bank, bank)
    assert loaded.geometry == GEO
    assert loaded.preset == PRESETS["test"]
    assert loaded.manifest["note"] == "unit test" and loaded.manifest["hyperparameters"] == {"seed": 0}
    assert loaded.manifest["exemplar_bank"] == {"size": 16, "dim": bank.shape[1]}
    assert not loaded.model.training, "a loaded model is ready for inference"
    imgs = torch.randn(3, 1, 24, 24)
    assert torch.equal(loaded.model.features(imgs), model.eval().features(imgs))


def test_round_trip_keeps_a_changed_preset_feature(tmp_path):
    """A preset overridden at training time (feature, feature_layer) is rebuilt from the manifest."""
    import dataclasses

    preset = dataclasses.replace(PRESETS["test"], feature="mean", feature_layer=-1)
    torch.manual_seed(1)
    model = MaskedAutoencoder(preset)
    save_model(tmp_path / "m", model, torch.randn(4, 64), GEO, {})
    loaded = load_model(tmp_path / "m")
    assert loaded.preset == preset
    imgs = torch.randn(2, 1, 24, 24)
    torch.testing.assert_close(loaded.model.features(imgs), model.eval().features(imgs))


def test_weights_file_is_plain_safetensors_without_pickle(tmp_path):
    out = tmp_path / "model"
    model, bank = _save(out)
    raw = (out / WEIGHTS).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])  # safetensors: u64 length + JSON header + raw tensor bytes
    assert BANK_KEY in header
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80"), "no zip/pickle torch.save archive"
    tensors = load_file(str(out / WEIGHTS))
    assert torch.equal(tensors[BANK_KEY], bank)
    assert set(tensors) == {*model.state_dict(), BANK_KEY}
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["weights"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert manifest["weights"]["file"] == WEIGHTS


def test_one_tampered_byte_fails_the_checksum(tmp_path):
    out = tmp_path / "model"
    _save(out)
    weights = out / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one tensor value
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum") as info:
        load_model(out)
    assert str(weights) in str(info.value)


def test_missing_manifest_is_named(tmp_path):
    out = tmp_path / "model"
    _save(out)
    (out / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=MANIFEST) as info:
        load_model(out)
    assert str(out) in str(info.value)


def test_a_directory_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_invalid_json_manifest_is_named(tmp_path):
    out = tmp_path / "model"
    _save(out)
    (out / MANIFEST).write_text('{"format_version": 1, "preset": ')
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        load_model(out)
    assert str(out / MANIFEST) in str(info.value)


def test_incomplete_manifest_is_named(tmp_path):
    out = tmp_path / "model"
    _save(out)
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["geometry"]
    write_manifest(out / MANIFEST, manifest)  # sealed as written, so only the missing field is wrong
    with pytest.raises(CheckpointError, match="incomplete manifest") as info:
        load_model(out)
    assert str(out / MANIFEST) in str(info.value) and "geometry" in str(info.value)


def _edit_manifest(out: Path, edit) -> Path:
    """Change the manifest's values in place (keeping its recorded checksum), as a person with an editor would."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def test_the_manifest_is_sealed_by_a_checksum_over_every_field(tmp_path):
    out = tmp_path / "model"
    _save(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 3
    assert len(manifest["checksum"]) == 64
    assert manifest["checksum"] == manifest_checksum(manifest), "over the other fields (sorted keys)"
    assert manifest["checksum"] != manifest_checksum({**manifest, "note": "edited"})
    # the checksum is over the values, not the layout: reordered keys and other indentation still load
    path = out / MANIFEST
    path.write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=4))
    assert load_model(out).geometry == GEO


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["geometry"].update(diameter=97.0),  # the reported attack: 18 picks instead of ~700
        lambda m: m["geometry"].update(box_factor=2.0),
        lambda m: m["preset"].update(feature="mean"),
        lambda m: m["weights"].update(sha256="0" * 64),
        lambda m: m["exemplar_bank"].update(size=1),
        lambda m: m["hyperparameters"].update(seed=7),
        lambda m: m.update(note="edited"),
        lambda m: m.update(extra="added"),
        lambda m: m.update(checksum="0" * 64),
    ],
    ids=["diameter", "box_factor", "preset", "weights_sha", "bank", "hyperparameters", "info", "added", "checksum"],
)
def test_a_changed_manifest_value_is_refused_naming_the_file(tmp_path, edit):
    out = tmp_path / "model"
    _save(out)
    path = _edit_manifest(out, edit)
    with pytest.raises(CheckpointError, match=r"manifest.json was changed after the model was written \(checksum mi"):
        load_model(out)
    with pytest.raises(CheckpointError) as info:
        load_model(out)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_manifest_without_a_checksum_is_refused_as_an_older_format(tmp_path, version):
    """A downgrade (format 2, no checksum) cannot bypass the check: it is refused, asking for a new training."""
    out = tmp_path / "model"
    _save(out)

    def downgrade(m):
        m.pop("checksum", None)
        m["format_version"] = version

    path = _edit_manifest(out, downgrade)
    with pytest.raises(CheckpointError, match=r"no checksum.*retrain") as info:
        load_model(out)
    assert str(path) in str(info.value)


def test_a_manifest_that_is_not_a_json_object_is_named(tmp_path):
    out = tmp_path / "model"
    _save(out)
    (out / MANIFEST).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object") as info:
        load_model(out)
    assert str(out / MANIFEST) in str(info.value)


def test_missing_weights_file_is_named(tmp_path):
    out = tmp_path / "model"
    _save(out)
    (out / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing weights") as info:
        load_model(out)
    assert str(out / WEIGHTS) in str(info.value)


def test_weights_of_another_preset_are_refused(tmp_path):
    """Weights of a `fast` model in a `test` model directory (checksum updated so only the fit is wrong)."""
    _save(tmp_path / "fast", preset="fast")
    out = tmp_path / "test"
    _save(out, preset="test")
    shutil.copyfile(tmp_path / "fast" / WEIGHTS, out / WEIGHTS)
    _rehash(out)
    with pytest.raises(CheckpointError, match="do not fit preset 'test'") as info:
        load_model(out)
    assert str(out / WEIGHTS) in str(info.value)


def test_weights_without_an_exemplar_bank_are_refused(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "model"
    _save(out)
    tensors = load_file(str(out / WEIGHTS))
    del tensors[BANK_KEY]
    save_file(tensors, str(out / WEIGHTS))
    _rehash(out)
    with pytest.raises(CheckpointError, match="no exemplar bank") as info:
        load_model(out)
    assert str(out / WEIGHTS) in str(info.value)


def test_saving_over_an_existing_directory_replaces_it_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "model"
    _save(out, seed=0, bank_rows=16)
    first_sha = json.loads((out / MANIFEST).read_text())["weights"]["sha256"]
    model, bank = _save(out, seed=1, bank_rows=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "no temporary or .old directories left"
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, WEIGHTS])
    loaded = load_model(out)
    assert loaded.manifest["weights"]["sha256"] != first_sha
    assert torch.equal(loaded.bank, bank)
    assert torch.equal(loaded.model.state_dict()["cls_token"], model.state_dict()["cls_token"])


def test_saving_creates_missing_parent_directories(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    _save(out)
    assert load_model(out).geometry == GEO
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]


def test_saving_over_a_directory_with_a_subdirectory_replaces_it(tmp_path):
    out = tmp_path / "model"
    _save(out, seed=0)
    (out / "notes").mkdir()
    (out / "notes" / "readme.txt").write_text("operator notes")
    _save(out, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_saving_recovers_from_a_leftover_old_directory(tmp_path):
    out = tmp_path / "model"
    _save(out, seed=0)
    leftover = tmp_path / ".model.old"
    leftover.mkdir()
    (leftover / WEIGHTS).write_bytes(b"stale")
    _, bank = _save(out, seed=1)
    assert torch.equal(load_model(out).bank, bank)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".model.old") == ["model"]


def test_the_ice_mask_setting_round_trips_and_an_older_manifest_keeps_flattening_over_everything(tmp_path):
    """``Geometry.ice_z`` changes how micrographs are prepared, so it is in the sealed manifest; a manifest
    written before the field existed loads with ``ice_z`` None, the preparation that model was trained with."""
    out = tmp_path / "model"
    torch.manual_seed(0)
    model = MaskedAutoencoder(PRESETS["test"])
    geo = Geometry(GEO.diameter, GEO.box_factor, PRESETS["test"].img_size, ice_z=3.0)
    bank = model.features(torch.randn(4, 1, geo.img_size, geo.img_size))
    save_model(out, model, bank, geo, {})
    assert load_model(out).geometry.ice_z == 3.0
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["geometry"]["ice_z"]
    write_manifest(out / MANIFEST, manifest)
    assert load_model(out).geometry.ice_z is None
