"""Reading and writing particle coordinates: RELION STAR, EMAN ``.box`` and CSV.

Coordinate convention of the whole project: coordinates are particle centres in pixels, ``x`` = column and
``y`` = row of the micrograph array as read (``data[y, x]``), 0-based, pixel centres at integer positions.
``.box`` files store box corners; they are converted to centres on read and back on write.

STAR writers produce text themselves rather than through ``starfile.write`` so that every table is a loop
(also with 0 or 1 rows: cryoSPARC cannot read a single row written as key/value pairs) and the column order
and number formats are fixed. Strings that contain spaces or ``#``, or that start like a STAR keyword, are
written in double quotes; quotes, tabs, newlines and other control characters are rejected.
Bad input files raise :class:`~cryomae.errors.InputError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from cryomae.errors import InputError
from cryomae.io.atomic import atomic_output

COORDINATE_SUFFIXES: tuple[str, ...] = (".star", ".box", ".csv")

_X_NAMES = ("rlncoordinatex", "x")
_Y_NAMES = ("rlncoordinatey", "y")
_SCORE_NAMES = ("rlnautopickfigureofmerit", "score", "fom")
_NAME_NAMES = ("rlnmicrographname", "micrograph")
_STRING_COLUMNS = ["rlnMicrographName", "rlnMicrographCoordinates", "_rlnMicrographName"]
_BAD_STAR_CHARS = re.compile(r"[\"'\x00-\x1f\x7f]")
_BOX_FIELDS = ("corner x", "corner y", "box width", "box height")
_STAR_KEYWORDS = ("data_", "loop_", "save_", "global_", "stop_")
_EXTRA_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")
_AUTOPICK_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit", "rlnAnglePsi")


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


def _read_star(path: Path) -> Coordinates:
    """The first block of a STAR file that has coordinate columns (a loop, or key/value pairs for one row)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas/starfile internals; the result is validated below
            blocks = starfile.read(path, always_dict=True, parse_as_string=_STRING_COLUMNS)
    except Exception as exc:  # starfile raises many types (ValueError, TypeError, pandas errors) on bad text
        raise InputError(path, f"cannot parse STAR file: {type(exc).__name__}: {exc}") from exc
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


# ---------------------------------------------------------------------------------------------- writing


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


def _star_string(path: Path, value: str, what: str) -> str:
    """A string as a STAR token: quoted when it holds a space or '#' or starts like a keyword."""
    if not value:
        raise InputError(path, f"empty {what}; a STAR file cannot hold an empty name")
    bad = _BAD_STAR_CHARS.search(value)
    if bad:
        raise InputError(
            path,
            f"{what} {value!r} contains {bad.group()!r}; STAR names cannot hold quotes, "
            "tabs, newlines or control characters",
        )
    needs_quotes = " " in value or "#" in value or value[0] in "_;$[]" or value.lower().startswith(_STAR_KEYWORDS)
    return f'"{value}"' if needs_quotes else value


def _star_value(path: Path, value: object, column: str) -> str:
    """Format one extra-column value: int as is, float with 6 decimals, str as a STAR token."""
    if isinstance(value, bool | np.bool_ | int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.6f}"
    if isinstance(value, str):
        return _star_string(path, value, f"value in column {column}")
    raise ValueError(f"column {column}: cannot write {type(value).__name__} value {value!r} to STAR")


