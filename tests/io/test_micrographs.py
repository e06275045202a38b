"""Tests of micrograph reading/writing: round trips per format, the x=column/y=row convention, and one
readable InputError per kind of bad file."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from cryomae.errors import InputError
from cryomae.io.micrographs import (
    MAX_MICROGRAPH_PIXELS,
    MICROGRAPH_SUFFIXES,
    Micrograph,
    read_micrograph,
    validate_mrc_complete,
    write_mrc,
)

REAL_MRC = Path("/work/shared/data/empiar10017/bin4/micrographs")


def _ramp(shape: tuple[int, int] = (24, 40), scale: float = 1.0) -> np.ndarray:
    """A non-square, non-constant image whose every pixel differs from its transpose position."""
    rows, cols = np.indices(shape)
    return (rows * 7 + cols * 3) * scale


def _patch_int32(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<i", value))


def _error(path: Path) -> str:
    with pytest.raises(InputError) as info:
        read_micrograph(path)
    message = str(info.value)
    assert path.name in message
    assert info.value.path == path
    return message


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)],
)
def test_mrc_round_trip_per_mode(tmp_path: Path, dtype: type, mode: int) -> None:
    data = _ramp() - (50 if dtype in (np.int8, np.int16) else 0)  # negative values for signed modes
    if dtype is np.int8:
        data = np.clip(data, -128, 127)
    path = tmp_path / "m.mrc"
    write_mrc(path, data, pixel_size=1.5, dtype=dtype)
    with mrcfile.open(path, permissive=False) as mrc:
        assert int(mrc.header.mode) == mode
    mic = read_micrograph(path)
    assert isinstance(mic, Micrograph)
    assert mic.data.dtype == np.float32
    assert mic.data.flags.c_contiguous and mic.data.flags.writeable
    assert mic.shape == (24, 40)
    np.testing.assert_array_equal(mic.data, data.astype(np.float32))
    assert mic.pixel_size == 1.5
    assert mic.name == "m.mrc" and mic.path == path


def test_mrc_pixel_size_none_when_unset_and_rounded_when_set(tmp_path: Path) -> None:
    write_mrc(tmp_path / "a.mrc", _ramp())
    assert read_micrograph(tmp_path / "a.mrc").pixel_size is None
    write_mrc(tmp_path / "b.mrc", _ramp((64, 64)), pixel_size=7.08)
    assert read_micrograph(tmp_path / "b.mrc").pixel_size == 7.08  # not 7.079999923...


def test_big_endian_mrc(tmp_path: Path) -> None:
    path = tmp_path / "be.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(_ramp().astype(">f4"))
        mrc.voxel_size = 2.5
    assert path.read_bytes()[212:214] == b"\x11\x11"
    mic = read_micrograph(path)
    np.testing.assert_array_equal(mic.data, _ramp())
    assert mic.pixel_size == 2.5


def test_mrcs_with_one_image_is_squeezed(tmp_path: Path) -> None:
    path = tmp_path / "one.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(_ramp().astype(np.float32)[None])
        mrc.set_image_stack()
    assert read_micrograph(path).shape == (24, 40)


def test_x_is_column_y_is_row(tmp_path: Path) -> None:
    img = np.zeros((16, 12), dtype=np.float32)
    img[3, 7] = 100.0  # row 3, column 7 -> x = 7, y = 3
    write_mrc(tmp_path / "dot.mrc", img, dtype=np.float32)
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "dot.png")
    for name in ("dot.mrc", "dot.png"):
        data = read_micrograph(tmp_path / name).data
        assert data.shape == (16, 12)
        y, x = np.unravel_index(int(np.argmax(data)), data.shape)
        assert (x, y) == (7, 3)
        assert data[3, 7] == 100.0


def test_jpeg_8bit(tmp_path: Path) -> None:
    img = np.clip(_ramp((48, 64), 1.0), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "m.jpg", quality=95)
    mic = read_micrograph(tmp_path / "m.jpg")
    assert mic.data.dtype == np.float32 and mic.shape == (48, 64)
    assert mic.pixel_size is None
    assert np.abs(mic.data - img).mean() < 2.0
    assert np.corrcoef(mic.data.ravel(), img.ravel())[0, 1] > 0.99


def test_png_8_and_16_bit_exact(tmp_path: Path) -> None:
    img8 = _ramp().astype(np.uint8)
    img16 = (_ramp() * 200).astype(np.uint16)
    assert img16.max() > 255
    Image.fromarray(img8).save(tmp_path / "a.png")
    Image.fromarray(img16).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_micrograph(tmp_path / "a.png").data, img8)
    np.testing.assert_array_equal(read_micrograph(tmp_path / "b.png").data, img16)


def test_rgb_png_is_converted_to_grey(tmp_path: Path) -> None:
    rgb = np.zeros((8, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # pure red
    rgb[2, 3] = (0, 0, 255)  # pure blue
    Image.fromarray(rgb).save(tmp_path / "c.png")
    data = read_micrograph(tmp_path / "c.png").data
    assert data.shape == (8, 10)
    assert data[0, 0] == pytest.approx(0.299 * 200, abs=1e-3)
    assert data[2, 3] == pytest.approx(0.114 * 255, abs=1e-3)


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
def test_tiff_16_bit_exact(tmp_path: Path, suffix: str) -> None:
    img = (_ramp() * 300).astype(np.uint16)
    tifffile.imwrite(tmp_path / f"m{suffix}", img)
    data = read_micrograph(tmp_path / f"m{suffix}").data
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, img)


def test_uppercase_suffix_is_accepted(tmp_path: Path) -> None:
    write_mrc(tmp_path / "UP.MRC", _ramp())
    assert read_micrograph(tmp_path / "UP.MRC").shape == (24, 40)


@pytest.mark.skipif(not REAL_MRC.is_dir(), reason="development data not present")
def test_real_float16_micrograph() -> None:
    path = sorted(REAL_MRC.glob("*.mrc"))[0]
    mic = read_micrograph(path)
    assert mic.shape == (1024, 1024)
    assert mic.pixel_size == pytest.approx(7.08)
    assert abs(float(mic.data.mean())) < 0.05 and 0.9 < float(mic.data.std()) < 1.1
    assert validate_mrc_complete(path)


# ------------------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in _error(tmp_path / "nope.mrc")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "m.gif"
    path.write_bytes(b"GIF89a")
    message = _error(path)
    assert "unsupported micrograph file type '.gif'" in message
    assert all(s in message for s in MICROGRAPH_SUFFIXES)


def test_truncated_mrc(tmp_path: Path) -> None:
    path = tmp_path / "cut.mrc"
    write_mrc(path, _ramp(), dtype=np.float32)
    full = path.stat().st_size
    assert full == 1024 + 24 * 40 * 4
    os.truncate(path, full - 100)
    message = _error(path)
    assert "truncated MRC file" in message
    assert str(full) in message and str(full - 100) in message


def test_mrc_longer_than_header_says(tmp_path: Path) -> None:
    path = tmp_path / "long.mrc"
    write_mrc(path, _ramp())
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    assert "longer than its header says" in _error(path)


@pytest.mark.parametrize(("mode", "name"), [(3, "complex int16"), (4, "complex float32"), (101, "4-bit")])
def test_unsupported_mode(tmp_path: Path, mode: int, name: str) -> None:
    path = tmp_path / f"mode{mode}.mrc"
    write_mrc(path, _ramp(), dtype=np.float32)
    _patch_int32(path, 12, mode)
    message = _error(path)
    assert f"unsupported MRC mode {mode} ({name}" in message
    assert "supported modes: 0 (int8), 1 (int16), 2 (float32), 6 (uint16), 12 (float16)" in message


def test_nan_pixels(tmp_path: Path) -> None:
    img = _ramp().astype(np.float32)
    img[1, 2] = img[5, 6] = img[7, 8] = np.nan
    write_mrc(tmp_path / "nan.mrc", img, dtype=np.float32)
    assert "image has 3 NaN pixels" in _error(tmp_path / "nan.mrc")


def test_inf_pixels(tmp_path: Path) -> None:
    img = _ramp().astype(np.float32)
    img[0, 0], img[1, 1] = np.inf, -np.inf
    img[2, 2] = np.nan
    write_mrc(tmp_path / "inf.mrc", img, dtype=np.float32)
    assert "image has 1 NaN and 2 infinite pixels" in _error(tmp_path / "inf.mrc")


def test_empty_image(tmp_path: Path) -> None:
    write_mrc(tmp_path / "empty.mrc", np.zeros((0, 16)))
    assert "image is empty (16x0 pixels" in _error(tmp_path / "empty.mrc")


def test_constant_image(tmp_path: Path) -> None:
    write_mrc(tmp_path / "flat.mrc", np.full((16, 16), 3.0))
    assert "image is constant (every pixel is 3.0); nothing to pick" in _error(tmp_path / "flat.mrc")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "flat.png")
    assert "image is constant" in _error(tmp_path / "flat.png")


def test_random_bytes_are_not_an_mrc(tmp_path: Path) -> None:
    path = tmp_path / "noise.mrc"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not an MRC file" in _error(path)


def test_short_and_empty_mrc(tmp_path: Path) -> None:
    (tmp_path / "short.mrc").write_bytes(b"\1" * 100)
    expected = "not an MRC file: 100 bytes is shorter than the 1024-byte MRC header"
    assert expected in _error(tmp_path / "short.mrc")
    (tmp_path / "zero.mrc").write_bytes(b"")
    assert "file is empty (0 bytes)" in _error(tmp_path / "zero.mrc")


def test_unrecognised_machine_stamp(tmp_path: Path) -> None:
    path = tmp_path / "stamp.mrc"
    write_mrc(path, _ramp())
    _patch_int32(path, 212, 0)
    assert "unrecognised machine stamp 0x00 0x00 0x00 0x00" in _error(path)


def test_negative_dimension(tmp_path: Path) -> None:
    path = tmp_path / "neg.mrc"
    write_mrc(path, _ramp())
    _patch_int32(path, 0, -5)
    assert "corrupt MRC header: negative size (nx=-5" in _error(path)


def test_mrc_stack_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stack.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.stack([_ramp(), _ramp() + 1, _ramp() + 2]).astype(np.float32))
        mrc.set_image_stack()
    assert "expected a single 2-D micrograph, got a stack of 3 images" in _error(path)


def test_tiff_stack_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([_ramp(), _ramp() + 1]).astype(np.uint16), photometric="minisblack")
    assert "got a stack of 2 images" in _error(path)


def test_corrupt_images(tmp_path: Path) -> None:
    noise = np.random.default_rng(1).bytes(3000)
    (tmp_path / "noise.jpg").write_bytes(noise)
    assert "cannot decode image" in _error(tmp_path / "noise.jpg")
    (tmp_path / "noise.tif").write_bytes(noise)
    assert "cannot decode TIFF" in _error(tmp_path / "noise.tif")
    Image.fromarray(_ramp((64, 64)).astype(np.uint8)).save(tmp_path / "ok.jpg")
    whole = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    assert "truncated" in _error(tmp_path / "cut.jpg")


def test_directory_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "dir.mrc").mkdir()
    assert "not a regular file" in _error(tmp_path / "dir.mrc")


# ------------------------------------------------------------------------------------------- size bound


def sparse_mrc(path: Path, nx: int, ny: int, mode: int = 0) -> Path:
    """A single-image MRC whose header declares nx x ny pixels and whose data is a hole (no disk, no memory)."""
    header = bytearray(1024)
    struct.pack_into("<10i", header, 0, nx, ny, 1, mode, 0, 0, 0, nx, ny, 1)
    struct.pack_into("<3f", header, 40, float(nx), float(ny), 1.0)
    struct.pack_into("<3i", header, 64, 1, 2, 3)
    header[208:212] = b"MAP "
    header[212:216] = bytes([0x44, 0x44, 0, 0])
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(1024 + nx * ny * {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}[mode])
    return path


def _no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pixel decoder fail the test: a refusal must come from the header, before any pixel is read."""

    def read(*args: object, **kwargs: object) -> None:
        pytest.fail("the pixels were read")

    monkeypatch.setattr(mrcfile, "open", read)
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", read)
    monkeypatch.setattr(ImageFile.ImageFile, "load", read)


