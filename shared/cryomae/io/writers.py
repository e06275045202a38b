"""Writing coordinate files: the one module that writes STAR files (RELION and cryoSPARC), ``.box`` and CSV.

The offline CLI (``cryomae pick``) and the session outputs (``cryomae.store.outputs``) both write through it, so
a STAR file reads the same whichever wrote it. STAR text is produced here rather than through
``starfile.write`` so that every table is a loop (also with 0 or 1 rows: cryoSPARC cannot read a single row
written as key/value pairs) and the column order and number formats are fixed. Strings that contain spaces or
``#``, or that start like a STAR keyword, are written in double quotes; quotes, tabs, newlines and other control
characters are rejected. Every file is written atomically (``cryomae.io.atomic``).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryomae.errors import InputError
from cryomae.io.atomic import atomic_output
from cryomae.io.coordinates import COORDINATE_SUFFIXES, Coordinates

AUTOPICK_SUFFIX = "_autopick.star"  # RELION's per-micrograph autopick file: <stem>_autopick.star
VERSION_LABEL = "cryomaeModelVersion"  # the model version column of particles.star (RELION ignores it)
SESSION_PARTICLE_COLUMNS = (
    "rlnMicrographName",
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnAutopickFigureOfMerit",
    VERSION_LABEL,
)
_BAD_STAR_CHARS = re.compile(r"[\"'\x00-\x1f\x7f]")
_STAR_KEYWORDS = ("data_", "loop_", "save_", "global_", "stop_")
_EXTRA_NAME = re.compile(r"^_?[A-Za-z][A-Za-z0-9_]*$")
_AUTOPICK_COLUMNS = ("rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit", "rlnAnglePsi")


def star_string(path: Path, value: str, what: str) -> str:
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
        return star_string(path, value, f"value in column {column}")
    raise ValueError(f"column {column}: cannot write {type(value).__name__} value {value!r} to STAR")


def _star_header(block: str, columns: Sequence[str]) -> str:
    """The start of a STAR data block holding one loop, up to its last column label (rows follow it)."""
    return f"# written by cryomae\n\ndata_{block}\n\nloop_\n" + "".join(
        f"_{c} #{k}\n" for k, c in enumerate(columns, 1)
    )


def _star_loop(block: str, columns: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """STAR text of one data block holding one loop; ``cells`` is column-major (one list per column)."""
    rows = "".join("\t".join(row) + "\n" for row in zip(*cells, strict=True))
    return _star_header(block, columns) + rows + "\n"


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
            cells.append([star_string(p, n, "micrograph name") for n in names])
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
    mics = [star_string(p, str(m), "micrograph name") for m, _ in entries]
    files = [star_string(p, str(f), "coordinate file name") for _, f in entries]
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
        [star_string(p, str(m), "micrograph name") for m in micrograph_names],
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


def session_particles_header() -> str:
    """The header of a session's ``particles.star`` (``SESSION_PARTICLE_COLUMNS``); rows are appended below it."""
    return _star_header("particles", SESSION_PARTICLE_COLUMNS)


def session_particles_rows(name: str, version: str, x: np.ndarray, y: np.ndarray, scores: np.ndarray) -> str:
    """A micrograph's rows of a session's ``particles.star``: name, X, Y (2 decimals, as the autopick files), FOM,
    model version; ``name`` and ``version`` already checked with ``star_string``."""
    return "".join(
        f"{name}\t{a:.2f}\t{b:.2f}\t{s:.6f}\t{version}\n"
        for a, b, s in zip(x.tolist(), y.tolist(), scores.tolist(), strict=True)
    )


def write_corrections(
    path: str | Path,
    names: Sequence[str],
    xy: np.ndarray,
    particle: np.ndarray,
    project: str | None = None,
    session: str | None = None,
) -> None:
    """Write an operator's marks as the session page writes ``corrections.star`` (``read_corrections`` reads it):
    micrograph name, centre, and ``_cryomaeParticle`` 1 (a missed particle) or 0 (a wrong pick); atomic."""
    p = Path(path)
    xy, _ = _check_xy(xy)
    flags = np.asarray(particle, dtype=bool).reshape(-1)
    if not len(names) == len(xy) == len(flags):
        raise ValueError(f"{len(names)} names, {len(xy)} centres and {len(flags)} labels")
    cells = [
        [star_string(p, n, "micrograph name") for n in names],
        _fmt(xy[:, 0], ".1f"),
        _fmt(xy[:, 1], ".1f"),
        [str(int(f)) for f in flags],
    ]
    origin = "" if project is None else f"# cryomae corrections: project {project}, session {session}\n"
    text = _star_loop(
        "corrections", ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "cryomaeParticle"], cells
    )
    _write_text(p, origin + text)
