"""Every example of the README and the docs runs (tests/docs_examples.py), and nothing escapes that.

A block Sybil does not collect would stand in the docs untested, and a skip without a reason hides
why: both are read here from the Markdown itself, with markdown-it (rich's parser, already
installed), independently of Sybil's own lexer.
"""
from __future__ import annotations

import re
from pathlib import Path

from markdown_it import MarkdownIt

from docs_examples import PATTERNS, ROOT, sybil

RUN = {"python", "console"}        # the blocks that run
SHOWN = {"", "text"}               # what a command or a cell printed, shown as it was
SKIP = re.compile(r"^[ \t]*<!--\s*skip:\s*(next|start|end)(.*?)-->", re.DOTALL | re.MULTILINE)


def pages() -> list[Path]:
    found = sorted({p for pattern in PATTERNS for p in ROOT.glob(pattern)})
    assert len(found) >= 10, found  # the README and the docs' pages
    return found


def fences(path: Path) -> list[tuple[str, int]]:
    """(info string, first line, 1-based) of every fenced block."""
    tokens = MarkdownIt("commonmark").parse(path.read_text())
    return [(t.info.strip(), t.map[0] + 1) for t in tokens if t.type == "fence"]


def test_every_block_is_an_example_or_shown_output():
    ran = 0
    for path in pages():
        document = sybil.parse(path)
        starts = {document.text[:e.start].count("\n") + 1 for e in document.examples()}
        for info, line in fences(path):
            assert info in RUN | SHOWN, f"{path.name}:{line}: a ```{info} block neither runs nor is output"
            if info in RUN:
                assert line in starts, f"{path.name}:{line}: a ```{info} block Sybil does not collect"
                ran += 1
    assert ran >= 30, ran


def test_every_skip_says_why():
    skips = 0
    for path in pages():
        for match in SKIP.finditer(path.read_text()):
            action, reason = match.group(1), match.group(2).strip()
            if action != "end":
                skips += 1
                assert re.fullmatch(r'"[^"]{20,}"', reason), \
                    f"{path.name}: `skip: {action}` must say why, in quotes: {match.group(0)!r}"
    assert skips >= 5


def test_the_front_page_stays_short_and_every_page_is_in_the_site():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"


def test_the_api_reference_names_every_public_name():
    """mkdocstrings reads mpify/__init__.py without running it: its `if TYPE_CHECKING:` imports
    must name exactly what `_WHERE` loads at run time, and docs/api.md every public name."""
    import ast

    tree = ast.parse((ROOT / "mpify" / "__init__.py").read_text())
    where = next(ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_WHERE")
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    imported = {a.asname or a.name for n in guarded.body for a in n.names}
    assert imported == set(where), set(where) ^ imported
    api = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in where if f"::: mpify.{name}\n" not in api]
    assert not missing, f"docs/api.md does not show {missing}"
