"""Correcting the picker on the session page, in a real browser (Debian's Chromium, headless, over the DevTools
protocol): an operator marks wrong picks and missed particles with real mouse clicks, and the page offers them as
``corrections.star``, keeps them across reloads (localStorage, per project and session), undoes and clears them,
and shrugs off a damaged stored value.

The session is written the way the writer writes one (``SessionOutputs.apply`` then ``SessionGallery.add`` and
``write_index``) from real MRC files, without the rest of the pipeline. The screenshot of the page with its marks
is kept with the test's files (and copied to ``CRYOMAE_CORRECTIONS_SCREENSHOT`` when set). The picture in
docs/images is taken from a real ``cryomae demo`` session instead: ``bash scripts/corrections-screenshot.sh``.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryomae.gallery.page import SessionGallery
from cryomae.io import write_mrc
from cryomae.messages import PicksReady
from cryomae.store.outputs import Candidates, SessionOutputs
from cryomae.synthetic import SyntheticMicrograph, make_micrograph
from tests.browser.chromium import Chromium, headless_browser
from tests.browser.marking import (
    CARDS,
    TEXT,
    card,
    click_element,
    click_on,
    marks_drawn,
    on_screen,
    open_page,
    picture,
    screenshot,
)
from tests.live.conftest import wait_until

PROJECT, SESSION, OTHER = "betagal", "grid3", "grid4"
SHAPE = (320, 448)  # rows, columns: not square, so that x and y swapped would show
DIAMETER = 24.0
ODD = "grid #1? <b>x & ü.mrc"  # a STAR token to quote (space, '#'), and HTML to escape
KEYWORD = "data_02.mrc"  # quoted too: starts like a STAR keyword
PLAIN = "mic_03.mrc"
UNMARKED = "mic_04.mrc"
MISSING = 3  # particles per micrograph the picker misses
NAMES = [ODD, KEYWORD, PLAIN, UNMARKED]  # picked in this order: the page shows the newest first
HEADER = (
    f"# cryomae corrections: project {PROJECT}, session {SESSION}, from the session page\n\n"
    "data_corrections\n\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n_cryomaeParticle #4\n"
)
COMMAND = f"cryomae exemplars correct --project {PROJECT} --session {SESSION} --from corrections.star"
LARGE = "document.querySelector('#large svg[data-key]')"
WRONG, MISSED = 0, 1


def _synthetic(name: str) -> SyntheticMicrograph:
    """The micrograph of a name: particles, and a few pieces of junk the picker takes for particles."""
    return make_micrograph(
        shape=SHAPE, diameter=DIAMETER, n_particles=18, n_distractors=4, snr=2.5, seed=zlib.crc32(name.encode())
    )


def _picks(micrograph: Path, session: str) -> tuple[PicksReady, np.ndarray]:
    """A micrograph written as MRC (once) and its candidates: the picker picks its junk (wrong picks) and all its
    particles but the first MISSING (missed particles: they score below the cutoff, as random spots do)."""
    m = _synthetic(micrograph.name)
    if not micrograph.exists():
        write_mrc(micrograph, m.image)
    rng = np.random.default_rng(zlib.crc32(micrograph.name.encode()))
    noise = np.stack([rng.uniform(0, SHAPE[1] - 1, 25), rng.uniform(0, SHAPE[0] - 1, 25)], axis=1)
    xy = np.concatenate([m.centres, m.distractors, noise])
    high = rng.uniform(0.55, 0.95, len(m.centres) + len(m.distractors))
    high[:MISSING] = rng.uniform(0.05, 0.45, MISSING)
    scores = np.concatenate([high, rng.uniform(0.05, 0.45, len(noise))])
    msg = PicksReady(
        project=PROJECT,
        session=session,
        micrograph=str(micrograph),
        micrograph_id=f"m-{micrograph.stem}",
        model_version="v1",
        diameter=DIAMETER,
        threshold=0.5,
        x=xy[:, 0].tolist(),
        y=xy[:, 1].tolist(),
        scores=scores.tolist(),
        shape=SHAPE,
        complete_at=time.time(),
    )
    return msg, m.image


def _write_session(outputs_root: Path, data: Path, session: str, names: list[str]) -> SessionOutputs:
    """What the writer does for each PicksReady: the STAR files, then the gallery's pictures and index."""
    outputs = SessionOutputs(outputs_root / PROJECT / session, name_root=data)
    gallery = SessionGallery(outputs, size=256)
    for name in names:
        msg, image = _picks(data / name, session)
        outputs.apply(msg)
        gallery.add(msg.micrograph, image)
    gallery.write_index(seen=len(names))
    return outputs


