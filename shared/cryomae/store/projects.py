"""The project store: projects, their exemplar sets and their model versions, as plain files under one root.

Layout (``root`` is typically a Kubernetes PVC, possibly NFS-backed, shared by the trainer, pickers and CLI)::

    root/projects/<project>/project.json                    name, created, default diameter, train overrides
    root/projects/<project>/exemplars/<set-id>/exemplars.star    the exemplar centres (a copy, STAR loop)
    root/projects/<project>/exemplars/<set-id>/exemplar_set.json micrograph path, sha256, size, mtime, diameter...
    root/projects/<project>/exemplars/<set-id>/corrections.star  an operator's marks on other micrographs, if any
    root/projects/<project>/models/<version>/               a model directory as ``save_model`` writes it
    root/projects/<project>/current.json                    {"version": ...}: the version pickers use
    root/projects/<project>/.staging/                       work in progress (reserved versions, new sets)

Every change becomes visible in one rename, so a reader never sees half of anything:

- a project, an exemplar set and a model version are written in full in a hidden staging directory on the same
  filesystem and then renamed into place;
- ``current.json`` is replaced with ``os.replace`` (a new file written beside it, fsynced, renamed over it). A JSON
  pointer file was chosen over a symlink because rename of a regular file is atomic on every POSIX filesystem and
  NFS server, while symlinks are refused on some volumes (CIFS, some CSI drivers) and are cached more loosely by
  NFS clients.

Versions are ``v<number>-<UTC time the training started>`` (``v0001-20261124T120000Z``); they sort by number.
A number is reserved by creating ``.staging/v<number>`` (``mkdir`` is exclusive, also on NFS), so two trainers of
the same project never publish the same version. A training that fails, or a process that dies, leaves the
current version as it was; its staging directory is removed at once by ``staged_version``/``discard_version``
or later by ``cleanup``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from pydantic import ValidationError

from cryomae.config import TrainConfig
from cryomae.errors import CheckpointError, ConfigError, CryomaeError, InputError
from cryomae.io.atomic import fsync_path, write_json
from cryomae.io.coordinates import (
    Coordinates,
    Corrections,
    check_exemplars,
    check_inside,
    read_coordinates,
    read_corrections,
)
from cryomae.io.micrographs import MAX_MICROGRAPH_PIXELS, Micrograph, micrograph_shape, read_micrograph
from cryomae.io.roots import inside_roots
from cryomae.io.writers import write_coordinates, write_corrections
from cryomae.messages import check_name, valid_name
from cryomae.model.layout import MANIFEST, WEIGHTS, read_manifest, sha256_file

if TYPE_CHECKING:  # torch is imported only to load a model, so that the operator CLI starts fast
    import torch

    from cryomae.model.checkpoint import TrainedModel

log = structlog.get_logger("cryomae.store")

PROJECTS = "projects"
PROJECT_FILE = "project.json"
TRAINING_STATUS = "training.json"  # written by the trainer service
CURRENT_FILE = "current.json"
EXEMPLARS = "exemplars"
EXEMPLAR_FILE = "exemplar_set.json"
EXEMPLAR_STAR = "exemplars.star"
CORRECTIONS_STAR = "corrections.star"
DUPLICATE_FRACTION = 0.25  # two marks on one micrograph closer than this many diameters mark the same particle
MODELS = "models"
STAGING = ".staging"
STALE_STAGING_S = 6 * 3600.0
_VERSION = re.compile(r"^v(\d{4,})-(\d{8}T\d{6}Z)$")
_RESERVATION = re.compile(r"^v(\d{4,})$")


def _utc_stamp(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file beside ``path``, fsync, rename over it)."""
    write_json(path, data, indent=2)


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a store file; a missing or corrupt file is an InputError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"corrupt store file, not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"corrupt store file, expected a JSON object, got {type(data).__name__}")
    return data


def _number(version: str) -> int:
    """The number of a version name that matched ``_VERSION``."""
    return int(version[1 : version.index("-")])


def version_number(version: str) -> int | None:
    """The number of a model version name (``v0002-20261124T120000Z`` -> 2); None for a name of another form."""
    return _number(version) if _VERSION.match(version) else None


def _check_diameter(diameter: float | None, what: str) -> None:
    if diameter is not None and not (math.isfinite(diameter) and diameter > 0):
        raise InputError(None, f"{what} must be a positive number of pixels, got {diameter}")


