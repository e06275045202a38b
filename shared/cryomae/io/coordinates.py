"""Reading particle coordinates (RELION STAR, EMAN ``.box`` and CSV) and the rules they must meet; writing them
is ``cryomae.io.writers``.

Coordinate convention of the whole project: coordinates are particle centres in pixels, ``x`` = column and
``y`` = row of the micrograph array as read (``data[y, x]``), 0-based, pixel centres at integer positions.
``.box`` files store box corners; they are converted to centres on read and back on write.

Bad input files raise :class:`~cryomae.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryomae.errors import InputError

if TYPE_CHECKING:  # pandas and starfile are imported only to read a STAR file: the services' start-up skips them
    import pandas as pd

COORDINATE_SUFFIXES: tuple[str, ...] = (".star", ".box", ".csv")

_X_NAMES = ("rlncoordinatex", "x")
_Y_NAMES = ("rlncoordinatey", "y")
_SCORE_NAMES = ("rlnautopickfigureofmerit", "score", "fom")
_NAME_NAMES = ("rlnmicrographname", "micrograph")
_STRING_COLUMNS = ["rlnMicrographName", "rlnMicrographCoordinates", "_rlnMicrographName"]
_BOX_FIELDS = ("corner x", "corner y", "box width", "box height")


@dataclass(eq=False)
class Coordinates:
    """Particle centres ``xy`` (float64 ``[N, 2]``, columns x, y), optional scores and micrograph names."""

    xy: np.ndarray
    scores: np.ndarray | None = None
    micrograph_names: list[str] | None = None

    def __post_init__(self) -> None:
        xy = np.asarray(self.xy, dtype=np.float64)
        if xy.size == 0:
            xy = xy.reshape(0, 2)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"xy must have shape [N, 2], got {xy.shape}")
        self.xy = xy
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
            if len(self.scores) != len(xy):
                raise ValueError(f"{len(self.scores)} scores for {len(xy)} coordinates")
        if self.micrograph_names is not None:
            self.micrograph_names = [str(n) for n in self.micrograph_names]
            if len(self.micrograph_names) != len(xy):
                raise ValueError(f"{len(self.micrograph_names)} micrograph names for {len(xy)} coordinates")

    def __len__(self) -> int:
        return int(self.xy.shape[0])


# ---------------------------------------------------------------------------------------------- reading


def _key(column: object) -> str:
    """Column name for matching: leading underscores dropped, case folded."""
    return str(column).lstrip("_").lower()


def _find(columns: Sequence[object], names: tuple[str, ...]) -> Any | None:
    """The first column whose key is one of ``names`` (in the order of ``names``), else None."""
    keys = {_key(c): c for c in columns}
    return next((keys[n] for n in names if n in keys), None)


def _floats(path: Path, values: Sequence[object] | np.ndarray, column: str, where: Callable[[int], str]) -> np.ndarray:
    """Parse a column as finite floats; the first bad value is reported with its row."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fiu":
        out = arr.astype(np.float64)
    else:
        out = np.empty(len(arr), dtype=np.float64)
        for i, v in enumerate(arr):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                problem = f"non-numeric value {str(v)!r} in column {column} at {where(i)}"
                raise InputError(path, problem) from None
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        kind = "NaN" if np.isnan(out[i]) else "infinite"
        raise InputError(path, f"{kind} value in column {column} at {where(i)}")
    return out


def _from_table(
    path: Path,
    columns: Sequence[object],
    get: Callable[[Any], Sequence[object] | np.ndarray],
    where: Callable[[int], str],
    found: str,
) -> Coordinates:
    """Build Coordinates from a table given its column names and a column getter."""
    xcol, ycol = _find(columns, _X_NAMES), _find(columns, _Y_NAMES)
    if xcol is None or ycol is None:
        need = "need rlnCoordinateX/rlnCoordinateY or x/y"
        raise InputError(path, f"no coordinate columns ({need}); found {found}")
    x = _floats(path, get(xcol), str(xcol), where)
    y = _floats(path, get(ycol), str(ycol), where)
    scol, ncol = _find(columns, _SCORE_NAMES), _find(columns, _NAME_NAMES)
    scores = None if scol is None else _floats(path, get(scol), str(scol), where)
    names = None if ncol is None else [str(v) for v in get(ncol)]
    return Coordinates(np.stack([x, y], axis=1).reshape(-1, 2), scores, names)


def _columns_text(columns: Sequence[object]) -> str:
    return ", ".join(str(c) for c in columns) if len(columns) else "none"


def _star_blocks(path: Path) -> dict[str, Any]:
    """Every data block of a STAR file (starfile's tables or key/value dicts); InputError naming the file when it
    cannot be parsed."""
    import starfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas/starfile internals; the result is validated by the caller
            return dict(starfile.read(path, always_dict=True, parse_as_string=_STRING_COLUMNS))
    except Exception as exc:  # starfile raises many types (ValueError, TypeError, pandas errors) on bad text
        raise InputError(path, f"cannot parse STAR file: {type(exc).__name__}: {exc}") from exc