@pytest.fixture
def browser() -> Iterator[Chromium]:
    with headless_browser(1400, 1000) as b:
        yield b


# ---------------------------------------------------------------------------------------------- geometry


def _kept_xy(c: Candidates) -> np.ndarray:
    keep = c.scores >= c.cutoff
    return np.stack([c.x[keep], c.y[keep]], axis=1)  # [n, 2] original pixels, x = column


def _wrong_pick(name: str, c: Candidates) -> tuple[float, float]:
    """A pick of junk, as the page holds it (1 decimal); junk lies 1.2 diameters from anything else."""
    kept = np.round(_kept_xy(c), 1)
    for x, y in np.round(_synthetic(name).distractors, 1):
        assert np.hypot(*(kept - (x, y)).T).min() < 0.1  # picked
        if DIAMETER < x < SHAPE[1] - DIAMETER and DIAMETER < y < SHAPE[0] - DIAMETER:
            return float(x), float(y)
    raise AssertionError("no junk inside the test micrograph")


def _missed_particle(name: str, c: Candidates) -> tuple[float, float]:
    """A particle the picker missed: no pick within a diameter of it (an empty spot for the page)."""
    missed = _synthetic(name).centres[:MISSING]
    kept = _kept_xy(c)
    distance = np.hypot(missed[:, None, 0] - kept[None, :, 0], missed[:, None, 1] - kept[None, :, 1]).min(axis=1)
    best = int(distance.argmax())
    assert distance[best] > DIAMETER, "every missed particle of the test micrograph lies under a pick"
    return float(missed[best, 0]), float(missed[best, 1])


def _click_on(
    b: Chromium, name: str, x: float, y: float, marks: list[int], svg: str | None = None
) -> tuple[float, float]:
    """Click micrograph pixel (x, y) on its card (or on ``svg``); wait until the picture shows ``marks``; the point
    clicked, in micrograph pixels."""
    return click_on(b, svg or picture(name), SHAPE, x, y, marks)


def _rows(text: str) -> list[list[str]]:
    assert text.startswith(HEADER), text
    body = text[len(HEADER) :]
    assert body == "" or body.endswith("\n"), body
    return [line.split("\t") for line in body.splitlines()]


def _stored(b: Chromium) -> dict[str, str]:
    return b.evaluate(
        "(function () { var o = {}; for (var i = 0; i < localStorage.length; i++) { var k = localStorage.key(i); "
        "o[k] = localStorage.getItem(k); } return o; })()"
    )


# ---------------------------------------------------------------------------------------------- the test


