"""The project store on real files: projects, exemplar sets from real MRC + STAR files, versions of really trained
models, the current pointer, failure and tamper handling, and the pickers' model cache."""

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cryomae.config import TrainConfig
from cryomae.errors import CheckpointError, ConfigError, InputError
from cryomae.io import Coordinates, write_coordinates, write_mrc
from cryomae.model.checkpoint import MANIFEST, WEIGHTS, TrainedModel, save_model
from cryomae.service.picker import ModelCache
from cryomae.store.projects import (
    CURRENT_FILE,
    EXEMPLAR_FILE,
    MODELS,
    STAGING,
    ExemplarSet,
    ProjectStore,
)
from cryomae.synthetic import make_micrograph
from cryomae.training.train import train_model

DIAMETER = 24.0
CFG = TrainConfig(preset="test", pretrain_epochs=1, epochs=1, pretrain_regions=64, n_unlabeled=32, device="cpu")
VERSION = re.compile(r"^v\d{4}-\d{8}T\d{6}Z$")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny test model trains fastest on one thread (and does not stall when the CPUs are shared)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def mic(tmp_path) -> tuple[Path, np.ndarray]:
    """A real MRC micrograph (192x192) and its true particle centres."""
    m = make_micrograph(shape=(192, 192), diameter=DIAMETER, n_particles=16, seed=3)
    path = tmp_path / "session" / "mic_001.mrc"
    path.parent.mkdir()
    write_mrc(path, m.image, pixel_size=2.0)
    return path, m.centres


@pytest.fixture
def store(tmp_path) -> ProjectStore:
    return ProjectStore(tmp_path / "store")


def _star(path: Path, xy: np.ndarray) -> Path:
    write_coordinates(path, Coordinates(np.asarray(xy, dtype=float).reshape(-1, 2)))
    return path


def _exemplars(store: ProjectStore, mic, tmp_path, n: int = 8, project: str = "apo") -> ExemplarSet:
    store.create_project(project, diameter=DIAMETER, exist_ok=True)
    path, centres = mic
    return store.add_exemplars(project, path, _star(tmp_path / f"ex{n}.star", centres[:n]), roots=[tmp_path])


def _train(store: ProjectStore, exset: ExemplarSet, seed: int = 0) -> str:
    """Train a tiny real model on a stored exemplar set and publish it; returns the version."""
    reference, coords = exset.read_inputs(roots=[exset.micrograph.parent])
    trained, info = train_model(reference, coords.xy, exset.diameter, CFG.model_copy(update={"seed": seed}))
    with store.staged_version(exset.project) as (version, tmp_dir):
        save_model(tmp_dir, trained.model, trained.bank, trained.geometry, info)
    return version


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------- projects


def test_create_get_and_list_projects(store, tmp_path):
    assert store.projects() == []
    alpha = store.create_project("alpha", diameter=180.0, train_overrides={"preset": "test", "epochs": 3})
    store.create_project("Beta_2.x")
    assert alpha.name == "alpha" and alpha.diameter == 180.0
    assert alpha.train_overrides == {"preset": "test", "epochs": 3}
    reopened = ProjectStore(tmp_path / "store")  # another process on the same volume
    assert [p.name for p in reopened.projects()] == ["Beta_2.x", "alpha"]
    got = reopened.get_project("alpha")
    assert got == alpha
    assert json.loads((got.path / "project.json").read_text())["name"] == "alpha"
    cfg = got.train_config(seed=7)
    assert (cfg.preset, cfg.epochs, cfg.seed, cfg.lr) == ("test", 3, 7, TrainConfig().lr)
    assert reopened.get_project("Beta_2.x").diameter is None


def test_an_existing_project_is_an_error_unless_exist_ok(store):
    first = store.create_project("alpha", diameter=100.0)
    with pytest.raises(InputError, match="'alpha' already exists"):
        store.create_project("alpha")
    again = store.create_project("alpha", diameter=50.0, exist_ok=True)
    assert again == first and again.diameter == 100.0, "exist_ok returns the project unchanged"
    assert [p.name for p in store.projects()] == ["alpha"]


