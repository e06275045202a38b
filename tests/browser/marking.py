"""Marking corrections on the session page with real clicks: the page helpers of the corrections browser test, also
used by tests/benchmarks/corrections_screenshot.py (the screenshot in docs/images, from a real session).

Every position is computed from the picture's box on the page (a picture shows the whole micrograph as large as
its box allows, its aspect kept and centred), never read from the page's own mapping, which the test checks.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from PIL import Image

from tests.browser.chromium import Chromium

CARDS = "Array.from(document.querySelectorAll('#grid svg[data-key]'))"
TEXT = "document.getElementById('corrections-text').textContent"


def card(name: str) -> str:
    """A JavaScript expression for the card of a micrograph (found by comparing names, never by a selector)."""
    return (
        "Array.from(document.querySelectorAll('#grid .card'))"
        f".find(function (c) {{ return c.getAttribute('data-micrograph') === {json.dumps(name)}; }})"
    )


def picture(name: str) -> str:
    """The picture (svg) of a micrograph's card."""
    return f"{card(name)}.querySelector('svg')"


def on_screen(b: Chromium, svg: str, shape: tuple[int, int], x: float, y: float) -> tuple[int, int, float, float]:
    """Where micrograph pixel (x, y) of a picture (``svg``: a JavaScript expression; ``shape``: the micrograph's
    rows and columns of original pixels) lies in the viewport, in whole CSS pixels (what a click carries), and the
    micrograph point that screen position stands for. The picture is scrolled to the middle of the viewport first;
    pixel (x, y) covers [x, x + 1) as the circles are drawn."""
    left, top, width, height = b.evaluate(
        f"(function (svg) {{ svg.scrollIntoView({{block: 'center'}}); var r = svg.getBoundingClientRect(); "
        f"return [r.left, r.top, r.width, r.height]; }})({svg})"
    )
    scale = min(width / shape[1], height / shape[0])
    left, top = left + (width - shape[1] * scale) / 2, top + (height - shape[0] * scale) / 2
    cx, cy = round(left + (x + 0.5) * scale), round(top + (y + 0.5) * scale)
    return cx, cy, (cx - left) / scale - 0.5, (cy - top) / scale - 0.5


def click_element(b: Chromium, expression: str) -> None:
    """A real click in the middle of an element."""
    x, y = b.evaluate(
        f"(function (el) {{ el.scrollIntoView({{block: 'center'}}); var r = el.getBoundingClientRect(); "
        f"return [Math.round(r.left + r.width / 2), Math.round(r.top + r.height / 2)]; }})({expression})"
    )
    b.click(x, y)


def marks_drawn(b: Chromium, svg: str) -> list[int]:
    """The marks drawn on a picture: [wrong, missed]."""
    return b.evaluate(
        f"(function (svg) {{ return [svg.querySelectorAll('g.marks path.wrong').length, "
        f"svg.querySelectorAll('g.marks polygon.missed').length]; }})({svg})"
    )


def click_on(
    b: Chromium, svg: str, shape: tuple[int, int], x: float, y: float, marks: list[int]
) -> tuple[float, float]:
    """Click micrograph pixel (x, y) on a picture; wait until it shows ``marks`` ([wrong, missed]); the point
    clicked, in micrograph pixels."""
    cx, cy, px, py = on_screen(b, svg, shape, x, y)
    b.click(cx, cy)
    b.wait_for(
        f"(function (svg) {{ return svg.querySelectorAll('g.marks path.wrong').length === {marks[0]} && "
        f"svg.querySelectorAll('g.marks polygon.missed').length === {marks[1]}; }})({svg})"
    )
    return px, py


def open_page(b: Chromium, url: str) -> None:
    """Open (or reload) the page and wait until every card has its picks and picture."""
    b.evaluate("window.cryomaeBefore = true")
    b.open(url)
    b.wait_for(
        f"!window.cryomaeBefore && {CARDS}.length > 0 && "
        f"{CARDS}.every(s => s.hasAttribute('data-kept') && s.getAttribute('data-loaded') === '1')"
    )


SIZES = ("small", "medium", "large")  # the page's picture sizes, in the order of its menu


def show_pictures(b: Chromium, size: str = "medium") -> None:
    """Pictures of a size (medium: as the page first shows them); scrolled back to the top."""
    b.evaluate(
        f"(function (el) {{ el.selectedIndex = {SIZES.index(size)}; el.dispatchEvent(new Event('change')); }})"
        "(document.getElementById('size'))"
    )
    b.evaluate("window.scrollTo(0, 0)")


def screenshot(b: Chromium, path: Path, width: int = 1400, height: int = 1250, size: str = "medium") -> None:
    """The top of the page with pictures of ``size``: the controls, the marks listed, and the marks on the cards."""
    show_pictures(b, size)
    clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
    data = base64.b64decode(
        b.call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(io.BytesIO(data)).convert("RGB").save(path, optimize=True, quality=90)  # format by suffix
