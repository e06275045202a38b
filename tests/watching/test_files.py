"""Which files count (names, folders, listing) and when a file is complete (settle time, MRC header, give-up),
on real files with a clock moved by hand."""

from __future__ import annotations

import os
import struct
from pathlib import Path, PurePath

import pytest

from cryomae.errors import InputError
from cryomae.io import read_micrograph
from cryomae.watching.candidates import check_pattern, is_candidate, is_temporary, list_candidates
from cryomae.watching.completeness import PendingFile, Verdict, incompleteness, looks_complete

from .helpers import SlowWrite, mrc_bytes, patched, write_micrograph


@pytest.mark.parametrize("name", [".mic.mrc", "mic.mrc.tmp", "mic.mrc.part", "mic.mrc~", "MIC.MRC.TMP", "#mic.mrc"])
def test_temporary_names(name: str):
    assert is_temporary(name)
    assert not is_candidate(PurePath(name), "*", recursive=True)


@pytest.mark.parametrize(
    ("relative", "pattern", "recursive", "expected"),
    [
        ("mic.mrc", "*.mrc", False, True),
        ("mic.MRC", "*.mrc", True, False),  # globs are case-sensitive
        ("grid1/mic.mrc", "*.mrc", True, True),
        ("grid1/mic.mrc", "*.mrc", False, False),
        (".snapshot/hourly/mic.mrc", "*.mrc", True, False),  # hidden folders hold snapshot copies
        ("mic.tiff", "*.tif*", True, True),
        ("mic.tif.part", "*.tif*", True, False),
        ("mic.jpg", "*.mrc", True, False),
    ],
)
def test_candidates(relative: str, pattern: str, recursive: bool, expected: bool):
    assert is_candidate(PurePath(relative), pattern, recursive) is expected


@pytest.mark.parametrize("pattern", ["", "Movies/*.mrc"])
def test_pattern_with_a_folder_part_is_refused(pattern: str):
    with pytest.raises(InputError, match="glob of file names"):
        check_pattern(pattern)


def test_listing_skips_hidden_folders_temp_names_and_folder_links(tmp_path: Path):
    folder = tmp_path / "session"
    wanted = [write_micrograph(folder / "a.mrc"), write_micrograph(folder / "grid1" / "b.mrc")]
    write_micrograph(folder / ".snapshot" / "a.mrc")
    write_micrograph(folder / "grid1" / "b.mrc.part")
    (folder / "grid1" / "loop").symlink_to(folder)  # a folder symlink back up: must not loop or repeat files
    (folder / "notes.txt").write_text("not a micrograph")

    listing = list_candidates(folder, "*.mrc", recursive=True)

    assert sorted(path for path, _ in listing.files) == sorted(wanted)
    assert all(st.st_size == p.stat().st_size for p, st in listing.files)
    assert listing.errors == []
    assert [p for p, _ in list_candidates(folder, "*.mrc", recursive=False).files] == [folder / "a.mrc"]


def test_listing_a_missing_folder_reports_it(tmp_path: Path):
    listing = list_candidates(tmp_path / "gone", "*.mrc", recursive=True)
    assert listing.files == []
    assert len(listing.errors) == 1
    assert "gone" in listing.errors[0]


SETTLE, GIVE_UP = 2.0, 30.0


def test_partial_mrc_settles_incomplete_then_completes(tmp_path: Path):
    content = mrc_bytes(tmp_path / "scratch")
    writer = SlowWrite(tmp_path / "mic.mrc", content)
    writer.header()
    writer.fraction(0.5)
    pending = PendingFile(writer.path, None, since=0.0)

    assert pending.check(0.0, SETTLE, GIVE_UP) is Verdict.SETTLING  # first look
    assert pending.check(1.0, SETTLE, GIVE_UP) is Verdict.SETTLING  # not quiet long enough
    assert pending.check(2.5, SETTLE, GIVE_UP) is Verdict.INCOMPLETE  # quiet, but the header wants more bytes
    writer.rest()
    assert pending.check(3.0, SETTLE, GIVE_UP) is Verdict.SETTLING  # it grew: the settle time starts again
    assert pending.check(4.0, SETTLE, GIVE_UP) is Verdict.SETTLING
    assert pending.check(5.0, SETTLE, GIVE_UP) is Verdict.COMPLETE
    assert pending.signature is not None
    assert pending.signature.size == len(content)