def _read_star(path: Path) -> Coordinates:
    """The first block of a STAR file that has coordinate columns (a loop, or key/value pairs for one row)."""
    import pandas as pd

    blocks = _star_blocks(path)
    if not blocks:
        raise InputError(path, "no data_ block found (empty or not a STAR file)")
    seen = []
    for name, block in blocks.items():
        table = pd.DataFrame([block]) if isinstance(block, dict) else block
        if not isinstance(table, pd.DataFrame):
            continue
        columns = list(table.columns)
        if _find(columns, _X_NAMES[:1]) is not None and _find(columns, _Y_NAMES[:1]) is not None:
            return _star_table(path, str(name), table)
        seen.append(f"data_{name} ({_columns_text(columns)})")
    raise InputError(
        path,
        "no coordinate columns (need rlnCoordinateX and rlnCoordinateY); found "
        + ("; ".join(seen) if seen else "no tables"),
    )


def _star_table(path: Path, block: str, table: pd.DataFrame) -> Coordinates:
    """Coordinates from the STAR block that has the coordinate columns."""

    def column(c: Any) -> np.ndarray:
        return table[c].to_numpy()

    def where(i: int) -> str:
        return f"row {i + 1} of data_{block}"

    return _from_table(path, list(table.columns), column, where, "")


def _box_field(path: Path, text: str, column: str, line_no: int) -> float:
    """One finite number of a .box line, or an InputError naming the line."""
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"non-numeric value {text!r} ({column}) on line {line_no}") from None
    if not np.isfinite(value):
        kind = "NaN" if np.isnan(value) else "infinite"
        raise InputError(path, f"{kind} value ({column}) on line {line_no}")
    return value