def test_an_operator_marks_corrections_and_the_page_writes_corrections_star(browser: Chromium, tmp_path: Path) -> None:
    b = browser
    data = tmp_path / "data"
    data.mkdir()
    outputs = _write_session(tmp_path / "outputs", data, SESSION, NAMES)
    _write_session(tmp_path / "outputs", data, OTHER, [PLAIN])  # another session of the project, on the same file
    url = (outputs.root / "gallery" / "index.html").as_uri()
    other_url = (tmp_path / "outputs" / PROJECT / OTHER / "gallery" / "index.html").as_uri()
    micrographs = {name: str(data / name) for name in NAMES}
    candidates = {name: outputs.candidates(path) for name, path in micrographs.items()}
    # the names the session's STAR files give the micrographs: corrections.star must name them the same
    index = starfile.read(outputs.index_path, always_dict=True)["coordinate_files"]
    star_names = {Path(n).name: n for n in index["rlnMicrographName"]}
    assert sorted(star_names) == sorted(NAMES) and star_names[ODD] == ODD  # relative to name_root

    open_page(b, url)
    assert _rows(b.evaluate(TEXT)) == []
    assert b.evaluate("document.getElementById('corrections-download').hasAttribute('href')") is False
    # an ordinary click on a pick still opens the micrograph large, and marks nothing
    odd_pick = _wrong_pick(ODD, candidates[ODD])
    cx, cy, _, _ = on_screen(b, picture(ODD), SHAPE, *odd_pick)
    b.click(cx, cy)
    b.wait_for("document.getElementById('large').className === 'open'")
    b.click(5, 5)  # beside the large picture: it closes
    b.wait_for("document.getElementById('large').className === ''")
    assert _rows(b.evaluate(TEXT)) == [] and _stored(b) == {}

    # "correct the picker": a pick clicked is wrong, an empty spot clicked is a missed particle
    click_element(b, "document.getElementById('correct-mode')")
    b.wait_for("document.getElementById('correct-mode').checked && document.body.classList.contains('correcting')")
    _click_on(b, ODD, *odd_pick, marks=[1, 0])
    odd_spot = _missed_particle(ODD, candidates[ODD])
    odd_missed = _click_on(b, ODD, *odd_spot, marks=[1, 1])
    keyword_spot = _missed_particle(KEYWORD, candidates[KEYWORD])
    _click_on(b, KEYWORD, *keyword_spot, marks=[0, 1])
    _click_on(b, KEYWORD, *keyword_spot, marks=[0, 0])  # a click on a mark removes it
    keyword_missed = _click_on(b, KEYWORD, *keyword_spot, marks=[0, 1])
    plain_pick = _wrong_pick(PLAIN, candidates[PLAIN])
    _click_on(b, PLAIN, *plain_pick, marks=[1, 0])
    assert marks_drawn(b, picture(UNMARKED)) == [0, 0]
    # the marks are drawn beside the picks, never as picks: every card still draws its picks and only them
    for name, c in candidates.items():
        kept = b.evaluate(f"{card(name)}.querySelectorAll('circle.kept').length")
        assert kept == int(np.count_nonzero(c.scores >= c.cutoff)) == outputs.entry(micrographs[name]).particles

    # corrections.star: by micrograph in the page's order (newest first), then in the order the marks were made
    text = b.evaluate(TEXT)
    expected = [  # name as STAR writes it, x, y, particle
        (star_names[PLAIN], *plain_pick, WRONG),
        (f'"{star_names[KEYWORD]}"', *keyword_missed, MISSED),
        (f'"{star_names[ODD]}"', *odd_pick, WRONG),
        (f'"{star_names[ODD]}"', *odd_missed, MISSED),
    ]
    rows = _rows(text)
    assert [(r[0], r[3]) for r in rows] == [(e[0], str(e[3])) for e in expected], text
    for row, (_, x, y, _) in zip(rows, expected, strict=True):
        assert len(row) == 4 and all(len(v.split(".")[1]) == 1 for v in row[1:3]), row  # 1 decimal
        assert abs(float(row[1]) - x) <= 1.0 and abs(float(row[2]) - y) <= 1.0, (row, x, y)
    assert "mic_04" not in text  # a micrograph without marks has no rows
    star = tmp_path / "corrections.star"
    star.write_text(text, encoding="utf-8")
    table = starfile.read(star, always_dict=True)["corrections"]
    assert list(table.columns) == ["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "cryomaeParticle"]
    assert list(table["rlnMicrographName"]) == [star_names[n] for n in (PLAIN, KEYWORD, ODD, ODD)]
    assert list(table["cryomaeParticle"]) == [e[3] for e in expected]
    np.testing.assert_allclose(table["rlnCoordinateX"], [e[1] for e in expected], atol=1.0)
    np.testing.assert_allclose(table["rlnCoordinateY"], [e[2] for e in expected], atol=1.0)
    # the wrong picks are the picks' own coordinates, the missed particles within a pixel of the spot aimed at
    assert (float(rows[0][1]), float(rows[0][2])) == plain_pick and (float(rows[2][1]), float(rows[2][2])) == odd_pick
    assert np.hypot(float(rows[3][1]) - odd_spot[0], float(rows[3][2]) - odd_spot[1]) <= 2.0

    # the list: per micrograph, with counts, names as text (never HTML); the command; the download
    listed = b.evaluate(
        "Array.from(document.querySelectorAll('#corrections-list > li[data-micrograph]')).map(li => "
        "[li.getAttribute('data-micrograph'), li.querySelector('span.dim').textContent, "
        "li.querySelectorAll('ul li').length])"
    )
    assert listed == [
        [PLAIN, " \u00b7 1 wrong, 0 missed", 1],
        [KEYWORD, " \u00b7 0 wrong, 1 missed", 1],
        [ODD, " \u00b7 1 wrong, 1 missed", 2],
    ]
    assert b.evaluate("document.getElementById('corrections-count').textContent") == (
        "4 marks on 3 micrographs (2 wrong, 2 missed)"
    )
    assert b.evaluate("document.querySelectorAll('b').length") == 0
    assert b.evaluate(f"{card(ODD)}.querySelector('.marked').textContent") == "marked: 1 wrong, 1 missed"
    assert b.evaluate("document.getElementById('corrections-command').textContent") == COMMAND
    downloads = tmp_path / "downloads"
    b.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    assert b.evaluate("document.getElementById('corrections-download').getAttribute('download')") == "corrections.star"
    click_element(b, "document.getElementById('corrections-download')")
    wait_until(
        lambda: (
            (downloads / "corrections.star").is_file()
            and (downloads / "corrections.star").read_text(encoding="utf-8") == text
        ),
        timeout=30,
        what="corrections.star downloaded",
    )
    shot = tmp_path / "gallery-corrections.jpg"
    screenshot(b, shot)
    assert shot.stat().st_size > 10_000

    # kept in this browser: a reload shows the same marks and the same file
    open_page(b, url)
    assert b.evaluate(TEXT) == text
    assert [marks_drawn(b, picture(n)) for n in NAMES] == [[1, 1], [0, 1], [1, 0], [0, 0]]
    assert b.evaluate("document.getElementById('correct-mode').checked") is False  # the mode starts off
    (key,) = _stored(b)
    # another session's page, in the same browser and on the same micrograph file, has none of them
    open_page(b, other_url)
    assert b.evaluate(TEXT) == HEADER.replace(f"session {SESSION}", f"session {OTHER}")
    assert b.evaluate(f"{CARDS}[0].querySelectorAll('g.marks *').length") == 0
    open_page(b, url)
    assert b.evaluate(TEXT) == text

    # undo: the last mark made goes (the wrong pick on mic_03), from the page and from the browser's store
    click_element(b, "document.getElementById('undo')")
    b.wait_for(f"{TEXT}.split('\\n').length === {len(text.splitlines())}")
    undone = b.evaluate(TEXT)
    assert _rows(undone) == [rows[1], rows[2], rows[3]]
    assert marks_drawn(b, picture(PLAIN)) == [0, 0]
    open_page(b, url)
    assert b.evaluate(TEXT) == undone
    # each mark listed can be removed
    item = "(function (li) {{ return li.querySelector('button.remove'); }})({})"
    listed_keyword = (
        "Array.from(document.querySelectorAll('#corrections-list > li'))"
        f".find(li => li.getAttribute('data-micrograph') === {json.dumps(KEYWORD)})"
    )
    click_element(b, item.format(listed_keyword))
    b.wait_for(f"{TEXT}.split('\\n').length === {len(undone.splitlines())}")
    assert _rows(b.evaluate(TEXT)) == [rows[2], rows[3]] and marks_drawn(b, picture(KEYWORD)) == [0, 0]
    # the large view, in correct mode: a click on the picture marks (and leaves it open), one beside it closes it
    click_element(b, "document.getElementById('correct-mode')")
    b.wait_for("document.getElementById('correct-mode').checked")
    click_element(b, f"{card(KEYWORD)}.querySelector('.name')")  # the caption still opens it
    b.wait_for(f"document.querySelector('#large.open svg[data-key]') && {LARGE}.hasAttribute('data-kept')")
    large_missed = _click_on(b, KEYWORD, *keyword_spot, marks=[0, 1], svg=LARGE)
    assert b.evaluate("document.getElementById('large').className") == "open"
    b.click(5, 5)
    b.wait_for("document.getElementById('large').className === ''")
    assert marks_drawn(b, picture(KEYWORD)) == [0, 1]
    rows_large = _rows(b.evaluate(TEXT))
    assert rows_large[0][0] == f'"{star_names[KEYWORD]}"' and rows_large[0][3] == "1" and rows_large[1:] == rows[2:]
    assert abs(float(rows_large[0][1]) - large_missed[0]) <= 1 and abs(float(rows_large[0][2]) - large_missed[1]) <= 1

    # a damaged or foreign stored value is ignored: the page works, with no marks, and says so
    for garbage in ("{not json", "null", "[1, 2]", '{"marks": "x"}', json.dumps({"project": PROJECT, "marks": []})):
        b.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(garbage)})")
        open_page(b, url)
        assert _rows(b.evaluate(TEXT)) == [], garbage
        assert b.evaluate(f"{CARDS}.length") == len(NAMES)
        assert "could not be read" in b.evaluate("document.getElementById('corrections-note').textContent")
    # a stored value with some readable marks among junk: the readable ones are kept
    unmarked_key = outputs.entry(micrographs[UNMARKED]).key
    mixed = {
        "format": 1,
        "project": PROJECT,
        "session": SESSION,
        "marks": [
            {"key": unmarked_key, "x": 100.04, "y": 50.0, "particle": 1, "n": 3},
            {"key": unmarked_key, "x": "100", "y": 50.0, "particle": 1, "n": 4},
            {"key": unmarked_key, "x": 10.0, "y": 20.0, "particle": 7, "n": 5},
            None,
            "x",
            [1, 2],
        ],
    }
    b.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(mixed))})")
    open_page(b, url)
    assert _rows(b.evaluate(TEXT)) == [[star_names[UNMARKED], "100.0", "50.0", "1"]]
    assert marks_drawn(b, picture(UNMARKED)) == [0, 1]
    # and marking goes on, storing a readable value again
    click_element(b, "document.getElementById('correct-mode')")
    b.wait_for("document.getElementById('correct-mode').checked")
    _click_on(b, UNMARKED, *_wrong_pick(UNMARKED, candidates[UNMARKED]), marks=[1, 1])
    assert len(_rows(b.evaluate(TEXT))) == 2
    assert len(json.loads(_stored(b)[key])["marks"]) == 2

    # clear all asks first: refused, nothing changes; confirmed, every mark goes and the download is off
    b.evaluate("window.confirm = function () { return false; }")
    click_element(b, "document.getElementById('clear-marks')")
    assert len(_rows(b.evaluate(TEXT))) == 2
    b.evaluate("window.confirm = function () { return true; }")
    click_element(b, "document.getElementById('clear-marks')")
    b.wait_for(f"{TEXT}.split('\\n').length === {len(HEADER.splitlines()) + 1}")
    assert _rows(b.evaluate(TEXT)) == [] and _stored(b) == {}
    assert b.evaluate("document.getElementById('corrections-download').hasAttribute('href')") is False

    assert not b.exceptions, b.exceptions
    errors = [m for m in b.console if m["type"] == "error"]
    assert not errors, errors
    assert not b.failed_requests, b.failed_requests
    target = os.environ.get("CRYOMAE_CORRECTIONS_SCREENSHOT")
    if target:
        Path(target).write_bytes(shot.read_bytes())


