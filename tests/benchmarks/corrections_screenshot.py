"""The pictures of "Correcting the picker" (docs/gallery.md, docs/operations.md) taken from a real session.

    bash scripts/corrections-screenshot.sh                  # about 5 minutes on a busy 2-core CPU
    .venv/bin/python tests/benchmarks/corrections_screenshot.py --no-after     # the first picture only

1. ``cryomae demo --count 6 --interval 1``: EMPIAR-10017 (bin4, ../shared/data) micrographs written into a
   watched folder, 15 exemplars registered, a model trained, every micrograph picked by the one-process services.
2. Its session page (``outputs/demo/session01/gallery/index.html``, opened from disk) in headless Chromium with
   large pictures (``--pictures``: at 700 particles a micrograph the marks are lost among medium ones), marked
   with real clicks (tests/browser/marking.py): "correct the picker" ticked; a wrong pick on the newest
   micrograph (a pick with no true particle within a diameter, the farthest from one); two missed particles (true
   centres with no pick within a diameter, the farthest from one) on the next micrographs of the first row, the
   newest again when the row holds two. Only points that the picture shows are chosen, away from the edges.
3. docs/images/gallery-corrections.jpg: the top of the page, 1400 x 1250 CSS pixels: the marks, their list,
   ``corrections.star`` and the command.
4. Unless ``--no-after``: the page's ``corrections.star`` downloaded, ``cryomae run`` started on the demo's
   folders, ``cryomae exemplars correct --project demo --session session01 --from corrections.star`` run, and,
   once every micrograph is picked again with the new model, docs/images/gallery-corrections-after.jpg: the same
   page, marks kept, down to the first cards' "before: N particles with model ..." lines.

The demo's folder (``--out``, default runs/corrections-screenshot) is replaced; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the project root importable for ``tests.browser``
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cryomae.io import read_coordinates
from cryomae.operator.demo import PROJECT, SESSION
from cryomae.store.outputs import MicrographEntry, SessionOutputs
from cryomae.store.projects import ProjectStore
from tests.browser.chromium import Chromium, find_browser
from tests.browser.marking import (
    CARDS,
    SIZES,
    TEXT,
    click_element,
    click_on,
    open_page,
    picture,
    screenshot,
    show_pictures,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 1400, 1250  # CSS pixels of the picture, as the earlier picture was
# room below a chosen point for the rows each mark adds to the list and to corrections.star above the cards
ROOM_BELOW = 160
WRONG, MISSED = 0, 1


@dataclass(frozen=True)
class Mark:
    name: str  # the micrograph's file name, as its card names it
    x: float  # original pixels, x = column
    y: float
    particle: int  # WRONG or MISSED
    distance: float  # to the nearest true particle (WRONG) or pick (MISSED), pixels


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def cryomae(*args: str) -> list[str]:
    """The command line of a ``cryomae`` command, from this virtualenv."""
    return [str(Path(sys.executable).with_name("cryomae")), *args]


# ------------------------------------------------------------------------------------------ 1. the session


def play_demo(out: Path, count: int, interval: float) -> dict[str, object]:
    """``cryomae demo`` into ``out``; its report (the command's exit status is the demo's: complete or not)."""
    command = cryomae("demo", "--out", str(out), "--count", str(count), "--interval", f"{interval:g}")
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    report: dict[str, object] = json.loads((out / "report.json").read_text())
    return report


# ------------------------------------------------------------------------------------------ 2. the marks


def _distances(points: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each point [n, 2], the distance to the nearest of ``others`` [m, 2] (inf when there are none)."""
    if len(others) == 0:
        return np.full(len(points), np.inf)
    return np.hypot(points[:, None, 0] - others[None, :, 0], points[:, None, 1] - others[None, :, 1]).min(axis=1)


def candidates(
    outputs: SessionOutputs, entry: MicrographEntry, truth_folder: Path, visible: Callable[[float, float], bool]
) -> tuple[list[Mark], list[Mark]]:
    """The wrong picks and missed particles of a micrograph that the picture shows, clearest first: picks with no
    true particle within a diameter, and true particles with no pick within a diameter, two diameters inside the
    micrograph's edges (where the detector's stripes lie)."""
    c = outputs.candidates(entry.micrograph)
    kept = np.stack([c.x, c.y], axis=1)[c.scores >= c.cutoff]
    truth = read_coordinates(truth_folder / f"{Path(entry.micrograph).stem}.star").xy
    d = entry.diameter
    rows, cols = entry.shape
    edge = 2 * d

    def keep(points: np.ndarray, distance: np.ndarray, particle: int) -> list[Mark]:
        x, y = points[:, 0], points[:, 1]
        inside = (x > edge) & (x < cols - 1 - edge) & (y > edge) & (y < rows - 1 - edge)
        found = [
            Mark(Path(entry.micrograph).name, float(x), float(y), particle, float(r))
            for (x, y), r, ok in zip(points, distance, inside & (distance > d), strict=True)
            if ok and visible(float(x), float(y))
        ]
        return sorted(found, key=lambda m: -m.distance)

    return keep(kept, _distances(kept, truth), WRONG), keep(truth, _distances(truth, kept), MISSED)


def first_row(b: Chromium) -> list[str]:
    """The names of the cards in the page's first row (the newest micrographs)."""
    names: list[str] = b.evaluate(
        "(function () { var cards = Array.from(document.querySelectorAll('#grid .card')); "
        "var top = cards[0].getBoundingClientRect().top; return cards.filter(c => "
        "Math.abs(c.getBoundingClientRect().top - top) < 1).map(c => c.getAttribute('data-micrograph')); })()"
    )
    return names


def visible_on_top(
    b: Chromium, name: str, shape: tuple[int, int], size: str, room: float
) -> Callable[[float, float], bool]:
    """Whether micrograph pixel (x, y) of a card lies in the picture's ``HEIGHT`` pixels, ``room`` pixels above its
    bottom, with the page scrolled to its top and pictures of ``size`` (the layout of the screenshot)."""
    show_pictures(b, size)
    top, width, height = b.evaluate(
        f"(function (svg) {{ var r = svg.getBoundingClientRect(); return [r.top + window.scrollY, r.width, "
        f"r.height]; }})({picture(name)})"
    )
    scale = min(width / shape[1], height / shape[0])
    top += (height - shape[0] * scale) / 2

    def visible(x: float, y: float) -> bool:
        del x  # every column is in the picture: the first row is as wide as the page
        return bool(top + (y + 0.5) * scale < HEIGHT - room)

    return visible


def mark_corrections(b: Chromium, outputs: SessionOutputs, truth_folder: Path, size: str) -> list[Mark]:
    """Tick "correct the picker" and mark a wrong pick on the newest micrograph and two missed particles on the next
    ones of the page's first row (on the newest too when the row holds two)."""
    click_element(b, "document.getElementById('correct-mode')")
    b.wait_for("document.getElementById('correct-mode').checked && document.body.classList.contains('correcting')")
    entries = {Path(e.micrograph).name: e for e in outputs.micrographs()}
    show_pictures(b, size)
    row = first_row(b)
    if len(row) < 2:
        raise SystemExit(f"the page's first row shows {len(row)} micrograph; 2 or more wanted (a wider window?)")
    found = {}
    for name in row:
        e = entries[name]
        found[name] = candidates(outputs, e, truth_folder, visible_on_top(b, name, e.shape, size, ROOM_BELOW))
    wrong = found[row[0]][0] or [m for f in found.values() for m in f[0]]  # the newest's, or any
    others = [*row[1:3], row[0]]
    missed = [found[n][1][0] for n in others if found[n][1]] + [m for n in others for m in found[n][1][1:]]
    chosen = [*wrong[:1], *missed[:2]]
    if len(chosen) < 3:
        raise SystemExit(f"too few clear wrong picks or missed particles on the first row: {chosen}")
    drawn = {name: [0, 0] for name in row}
    for m in chosen:
        drawn[m.name][m.particle] += 1
        click_on(b, picture(m.name), entries[m.name].shape, m.x, m.y, drawn[m.name])
        what = "wrong pick" if m.particle == WRONG else "missed particle"
        print(f"marked a {what} on {m.name} at x {m.x:.1f}, y {m.y:.1f} ({m.distance:.0f} px from the nearest)")
    b.wait_for(f"document.getElementById('corrections-count').textContent.startsWith('{len(chosen)} marks ')")
    return chosen


def check_marks_shown(b: Chromium, size: str) -> None:
    """Every mark lies inside the top ``HEIGHT`` pixels of the page (the screenshot), with pictures of ``size``."""
    show_pictures(b, size)
    bottom = b.evaluate(
        "Math.max.apply(null, Array.from(document.querySelectorAll('#grid g.marks .mark')).map(function (el) { "
        "return el.getBoundingClientRect().bottom + window.scrollY; }))"
    )
    if bottom > HEIGHT:
        raise SystemExit(f"a mark lies at {bottom:.0f} px, below the picture's {HEIGHT} px")


def check_page(b: Chromium) -> None:
    if b.exceptions or any(m["type"] == "error" for m in b.console) or b.failed_requests:
        raise SystemExit(f"the page reported errors: {b.exceptions} {b.console} {b.failed_requests}")


# ------------------------------------------------------------------------------------------ 4. the correction