@pytest.mark.parametrize("name", ["", "../escape", "a/b", ".hidden", "-dash", "with space", "x" * 65, "é"])
def test_invalid_project_names_are_refused(store, name):
    with pytest.raises(InputError, match="invalid project name"):
        store.create_project(name)
    with pytest.raises(InputError, match="invalid project name"):
        store.get_project(name)
    assert store.projects() == []
    assert not (store.root / "escape").exists()


@pytest.mark.parametrize("overrides", [{"epochs": -1}, {"no_such_option": 1}, {"preset": "huge"}])
def test_invalid_training_overrides_are_refused_before_anything_is_written(store, overrides):
    with pytest.raises(ConfigError, match="invalid training overrides"):
        store.create_project("alpha", train_overrides=overrides)
    assert store.projects() == []


def test_invalid_default_diameter_is_refused(store):
    with pytest.raises(InputError, match="positive"):
        store.create_project("alpha", diameter=-5.0)
    assert store.projects() == []


def test_an_unknown_project_is_named(store):
    with pytest.raises(InputError, match="no project 'nope'"):
        store.get_project("nope")
    with pytest.raises(InputError, match="no project 'nope'"):
        store.current_version("nope")


# ---------------------------------------------------------------------------------------------- exemplar sets


def test_add_exemplars_stores_a_copy_and_the_micrographs_identity(store, mic, tmp_path):
    path, centres = mic
    store.create_project("apo", diameter=DIAMETER)
    src = _star(tmp_path / "picked.star", centres[:15])
    exset = store.add_exemplars("apo", path, src, roots=[tmp_path])
    assert exset.count == 15 and exset.warnings == ()
    assert exset.micrograph == path.absolute() and exset.micrograph_shape == (192, 192)
    assert exset.micrograph_size == path.stat().st_size and exset.pixel_size == pytest.approx(2.0)
    assert exset.diameter == DIAMETER and exset.source == str(src)
    src.unlink()  # the store keeps its own copy
    np.testing.assert_allclose(exset.coordinates().xy, centres[:15], atol=1e-5)
    assert store.exemplar_set("apo", exset.id) == exset
    assert store.exemplar_sets("apo") == [exset]
    stored = json.loads((exset.path / EXEMPLAR_FILE).read_text())
    assert len(stored["micrograph_sha256"]) == 64 and stored["count"] == 15
    assert list((store.root / "projects" / "apo" / STAGING).iterdir()) == [], "no staging left behind"
    reference, coords = exset.read_inputs(roots=[tmp_path])
    assert reference.shape == (192, 192) and len(coords) == 15


def test_diameter_defaults_to_the_projects_and_is_required_somewhere(store, mic, tmp_path):
    path, centres = mic
    store.create_project("with_default", diameter=30.0)
    store.create_project("without")
    src = _star(tmp_path / "ex.star", centres[:6])
    assert store.add_exemplars("with_default", path, src, roots=[tmp_path]).diameter == 30.0
    assert store.add_exemplars("with_default", path, src, diameter=22.0, roots=[tmp_path]).diameter == 22.0
    with pytest.raises(InputError, match=r"give the particle diameter \(--diameter\)"):
        store.add_exemplars("without", path, src, roots=[tmp_path])
    with pytest.raises(InputError, match="does not fit"):
        store.add_exemplars("without", path, src, diameter=500.0, roots=[tmp_path])
    assert store.exemplar_sets("without") == []


def test_an_exemplar_outside_the_image_is_refused_naming_the_file(store, mic, tmp_path):
    path, centres = mic
    store.create_project("apo", diameter=DIAMETER)
    bad = _star(tmp_path / "outside.star", np.vstack([centres[:5], [[250.0, 40.0]]]))
    with pytest.raises(InputError, match="outside the 192x192 image") as info:
        store.add_exemplars("apo", path, bad, roots=[tmp_path])
    assert info.value.path == bad
    assert store.exemplar_sets("apo") == []