def _too_large(path: Path, max_pixels: int | None = None) -> str:
    with pytest.raises(InputError) as info:
        read_micrograph(path) if max_pixels is None else read_micrograph(path, max_pixels=max_pixels)
    assert info.value.path == path
    return info.value.problem


def test_default_pixel_limit_admits_8k_and_k3_super_resolution_and_refuses_16k() -> None:
    assert MAX_MICROGRAPH_PIXELS == 2**27
    for width, height in ((8192, 8192), (11520, 8184)):  # an 8k detector, K3 super-resolution
        assert width * height <= MAX_MICROGRAPH_PIXELS
    assert MAX_MICROGRAPH_PIXELS < 16384 * 16384


def test_sparse_16k_mrc_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sparse_mrc(tmp_path / "huge.mrc", 16384, 16384)  # 256 MB of hole
    big = sparse_mrc(tmp_path / "bigger.mrc", 100000, 100000, mode=2)  # 40 GB of hole
    _no_reading(monkeypatch)
    assert _too_large(path) == (
        "micrograph of 16384x16384 px (268 Mpx) exceeds the limit of 134 Mpx (CRYOMAE_MAX_MICROGRAPH_PIXELS)"
    )
    assert "micrograph of 100000x100000 px (10000 Mpx) exceeds the limit of 134 Mpx" in _too_large(big)
    truncated = tmp_path / "header_only.mrc"
    with open(big, "rb") as f:
        truncated.write_bytes(f.read(1024))  # the size is said first, before the length that disagrees
    assert "100000x100000 px" in _too_large(truncated)


