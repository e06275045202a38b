"""Reading and writing micrographs: MRC (via mrcfile), JPEG/PNG (via Pillow) and TIFF (via tifffile).

Every reader returns a float32, C-contiguous ``[H, W]`` array exactly as stored: no flip, no transpose, no
EXIF rotation, MRC ``mapc/mapr`` ignored. Coordinate convention of the whole project: coordinates are particle
centres in pixels, ``x`` = column and ``y`` = row of this array (``data[y, x]``), 0-based, with pixel centres
at integer positions.

A file that cannot be a usable micrograph (missing, truncated, corrupt, unsupported mode, NaN/Inf pixels,
empty or constant) raises :class:`~cryomae.errors.InputError` naming the file and the problem, so services can
dead-letter it with a readable reason. mrcfile's warnings never escape: they become ``InputError`` too.

A micrograph of more than ``max_pixels`` pixels (default ``MAX_MICROGRAPH_PIXELS``) is refused from its size as
the file states it (MRC header, TIFF page shape, JPEG/PNG header), before a pixel is read.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import tifffile
from PIL import Image

from cryomae.errors import InputError
from cryomae.io.atomic import atomic_output

MICROGRAPH_SUFFIXES: tuple[str, ...] = (".mrc", ".mrcs", ".jpg", ".jpeg", ".png", ".tif", ".tiff")
MRC_SUFFIXES: tuple[str, ...] = (".mrc", ".mrcs")

# Largest micrograph read by default (``read_micrograph``'s ``max_pixels``), in pixels: 134 Mpx admits 8k x 8k
# detectors and K3 super-resolution (11520 x 8184) and refuses 16384 x 16384 (1 GB as float32, several in work).
MAX_MICROGRAPH_PIXELS = 2**27
MAX_PIXELS_SETTING = "CRYOMAE_MAX_MICROGRAPH_PIXELS"  # where the services' limit is set (named in the refusal)
_HEADER_BYTES = 1024
# Bytes per voxel of each MRC mode (mode 101 packs two 4-bit voxels per byte: handled separately).
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2}
_MODE_NAMES = {
    0: "int8",
    1: "int16",
    2: "float32",
    3: "complex int16",
    4: "complex float32",
    6: "uint16",
    12: "float16",
    101: "4-bit packed",
}
_READ_MODES = (0, 1, 2, 6, 12)
_WRITE_DTYPES = {np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.float16)}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's convert("L")


@dataclass(frozen=True, eq=False)
class Micrograph:
    """A 2-D micrograph: float32 ``[H, W]`` pixels (``data[y, x]``), source path, pixel size in Å or None."""

    data: np.ndarray
    path: Path
    pixel_size: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) = (rows, columns)."""
        return int(self.data.shape[0]), int(self.data.shape[1])

    @property
    def name(self) -> str:
        """The file name, e.g. ``mic_0001.mrc``."""
        return self.path.name


@dataclass(frozen=True)
class _MrcHeader:
    """The fields of an MRC header needed to size and validate the file."""

    nx: int
    ny: int
    nz: int
    mode: int
    nsymbt: int
    mx: int
    cella_x: float
    has_map_id: bool
    stamp: bytes
    byte_order: str | None  # None when the machine stamp is not recognised


MAX_EXTENDED_HEADER_BYTES = 64 << 20  # an extended header above this is refused (FEI/EPU ones take kilobytes)


def _parse_header(raw: bytes) -> _MrcHeader:
    """Decode the first 1024 bytes of an MRC file (byte order from the machine stamp, else guessed)."""
    stamp = raw[212:216]
    if stamp[0] == 0x44 and stamp[1] in (0x44, 0x41):
        order: str | None = "<"
    elif stamp[0] == 0x11 and stamp[1] == 0x11:
        order = ">"
    else:
        order = None
    guess = order or "<"
    if order is None and struct.unpack("<i", raw[12:16])[0] not in _MODE_NAMES:
        guess = ">"
    nx, ny, nz, mode = struct.unpack(guess + "4i", raw[0:16])
    (mx,) = struct.unpack(guess + "i", raw[28:32])
    (cella_x,) = struct.unpack(guess + "f", raw[40:44])
    (nsymbt,) = struct.unpack(guess + "i", raw[92:96])
    return _MrcHeader(nx, ny, nz, mode, nsymbt, mx, cella_x, raw[208:211] == b"MAP", bytes(stamp), order)