def test_an_empty_coordinate_file_is_refused_naming_the_file(store, mic, tmp_path):
    path, _ = mic
    store.create_project("apo", diameter=DIAMETER)
    no_rows = _star(tmp_path / "no_rows.star", np.zeros((0, 2)))
    with pytest.raises(InputError, match="no exemplar coordinates") as info:
        store.add_exemplars("apo", path, no_rows, roots=[tmp_path])
    assert info.value.path == no_rows
    zero_bytes = tmp_path / "zero.star"
    zero_bytes.write_bytes(b"")
    with pytest.raises(InputError) as info:
        store.add_exemplars("apo", path, zero_bytes, roots=[tmp_path])
    assert info.value.path == zero_bytes
    assert store.exemplar_sets("apo") == []


def test_an_unreadable_micrograph_is_refused_naming_it(store, mic, tmp_path):
    path, centres = mic
    store.create_project("apo", diameter=DIAMETER)
    src = _star(tmp_path / "ex.star", centres[:6])
    truncated = tmp_path / "truncated.mrc"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated MRC") as info:
        store.add_exemplars("apo", truncated, src, roots=[tmp_path])
    assert info.value.path == truncated
    with pytest.raises(InputError, match="file not found") as info:
        store.add_exemplars("apo", tmp_path / "missing.mrc", src, roots=[tmp_path])
    assert info.value.path == tmp_path / "missing.mrc"
    assert store.exemplar_sets("apo") == []


def test_an_exemplar_micrograph_outside_the_data_roots_is_refused(store, mic, tmp_path):
    path, centres = mic  # tmp_path/session/mic_001.mrc
    store.create_project("apo", diameter=DIAMETER)
    src = _star(tmp_path / "ex.star", centres[:6])
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(InputError, match="outside the configured data roots") as info:
        store.add_exemplars("apo", path, src, roots=[data])
    assert info.value.path == path and str(data) in str(info.value)
    # a real symlink inside the root that points outside is refused too, naming where it leads
    link = data / "mic_001.mrc"
    link.symlink_to(path)
    with pytest.raises(InputError, match="outside the configured data roots") as info:
        store.add_exemplars("apo", link, src, roots=[data])
    assert info.value.path == link and f"resolves to {path}" in str(info.value)
    # so is a path with '..' that leaves the root
    with pytest.raises(InputError, match="outside the configured data roots"):
        store.add_exemplars("apo", data / ".." / "session" / "mic_001.mrc", src, roots=[data])
    assert store.exemplar_sets("apo") == []
    assert store.add_exemplars("apo", path, src, roots=[data, path.parent]).count == 6  # inside another root


def test_a_symlink_inside_the_data_roots_to_a_file_inside_them_is_accepted(store, mic, tmp_path):
    path, centres = mic
    store.create_project("apo", diameter=DIAMETER)
    link = tmp_path / "session" / "link.mrc"
    link.symlink_to(path)
    exset = store.add_exemplars("apo", link, _star(tmp_path / "ex.star", centres[:6]), roots=[path.parent])
    assert exset.micrograph == link
    assert exset.read_inputs(roots=[path.parent])[0].shape == (192, 192)


def test_a_stored_micrograph_that_now_resolves_outside_the_roots_is_refused_for_training(store, mic, tmp_path):
    """The file is swapped for a real symlink to an identical copy outside the roots: same content, same
    checksum, but the trainer must not read outside the data roots."""
    path, centres = mic
    store.create_project("apo", diameter=DIAMETER)
    exset = store.add_exemplars("apo", path, _star(tmp_path / "ex.star", centres[:6]), roots=[path.parent])
    elsewhere = tmp_path / "elsewhere" / "copy.mrc"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)
    with pytest.raises(InputError, match="outside the configured data roots") as info:
        exset.read_inputs(roots=[path.parent])
    assert info.value.path == path and f"resolves to {elsewhere}" in str(info.value)
    assert exset.read_inputs(roots=[path.parent, elsewhere.parent])[0].shape == (192, 192)