def test_pixel_limit_per_format_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _ramp((48, 64), 0.2).astype(np.uint8)  # 3072 px
    write_mrc(tmp_path / "m.mrc", image, dtype=np.int8)
    tifffile.imwrite(tmp_path / "m.tif", image.astype(np.uint16), photometric="minisblack")
    Image.fromarray(image).save(tmp_path / "m.png")
    Image.fromarray(image).save(tmp_path / "m.jpg")
    files = [tmp_path / f"m.{suffix}" for suffix in ("mrc", "tif", "png", "jpg")]
    for path in files:
        assert read_micrograph(path, max_pixels=3072).shape == (48, 64)  # at the limit: read
        assert read_micrograph(path, max_pixels=None).shape == (48, 64)  # no limit
    _no_reading(monkeypatch)
    for path in files:
        assert _too_large(path, 2000) == (
            "micrograph of 64x48 px (0.00307 Mpx) exceeds the limit of 0.002 Mpx (CRYOMAE_MAX_MICROGRAPH_PIXELS)"
        ), path


def test_tiff_stack_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.stack([_ramp(), _ramp() + 1]).astype(np.uint16), photometric="minisblack")
    _no_reading(monkeypatch)
    assert "got a stack of 2 images" in _error(path)


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height, with a few bytes of data: enough for Pillow to open it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b""))
    return path