def _star_loop(block: str, columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """STAR text of one data block holding one loop; ``cells`` is column-major (one list per column)."""
    lines = ["# written by cryomae", "", f"data_{block}", "", "loop_"]
    lines += [f"_{c} #{k}" for k, c in enumerate(columns, 1)]
    lines += ["\t".join(row) for row in zip(*cells, strict=True)]
    return "\n".join(lines) + "\n\n"


def _write_text(path: str | Path, text: str) -> None:
    """Write text atomically (temp file beside ``path``, then rename)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _check_xy(xy: np.ndarray, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate centres (and scores) before writing: [N, 2] finite floats and N finite scores."""
    c = Coordinates(xy, scores)
    if not np.isfinite(c.xy).all():
        raise ValueError("cannot write NaN or infinite coordinates")
    if c.scores is not None and not np.isfinite(c.scores).all():
        raise ValueError("cannot write NaN or infinite scores")
    return c.xy, c.scores


def _fmt(values: np.ndarray, spec: str) -> list[str]:
    return [format(float(v), spec) for v in values]


def write_coordinates(path: str | Path, coords: Coordinates, box_size: float | None = None) -> None:
    """Write centres by suffix: ``.star`` loop, ``.box`` corners (needs ``box_size``) or ``.csv``; atomic."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in COORDINATE_SUFFIXES:
        raise InputError(
            p, f"unsupported coordinate file type '{p.suffix}'; supported: {', '.join(COORDINATE_SUFFIXES)}"
        )
    xy, scores = _check_xy(coords.xy, coords.scores)
    names = coords.micrograph_names
    if suffix == ".box":
        if box_size is None or not np.isfinite(box_size) or box_size <= 0:
            raise InputError(p, f"writing a .box file needs a positive box_size in pixels (got {box_size})")
        corner = xy - box_size / 2.0
        b = f"{box_size:.2f}".rstrip("0").rstrip(".")
        _write_text(p, "".join(f"{cx:.2f}\t{cy:.2f}\t{b}\t{b}\n" for cx, cy in corner))
    elif suffix == ".star":
        columns, cells = ["rlnCoordinateX", "rlnCoordinateY"], [_fmt(xy[:, 0], ".6f"), _fmt(xy[:, 1], ".6f")]
        if scores is not None:
            columns.append("rlnAutopickFigureOfMerit")
            cells.append(_fmt(scores, ".6f"))
        if names is not None:
            columns.append("rlnMicrographName")
            cells.append([_star_string(p, n, "micrograph name") for n in names])
        _write_text(p, _star_loop("", columns, cells))
    else:
        _write_text(p, _csv_text(xy, scores, names))


def _csv_text(xy: np.ndarray, scores: np.ndarray | None, names: list[str] | None) -> str:
    """CSV text with header x,y[,score][,micrograph]; names quoted by the csv module when needed."""
    header = ["x", "y"]
    cells: list[list[str]] = [_fmt(xy[:, 0], ".6f"), _fmt(xy[:, 1], ".6f")]
    if scores is not None:
        header.append("score")
        cells.append(_fmt(scores, ".6f"))
    if names is not None:
        header.append("micrograph")
        cells.append(list(names))

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(zip(*cells, strict=True))
    return buf.getvalue()


def write_autopick_star(path: str | Path, xy: np.ndarray, scores: np.ndarray) -> None:
    """RELION per-micrograph autopick STAR: block ``data_``, always a loop of X, Y, class 0, FOM, psi 0.0."""
    c, s = _check_xy(xy, scores)
    assert s is not None
    n = len(c)
    cells = [_fmt(c[:, 0], ".2f"), _fmt(c[:, 1], ".2f"), ["0"] * n, _fmt(s, ".6f"), ["0.0"] * n]
    _write_text(path, _star_loop("", _AUTOPICK_COLUMNS, cells))


def write_coordinate_index(path: str | Path, entries: list[tuple[str, str]]) -> None:
    """RELION index ``data_coordinate_files``: micrograph name (exactly as given) -> coordinate file."""
    p = Path(path)
    mics = [_star_string(p, str(m), "micrograph name") for m, _ in entries]
    files = [_star_string(p, str(f), "coordinate file name") for _, f in entries]
    _write_text(p, _star_loop("coordinate_files", ["rlnMicrographName", "rlnMicrographCoordinates"], [mics, files]))


def write_particles_star(
    path: str | Path,
    micrograph_names: list[str],
    xy: np.ndarray,
    scores: np.ndarray,
    extra: dict[str, list[Any]] | None = None,
) -> None:
    """Session particle table ``data_particles``: name, X, Y, FOM, then ``extra`` columns (``_`` added)."""
    p = Path(path)
    c, s = _check_xy(xy, scores)
    assert s is not None
    if len(micrograph_names) != len(c):
        raise ValueError(f"{len(micrograph_names)} micrograph names for {len(c)} coordinates")
    columns = ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"]
    cells = [
        [_star_string(p, str(m), "micrograph name") for m in micrograph_names],
        _fmt(c[:, 0], ".6f"),
        _fmt(c[:, 1], ".6f"),
        _fmt(s, ".6f"),
    ]
    for name, values in (extra or {}).items():
        if not _EXTRA_NAME.match(name):
            raise ValueError(f"invalid STAR column name {name!r} (letters, digits and underscores only)")
        if len(values) != len(c):
            raise ValueError(f"extra column {name}: {len(values)} values for {len(c)} coordinates")
        columns.append(name.lstrip("_"))
        cells.append([_star_value(p, v, name) for v in values])
    _write_text(p, _star_loop("particles", columns, cells))
