"""The session page in a real browser (Debian's Chromium, headless, over the DevTools protocol), written by a real
session of the one-process mode: micrographs dropped into a watched folder, a model trained from 15 exemplars,
one micrograph that fails, a re-threshold by the operator. Opened from disk and from ``cryomae gallery serve``.

The screenshot is kept with the test's files (and copied to ``CRYOMAE_GALLERY_SCREENSHOT`` when set).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryomae.gallery.server import make_server, serve_in_thread
from cryomae.io import write_mrc
from cryomae.operator import actions as ops
from cryomae.service.writer import Writer
from tests.browser.chromium import Chromium, headless_browser
from tests.live.conftest import (
    MICS_DLQ,
    PROJECT,
    SESSION,
    Live,
    make_dataset,
    running,
    train_first_model,
    wait_until,
)

PICKED = 6
ODD_NAME = "grid #1? <b>x & ü.mrc"
CARDS = "Array.from(document.querySelectorAll('#grid svg[data-key]'))"
SLIDER = "document.getElementById('cutoff')"
SIZE = "document.getElementById('size')"
# each card's name, count, the count's noun, cutoff and time of picking, as the page shows them
LABELS = (
    "Array.from(document.querySelectorAll('#grid .card')).map(c => [c.getAttribute('data-micrograph'), "
    "c.querySelector('.count').textContent, c.querySelector('.unit').textContent.trim(), "
    "c.querySelector('.cutoff').textContent, c.querySelector('.when').textContent, "
    "c.querySelectorAll('circle.kept').length])"
)
ISO_TIME = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"


def _iso_utc(t: float) -> str:
    """A time as the page writes it (ISO form) in the browser's time zone, set to UTC by the test."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(t)))


def _noun(count: int) -> str:
    return "particle" if count == 1 else "particles"


@pytest.fixture
def browser() -> Iterator[Chromium]:
    with headless_browser() as b:
        yield b


@pytest.fixture
def session_page(tmp_path: Path) -> tuple[Live, Path]:
    """A session written by the one-process mode; its page, and the live installation."""
    (tmp_path / "dataset").mkdir()
    live = Live(tmp_path / "site", "memory", "gallery", make_dataset(tmp_path / "dataset", PICKED + 1))
    live.create_project()
    settings = live.settings()
    with running(live, settings) as (app, control):
        live.session_folder.mkdir(parents=True)
        ops.session_start(settings, control, PROJECT, SESSION, live.session_folder, "*.mrc", True)
        train_first_model(live, control)
        # a micrograph the picker refuses (constant: nothing to pick on), dead-lettered: "failed" on the page
        write_mrc(live.data / "flat.mrc", np.zeros((256, 256), dtype=np.float32))
        shutil.move(live.data / "flat.mrc", live.session_folder / "flat.mrc")
        # one name that URLs and HTML must escape: the page loads its files and shows it as text
        odd = live.session_folder / ODD_NAME
        shutil.copyfile(live.dataset.micrographs[1], live.data / "odd.part")
        os.replace(live.data / "odd.part", odd)
        for i in range(2, PICKED + 1):
            live.drop(i)
        wait_until(lambda: live.picked() == PICKED, what=f"{PICKED} micrographs picked")
        wait_until(lambda: app.broker.depth(MICS_DLQ) == 1, what="the flat micrograph dead-lettered")
        # the operator sets a session cutoff: the writer rewrites the STAR files and the page follows
        scores = np.concatenate([live.outputs().candidates(e.micrograph).scores for e in live.outputs().micrographs()])
        ops.session_rethreshold(settings, control, PROJECT, SESSION, float(np.round(np.quantile(scores, 0.6), 4)))
        wait_until(lambda: live.outputs().counts().threshold is not None, what="the session cutoff applied")
        writer = app.services["writer"]
        assert isinstance(writer, Writer) and writer.gallery is not None
        assert writer.gallery.wait_idle(120)
    return live, live.root / "outputs" / PROJECT / SESSION / "gallery" / "index.html"