@dataclass(frozen=True)
class Project:
    """A project: a name, an optional default particle diameter and training overrides for its models."""

    name: str
    path: Path
    created: float  # Unix seconds
    diameter: float | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The project's training configuration: defaults, then the project's overrides, then ``overrides``."""
        try:
            return TrainConfig(**{**self.train_overrides, **overrides})
        except ValidationError as e:
            raise ConfigError(f"project {self.name!r}: invalid training settings: {e}") from None


@dataclass(frozen=True)
class CorrectedMicrograph:
    """A micrograph an operator marked corrections on, stored with what tells later that it is unchanged."""

    path: Path  # absolute, as the session's outputs name it
    sha256: str
    size: int
    shape: tuple[int, int]  # (rows, columns)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "size": self.size, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CorrectedMicrograph:
        rows, cols = data["shape"]
        return cls(Path(data["path"]), str(data["sha256"]), int(data["size"]), (int(rows), int(cols)))


@dataclass(frozen=True)
class CorrectionInputs:
    """What training reads of one corrected micrograph: its pixels, and the centres (original pixels) of the
    particles the picker missed and of its wrong picks."""

    micrograph: Micrograph
    missed: np.ndarray  # [P, 2]
    wrong: np.ndarray  # [N, 2]


@dataclass(frozen=True)
class ExemplarSet:
    """Exemplars marked on one micrograph, stored with enough to check later that the micrograph is unchanged."""

    project: str
    id: str
    path: Path  # the set's directory
    micrograph: Path  # absolute path as given when the set was added
    micrograph_sha256: str
    micrograph_size: int
    micrograph_mtime: float
    micrograph_shape: tuple[int, int]  # (rows, columns)
    pixel_size: float | None
    diameter: float
    count: int
    created: float
    source: str  # the coordinate file the exemplars (or the corrections) were read from
    warnings: tuple[str, ...] = ()
    # a set of corrections shares the reference and exemplars of ``base`` and adds an operator's marks on other
    # micrographs (``corrections.star``: every mark of the sets before it, and the new ones)
    base: str | None = None
    corrections: tuple[CorrectedMicrograph, ...] = ()
    missed: int = 0  # marked particles the picker missed (positives)
    wrong: int = 0  # marked wrong picks (negatives)

    @property
    def coordinates_file(self) -> Path:
        return self.path / EXEMPLAR_STAR

    def coordinates(self) -> Coordinates:
        """The stored exemplar centres (original micrograph pixels, x = column)."""
        return read_coordinates(self.coordinates_file)

    def read_inputs(
        self, max_pixels: int | None = MAX_MICROGRAPH_PIXELS, *, roots: Sequence[Path]
    ) -> tuple[Micrograph, Coordinates]:
        """The micrograph and the exemplars, for training; InputError if the micrograph changed or vanished, or
        has more than ``max_pixels`` pixels, or now lies (resolved: symlinks followed) outside the data ``roots``.
        The resolved file is the one read."""
        path = _inside_data_roots(self.micrograph, roots)
        if not path.is_file():
            raise InputError(self.micrograph, f"micrograph of exemplar set {self.id} no longer exists")
        size = path.stat().st_size
        if size != self.micrograph_size or sha256_file(path) != self.micrograph_sha256:
            raise InputError(
                self.micrograph,
                f"changed since exemplar set {self.id} was stored (content differs; size {size}, "
                f"was {self.micrograph_size}); add the exemplars again",
            )
        mic = read_micrograph(path, max_pixels)
        coords = self.coordinates()
        check_inside(coords, mic.shape, self.coordinates_file)
        return mic, coords

    def marks(self) -> Corrections | None:
        """The stored corrections (micrograph names are the absolute paths); None for a set without."""
        return read_corrections(self.path / CORRECTIONS_STAR) if self.corrections else None

    def read_corrections(
        self, max_pixels: int | None = MAX_MICROGRAPH_PIXELS, *, roots: Sequence[Path]
    ) -> list[CorrectionInputs]:
        """Every corrected micrograph with its marks, for training; InputError as ``read_inputs`` when one changed,
        vanished or lies outside the data roots."""
        marks = self.marks()
        if marks is None:
            return []
        names = np.asarray(marks.names, dtype=object)
        out = []
        for record in self.corrections:
            path = _inside_data_roots(record.path, roots)
            if not path.is_file():
                raise InputError(record.path, f"a micrograph corrected in exemplar set {self.id} no longer exists")
            if path.stat().st_size != record.size or sha256_file(path) != record.sha256:
                raise InputError(record.path, f"changed since its corrections were stored in exemplar set {self.id}")
            mine = names == str(record.path)
            mic = read_micrograph(path, max_pixels)
            check_inside(Coordinates(marks.xy[mine]), mic.shape, self.path / CORRECTIONS_STAR)
            out.append(CorrectionInputs(mic, marks.xy[mine & marks.particle], marks.xy[mine & ~marks.particle]))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "micrograph": str(self.micrograph),
            "micrograph_sha256": self.micrograph_sha256,
            "micrograph_size": self.micrograph_size,
            "micrograph_mtime": self.micrograph_mtime,
            "micrograph_shape": list(self.micrograph_shape),
            "pixel_size": self.pixel_size,
            "diameter": self.diameter,
            "count": self.count,
            "created": self.created,
            "source": self.source,
            "warnings": list(self.warnings),
            **(
                {
                    "base": self.base,
                    "corrections": [c.to_json() for c in self.corrections],
                    "missed": self.missed,
                    "wrong": self.wrong,
                }
                if self.base is not None
                else {}
            ),
        }


class ProjectStore:
    """Projects, exemplar sets and model versions under ``root`` (see the module docstring for the layout).

    Safe for several processes at once (CLI, trainer, pickers) on one shared filesystem: every change is a rename.
    Nothing is created until something is written.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------------------------------ projects

    def _dir(self, name: str) -> Path:
        return self.root / PROJECTS / name

    def create_project(
        self,
        name: str,
        diameter: float | None = None,
        train_overrides: dict[str, Any] | None = None,
        exist_ok: bool = False,
    ) -> Project:
        """Create a project; with ``exist_ok`` an existing one is returned unchanged (its settings are kept)."""
        check_name(name, "project name")
        _check_diameter(diameter, "project diameter (--diameter)")
        overrides = dict(train_overrides or {})
        try:
            cfg = TrainConfig(**overrides)
        except ValidationError as e:
            raise ConfigError(f"project {name!r}: invalid training overrides: {e}") from None
        if self._dir(name).exists():
            if exist_ok:
                return self.get_project(name)
            raise InputError(None, f"project {name!r} already exists in {self.root}")
        parent = self.root / PROJECTS
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".new-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            (tmp / EXEMPLARS).mkdir()
            (tmp / MODELS).mkdir()
            record = {
                "name": name,
                "created": time.time(),
                "diameter": None if diameter is None else float(diameter),
                "train_overrides": cfg.model_dump(mode="json", include=set(overrides)),
            }
            _write_json(tmp / PROJECT_FILE, record)
            os.rename(tmp, self._dir(name))  # fails if another process created it meanwhile
        except OSError:
            shutil.rmtree(tmp)
            if self._dir(name).exists():
                if exist_ok:
                    return self.get_project(name)
                raise InputError(None, f"project {name!r} already exists in {self.root}") from None
            raise
        log.info("project_created", project=name, diameter=diameter, train_overrides=record["train_overrides"])
        return self.get_project(name)

    def get_project(self, name: str) -> Project:
        """The project called ``name``; InputError if the name is invalid or there is no such project."""
        check_name(name, "project name")
        path = self._dir(name)
        if not (path / PROJECT_FILE).is_file():
            create = f"cryomae project create {name} --diameter D"
            raise InputError(None, f"no project {name!r} in {self.root} (create it with `{create}`)")
        data = _read_json(path / PROJECT_FILE)
        try:
            return Project(
                name=str(data["name"]),
                path=path,
                created=float(data["created"]),
                diameter=None if data.get("diameter") is None else float(data["diameter"]),
                train_overrides=dict(data.get("train_overrides") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path / PROJECT_FILE, f"corrupt project file ({type(e).__name__}: {e})") from None

    def projects(self) -> list[Project]:
        """Every project, sorted by name."""
        parent = self.root / PROJECTS
        if not parent.is_dir():
            return []
        names = sorted(p.name for p in parent.iterdir() if valid_name(p.name) and (p / PROJECT_FILE).is_file())
        return [self.get_project(n) for n in names]

    def write_training_status(self, project: str, status: dict[str, Any]) -> None:
        """The project's training status (``training.json``: state, progress, error), replaced atomically."""
        _write_json(self.get_project(project).path / TRAINING_STATUS, status)

    def training_status(self, project: str) -> dict[str, Any] | None:
        """The last training status written for a project (None: never trained)."""
        path = self.get_project(project).path / TRAINING_STATUS
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            return {"state": "unknown", "error": f"{path}: {exc}"}
        return data

    # ------------------------------------------------------------------------------------------ exemplar sets

    def add_exemplars(
        self,
        project: str,
        micrograph: str | Path,
        coords: str | Path,
        diameter: float | None = None,
        *,
        roots: Sequence[Path],
    ) -> ExemplarSet:
        """Validate and store an exemplar set; ``diameter`` defaults to the project's.

        InputError (naming the file) when the micrograph lies outside the data ``roots`` (resolved: a symlink
        inside a root leading outside is refused), when the micrograph or the coordinates cannot be read, when
        there is no exemplar, or when one lies outside the image. Fewer than 5 exemplars is allowed but the
        returned set carries a warning (about 15 are recommended).
        """
        proj = self.get_project(project)
        diameter = proj.diameter if diameter is None else diameter
        if diameter is None:
            raise InputError(
                None, f"give the particle diameter (--diameter): project {project!r} has no default diameter"
            )
        _check_diameter(diameter, "particle diameter (--diameter)")
        mic_path = Path(os.path.abspath(micrograph))
        _inside_data_roots(mic_path, roots)  # the trainer checks it again when it reads the set
        coords_path = Path(coords)
        mic = read_micrograph(mic_path)
        ex = read_coordinates(coords_path)
        warnings = check_exemplars(ex, mic.shape, coords_path)
        if diameter >= min(mic.shape):
            size = f"{mic.shape[1]}x{mic.shape[0]}"
            raise InputError(mic_path, f"particle diameter {diameter} px does not fit in the {size} image")
        stat = mic_path.stat()
        created = time.time()
        set_id = f"{_utc_stamp(created)}-{uuid.uuid4().hex[:6]}"
        exset = ExemplarSet(
            project=project,
            id=set_id,
            path=proj.path / EXEMPLARS / set_id,
            micrograph=mic_path,
            micrograph_sha256=sha256_file(mic_path),
            micrograph_size=stat.st_size,
            micrograph_mtime=stat.st_mtime,
            micrograph_shape=(int(mic.shape[0]), int(mic.shape[1])),
            pixel_size=mic.pixel_size,
            diameter=float(diameter),
            count=len(ex),
            created=created,
            source=str(Path(os.path.abspath(coords_path))),
            warnings=tuple(warnings),
        )
        self._write_set(proj, exset, lambda tmp: write_coordinates(tmp / EXEMPLAR_STAR, Coordinates(ex.xy)))
        log.info("exemplars_added", project=project, exemplar_set=set_id, count=len(ex), micrograph=str(mic_path))
        return exset

    def _write_set(self, proj: Project, exset: ExemplarSet, write: Any) -> None:
        """Write an exemplar set in staging (``write(folder)`` its STAR files, then its JSON) and rename it in."""
        staging = proj.path / STAGING
        staging.mkdir(exist_ok=True)
        tmp = staging / f"exemplars-{exset.id}"
        tmp.mkdir()
        try:
            write(tmp)
            _write_json(tmp / EXEMPLAR_FILE, exset.to_json())
            (proj.path / EXEMPLARS).mkdir(exist_ok=True)
            os.rename(tmp, exset.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # the original error is what matters
            raise

    def add_corrections(
        self,
        project: str,
        base: str,
        marks: Corrections,
        source: str | Path,
        *,
        roots: Sequence[Path],
    ) -> tuple[ExemplarSet, dict[str, int]]:
        """Store an operator's corrections as a new exemplar set: the reference and exemplars of set ``base``, its
        marks, and ``marks`` (micrograph names: absolute paths) added to them.

        InputError (naming the file ``source``) when a micrograph lies outside the data ``roots`` or cannot be
        read, when a mark lies outside its micrograph, or when two marks of the file lie within
        ``DUPLICATE_FRACTION`` diameters of each other on one micrograph. A mark that repeats one of the earlier
        sets (same place, same kind) is skipped, one that contradicts it replaces it; nothing new is an InputError.
        Returns the set and the counts (added, already, replaced)."""
        proj = self.get_project(project)
        before = self.exemplar_set(project, base)
        src = Path(os.path.abspath(source))
        near = DUPLICATE_FRACTION * before.diameter
        old = before.marks()
        kept: list[tuple[str, float, float, bool]] = (
            []
            if old is None
            else [
                (n, float(x), float(y), bool(f)) for n, (x, y), f in zip(old.names, old.xy, old.particle, strict=True)
            ]
        )
        counts = {"added": 0, "already": 0, "replaced": 0}
        shapes: dict[str, tuple[int, int]] = {}
        for name in dict.fromkeys(marks.names):  # each micrograph once, in file order
            mine = np.array([n == name for n in marks.names])
            path = _inside_data_roots(Path(name), roots)
            shape = micrograph_shape(path) if path.is_file() else None
            if shape is None:
                raise InputError(src, f"micrograph {name} cannot be read (missing, or not a micrograph)")
            shapes[name] = shape
            xy, flags = marks.xy[mine], marks.particle[mine]
            check_inside(Coordinates(xy), shape, src)
            gaps = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))  # [n, n]
            np.fill_diagonal(gaps, np.inf)
            if (gaps < near).any():
                i, j = np.unravel_index(int(np.argmin(gaps)), gaps.shape)
                raise InputError(
                    src,
                    f"two marks on {name} mark the same particle: ({xy[i, 0]:.1f}, {xy[i, 1]:.1f}) and "
                    f"({xy[j, 0]:.1f}, {xy[j, 1]:.1f}) lie {gaps[i, j]:.1f} px apart (under {near:.1f} px)",
                )
            for (x, y), flag in zip(xy, flags, strict=True):
                same = [k for k, m in enumerate(kept) if m[0] == name and math.hypot(m[1] - x, m[2] - y) < near]
                if any(kept[k][3] == bool(flag) for k in same):
                    counts["already"] += 1
                    continue
                counts["replaced" if same else "added"] += 1
                kept = [m for k, m in enumerate(kept) if k not in same] + [(name, float(x), float(y), bool(flag))]
        if not counts["added"] and not counts["replaced"]:
            raise InputError(src, f"nothing new: every mark is already in exemplar set {base} of project {project!r}")
        # a micrograph of the earlier sets keeps its record (training checks it is unchanged); a new one is hashed
        earlier = {str(c.path): c for c in before.corrections}
        fresh = {name: shapes[name] for name in dict.fromkeys(marks.names)}
        records = [
            earlier[name] if name in earlier and name not in fresh else _corrected(Path(name), fresh[name])
            for name in dict.fromkeys(m[0] for m in kept)
        ]
        created = time.time()
        missed = sum(1 for m in kept if m[3])
        exset = dataclasses.replace(
            before,
            id=f"{_utc_stamp(created)}-{uuid.uuid4().hex[:6]}",
            created=created,
            source=str(src),
            warnings=(),
            base=before.id,
            corrections=tuple(records),
            missed=missed,
            wrong=len(kept) - missed,
        )
        exset = dataclasses.replace(exset, path=proj.path / EXEMPLARS / exset.id)

        def write(tmp: Path) -> None:
            shutil.copyfile(before.coordinates_file, tmp / EXEMPLAR_STAR)
            names, xs, ys, flags = zip(*kept, strict=True)
            write_corrections(tmp / CORRECTIONS_STAR, list(names), np.stack([xs, ys], axis=1), np.array(flags))

        self._write_set(proj, exset, write)
        log.info("corrections_added", project=project, exemplar_set=exset.id, base=base, **counts)
        return exset, counts

    def exemplar_set(self, project: str, set_id: str) -> ExemplarSet:
        """A stored exemplar set; InputError if the project or the set does not exist."""
        proj = self.get_project(project)
        check_name(set_id, "exemplar set id")
        path = proj.path / EXEMPLARS / set_id
        if not (path / EXEMPLAR_FILE).is_file():
            raise InputError(None, f"no exemplar set {set_id!r} in project {project!r}")
        data = _read_json(path / EXEMPLAR_FILE)
        try:
            rows, cols = data["micrograph_shape"]
            return ExemplarSet(
                project=project,
                id=set_id,
                path=path,
                micrograph=Path(data["micrograph"]),
                micrograph_sha256=str(data["micrograph_sha256"]),
                micrograph_size=int(data["micrograph_size"]),
                micrograph_mtime=float(data["micrograph_mtime"]),
                micrograph_shape=(int(rows), int(cols)),
                pixel_size=None if data.get("pixel_size") is None else float(data["pixel_size"]),
                diameter=float(data["diameter"]),
                count=int(data["count"]),
                created=float(data["created"]),
                source=str(data["source"]),
                warnings=tuple(str(w) for w in data.get("warnings", [])),
                base=None if data.get("base") is None else str(data["base"]),
                corrections=tuple(CorrectedMicrograph.from_json(c) for c in data.get("corrections", [])),
                missed=int(data.get("missed", 0)),
                wrong=int(data.get("wrong", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path / EXEMPLAR_FILE, f"corrupt exemplar set file ({type(e).__name__}: {e})") from None

    def exemplar_sets(self, project: str) -> list[ExemplarSet]:
        """Every exemplar set of a project, oldest first."""
        folder = self.get_project(project).path / EXEMPLARS
        ids = sorted(p.name for p in folder.iterdir() if (p / EXEMPLAR_FILE).is_file()) if folder.is_dir() else []
        return [self.exemplar_set(project, i) for i in ids]

    # ------------------------------------------------------------------------------------------ model versions

    def versions(self, project: str) -> list[str]:
        """Published versions of a project, oldest (lowest number) first."""
        folder = self.get_project(project).path / MODELS
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if _VERSION.match(p.name) and p.is_dir()]
        return sorted(found, key=_number)

    def _reservation(self, project: str, version: str) -> Path:
        m = _VERSION.match(version)
        if m is None:
            raise InputError(None, f"invalid model version {version!r} (expected like v0001-20261124T120000Z)")
        return self._dir(project) / STAGING / f"v{m.group(1)}"

    def new_version_dir(self, project: str) -> tuple[str, Path]:
        """Reserve the next version number; returns the version and an empty directory to write the model into.

        Write the model there (``save_model(tmp_dir, ...)``), then ``publish_version``, or ``discard_version``
        when training fails. Until published, nothing of it is visible in ``versions`` or to pickers.
        """
        proj = self.get_project(project)
        staging = proj.path / STAGING
        staging.mkdir(exist_ok=True)
        while True:
            # staging first, then models: a reservation being published is renamed into models before its
            # staging directory goes, so one of the two listings sees its number
            used = [int(m.group(1)) for p in staging.iterdir() if (m := _RESERVATION.match(p.name))]
            used += [_number(v) for v in self.versions(project)]
            number = max(used, default=0) + 1
            version = f"v{number:04d}-{_utc_stamp(time.time())}"
            reservation = self._reservation(project, version)
            try:
                reservation.mkdir()
            except FileExistsError:
                continue  # another trainer took this number between the listing and mkdir
            tmp_dir = reservation / "model"
            tmp_dir.mkdir()
            return version, tmp_dir

    def publish_version(self, project: str, version: str, tmp_dir: str | Path) -> Path:
        """Move a fully written model directory to ``models/<version>`` and make it current.

        The weights' checksum is verified first (CheckpointError if the directory is incomplete), so a
        half-written model can never become visible. Returns the published directory.
        """
        reservation = self._reservation(project, version)
        src = Path(tmp_dir)
        if src != reservation / "model":
            raise CryomaeError(f"{src}: not the directory reserved for version {version} ({reservation / 'model'})")
        if not src.is_dir():
            raise CheckpointError(f"{src}: the directory of version {version} is gone (removed by cleanup?)")
        _verify_complete(src)
        target = self._dir(project) / MODELS / version
        if target.exists():
            raise CheckpointError(f"{target}: version {version} is already published")
        target.parent.mkdir(exist_ok=True)
        os.rename(src, target)
        shutil.rmtree(reservation)
        self.set_current(project, version)
        log.info("model_version_published", project=project, version=version, path=str(target))
        return target

    def discard_version(self, project: str, version: str) -> None:
        """Remove an unpublished version's staging directory (after a failed training)."""
        reservation = self._reservation(project, version)
        if reservation.exists():
            shutil.rmtree(reservation)

    @contextmanager
    def staged_version(self, project: str) -> Iterator[tuple[str, Path]]:
        """``with store.staged_version(p) as (version, tmp_dir): save_model(tmp_dir, ...)`` publishes on success.

        If the block raises (or publishing fails), the staged directory is removed and the current version stays.
        """
        version, tmp_dir = self.new_version_dir(project)
        try:
            yield version, tmp_dir
            self.publish_version(project, version, tmp_dir)
        finally:
            self.discard_version(project, version)

    def set_current(self, project: str, version: str) -> None:
        """Point ``current.json`` at a published version (atomic replace); also the way to roll back."""
        self._reservation(project, version)  # validates the name
        if version not in self.versions(project):
            raise InputError(None, f"no published version {version!r} in project {project!r}")
        previous = self.current_version(project)
        _write_json(
            self._dir(project) / CURRENT_FILE, {"version": version, "previous": previous, "switched": time.time()}
        )

    def current_version(self, project: str) -> str | None:
        """The version pickers should use, or None before the first model is published."""
        path = self.get_project(project).path / CURRENT_FILE
        if not path.is_file():
            return None
        version = _read_json(path).get("version")
        if not isinstance(version, str) or _VERSION.match(version) is None:
            raise InputError(path, f"corrupt current-version file (version {version!r})")
        return version

    def current_exemplar_set(self, project: str) -> ExemplarSet:
        """The exemplar set the current model was trained on (before any model: the newest set); InputError when
        the project has no exemplar set."""
        version = self.current_version(project)
        if version is not None:
            manifest = read_manifest(self.get_project(project).path / MODELS / version / MANIFEST)
            set_id = (manifest.get("exemplar_set") or {}).get("id")
            if isinstance(set_id, str):
                return self.exemplar_set(project, set_id)
        sets = self.exemplar_sets(project)
        if not sets:
            add = f"cryomae exemplars add --project {project} ..."
            raise InputError(None, f"project {project!r} has no exemplars yet; register them first (`{add}`)")
        return max(sets, key=lambda s: s.created)

    def load_version(self, project: str, version: str, device: torch.device | str = "cpu") -> TrainedModel:
        """Load a published version, verifying its checksum (CheckpointError if missing or corrupt)."""
        self._reservation(project, version)  # validates the name
        path = self.get_project(project).path / MODELS / version
        if not path.is_dir():
            raise CheckpointError(f"{path}: no version {version!r} in project {project!r}")
        from cryomae.model.checkpoint import load_model

        return load_model(path, device)

    def load_current(self, project: str, device: torch.device | str = "cpu") -> TrainedModel | None:
        """The current version's model, or None before the first model is published."""
        version = self.current_version(project)
        return None if version is None else self.load_version(project, version, device)

    # ------------------------------------------------------------------------------------------ housekeeping

    def cleanup(self, older_than_s: float = STALE_STAGING_S) -> list[Path]:
        """Remove staging left by crashed processes, when older than ``older_than_s``; returns what was removed.

        The age keeps a training still running in another process safe; ``0`` removes every leftover (use it only
        when no trainer can be running).
        """
        parent = self.root / PROJECTS
        if not parent.is_dir():
            return []
        now = time.time()
        leftovers = [p for p in parent.iterdir() if p.name.startswith(".new-")]
        for proj in parent.iterdir():
            if (proj / STAGING).is_dir():
                leftovers += list((proj / STAGING).iterdir())
        removed = []
        for path in leftovers:
            try:
                if older_than_s > 0 and now - path.lstat().st_mtime < older_than_s:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue  # published or discarded by its owner meanwhile
            removed.append(path)
        if removed:
            log.info("store_cleanup", removed=[str(p) for p in removed])
        return removed


def _corrected(path: Path, shape: tuple[int, int]) -> CorrectedMicrograph:
    """The record of a micrograph marked now: what tells training later that it is unchanged."""
    return CorrectedMicrograph(path, sha256_file(path), path.stat().st_size, shape)


def _inside_data_roots(micrograph: Path, roots: Sequence[Path]) -> Path:
    """The resolved path of an exemplar micrograph, if it lies under a data root (the picker's rule)."""
    resolved_roots = [Path(r).resolve() for r in roots]
    why = "; the trainer reads exemplar micrographs only under the data roots"
    return inside_roots(micrograph, resolved_roots, why)


def _verify_complete(model_dir: Path) -> None:
    """A model directory is complete when its manifest is intact (its checksum) and names the sha256 its weights
    file has."""
    try:
        expected = read_manifest(model_dir / MANIFEST)["weights"]["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{model_dir}: no {MANIFEST}; the model was not fully written") from None
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{model_dir / MANIFEST}: incomplete manifest ({e})") from None
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing weights file; the model was not fully written")
    if sha256_file(weights) != expected:
        raise CheckpointError(f"{weights}: checksum differs from the manifest; the model was not fully written")
    for f in (weights, model_dir / MANIFEST):
        fsync_path(f)  # on disk before the rename makes it visible