def _data_bytes(h: _MrcHeader) -> int | None:
    """Size of the data block the header declares, or None when the header cannot describe one."""
    if min(h.nx, h.ny, h.nz) < 0:
        return None
    if h.mode == 101:
        return (h.nx + 1) // 2 * h.ny * h.nz
    per_voxel = _MODE_BYTES.get(h.mode)
    return None if per_voxel is None else h.nx * h.ny * h.nz * per_voxel


def _read_header(path: Path) -> tuple[bytes, int]:
    """The first 1024 bytes (or fewer) and the file length."""
    with open(path, "rb") as f:
        raw = f.read(_HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    return raw, size


def _whole_header(path: str | Path) -> tuple[_MrcHeader, int] | None:
    """The parsed header and the file length; None when the file cannot be read now or is shorter than a header."""
    try:
        raw, size = _read_header(Path(path))
    except OSError:
        return None
    if len(raw) < _HEADER_BYTES:
        return None
    return _parse_header(raw), size


def validate_mrc_complete(path: str | Path) -> bool:
    """True when header + extended header + declared data size equals the file length.

    A file watcher uses this to tell a fully written MRC from one still being copied; it never raises
    (a missing, short or unreadable file is simply not complete).
    """
    found = _whole_header(path)
    if found is None:
        return False
    h, size = found
    data = _data_bytes(h)
    if data is None or h.nsymbt < 0:
        return False
    return _HEADER_BYTES + h.nsymbt + data == size


def mrc_can_never_complete(path: str | Path, max_pixels: int | None = None) -> bool:
    """True when an MRC file can never become a pickable micrograph by growing: a whole 1024-byte header that is
    invalid (no 'MAP' identifier, unknown byte order, a negative size, a mode this reader cannot read), that
    declares what ``read_micrograph`` refuses however complete the file (a stack, no pixels, more than
    ``max_pixels``, an extended header over ``MAX_EXTENDED_HEADER_BYTES``), or a file longer than its header
    declares. False while it may still be being written (shorter than a header, or than its header declares),
    when it is complete, or when it cannot be read now; never raises."""
    found = _whole_header(path)
    if found is None:
        return False
    h, size = found
    try:
        _refuse_header(Path(path), h, max_pixels)  # what no length can fix
    except InputError:
        return True
    data = _data_bytes(h)
    assert data is not None  # mode and sizes were checked
    return size > _HEADER_BYTES + h.nsymbt + data


def _mpx(pixels: int) -> str:
    """A pixel count in megapixels for people: 268, 0.786."""
    value = pixels / 1e6
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    """InputError when a width x height image exceeds ``max_pixels`` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            path,
            f"micrograph of {width}x{height} px ({_mpx(width * height)} Mpx) exceeds the limit of {_mpx(max_pixels)} "
            f"Mpx ({MAX_PIXELS_SETTING})",
        )


def _stack_problem(n: int) -> str:
    return f"expected a single 2-D micrograph, got a stack of {n} images"


def _modes_text() -> str:
    return ", ".join(f"{m} ({_MODE_NAMES[m]})" for m in _READ_MODES)


def _pixel_size(h: _MrcHeader) -> float | None:
    """Å per pixel from cella/mx, rounded to float32 precision; None when unset (0) or meaningless."""
    if h.mx <= 0 or not np.isfinite(h.cella_x) or h.cella_x <= 0:
        return None
    return float(f"{h.cella_x / h.mx:.6g}")


def _refuse_header(path: Path, h: _MrcHeader, max_pixels: int | None) -> None:
    """InputError for what a whole header declares that no file length can fix: not an MRC, an unknown byte order,
    a negative size, a mode this reader cannot read, a stack, no pixels, more than ``max_pixels``, an extended
    header over ``MAX_EXTENDED_HEADER_BYTES``. The one list for reading a micrograph and for the watcher
    (``mrc_can_never_complete``)."""
    if not h.has_map_id:
        raise InputError(path, "not an MRC file, or its header is corrupt (no 'MAP' identifier at byte 208)")
    if h.byte_order is None:
        stamp = " ".join(f"0x{b:02x}" for b in h.stamp)
        raise InputError(path, f"corrupt MRC header: unrecognised machine stamp {stamp} (byte order unknown)")
    if min(h.nx, h.ny, h.nz) < 0 or h.nsymbt < 0:
        raise InputError(
            path,
            f"corrupt MRC header: negative size (nx={h.nx}, ny={h.ny}, nz={h.nz}, extended header {h.nsymbt} bytes)",
        )
    if h.mode not in _READ_MODES:
        name = _MODE_NAMES.get(h.mode, "not a defined MRC mode")
        raise InputError(path, f"unsupported MRC mode {h.mode} ({name}); supported modes: {_modes_text()}")
    if h.nz > 1:
        raise InputError(path, _stack_problem(h.nz))
    if h.nz == 0:
        raise InputError(path, "image is empty (the header declares 0 sections)")
    if h.nx == 0 or h.ny == 0:
        raise InputError(path, f"image is empty ({h.nx}x{h.ny} pixels, width x height)")
    _check_pixels(path, h.nx, h.ny, max_pixels)
    if h.nsymbt > MAX_EXTENDED_HEADER_BYTES:
        raise InputError(
            path,
            f"extended header of {h.nsymbt} bytes exceeds the limit of {MAX_EXTENDED_HEADER_BYTES >> 20} MiB "
            "(a micrograph's metadata takes far less: a corrupt header?)",
        )


def _check_mrc_header(path: Path, raw: bytes, size: int, max_pixels: int | None = None) -> _MrcHeader:
    """Reject, with a specific message, every header problem that can be seen before reading the data (a size
    above ``max_pixels`` before a length that disagrees with the header)."""
    if size == 0:
        raise InputError(path, "file is empty (0 bytes)")
    if len(raw) < _HEADER_BYTES:
        raise InputError(path, f"not an MRC file: {size} bytes is shorter than the 1024-byte MRC header")
    h = _parse_header(raw)
    _refuse_header(path, h, max_pixels)
    data = _data_bytes(h)
    assert data is not None  # mode and sizes were checked above
    expected = _HEADER_BYTES + h.nsymbt + data
    if size != expected:
        detail = (
            f"the header declares {expected} bytes (1024-byte header + {h.nsymbt}-byte extended header "
            f"+ {data} bytes of {h.nx}x{h.ny} mode-{h.mode} data) but the file has {size} bytes"
        )
        if size < expected:
            raise InputError(path, f"truncated MRC file: {detail}")
        raise InputError(path, f"MRC file longer than its header says (corrupt header?): {detail}")
    return h


def _read_mrc(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, float | None]:
    """Read a single-image MRC after validating its header; mrcfile errors and warnings become InputError."""
    raw, size = _read_header(path)
    h = _check_mrc_header(path, raw, size, max_pixels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, mode="r", permissive=False) as mrc:
                data = mrc.data  # owns its buffer: stays valid after close; converted once by the caller
        except FileNotFoundError as exc:
            raise InputError(path, "file not found") from exc
        except (ValueError, TypeError, IndexError, ArithmeticError) as exc:
            raise InputError(path, f"cannot read MRC file: {exc}") from exc
    problems = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if problems:
        raise InputError(path, f"cannot read MRC file: {problems[0]}")
    if not isinstance(data, np.ndarray):
        raise InputError(path, "cannot read MRC file: no data block")
    while data.ndim > 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputError(path, f"expected a single 2-D micrograph, got data of shape {data.shape}")
    return data, _pixel_size(h)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """Luma of an ``[..., >=3]`` colour array as float32 (alpha and extra channels dropped)."""
    return np.asarray(rgb[..., :3], dtype=np.float32) @ _LUMA


def _pillow_pixels(img: Image.Image) -> np.ndarray:
    """The image's pixels as a 2-D array: greyscale as stored, colour converted to luma."""
    if img.mode in ("L", "I", "F") or img.mode.startswith("I;16"):
        return np.asarray(img)
    if img.mode in ("LA", "La"):
        return np.asarray(img)[..., 0]
    return _grey(np.asarray(img.convert("RGB")))


def _read_pillow(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a JPEG/PNG with Pillow (large micrographs pass Pillow's decompression-bomb warning; its error, at
    twice ``Image.MAX_IMAGE_PIXELS``, stands whatever ``max_pixels`` says)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. palette-transparency notes from convert()
            with Image.open(path) as img:
                _check_pixels(path, img.width, img.height, max_pixels)
                frames = int(getattr(img, "n_frames", 1))
                if frames > 1:
                    raise InputError(path, _stack_problem(frames))
                img.load()
                return _pillow_pixels(img)
    except Image.DecompressionBombError as exc:
        stated = re.search(r"\((\d+) pixels\)", str(exc))  # "Image size (N pixels) exceeds limit of ..."
        pixels = int(stated.group(1)) if stated else None
        if max_pixels is not None and pixels is not None and pixels > max_pixels:
            raise InputError(
                path,
                f"micrograph of {pixels} px ({_mpx(pixels)} Mpx) exceeds the limit of {_mpx(max_pixels)} Mpx "
                f"({MAX_PIXELS_SETTING}; Pillow: {exc})",
            ) from None
        raise InputError(path, f"image too large to decode safely: {exc}") from exc
    except FileNotFoundError as exc:
        raise InputError(path, "file not found") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot decode image: {exc}") from exc


def _tiff_pixels(path: Path, arr: np.ndarray, axes: str) -> np.ndarray:
    """Reduce a tifffile series to 2-D: colour samples to luma, size-1 axes dropped, stacks rejected."""
    if "S" in axes:
        s = axes.index("S")
        arr = np.moveaxis(arr, s, -1)
        axes = axes[:s] + axes[s + 1 :] + "S"
        arr = _grey(arr) if arr.shape[-1] >= 3 else arr[..., 0]
        axes = axes[:-1]
    if "Y" not in axes or "X" not in axes:
        raise InputError(path, f"TIFF has no 2-D image plane (axes {axes!r}, shape {arr.shape})")
    arr = np.moveaxis(arr, (axes.index("Y"), axes.index("X")), (-2, -1))
    n_images = int(np.prod(arr.shape[:-2], dtype=np.int64))
    if n_images > 1:
        raise InputError(path, _stack_problem(n_images))
    return arr.reshape(arr.shape[-2:])


def _check_tiff_shape(path: Path, shape: tuple[int, ...], axes: str, max_pixels: int | None) -> None:
    """Refuse, from the series' shape alone, an image plane above ``max_pixels`` and a stack of images."""
    if "Y" not in axes or "X" not in axes or len(shape) != len(axes):
        return  # said by ``_tiff_pixels`` (the plane cannot be sized from this shape)
    _check_pixels(path, int(shape[axes.index("X")]), int(shape[axes.index("Y")]), max_pixels)
    n_images = int(np.prod([n for n, a in zip(shape, axes, strict=True) if a not in "YXS"], dtype=np.int64))
    if n_images > 1:
        raise InputError(path, _stack_problem(n_images))


def _read_tiff(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read the first image series of a TIFF with tifffile, after checking its shape."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InputError(path, "TIFF file contains no image")
                series = tif.series[0]
                _check_tiff_shape(path, tuple(series.shape), str(series.axes), max_pixels)
                arr, axes = series.asarray(), str(series.axes)
    except FileNotFoundError as exc:
        raise InputError(path, "file not found") from exc
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError) as exc:
        raise InputError(path, f"cannot decode TIFF: {exc}") from exc
    return _tiff_pixels(path, arr, axes)


def _checked_image(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Float32 C-contiguous writable copy, after rejecting empty, non-finite and constant images."""
    if pixels.ndim != 2:
        raise InputError(path, f"expected a 2-D image, got shape {pixels.shape}")
    if pixels.size == 0:
        raise InputError(path, f"image is empty ({pixels.shape[1]}x{pixels.shape[0]} pixels, width x height)")
    if np.iscomplexobj(pixels):
        raise InputError(path, "image has complex pixel values")
    data = np.array(pixels, dtype=np.float32, order="C")
    lo, hi = data.min(), data.max()  # NaN propagates into both, and an infinity shows in one
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = np.isfinite(data)
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum()) - n_nan
        parts = [f"{n_nan} NaN"] if n_nan else []
        parts += [f"{n_inf} infinite"] if n_inf else []
        problem = f"image has {' and '.join(parts)} pixels (of {data.size}); the file is corrupt"
        raise InputError(path, problem)
    if lo == hi:
        raise InputError(path, f"image is constant (every pixel is {float(data.flat[0])}); nothing to pick")
    return data


def micrograph_shape(path: str | Path) -> tuple[int, int] | None:
    """A micrograph file's (rows, columns) from its header alone (MRC header, Pillow's or tifffile's), without
    reading its pixels; None when it cannot be told (not a micrograph type, unreadable, no 2-D plane)."""
    p = Path(path)
    suffix = p.suffix.lower()
    try:
        if suffix in MRC_SUFFIXES:
            found = _whole_header(p)
            return None if found is None else (found[0].ny, found[0].nx)
        if suffix in (".tif", ".tiff"):
            with tifffile.TiffFile(p) as tif:
                series = tif.series[0]
                axes, shape = str(series.axes), tuple(series.shape)
                return (int(shape[axes.index("Y")]), int(shape[axes.index("X")]))
        if suffix in MICROGRAPH_SUFFIXES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(p) as img:
                    return (img.height, img.width)
    except (OSError, ValueError, IndexError, tifffile.TiffFileError, Image.DecompressionBombError):
        return None
    return None


def read_micrograph(path: str | Path, max_pixels: int | None = MAX_MICROGRAPH_PIXELS) -> Micrograph:
    """Read one micrograph as float32 ``[H, W]`` (``data[y, x]``); pixel size from MRC headers only.

    A micrograph of more than ``max_pixels`` pixels (None: no limit) is refused before its pixels are read."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in MICROGRAPH_SUFFIXES:
        shown = f"'{p.suffix}'" if p.suffix else "(no suffix)"
        supported = ", ".join(MICROGRAPH_SUFFIXES)
        raise InputError(p, f"unsupported micrograph file type {shown}; supported: {supported}")
    if not p.exists():
        raise InputError(p, "file not found")
    if not p.is_file():
        raise InputError(p, "not a regular file (a directory?)")
    pixel_size: float | None = None
    if suffix in MRC_SUFFIXES:
        pixels, pixel_size = _read_mrc(p, max_pixels)
    elif suffix in (".tif", ".tiff"):
        pixels = _read_tiff(p, max_pixels)
    else:
        pixels = _read_pillow(p, max_pixels)
    return Micrograph(data=_checked_image(p, pixels), path=p, pixel_size=pixel_size)


def _cast_for_mrc(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to an MRC dtype, refusing values the dtype cannot hold (instead of silently wrapping)."""
    if data.dtype.kind not in "biuf":
        raise ValueError(f"cannot write {data.dtype} data as MRC; give real numbers")
    if dtype.kind in "iu":
        if data.dtype.kind == "f":
            if not np.isfinite(data).all():
                raise ValueError(f"cannot write NaN or infinite values as {dtype}")
            data = np.rint(data)
        finite = data
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
        lo, hi = float(np.finfo(dtype).min), float(np.finfo(dtype).max)
    if finite.size and (finite.min() < lo or finite.max() > hi):
        raise ValueError(f"values {finite.min()}..{finite.max()} do not fit in {dtype} ({lo}..{hi})")
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(data, dtype=dtype)


def write_mrc(
    path: str | Path, data: np.ndarray, pixel_size: float | None = None, dtype: np.dtype | type = np.float16
) -> None:
    """Write a 2-D image (``data[y, x]``) as a single-image MRC, atomically (temp file + rename).

    ``dtype`` picks the mode: int8 (0), int16 (1), float32 (2), uint16 (6) or float16 (12, the default).
    NaN/Inf values are written as given (tests need such files); values out of the dtype's range are an error.
    """
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ValueError(f"write_mrc expects a 2-D image, got shape {arr.shape}")
    dt = np.dtype(dtype)
    if dt not in _WRITE_DTYPES:
        names = ", ".join(sorted(str(d) for d in _WRITE_DTYPES))
        raise ValueError(f"cannot write dtype {dt} as MRC; use one of {names}")
    out = _cast_for_mrc(arr, dt)
    with atomic_output(path) as tmp, warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about NaN/Inf in header stats
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(out)
            if pixel_size is not None:
                mrc.voxel_size = float(pixel_size)


def read_ahead(
    paths: Sequence[str | Path], depth: int = 1
) -> Generator[tuple[Path, Micrograph | InputError], None, None]:
    """Read micrographs in order, ``depth`` files ahead of the caller, in one background thread.

    Yields ``(path, micrograph)`` or ``(path, InputError)`` for a file that cannot be read, so one bad file
    does not stop the rest. Decoding (JPEG, TIFF) and validation of the next files overlap with whatever the
    caller does with the current one (picking on the GPU); with ``depth=0`` every file is read when asked for.
    Other exceptions propagate when their file's turn comes. Closing the generator early waits only for the
    reads already started.
    """

    def read(p: Path) -> Micrograph | InputError:
        try:
            return read_micrograph(p)
        except InputError as exc:
            return exc

    items = [Path(p) for p in paths]
    if depth <= 0:
        for p in items:
            yield p, read(p)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending: deque[tuple[Path, Future[Micrograph | InputError]]] = deque()
        nxt = 0
        try:
            while nxt < len(items) or pending:
                while nxt < len(items) and len(pending) <= depth:
                    pending.append((items[nxt], pool.submit(read, items[nxt])))
                    nxt += 1
                path, future = pending.popleft()
                yield path, future.result()
        finally:
            for _, future in pending:
                future.cancel()