def test_fewer_than_five_exemplars_are_stored_with_a_warning(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path, n=3)
    assert exset.warnings == ("few exemplars: 3; about 15 are recommended",)
    assert store.exemplar_set("apo", exset.id).warnings == exset.warnings
    assert _exemplars(store, mic, tmp_path, n=5).warnings == ()


def test_unknown_or_invalid_exemplar_set_ids_are_refused(store, mic, tmp_path):
    _exemplars(store, mic, tmp_path)
    with pytest.raises(InputError, match="no exemplar set 'nope'"):
        store.exemplar_set("apo", "nope")
    with pytest.raises(InputError, match="invalid exemplar set id"):
        store.exemplar_set("apo", "../../etc")


def test_a_micrograph_changed_after_the_set_was_stored_is_refused_for_training(store, mic, tmp_path):
    path, _ = mic
    exset = _exemplars(store, mic, tmp_path)
    write_mrc(path, make_micrograph(shape=(192, 192), diameter=DIAMETER, seed=99).image, pixel_size=2.0)
    with pytest.raises(InputError, match="changed since exemplar set") as info:
        exset.read_inputs(roots=[tmp_path])
    assert info.value.path == path.absolute()
    path.unlink()
    with pytest.raises(InputError, match="no longer exists"):
        exset.read_inputs(roots=[tmp_path])


# ---------------------------------------------------------------------------------------------- versions