def _read_box(path: Path) -> Coordinates:
    """EMAN .box: corner x, corner y, width, height per line (extra columns ignored); returns centres."""
    rows: list[list[float]] = []
    for line_no, line in enumerate(_text_lines(path), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 4:
            raise InputError(
                path,
                f"line {line_no} has {len(fields)} columns; a .box line needs "
                "corner x, corner y, box width, box height",
            )
        rows.append([_box_field(path, v, c, line_no) for v, c in zip(fields[:4], _BOX_FIELDS, strict=True)])
        if rows[-1][2] < 0 or rows[-1][3] < 0:
            raise InputError(path, f"negative box size on line {line_no}")
    box = np.array(rows, dtype=np.float64).reshape(-1, 4)
    return Coordinates(box[:, :2] + box[:, 2:] / 2.0)


def _text_lines(path: Path) -> list[str]:
    """The file's lines as text (UTF-8, BOM allowed); undecodable bytes are an InputError."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not a text file ({exc.reason} at byte {exc.start})") from exc


def _read_csv(path: Path) -> Coordinates:
    """CSV with a header row: x,y or rlnCoordinateX,rlnCoordinateY; optional score and micrograph columns."""
    try:
        rows = list(csv.reader(_text_lines(path)))
    except csv.Error as exc:
        raise InputError(path, f"cannot parse CSV: {exc}") from exc
    numbered = [(i, [f.strip() for f in r]) for i, r in enumerate(rows, 1) if r and any(f.strip() for f in r)]
    if not numbered:
        raise InputError(path, "empty file; a CSV needs a header row naming the columns (x,y)")
    (_, header), body = numbered[0], numbered[1:]
    for line_no, r in body:
        if len(r) != len(header):
            raise InputError(path, f"line {line_no} has {len(r)} fields but the header has {len(header)}")
    lines = [n for n, _ in body]
    index = {c: k for k, c in enumerate(header)}

    def column(c: Any) -> list[str]:
        return [r[index[c]] for _, r in body]

    def where(i: int) -> str:
        return f"row {i + 1} (line {lines[i]})"

    found = f"header {_columns_text(header)} (a header row is required)"
    return _from_table(path, header, column, where, found)


def read_coordinates(path: str | Path) -> Coordinates:
    """Read particle centres from ``.star``, ``.box`` or ``.csv`` (x = column, y = row, pixels)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in COORDINATE_SUFFIXES:
        shown = f"'{p.suffix}'" if p.suffix else "(no suffix)"
        supported = ", ".join(COORDINATE_SUFFIXES)
        raise InputError(p, f"unsupported coordinate file type {shown}; supported: {supported}")
    if not p.is_file():
        raise InputError(p, "file not found" if not p.exists() else "not a regular file (a directory?)")
    if suffix == ".star":
        return _read_star(p)
    if suffix == ".box":
        return _read_box(p)
    return _read_csv(p)


def check_inside(coords: Coordinates, shape: tuple[int, int], path: str | Path) -> None:
    """Raise InputError unless every centre lies in the image: 0 <= x <= W-1 and 0 <= y <= H-1.

    ``shape`` is (H, W) as in ``Micrograph.shape``; the message says the image size as WxH.
    """
    H, W = int(shape[0]), int(shape[1])
    x, y = coords.xy[:, 0], coords.xy[:, 1]
    outside = ~((x >= 0) & (x <= W - 1) & (y >= 0) & (y <= H - 1))
    n = int(outside.sum())
    if n:
        i = int(np.argmax(outside))
        what = "coordinate lies" if n == 1 else "coordinates lie"
        size = f"{W}x{H} image" if W == H else f"{W}x{H} image ({W} columns, {H} rows)"
        raise InputError(
            path, f"{n} {what} outside the {size} (first: x={float(x[i])}, y={float(y[i])}; x is the column, y the row)"
        )


# ---------------------------------------------------------------------------------------------- exemplars


RECOMMENDED_EXEMPLARS = 15  # the few-shot protocol's count: the accuracy figures are measured with it
FEW_EXEMPLARS = 5  # below this many, training still runs but the operator is warned


def check_exemplars(coords: Coordinates, shape: tuple[int, int], path: str | Path) -> list[str]:
    """The exemplar rule, the same for the CLI and the services: at least one centre, every centre inside the
    image (``check_inside``); returns the warnings to show (fewer than ``FEW_EXEMPLARS``)."""
    if len(coords) == 0:
        raise InputError(path, "no exemplar coordinates in the file; mark at least one particle")
    check_inside(coords, shape, path)
    if len(coords) < FEW_EXEMPLARS:
        return [f"few exemplars: {len(coords)}; about {RECOMMENDED_EXEMPLARS} are recommended"]
    return []


# ---------------------------------------------------------------------------------------------- corrections

PARTICLE_LABEL = "cryomaeParticle"  # corrections.star: 1 a particle the picker missed, 0 a wrong pick
MAX_CORRECTIONS_BYTES = 4 << 20  # a corrections file is a few kilobytes; a larger one is refused before it is read
MAX_CORRECTIONS = 5000  # marks in one file
_HEADER_PREFIX = "# cryomae corrections: project "


@dataclass(eq=False)
class Corrections:
    """An operator's marks from the session page: micrograph names as the session's STAR files write them, centres
    (original pixels, x = column) and whether each is a particle (missed) or not (a wrong pick); the project and
    session the page named in the file's first line, where it did."""

    names: list[str]
    xy: np.ndarray  # [N, 2]
    particle: np.ndarray  # bool [N]
    project: str | None = None
    session: str | None = None


def _corrections_origin(path: Path) -> tuple[str | None, str | None]:
    """The project and session named by the page's first line (``# cryomae corrections: project P, session S,
    ...``); (None, None) when the file has no such line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline(4096)
    if not first.startswith(_HEADER_PREFIX):
        return None, None
    project, sep, rest = first[len(_HEADER_PREFIX) :].partition(", session ")
    return (project.strip(), rest.partition(",")[0].strip()) if sep else (None, None)


def read_corrections(path: str | Path) -> Corrections:
    """Read a ``corrections.star`` (the session page's, or any STAR file with rlnMicrographName, rlnCoordinateX,
    rlnCoordinateY and cryomaeParticle 0/1); InputError naming the file and the problem otherwise. The size is
    checked before anything is read."""
    p = Path(path)
    if p.suffix.lower() != ".star":
        raise InputError(p, "corrections must be a .star file (the session page's corrections.star)")
    if not p.is_file():
        raise InputError(p, "file not found" if not p.exists() else "not a regular file (a directory?)")
    size = p.stat().st_size
    if size > MAX_CORRECTIONS_BYTES:
        raise InputError(p, f"{size} bytes: larger than {MAX_CORRECTIONS_BYTES >> 20} MiB, not a corrections file")
    blocks = _star_blocks(p)
    table = next((b for b in blocks.values() if hasattr(b, "columns") and PARTICLE_LABEL in b.columns), None)
    if table is None:
        raise InputError(p, f"no loop with _{PARTICLE_LABEL} (1: a missed particle, 0: a wrong pick)")
    coords = _star_table(p, "corrections", table)
    if coords.micrograph_names is None:
        raise InputError(p, "no rlnMicrographName column: each mark must name its micrograph")
    if len(coords) == 0:
        raise InputError(p, "no marks in the file")
    if len(coords) > MAX_CORRECTIONS:
        raise InputError(p, f"{len(coords)} marks: more than {MAX_CORRECTIONS} in one file")
    labels = _floats(p, table[PARTICLE_LABEL].to_numpy(), PARTICLE_LABEL, lambda i: f"row {i + 1}")
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(
            p, f"_{PARTICLE_LABEL} must be 1 (missed particle) or 0 (wrong pick), got {labels[i]} at row {i + 1}"
        )
    project, session = _corrections_origin(p)
    return Corrections(coords.micrograph_names, coords.xy, labels == 1.0, project, session)