def test_file_that_is_not_an_mrc_is_given_up_after_the_give_up_time(tmp_path: Path):
    path = tmp_path / "junk.mrc"
    path.write_bytes(b"not an MRC file at all " * 20)  # shorter than a header: it may still grow into one
    pending = PendingFile(path, None, since=0.0)
    pending.check(0.0, SETTLE, GIVE_UP)

    assert pending.check(GIVE_UP - 1, SETTLE, GIVE_UP) is Verdict.INCOMPLETE
    assert pending.check(GIVE_UP, SETTLE, GIVE_UP) is Verdict.GIVE_UP
    assert "not an MRC file" in incompleteness(path)


def test_empty_files_are_never_complete_and_other_types_need_only_settle(tmp_path: Path):
    empty, picture = tmp_path / "empty.jpg", tmp_path / "mic.jpg"
    empty.touch()
    picture.write_bytes(b"\xff\xd8 any bytes: only MRC headers are checked")
    assert not looks_complete(empty, 0)
    assert looks_complete(picture, picture.stat().st_size)
    assert incompleteness(empty) == "file is empty (0 bytes)"


def test_vanished_or_replaced_by_a_folder_is_gone(tmp_path: Path):
    path = write_micrograph(tmp_path / "mic.mrc")
    pending = PendingFile(path, None, since=0.0)
    assert pending.check(0.0, SETTLE, GIVE_UP) is Verdict.SETTLING
    os.unlink(path)
    assert pending.check(1.0, SETTLE, GIVE_UP) is Verdict.GONE
    path.mkdir()
    assert pending.check(2.0, SETTLE, GIVE_UP) is Verdict.GONE


def _unfixable(scratch: Path) -> dict[str, bytes]:
    """Settled .mrc files that can never become readable micrographs, however long one waits."""
    good = mrc_bytes(scratch)
    return {
        "text": b"plain text, not an MRC " * 80,  # longer than a header, and no MAP identifier
        "no_map_id": patched(good, 208, b"XYZ"),
        "unknown_mode": patched(good, 12, struct.pack("<i", 99)),
        "negative_size": patched(good, 0, struct.pack("<i", -48)),
        "longer_than_declared": good + bytes(400),
    }


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("text", "not an MRC file"),
        ("no_map_id", "not an MRC file"),
        ("unknown_mode", "unsupported MRC mode 99"),
        ("negative_size", "negative size"),
        ("longer_than_declared", "longer than its header says"),
    ],
)
def test_files_that_can_never_complete_are_rejected_once_settled(tmp_path: Path, kind: str, problem: str):
    """Item 18: no need to wait the give-up time for these; published at once for the picker to dead-letter."""
    path = tmp_path / f"{kind}.mrc"
    path.write_bytes(_unfixable(tmp_path / "scratch")[kind])
    pending = PendingFile(path, None, since=0.0)
    assert pending.check(0.0, SETTLE, GIVE_UP) is Verdict.SETTLING  # first look
    assert pending.check(SETTLE - 0.5, SETTLE, GIVE_UP) is Verdict.SETTLING  # it may still be changing
    assert pending.check(SETTLE, SETTLE, GIVE_UP) is Verdict.REJECT
    assert problem in pending.problem
    assert problem in incompleteness(path)


@pytest.mark.parametrize("kind", ["truncated", "header_only", "shorter_than_a_header", "empty"])
def test_files_that_may_still_grow_stay_incomplete_until_the_give_up_time(tmp_path: Path, kind: str):
    """A copy in progress looks like these: shorter than its header declares, or than a header."""
    good = mrc_bytes(tmp_path / "scratch")
    content = {
        "truncated": good[:-500],
        "header_only": good[:1024],
        "shorter_than_a_header": good[:600],
        "empty": b"",
    }[kind]
    path = tmp_path / f"{kind}.mrc"
    path.write_bytes(content)
    pending = PendingFile(path, None, since=0.0)
    pending.check(0.0, SETTLE, GIVE_UP)
    assert pending.check(SETTLE, SETTLE, GIVE_UP) is Verdict.INCOMPLETE
    assert pending.check(GIVE_UP - 0.1, SETTLE, GIVE_UP) is Verdict.INCOMPLETE
    assert pending.check(GIVE_UP, SETTLE, GIVE_UP) is Verdict.GIVE_UP


