"""The documentation's relative links resolve, and nothing cites the unpublished specification files.

Every relative link of every tracked Markdown file and of the quick-start notebook's markdown cells must name a file
of the repository, and an anchor (`page.md#section`) a heading of that page. The methods are documented in
`docs/methods/`; the specification files they were first written from are not part of the repository, so no tracked
file may cite them.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "notebooks/vaopd_quickstart.ipynb"
# Assembled so that this file does not match itself
UNPUBLISHED = re.compile(r"\b(?:" + "|".join(("METHOD", "VGS", "VICUR")) + r")\.md\b")
# Replication data (the runner's tables, JSON and per-run logs), not documentation
DATA_DIRS = ("docs/replication/",)

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+[\"'(].*?[\"')])?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.MULTILINE)
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=[\"']([^\"']+)[\"']", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t#]*$", re.MULTILINE)


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the tracked files")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [name for name in listed.decode().split("\0") if name and (ROOT / name).is_file()]


def markdown_sources() -> dict[str, str]:
    """Markdown text by the path its links are relative to: every tracked `.md` file, and the notebook's markdown
    cells (one entry per cell)."""
    sources = {name: (ROOT / name).read_text(encoding="utf-8") for name in tracked_files() if name.endswith(".md")}
    cells = json.loads((ROOT / NOTEBOOK).read_text(encoding="utf-8"))["cells"]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            sources[f"{NOTEBOOK}#cell{i}"] = "".join(cell["source"])
    return sources


def without_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked: their brackets and parentheses are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    prose = without_code(text)
    found = [m.group(1) for pattern in (INLINE_LINK, REFERENCE_LINK, HTML_LINK) for m in pattern.finditer(prose)]
    return [target.strip("<>") for target in found]


def is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not target.startswith("//")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, markup and punctuation dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown page's headings, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    result = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(source: str, text: str) -> list[str]:
    """`'source: target (why)'` for each relative link of `text` that does not resolve."""
    base = (ROOT / source.split("#cell")[0]).parent
    broken = []
    for target in links(text):
        if not is_relative(target):
            continue
        path, _, anchor = unquote(target).partition("#")
        file = (base / path).resolve() if path else ROOT / source.split("#cell")[0]
        if not file.exists():
            broken.append(f"{source}: {target} (no such file)")
        elif ROOT not in file.parents and file != ROOT:
            broken.append(f"{source}: {target} (outside the repository)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{source}: {target} (no heading with that anchor)")
    return broken


def test_relative_links_of_the_docs_and_the_notebook_resolve():
    sources = markdown_sources()
    assert "docs/methods/va_opd.md" in sources and any(s.startswith(NOTEBOOK) for s in sources)
    broken = [problem for source, text in sources.items() for problem in broken_links(source, text)]
    assert not broken, "Broken relative links:\n" + "\n".join(broken)


def test_the_checker_finds_broken_files_and_anchors_and_skips_code_and_urls():
    text = (
        "[ok](docs/methods/vgs.md#the-loss) [file](docs/methods/nope.md) [anchor](docs/methods/vgs.md#nope)\n"
        "[web](https://example.com/x.md) `[code](missing.md)` ![img](docs/replication/area/replication.png)\n"
        "```\n[fenced](missing.md)\n```\n[ref]: docs/absent.md\n"
    )
    assert broken_links("README.md", text) == [
        "README.md: docs/methods/nope.md (no such file)",
        "README.md: docs/methods/vgs.md#nope (no heading with that anchor)",
        "README.md: docs/absent.md (no such file)",
    ]
    assert slug("The paper's recipe and claims") == "the-papers-recipe-and-claims"
    assert slug("Standard OPD (the baseline)") == "standard-opd-the-baseline"
    assert slug("`VAOPDConfig` settings") == "vaopdconfig-settings"


def test_no_tracked_file_cites_the_unpublished_specifications():
    citing = []
    for name in tracked_files():
        if name.startswith(DATA_DIRS):
            continue
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (figures)
        citing += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in UNPUBLISHED.finditer(text)]
    assert not citing, (
        "These cite specification files that are not in the repository; cite docs/methods/ instead:\n"
        + "\n".join(citing)
    )
