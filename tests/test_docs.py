"""The documentation as a whole: a short README that leads to every page, and links that resolve.

Guards for what individual pages say live next to the code they describe: the settings tables in
``tests/test_config.py``, the hooks in ``tests/test_plugins.py``, the quick start in
``tests/test_quickstart.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
#: Pages written on other branches. Links to them are allowed while they are missing; once a page exists,
#: its links are checked like any other.
PAGES_ON_OTHER_BRANCHES: set[Path] = set()

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _links(page: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", page.read_text()))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return anchors


def _target(page: Path, link: str) -> tuple[Path, str]:
    path, _, anchor = link.partition("#")
    return ((page.parent / path).resolve() if path else page), anchor


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move reference material to docs/"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in _pages():
        for link in _links(page):
            target, anchor = _target(page, link)
            if not target.exists():
                if target not in PAGES_ON_OTHER_BRANCHES:
                    broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_reachable_from_the_readme():
    seen, todo = set(), [README]
    while todo:
        page = todo.pop()
        if page in seen or not page.exists():
            continue
        seen.add(page)
        todo += [t for t, _ in (_target(page, link) for link in _links(page)) if t.suffix == ".md"]
    unreachable = [p.name for p in DOCS.glob("*.md") if p not in seen]
    assert not unreachable, f"no link leads from README.md to: {unreachable}"