def test_symlink_resolving_outside_the_data_roots_is_rejected_once_settled(tmp_path: Path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    inside = write_micrograph(root / "session" / "mic.mrc")
    outside = write_micrograph(elsewhere / "mic.mrc")
    junk = elsewhere / "junk.mrc"
    junk.write_bytes(b"\x00" * 600)  # would wait as incomplete, were it inside
    links = {}
    for name, target in (("in.mrc", inside), ("out.mrc", outside), ("junk.mrc", junk)):
        links[name] = root / "session" / "links" / name
        links[name].parent.mkdir(parents=True, exist_ok=True)
        links[name].symlink_to(target)
    roots = [root]

    verdicts = {}
    for name, link in links.items():
        pending = PendingFile(link, None, since=0.0)
        pending.check(0.0, SETTLE, GIVE_UP, roots)
        assert pending.check(SETTLE - 0.5, SETTLE, GIVE_UP, roots) is Verdict.SETTLING
        verdicts[name] = (pending.check(SETTLE, SETTLE, GIVE_UP, roots), pending.problem)
    assert verdicts["in.mrc"] == (Verdict.COMPLETE, "")  # a symlink inside the roots is fine
    for name, target in (("out.mrc", outside), ("junk.mrc", junk)):
        verdict, problem = verdicts[name]
        assert verdict is Verdict.REJECT, name
        assert str(target) in problem and "outside the data roots" in problem and str(root) in problem


def _header_only(nx: int, ny: int, nz: int, mode: int = 2, nsymbt: int = 0) -> bytes:
    """A valid 1024-byte MRC header (little-endian, 'MAP ') and nothing after it: a copy that has just begun."""
    raw = bytearray(1024)
    raw[0:16] = struct.pack("<4i", nx, ny, nz, mode)
    raw[92:96] = struct.pack("<i", nsymbt)
    raw[208:212] = b"MAP "
    raw[212:216] = b"\x44\x44\x00\x00"
    return bytes(raw)


@pytest.mark.parametrize(
    ("kind", "header", "problem"),
    [
        ("over_the_pixel_limit", _header_only(100_000, 100_000, 1), "exceeds the limit of"),
        ("extended_header_of_1_GB", _header_only(1024, 1024, 1, nsymbt=1 << 30), "extended header of 1073741824 bytes"),
        ("stack", _header_only(512, 512, 40), "a stack of 40 images"),
        ("no_pixels", _header_only(0, 512, 1), "image is empty"),
    ],
)
def test_headers_the_picker_refuses_are_rejected_at_once_not_after_the_give_up_time(
    tmp_path: Path, kind: str, header: bytes, problem: str
) -> None:
    """Issue 25, item 9: however complete such a file became it could never be picked, so it is not kept waiting
    600 s as a copy in progress: the watcher publishes it once settled, for the picker to dead-letter."""
    path = tmp_path / f"{kind}.mrc"
    path.write_bytes(header)
    pending = PendingFile(path, None, since=0.0)
    pending.check(0.0, SETTLE, GIVE_UP, (), 134_217_728)
    assert pending.check(SETTLE, SETTLE, GIVE_UP, (), 134_217_728) is Verdict.REJECT
    assert problem in pending.problem, pending.problem
    with pytest.raises(InputError, match=problem):
        read_micrograph(path)
    # a raised pixel limit lets the large one wait as a copy in progress again
    if kind == "over_the_pixel_limit":
        again = PendingFile(path, None, since=0.0)
        again.check(0.0, SETTLE, GIVE_UP, (), 10**11)
        assert again.check(SETTLE, SETTLE, GIVE_UP, (), 10**11) is Verdict.INCOMPLETE
