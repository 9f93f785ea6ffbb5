"""The README is a front door, and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target), the target maybe in <...> and maybe with a "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A reference definition: [name]: target
DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.M | re.S)
CODE = re.compile(r"(`+)(?:(?!\n\s*\n).)*?\1", re.S)  # inline code, within a paragraph
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)


def _prose(page: Path) -> str:
    """The page's text without its code: neither fenced blocks nor inline code holds links."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation but
    '-' and '_' dropped, spaces to '-'; a repeated anchor gets -1, -2, ..."""
    found: set[str] = set()
    for title in HEADING.findall(_prose(page)):
        anchor = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        base, n = anchor, 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def links(page: Path) -> list[str]:
    """Every link target of `page` outside code: inline links, images, reference definitions."""
    text = CODE.sub("", _prose(page))
    return LINK.findall(text) + DEFINITION.findall(text)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of `page` that leads outside `root`, to no file, or to no
    heading of its file. Links with a scheme (http(s), mailto) are not fetched."""
    found = []
    for target in links(page):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page.resolve()
        if not file.is_relative_to(root.resolve()):
            found.append(f"{page.name}: {target}: outside the repository")
        elif not file.exists():
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
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_each_docs_page_says_first_what_it_answers() -> None:
    for page in PAGES[1:]:
        title, blank, first = page.read_text(encoding="utf-8").splitlines()[:3]
        assert title.startswith("# ") and blank == "" and first and not first.startswith(("#", "`")), page


def test_the_checker_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# A heading\n\n## Twice\n\n## Twice\n\ntext\n")
    (tmp_path / "pic.svg").write_text("<svg/>")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page (`one`)\n\n"
        "[ok](there.md#a-heading) [gone](missing.md) [no heading](there.md#nope)\n"
        "[second](there.md#twice-1) [no third](there.md#twice-2) ![pic](pic.svg \"a title\")\n"
        "![no pic](<gone.svg>) [web](https://example.com/x) [mail](mailto:a@b.c)\n"
        "[self](#page-one) [self, wrong](#page) [up](../../etc/passwd)\n"
        "`[in code](nowhere.md)` and ``[in code](nowhere.md)``\n\n"
        "```\n[in a fence](nowhere.md)\n# not a heading\n```\n\n"
        "[by reference][r]\n\n[r]: ref-gone.md\n")
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md: no such file",
        "page.md: there.md#nope: no such heading",
        "page.md: there.md#twice-2: no such heading",
        "page.md: gone.svg: no such file",
        "page.md: #page: no such heading",
        "page.md: ../../etc/passwd: outside the repository",
        "page.md: ref-gone.md: no such file",
    ]
    assert anchors(page) == {"page-one"}
