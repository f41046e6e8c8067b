"""Every relative link in the README and the docs points at a file or directory of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "nomad" / "README.md",
        REPO / "benchmarks" / "README.md"]
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


def relative_links(markdown: str) -> list[str]:
    """Link targets that are paths in this repository (not URLs, not anchors of the same page), outside
    code blocks and code spans."""
    text = _CODE.sub("", _FENCE.sub("", markdown))
    targets = _LINK.findall(text) + _REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.I)]


def broken_links(path: Path) -> list[str]:
    out = []
    for target in relative_links(path.read_text()):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not (path.parent / file_part).exists():
            out.append(target)
    return out


def test_the_link_finder_sees_links_and_skips_code() -> None:
    md = ("See [the design](docs/architecture.md#layout), ![img](img/a.png) and [site](https://x.org).\n"
          "`[not](a/link.md)`\n```\n[nor](this.md)\n```\n[ref]: deploy/acl/\n[top](#layout)\n")
    assert relative_links(md) == ["docs/architecture.md#layout", "img/a.png", "deploy/acl/"]


def test_a_broken_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "README.md"
    page.write_text("[ok](there.md) [gone](DESIGN.md) [dir](./)\n")
    assert broken_links(page) == ["DESIGN.md"]


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_the_architecture_document_is_in_the_repository_and_linked_from_the_readme() -> None:
    assert (REPO / "docs" / "architecture.md").is_file()
    assert "docs/architecture.md" in relative_links((REPO / "README.md").read_text())