@contextmanager
def services(out: Path, log: Path) -> Iterator[list[str]]:
    """``cryomae run`` on the demo's folders (one process, in-memory broker), stopped as Ctrl-C stops it; yields
    the settings options an operator command needs to reach it."""
    options = [
        *("--store", str(out / "store"), "--outputs", str(out / "outputs"), "--state", str(out / "state")),
        *("--data-root", str(out / "microscope")),
    ]
    env = {**os.environ, "CRYOMAE_METRICS_PORT": "0"}  # any free port: another service may hold 9400
    with log.open("wb") as sink:
        # its own folder as the working directory: no .env of the checkout applies
        proc = subprocess.Popen(cryomae("run", *options), cwd=out, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield options
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def repicked(outputs: Path, store: ProjectStore, before: str) -> bool:
    """Every micrograph of the session picked again by a model published after ``before``."""
    version = store.current_version(PROJECT)
    if version is None or version == before:
        return False
    entries = SessionOutputs(outputs, read_only=True).micrographs()
    return bool(entries) and all(e.model_version == version and e.previous_model_version for e in entries)


def correct(b: Chromium, out: Path, after: Path, size: str) -> None:
    """Download the page's corrections.star, run the command the page shows against ``cryomae run``, wait for the
    re-picked session and take the second picture."""
    downloads = out / "downloads"
    b.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    text = b.evaluate(TEXT)
    click_element(b, "document.getElementById('corrections-download')")
    star = downloads / "corrections.star"
    wait_for(lambda: star.is_file() and star.read_text(encoding="utf-8") == text, 30, "corrections.star downloaded")
    shown = b.evaluate("document.getElementById('corrections-command').textContent").split()
    if shown[:2] != ["cryomae", "exemplars"] or shown[-2:] != ["--from", "corrections.star"]:
        raise SystemExit(f"the page shows an unexpected command: {' '.join(shown)}")
    store = ProjectStore(out / "store")
    before = store.current_version(PROJECT) or ""
    outputs = out / "outputs" / PROJECT / SESSION
    started = time.monotonic()
    with services(out, out / "run.log") as options:
        command = cryomae(*shown[1:], *options)
        print("$", " ".join(shown), "(with the demo's --store, --outputs, --state, --data-root)", flush=True)
        subprocess.run(command, check=True, cwd=downloads)
        wait_for(lambda: repicked(outputs, store, before), 1800, "the session re-picked with the corrected model")
        print(f"re-picked with {store.current_version(PROJECT)} in {time.monotonic() - started:.0f} s", flush=True)
        # the page follows the session itself ("refresh every 10 s"): wait until every card says what it had before
        b.wait_for(
            f"{CARDS}.length > 0 && Array.from(document.querySelectorAll('#grid .card')).every(c => "
            f"c.querySelector('.before') && c.querySelector('svg').getAttribute('data-loaded') === '1')",
            timeout=120,
        )
    show_pictures(b, size)
    bottom = b.evaluate(  # of the first row's cards, their captions included
        "(function (c) { return c.getBoundingClientRect().bottom + window.scrollY; })"
        "(document.querySelector('#grid .card'))"
    )
    screenshot(b, after, WIDTH, int(np.ceil(bottom)) + 12, size)
    befores = b.evaluate("Array.from(document.querySelectorAll('#grid .card .before')).map(e => e.textContent)")
    print(f"wrote {after}: {befores[0]} ...")


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description="the corrections screenshot of the docs, from a real session")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "runs" / "corrections-screenshot")
    parser.add_argument("--count", type=int, default=6, help="micrographs the demo plays (default 6)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between them (default 1)")
    parser.add_argument("--shot", type=Path, default=PROJECT_ROOT / "docs" / "images" / "gallery-corrections.jpg")
    parser.add_argument(
        "--after", type=Path, default=PROJECT_ROOT / "docs" / "images" / "gallery-corrections-after.jpg"
    )
    parser.add_argument("--pictures", choices=SIZES, default="large", help="picture size (default large)")
    parser.add_argument("--no-after", action="store_true", help="only the first picture: no correction applied")
    parser.add_argument("--reuse", action="store_true", help="the demo already played into --out: mark its page")
    args = parser.parse_args()
    executable = find_browser()
    if executable is None:
        raise SystemExit("no Chromium: bash scripts/test-services.sh installs Debian's chromium")
    out = args.out.resolve()
    started = time.monotonic()
    report = json.loads((out / "report.json").read_text()) if args.reuse else play_demo(out, args.count, args.interval)
    if not report.get("complete") or not report.get("gallery"):
        raise SystemExit(f"the demo did not finish: {report.get('unfinished')}")
    truth_folder = Path(str(report["source"])) / "coords"
    outputs = SessionOutputs(out / "outputs" / PROJECT / SESSION, read_only=True)
    url = Path(str(report["gallery"])).as_uri()
    with Chromium(executable) as b:
        b.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        open_page(b, url)
        marks = mark_corrections(b, outputs, truth_folder, args.pictures)
        check_marks_shown(b, args.pictures)
        screenshot(b, args.shot, WIDTH, HEIGHT, args.pictures)
        check_page(b)
        print(f"wrote {args.shot}: {len(marks)} marks; {b.evaluate(TEXT).count(chr(10))} lines of corrections.star")
        if not args.no_after:
            correct(b, out, args.after, args.pictures)
            check_page(b)
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