def test_publishing_versions_switches_current(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    assert store.versions("apo") == [] and store.current_version("apo") is None
    assert store.load_current("apo") is None
    v1 = _train(store, exset, seed=1)
    assert VERSION.match(v1) and v1.startswith("v0001-")
    assert store.versions("apo") == [v1] and store.current_version("apo") == v1
    first = store.load_current("apo")
    assert isinstance(first, TrainedModel) and first.geometry.diameter == DIAMETER

    reference, coords = exset.read_inputs(roots=[tmp_path])
    trained, info = train_model(reference, coords.xy, DIAMETER, CFG.model_copy(update={"seed": 2}))
    with store.staged_version("apo") as (v2, tmp_dir):
        save_model(tmp_dir, trained.model, trained.bank, trained.geometry, info)
        # written but not yet published: invisible
        assert store.versions("apo") == [v1] and store.current_version("apo") == v1
        assert sorted(p.name for p in (store.root / "projects" / "apo" / MODELS).iterdir()) == [v1]
    assert v2.startswith("v0002-") and store.versions("apo") == [v1, v2]
    assert ProjectStore(store.root).current_version("apo") == v2
    second = store.load_current("apo")
    assert second is not None and torch.equal(second.bank, trained.bank)
    assert not torch.equal(second.bank, first.bank)
    current = json.loads((store.root / "projects" / "apo" / CURRENT_FILE).read_text())
    assert current["version"] == v2 and current["previous"] == v1

    store.set_current("apo", v1)  # roll back
    assert store.current_version("apo") == v1
    loaded = store.load_current("apo")
    assert loaded is not None and torch.equal(loaded.bank, first.bank)
    with pytest.raises(InputError, match="no published version"):
        store.set_current("apo", "v0009-20260101T000000Z")


def test_a_failed_training_leaves_the_current_version(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset)
    with pytest.raises(RuntimeError, match="out of memory"), store.staged_version("apo") as (_, tmp_dir):  # noqa: PT012
        (tmp_dir / WEIGHTS).write_bytes(b"half a model")
        raise RuntimeError("CUDA out of memory")
    assert store.current_version("apo") == v1 and store.versions("apo") == [v1]
    project = store.root / "projects" / "apo"
    assert sorted(p.name for p in (project / MODELS).iterdir()) == [v1]
    assert list((project / STAGING).iterdir()) == [], "a failed training's staging is removed at once"
    loaded = store.load_current("apo")
    assert loaded is not None


def test_an_incomplete_model_directory_is_never_published(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset)
    version, tmp_dir = store.new_version_dir("apo")
    (tmp_dir / WEIGHTS).write_bytes(b"only the weights, no manifest")
    with pytest.raises(CheckpointError, match=f"no {MANIFEST}"):
        store.publish_version("apo", version, tmp_dir)
    assert store.current_version("apo") == v1 and store.versions("apo") == [v1]
    with pytest.raises(CheckpointError, match="no version"):
        store.load_version("apo", version)
    store.discard_version("apo", version)
    assert list((store.root / "projects" / "apo" / STAGING).iterdir()) == []


def test_a_crashed_training_is_cleaned_up_later_without_touching_current(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset)
    version, tmp_dir = store.new_version_dir("apo")  # the trainer "dies" after writing part of the model
    (tmp_dir / WEIGHTS).write_bytes(b"partial")
    assert version.startswith("v0002-")
    assert store.current_version("apo") == v1 and store.versions("apo") == [v1]
    assert store.new_version_dir("apo")[0].startswith("v0003-"), "a reserved number is not handed out twice"
    assert store.cleanup() == [], "fresh staging may belong to a training still running elsewhere"
    removed = store.cleanup(older_than_s=0)
    assert sorted(p.name for p in removed) == ["v0002", "v0003"]
    assert list((store.root / "projects" / "apo" / STAGING).iterdir()) == []
    assert store.current_version("apo") == v1 and store.versions("apo") == [v1]
    assert _train(store, exset).startswith("v0002-")


def test_tampered_weights_are_detected_on_load(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset)
    weights = store.root / "projects" / "apo" / MODELS / v1 / WEIGHTS
    _flip_byte(weights)
    with pytest.raises(CheckpointError, match="checksum") as info:
        store.load_current("apo")
    assert str(weights) in str(info.value)
    with pytest.raises(CheckpointError, match="checksum"):
        store.load_version("apo", v1)


def _change_diameter(manifest_path: Path, diameter: float) -> None:
    manifest = json.loads(manifest_path.read_text())
    manifest["geometry"]["diameter"] = diameter
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def test_a_changed_manifest_is_detected_on_load(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset)
    manifest = store.root / "projects" / "apo" / MODELS / v1 / MANIFEST
    _change_diameter(manifest, 97.0)
    for load in (lambda: store.load_current("apo"), lambda: store.load_version("apo", v1)):
        with pytest.raises(CheckpointError, match=r"was changed after the model was written \(checksum") as info:
            load()
        assert str(manifest) in str(info.value)
    with pytest.raises(CheckpointError, match="checksum"):
        ModelCache(store, "cpu").get("apo")  # a picker refuses it too (and dead-letters with this reason)


def test_a_model_directory_with_a_changed_manifest_is_never_published(store, mic, tmp_path):
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset)
    reference, coords = exset.read_inputs(roots=[tmp_path])
    trained, info = train_model(reference, coords.xy, exset.diameter, CFG)
    version, tmp_dir = store.new_version_dir("apo")
    save_model(tmp_dir, trained.model, trained.bank, trained.geometry, info)
    _change_diameter(tmp_dir / MANIFEST, 97.0)
    with pytest.raises(CheckpointError, match="checksum mismatch") as info_:
        store.publish_version("apo", version, tmp_dir)
    assert str(tmp_dir / MANIFEST) in str(info_.value)
    assert store.current_version("apo") == v1 and store.versions("apo") == [v1]
    store.discard_version("apo", version)


