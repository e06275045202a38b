"""The documentation holds together: every relative link in README.md and docs/ resolves (file and heading), the
README stays a front door, and the settings table in docs/settings.md is the settings model's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cryomae.settings import reference, reference_markdown

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh", "source .venv/bin/activate"):
        assert command in text
    linked = {Path(t.partition("#")[0]).name for t in _links(ROOT / "README.md")}
    assert {"operations.md", "settings.md", "deployment.md", "method.md", "development.md"} <= linked


def test_every_docs_page_has_a_contents_list() -> None:
    generated = {
        "benchmarks.md",
        "ablations.md",
        "facility-encoder.md",
    }
    missing = [p.name for p in PAGES[1:] if p.name not in generated and "\nContents:\n" not in p.read_text()]
    assert not missing, f"no contents list in {missing}"


def test_the_settings_table_is_the_settings_model() -> None:
    text = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    table = text.split("do not edit -->\n", 1)[1].split("<!-- settings-reference: end -->", 1)[0]
    assert table == reference_markdown(), "docs/settings.md is stale: paste `cryomae config reference` in it"
    names = [env for env, _, _ in reference()]
    assert len(names) == len(set(names)) and "CRYOMAE_DEVICE" in names and "CRYOMAE_PICK__DEVICE" not in names
    assert all(meaning for _, _, meaning in reference()), "every setting says what it means"
