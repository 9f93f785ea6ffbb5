"""The README is a front door, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, spaces to '-',
    punctuation but '-' and '_' dropped."""
    found = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def broken_links(page: Path) -> list[str]:
    """Every relative link of `page` (outside code blocks) that leads to no file, or
    to no heading of its file."""
    found = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: nothing to fetch here
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            found.append(f"{page.name}: {target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            found.append(f"{page.name}: {target}: no such heading")
    return found


def test_every_link_leads_to_a_file_and_a_heading() -> None:
    assert len(PAGES) > 5
    assert [problem for page in PAGES for problem in broken_links(page)] == []


def test_the_readme_is_a_front_door_to_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    linked = {Path(target.partition("#")[0]).name for target in LINK.findall(readme)}
    assert {page.name for page in PAGES[1:]} <= linked


def test_each_docs_page_says_first_what_it_answers() -> None:
    for page in PAGES[1:]:
        title, blank, first = page.read_text(encoding="utf-8").splitlines()[:3]
        assert title.startswith("# ") and blank == "" and first and not first.startswith(("#", "`")), page


def test_the_checker_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n\ntext\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](there.md#a-heading) [gone](missing.md) [no heading](there.md#nope)\n"
                    "[web](https://example.com/x) [self](#page)\n\n```\n[in code](nowhere.md)\n```\n")
    assert broken_links(page) == ["page.md: missing.md: no such file",
                                  "page.md: there.md#nope: no such heading"]