def test_invalid_version_names_are_refused(store, mic, tmp_path):
    _exemplars(store, mic, tmp_path)
    with pytest.raises(InputError, match="invalid model version"):
        store.load_version("apo", "../../escape")


# ---------------------------------------------------------------------------------------------- model cache


class CountingStore(ProjectStore):
    """The real store, recording each load and optionally holding it until released (to test concurrency)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loads: list[str] = []
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def load_version(self, project, version, device="cpu"):
        self.loads.append(version)
        if self.hold:
            self.entered.set()
            assert self.release.wait(10), "test never released the load"
        return super().load_version(project, version, device)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_loads_once_and_reloads_only_when_current_changes(tmp_path, mic):
    store = CountingStore(tmp_path / "store")
    exset = _exemplars(store, mic, tmp_path)
    clock = FakeClock()
    cache = ModelCache(store, "cpu", check_interval_s=5.0, clock=clock)
    assert cache.get("apo") is None, "no model published yet"
    v1 = _train(store, exset, seed=1)
    cache.invalidate("apo")
    got = cache.get("apo")
    assert got is not None and got[0] == v1
    for _ in range(3):
        again = cache.get("apo")
        assert again is not None and again[1] is got[1]
    clock.now += 60  # re-reads current.json, which has not changed: no reload
    again = cache.get("apo")
    assert again is not None and again[1] is got[1] and store.loads == [v1]

    v2 = _train(store, exset, seed=2)
    assert cache.get("apo")[0] == v1, "current.json is not re-read before the interval"  # type: ignore[index]
    cache.invalidate("apo")  # a ModelPublished arrived
    second = cache.get("apo")
    assert second is not None and second[0] == v2 and second[1] is not got[1]

    v3 = _train(store, exset, seed=3)
    clock.now += 4.9
    assert cache.get("apo")[0] == v2  # type: ignore[index]
    clock.now += 0.2
    third = cache.get("apo")
    assert third is not None and third[0] == v3
    assert store.loads == [v1, v2, v3]


def test_loading_a_new_version_does_not_block_pickers_using_the_previous_one(tmp_path, mic):
    store = CountingStore(tmp_path / "store")
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset, seed=1)
    cache = ModelCache(store, "cpu", check_interval_s=3600.0)
    first = cache.get("apo")
    assert first is not None and first[0] == v1
    v2 = _train(store, exset, seed=2)
    store.hold = True
    cache.invalidate("apo")
    with ThreadPoolExecutor(max_workers=2) as pool:
        loading = pool.submit(cache.get, "apo")
        assert store.entered.wait(10), "the loader thread never started loading"
        during = pool.submit(cache.get, "apo").result(timeout=10)  # would time out if it waited on the load
        assert during is not None and during[0] == v1 and during[1] is first[1]
        store.release.set()
        loaded = loading.result(timeout=10)
    assert loaded is not None and loaded[0] == v2
    after = cache.get("apo")
    assert after is not None and after[0] == v2 and after[1] is loaded[1]
    assert store.loads == [v1, v2], "the new version was loaded once"


def test_cache_keeps_the_previous_model_when_the_new_version_is_corrupt(tmp_path, mic):
    store = CountingStore(tmp_path / "store")
    exset = _exemplars(store, mic, tmp_path)
    v1 = _train(store, exset, seed=1)
    cache = ModelCache(store, "cpu", check_interval_s=3600.0)
    first = cache.get("apo")
    assert first is not None
    v2 = _train(store, exset, seed=2)
    _flip_byte(store.root / "projects" / "apo" / MODELS / v2 / WEIGHTS)
    cache.invalidate("apo")
    kept = cache.get("apo")
    assert kept is not None and kept[0] == v1 and kept[1] is first[1]
    assert cache.get("apo")[0] == v1  # type: ignore[index]
    assert store.loads == [v1, v2], "a version that failed is not retried on every get"
    with pytest.raises(CheckpointError, match="checksum"):
        ModelCache(store, "cpu").get("apo")  # nothing to fall back on
