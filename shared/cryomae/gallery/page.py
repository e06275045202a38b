"""The session gallery: a page a person opens (from disk or any static web server) to look at a session's picks.

Layout under a session's outputs folder (``SessionGallery(outputs)``), beside the STAR files, which it never
changes::

    gallery/index.html        the page: script and style inline, the same for every session, no network access
    gallery/session.js        the session's data: summary, score histogram, every micrograph's counts and cutoff
    gallery/img/<key>.jpg     each micrograph shrunk, low-pass filtered: the page draws the circles over it
    gallery/picks/<key>.jpg   the same with its picks (yellow) and rejected candidates near the cutoff (sky blue)
                              drawn in, and a legend: for a file browser, or a Diamond-style image folder
    gallery/data/<key>.js     every candidate of the micrograph with its score, for the page's cutoff slider

Data travels as ``.js`` files loaded by ``<script>`` tags rather than JSON fetched by the page: browsers refuse
``fetch`` on ``file://``, so this is what lets the page open from disk. Every file is written atomically.
``<key>`` is the name the session's coordinate files use (``coordinates/<key>_autopick.star``).

The page also lets an operator mark wrong picks and missed particles ("correct the picker"): the marks stay in the
browser (localStorage) and leave it only as a ``corrections.star`` the operator saves, named by each micrograph's
``star_name`` in session.js. Nothing here reads or writes them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cryomae.errors import InputError
from cryomae.gallery.layout import GALLERY_DIR, INDEX_NAME
from cryomae.gallery.render import (
    NEAR_FRACTION,
    Thumbnail,
    draw,
    near_cutoff,
    picture_factor,
    picture_shape,
    save_image,
    thumbnail,
)
from cryomae.io.atomic import TEMP_FILE, atomic_output
from cryomae.io.micrographs import read_micrograph
from cryomae.io.roots import inside_roots
from cryomae.store.outputs import Candidates, MicrographEntry, SessionOutputs

SESSION_DATA = "session.js"
HISTOGRAM_BINS = 80
_FORMAT = 1


def page_html() -> str:
    """The page: static, the same for every session (its data comes from session.js)."""
    return files("cryomae.gallery").joinpath("page.html").read_text(encoding="utf-8")


FAILURES_NAME = "failures.json"
FAILURES_KEPT = 1000  # failed micrographs remembered per session (the newest)
FAILURES_SHOWN = 200  # of which the page lists the newest


def read_pixels(micrograph: str, roots: Sequence[Path], max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """A micrograph's pixels for its pictures, or (None, the problem) when it is outside the data roots now, gone,
    too large or unreadable: the page then says it has no picture."""
    try:
        path = inside_roots(micrograph, roots, "; the gallery reads micrographs only under them")
        return read_micrograph(path, max_pixels).data, None
    except (InputError, OSError) as exc:
        return None, str(exc)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, mode=0o644) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _json(data: Any) -> str:
    """``data`` as compact JSON, which is also a JavaScript expression (how the .js data files carry it)."""
    return json.dumps(data, allow_nan=False, separators=(",", ":"))


class SessionGallery:
    """The gallery of one session folder, kept in step with its ``SessionOutputs`` (``size``: picture pixels)."""

    def __init__(self, outputs: SessionOutputs, size: int = 512) -> None:
        self.outputs = outputs
        self.size = size
        self.root = outputs.root / GALLERY_DIR

    # ------------------------------------------------------------------------------------------ paths

    def image_path(self, key: str) -> Path:
        return self.root / "img" / f"{key}.jpg"

    def picks_path(self, key: str) -> Path:
        return self.root / "picks" / f"{key}.jpg"

    def data_path(self, key: str) -> Path:
        return self.root / "data" / f"{key}.js"

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    # ------------------------------------------------------------------------------------------ writing

    def add(self, micrograph: str, image: np.ndarray | None) -> MicrographEntry:
        """Write a micrograph's pictures (from ``image`` [H, W], its pixels; None when it could not be read:
        the page says so) and its candidates. The index is written by ``write_index``."""
        entry = self.outputs.entry(micrograph)
        c = self.outputs.candidates(micrograph)
        if image is not None:
            thumb = thumbnail(image, entry.diameter, self.size)
            save_image(Image.fromarray(thumb.grey), self.image_path(entry.key))
            self._draw_picks(entry, thumb, c)
        data = {
            "x": np.round(c.x, 1).tolist(),
            "y": np.round(c.y, 1).tolist(),
            "s": c.scores.tolist(),  # exact: the page's counts at the cutoff in force equal the STAR files'
        }
        _write_text(self.data_path(entry.key), f"CRYOMAE_CANDIDATES({_json(entry.key)}, {_json(data)});\n")
        return entry

    def redraw_picks(self) -> int:
        """After a re-threshold: draw every micrograph's picks again on its stored picture; returns how many."""
        done = 0
        for entry in self.outputs.micrographs():
            plain = self.image_path(entry.key)
            if not plain.is_file():
                continue
            with Image.open(plain) as im:
                grey = np.asarray(im.convert("L"))
            thumb = Thumbnail(grey, picture_factor(entry.shape, self.size), entry.shape)
            self._draw_picks(entry, thumb, self.outputs.candidates(entry.micrograph))
            done += 1
        return done

    def _draw_picks(self, entry: MicrographEntry, thumb: Thumbnail, c: Candidates) -> None:
        xy = np.stack([c.x, c.y], axis=1).reshape(-1, 2)
        picture = draw(thumb, entry.diameter, xy[c.scores >= c.cutoff], xy[near_cutoff(c.scores, c.cutoff)])
        save_image(picture, self.picks_path(entry.key))

    def record_failure(self, micrograph: str, reason: str, failed_at: float) -> None:
        """A micrograph of the session was dead-lettered by the picker (``PickFailed``): remember it for the page."""
        kept = [f for f in self._failures() if f["micrograph"] != micrograph]
        kept.append({"micrograph": micrograph, "reason": reason, "failed_at": failed_at})
        _write_text(self.root / FAILURES_NAME, json.dumps(kept[-FAILURES_KEPT:], allow_nan=False) + "\n")

    def _failures(self) -> list[dict[str, Any]]:
        try:
            data = json.loads((self.root / FAILURES_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none yet, or damaged: the page's list starts again
            return []
        return [f for f in data if isinstance(f, dict) and {"micrograph", "reason", "failed_at"} <= f.keys()]

    def failures(self, entries: list[MicrographEntry]) -> list[dict[str, Any]]:
        """The failed micrographs not picked since they failed (a replay that succeeded takes one off), oldest first;
        ``entries``: the session's micrographs (``SessionOutputs.micrographs``)."""
        picked = {e.micrograph: e.applied_at for e in entries}
        return [f for f in self._failures() if picked.get(f["micrograph"], -math.inf) < f["failed_at"]]

    def remove_temp_files(self) -> int:
        """Delete the temporary files a crash left mid-write (hidden ``.*.tmp`` beside the gallery's files)."""
        removed = 0
        for folder in (self.root, self.root / "img", self.root / "picks", self.root / "data"):
            if folder.is_dir():
                for path in folder.iterdir():
                    if TEMP_FILE.match(path.name) and path.is_file():
                        path.unlink(missing_ok=True)
                        removed += 1
        return removed

    def missing(self) -> list[str]:
        """Micrographs of the session whose candidates file is not written yet (e.g. after a crash)."""
        return [e.micrograph for e in self.outputs.micrographs() if not self.data_path(e.key).is_file()]

    def write_index(self, seen: int | None = None) -> Path:
        """Write session.js from the outputs (and the page when it differs); returns the page's path. ``seen``:
        micrographs the watcher published for the session, which the writer cannot know itself (None: unknown)."""
        _write_text(self.root / SESSION_DATA, f"window.CRYOMAE_GALLERY = {_json(self.session_data(seen))};\n")
        html = page_html()
        if not self.index_path.is_file() or self.index_path.read_text(encoding="utf-8") != html:
            _write_text(self.index_path, html)
        return self.index_path

    # ------------------------------------------------------------------------------------------ data

    def session_data(self, seen: int | None = None) -> dict[str, Any]:
        """What session.js holds (also what the tests read)."""
        entries = self.outputs.micrographs()
        counts = self.outputs.counts()
        scores = [self.outputs.candidates(e.micrograph).scores for e in entries]
        every = np.concatenate(scores) if scores else np.zeros(0)
        lo, hi = (float(every.min()), float(every.max())) if every.size else (0.0, 1.0)
        counts_hist = np.histogram(every, bins=HISTOGRAM_BINS, range=(lo, hi if hi > lo else lo + 1.0))[0]
        micrographs = []
        for seq, e in enumerate(entries):
            factor = picture_factor(e.shape, self.size)
            image = self.image_path(e.key)
            drawn = image.is_file()
            micrographs.append(
                {
                    "key": e.key,
                    "seq": seq,
                    "name": Path(e.micrograph).name,
                    "path": e.micrograph,
                    "star_name": self.outputs.star_name(e.micrograph),  # rlnMicrographName, for corrections.star
                    "particles": e.particles,
                    "candidates": e.candidates,
                    "cutoff": e.threshold,
                    "picker_cutoff": e.picker_threshold,
                    "model_version": e.model_version,
                    "previous_model_version": e.previous_model_version,
                    "previous_particles": e.previous_particles,
                    "picked_at": e.picked_at,
                    "applied_at": e.applied_at,
                    "shape": list(e.shape),
                    "diameter": e.diameter,
                    "factor": factor,
                    "thumb": list(picture_shape(e.shape, factor)),
                    "image": image.relative_to(self.root).as_posix() if drawn else None,
                    "image_problem": None if drawn else "no picture: the micrograph could not be read",
                    "picks_image": self.picks_path(e.key).relative_to(self.root).as_posix(),
                    "data": self.data_path(e.key).relative_to(self.root).as_posix(),
                    "version_token": e.message_id[:16],
                }
            )
        failures = self.failures(entries)
        cutoffs = [e.threshold for e in entries]
        project, session = self.outputs.owner or (self.outputs.root.parent.name, self.outputs.root.name)
        return {
            "format": _FORMAT,
            "project": project,
            "session": session,
            "written_at": time.time(),
            "cutoff": counts.threshold,
            "median_cutoff": float(np.median(cutoffs)) if cutoffs else None,
            "near_fraction": NEAR_FRACTION,
            "summary": {
                "seen": seen,
                "picked": counts.micrographs,
                "failed": len(failures),
                "particles": counts.particles,
                "candidates": counts.candidates,
            },
            "histogram": {"lo": lo, "hi": hi, "counts": counts_hist.tolist()},
            "failures": [
                {
                    "name": Path(f["micrograph"]).name,
                    "path": f["micrograph"],
                    "reason": f["reason"],
                    "at": f["failed_at"],
                }
                for f in reversed(failures[-FAILURES_SHOWN:])
            ],
            "micrographs": micrographs,
        }