def _check_page(b: Chromium, live: Live, url: str, screenshot: Path | None) -> None:
    b.open(url)
    entries = {Path(e.micrograph).name: e for e in live.outputs().micrographs()}
    assert len(entries) == PICKED
    # every picked micrograph is listed, newest first, with its particle count as the STAR files hold it
    b.wait_for(f"{CARDS}.length === {PICKED} && {CARDS}.every(s => s.hasAttribute('data-kept'))")
    cards = b.evaluate(
        "Array.from(document.querySelectorAll('#grid .card')).map(c => [c.getAttribute('data-micrograph'), "
        "c.querySelector('.count').textContent, c.querySelector('svg').getAttribute('data-kept')])"
    )
    assert [c[0] for c in cards] == sorted(entries, key=lambda n: entries[n].applied_at, reverse=True)
    for name, count, kept in cards:
        rows = len(starfile.read(entries[name].coordinate_file)) if entries[name].particles else 0
        assert int(count) == int(kept) == entries[name].particles == rows
    assert ODD_NAME in [c[0] for c in cards] and b.evaluate("document.querySelectorAll('#grid b').length") == 0
    # each card's count, its noun and its cutoff are those of the STAR files; its time of picking in ISO form
    for name, count, unit, cutoff, picked, drawn in b.evaluate(LABELS):
        e = entries[name]
        assert (int(count), unit, cutoff, drawn) == (e.particles, _noun(e.particles), f"{e.threshold:.4f}", e.particles)
        assert picked == f"picked {_iso_utc(e.picked_at)}", picked
    assert re.fullmatch(f"updated {ISO_TIME} .*", b.evaluate("document.getElementById('updated').textContent"))
    failed_at = b.evaluate("document.querySelector('#failures li span').textContent")
    assert re.fullmatch(f"flat\\.mrc \u00b7 {ISO_TIME}", failed_at), failed_at
    # the images load
    b.wait_for(f"{CARDS}.every(s => s.getAttribute('data-loaded'))")
    assert b.evaluate(f"{CARDS}.map(s => s.getAttribute('data-loaded'))") == ["1"] * PICKED
    # the summary: seen / picked / failed / particles
    summary = b.evaluate(
        "['seen', 'picked', 'failed', 'particles'].map(k => document.getElementById('summary-' + k).textContent)"
    )
    assert summary == [str(PICKED + 1), str(PICKED), "1", str(live.outputs().counts().particles)]
    failed = b.evaluate("Array.from(document.querySelectorAll('#failures li')).map(li => li.textContent)")
    assert len(failed) == 1 and failed[0].startswith("flat.mrc") and "constant" in failed[0], failed
    command = b.evaluate("document.getElementById('command').textContent")
    cutoff = live.outputs().counts().threshold
    assert cutoff is not None
    assert command == f"cryomae session rethreshold --project {PROJECT} --session {SESSION} --threshold {cutoff}"
    # moving the slider down keeps more candidates, draws more circles and changes the command
    before = b.evaluate(f"{CARDS}.map(s => s.querySelectorAll('circle.kept').length)")
    lower = round(
        float(cutoff)
        - 0.1
        * (
            float(b.evaluate("document.getElementById('cutoff').max"))
            - float(b.evaluate("document.getElementById('cutoff').min"))
        ),
        4,
    )
    b.evaluate(f"(function (el) {{ el.value = {lower}; el.dispatchEvent(new Event('input')); }})({SLIDER})")
    after = b.evaluate(f"{CARDS}.map(s => s.querySelectorAll('circle.kept').length)")
    assert sum(after) > sum(before) and all(a >= c for a, c in zip(after, before, strict=True))
    shown = round(float(b.evaluate("document.getElementById('cutoff').value")), 4)  # the page rounds to 4 places
    assert b.evaluate("document.getElementById('command').textContent").endswith(f"--threshold {shown}")
    for name, e in entries.items():  # the drawn picks are the candidates at or above the slider's cutoff
        c = live.outputs().candidates(e.micrograph)
        drawn = b.evaluate(
            f"document.querySelector('.card[data-micrograph=\"{name}\"] svg').querySelectorAll('circle.kept').length"
        )
        assert drawn == int(np.count_nonzero(c.scores >= shown))
    # every card's count and cutoff follow the slider: the count is the picks drawn, the cutoff the slider's
    assert b.evaluate("document.getElementById('cutoff-value').textContent") == f"{shown:.4f}"
    for name, count, unit, cutoff, _, drawn in b.evaluate(LABELS):
        assert (int(count), unit, cutoff) == (drawn, _noun(drawn), f"{shown:.4f}"), name
    # the picture size: larger cards
    width = "document.querySelector('#grid .card').getBoundingClientRect().width"
    small = b.evaluate(width)
    b.evaluate("(function (el) { el.selectedIndex = 2; el.dispatchEvent(new Event('change')); })(" + SIZE + ")")
    assert b.evaluate(width) > 1.5 * small
    # click a micrograph: it opens large with its picks
    b.evaluate("document.querySelector('#grid .card').click()")
    b.wait_for("document.querySelector('#large.open svg circle.kept') !== null")
    if screenshot is not None:
        b.screenshot(screenshot)
        assert screenshot.stat().st_size > 10_000
    large = b.evaluate(
        "(function (el) { return [el.querySelector('.count').textContent, el.querySelector('.cutoff').textContent, "
        "el.querySelectorAll('circle.kept').length]; })(document.getElementById('large'))"
    )
    assert large == [str(large[2]), f"{shown:.4f}", large[2]]  # the large view follows the slider too
    b.evaluate("document.getElementById('large').click()")
    # back to the cutoff in force: every card's count and cutoff are the STAR files' again
    b.evaluate("document.getElementById('reset').click()")
    for name, count, unit, cutoff, _, drawn in b.evaluate(LABELS):
        e = entries[name]
        assert (int(count), unit, cutoff, drawn) == (e.particles, _noun(e.particles), f"{e.threshold:.4f}", e.particles)
    assert not b.exceptions, b.exceptions
    errors = [m for m in b.console if m["type"] == "error"]
    assert not errors, errors
    assert not b.failed_requests, b.failed_requests


def test_the_session_page_works_in_a_browser_from_disk_and_from_the_server(
    session_page: tuple[Live, Path], browser: Chromium, tmp_path: Path
) -> None:
    live, page = session_page
    shot = tmp_path / "gallery.png"
    browser.call("Emulation.setTimezoneOverride", timezoneId="UTC")  # the dates the page shows are checked in UTC
    _check_page(browser, live, page.as_uri(), None)
    browser.evaluate("document.getElementById('large').click()")
    server = make_server(live.root / "outputs", port=0)
    serve_in_thread(server)
    try:
        port = server.server_address[1]
        _check_page(browser, live, f"http://127.0.0.1:{port}/{PROJECT}/{SESSION}/gallery/index.html", None)
        # a fresh page for the screenshot: the grid with its picks, as a person first sees it
        browser.open(f"http://127.0.0.1:{port}/{PROJECT}/{SESSION}/gallery/index.html")
        browser.wait_for(f"{CARDS}.length === {PICKED} && {CARDS}.every(s => s.getAttribute('data-loaded') === '1')")
        browser.screenshot(shot)
    finally:
        server.shutdown()
        server.server_close()
    assert shot.stat().st_size > 10_000
    target = os.environ.get("CRYOMAE_GALLERY_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
