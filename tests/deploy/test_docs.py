"""The documentation lives in the repository: the README links docs/, every
relative link of the README and docs/ resolves, and nothing points outside
the repository for the design or the contract."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_links_the_docs() -> None:
    """The README links the design, the contract, the runbook and the scaling notes,
    and no longer sends readers to ../shared."""
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/design.md", "docs/api.md", "docs/runbook.md", "docs/scaling.md"):
        assert f"]({page})" in readme, page
    assert "../shared" not in readme


def test_relative_links_resolve() -> None:
    """Every relative Markdown link of the README and docs/ names a file that exists
    (anchors are not checked)."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http:, mailto: ...
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []
