"""A picture of a session page as a person first sees it, for the README (docs/images/gallery.jpg):

    .venv/bin/cryomae demo --out runs/demo --count 12 --interval 2
    .venv/bin/python -m tests.browser.screenshot runs/demo/outputs/demo/session01/gallery/index.html \\
        docs/images/gallery.jpg [--pictures medium]
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

from PIL import Image

from tests.browser.chromium import Chromium, find_browser

CARDS = "Array.from(document.querySelectorAll('#grid svg[data-key]'))"


def main() -> None:
    parser = argparse.ArgumentParser(description="screenshot of a session page")
    parser.add_argument("page", type=Path, help="gallery/index.html of a session")
    parser.add_argument("out", type=Path, help="PNG, or JPEG for .jpg")
    parser.add_argument("--pictures", choices=["small", "medium", "large"], default="medium")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args()
    executable = find_browser()
    if executable is None:
        raise SystemExit("no Chromium found (Debian: apt-get install chromium)")
    with Chromium(executable) as b:
        b.call(
            "Emulation.setDeviceMetricsOverride",
            width=args.width,
            height=args.height,
            deviceScaleFactor=1,
            mobile=False,
        )
        b.open(args.page.resolve().as_uri())
        b.wait_for(f"{CARDS}.length > 0 && {CARDS}.every(s => s.hasAttribute('data-kept'))")
        size = {"small": 0, "medium": 1, "large": 2}[args.pictures]
        b.evaluate(
            f"(function (el) {{ el.selectedIndex = {size}; el.dispatchEvent(new Event('change')); }})"
            "(document.getElementById('size'))"
        )
        b.wait_for(f"{CARDS}.every(s => s.getAttribute('data-loaded') === '1')")
        clip = {"x": 0, "y": 0, "width": args.width, "height": args.height, "scale": 1}
        data = base64.b64decode(b.call("Page.captureScreenshot", format="png", clip=clip)["data"])
        if b.exceptions or any(m["type"] == "error" for m in b.console):
            raise SystemExit(f"the page reported errors: {b.exceptions} {b.console}")
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix.lower() in (".jpg", ".jpeg"):
        picture.save(args.out, format="JPEG", quality=85)
    else:
        picture.save(args.out, format="PNG", optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