def test_png_beyond_pillows_bomb_limit_names_the_pixel_limit(tmp_path: Path) -> None:
    path = _png_header(tmp_path / "bomb.png", 100000, 100000)
    assert _too_large(path).startswith("micrograph of 10000000000 px (10000 Mpx) exceeds the limit of 134 Mpx")
    assert _too_large(_png_header(tmp_path / "wide.png", 16384, 9000)) == (
        "micrograph of 16384x9000 px (147 Mpx) exceeds the limit of 134 Mpx (CRYOMAE_MAX_MICROGRAPH_PIXELS)"
    )


# ------------------------------------------------------------------------------------------- writing


def test_validate_mrc_complete(tmp_path: Path) -> None:
    path = tmp_path / "v.mrc"
    write_mrc(path, _ramp())
    assert validate_mrc_complete(path) is True
    os.truncate(path, path.stat().st_size - 1)
    assert validate_mrc_complete(path) is False
    os.truncate(path, 500)  # not even a whole header
    assert validate_mrc_complete(path) is False
    assert validate_mrc_complete(tmp_path / "missing.mrc") is False


def test_validate_mrc_complete_counts_the_extended_header(tmp_path: Path) -> None:
    path = tmp_path / "ext.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(_ramp().astype(np.float32))
        mrc.set_extended_header(np.zeros(256, dtype="V1"))
    assert path.stat().st_size == 1024 + 256 + 24 * 40 * 4
    assert validate_mrc_complete(path) is True
    with open(path, "ab") as f:
        f.write(b"\0\0")
    assert validate_mrc_complete(path) is False


def test_write_mrc_is_atomic_and_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "w.mrc"
    write_mrc(path, _ramp())
    write_mrc(path, _ramp() + 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.mrc"]
    np.testing.assert_array_equal(read_micrograph(path).data, _ramp() + 1)


def test_write_mrc_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-D"):
        write_mrc(tmp_path / "a.mrc", np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="do not fit in int8"):
        write_mrc(tmp_path / "b.mrc", _ramp() * 10, dtype=np.int8)
    with pytest.raises(ValueError, match="do not fit in float16"):
        write_mrc(tmp_path / "c.mrc", np.full((4, 4), 1e6))
    with pytest.raises(ValueError, match="cannot write dtype float64"):
        write_mrc(tmp_path / "d.mrc", _ramp(), dtype=np.float64)
    assert list(tmp_path.iterdir()) == []