def test_a_repicked_micrograph_shows_its_count_before(browser: Chromium, tmp_path: Path) -> None:
    """After the session is re-picked by a model trained on corrections, each re-picked card says what the model
    before it kept; a micrograph picked once says nothing of the kind."""
    data = tmp_path / "data"
    data.mkdir()
    outputs = _write_session(tmp_path / "outputs", data, SESSION, [PLAIN, UNMARKED])
    before = outputs.entry(str(data / PLAIN)).particles
    msg, image = _picks(data / PLAIN, SESSION)
    keep = len(msg.scores) // 2
    repick = msg.model_copy(
        update={"model_version": "v2", "threshold": sorted(msg.scores)[keep], "picked_at": time.time() + 1}
    )
    outputs.apply(repick)
    gallery = SessionGallery(outputs, size=256)
    gallery.add(repick.micrograph, image)
    gallery.write_index(seen=2)
    after = outputs.entry(str(data / PLAIN)).particles
    assert after != before
    open_page(browser, (outputs.root / "gallery" / "index.html").as_uri())
    shown = browser.evaluate(
        "Array.from(document.querySelectorAll('#grid .card')).map(c => [c.getAttribute('data-micrograph'), "
        "(c.querySelector('.before') || {}).textContent || null])"
    )
    assert dict(shown) == {PLAIN: f"before: {before} particles with model v1", UNMARKED: None}
