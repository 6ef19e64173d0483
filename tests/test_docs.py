"""The documentation stays true: every Python block of README.md and docs/**/*.md runs.

- Each ```` ```python ```` block runs as it stands, in a fresh namespace, in this process
  (so the blocks see conftest's 8 fake CPU devices; code not given a mesh uses device 0).
  A ``# ...`` comment after a ``print(...)`` (on its line or the next) states what it
  prints: its lists, quoted strings and capitalised names must appear in the output.
- A block that cannot run as it stands (it needs a GPU, a dataset, hub weights, minutes
  of work) is marked by an HTML comment on the line right above its fence, which the
  rendered page does not show::

      <!-- not run: needs the CLIP weights from the hub -->
      ```python

  The reason is required. Shell commands, config output and logs go in ```` ```bash ````
  or ```` ```text ```` blocks, which are not run. Blocks must stay fast: the whole file
  runs in seconds.
- Relative links between these pages point to files that exist, and ``#anchors`` to
  headings that exist (GitHub's slugs); every docs page is linked from the README; the
  README stays at most 250 lines (what a newcomer reads first; the rest goes to docs/).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(\S.*?)\s*-->\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _name(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def _page_blocks(text: str, name: str) -> tuple[list, list]:
    """(blocks to run as pytest params, (id, reason) of the blocks marked not run)."""
    run, skipped = [], []
    for i, match in enumerate(FENCE.finditer(text)):
        before = text[:match.start()].rstrip("\n").rpartition("\n")[2]
        ident = f"{name}#{i}"
        if before.lstrip().startswith("<!--") and "not run" in before:
            reason = NOT_RUN.search(before)
            assert reason, f"{ident}: write the marker as <!-- not run: reason -->"
            skipped.append((ident, reason.group(1)))
        else:
            run.append(pytest.param(match.group(1), id=ident))
    return run, skipped


def _blocks():
    run, skipped = [], []
    for page in PAGES:
        page_run, page_skipped = _page_blocks(page.read_text(), _name(page))
        run += page_run
        skipped += page_skipped
    return run, skipped


BLOCKS, NOT_RUN_BLOCKS = _blocks()


def test_the_docs_have_code_blocks():
    assert len(BLOCKS) >= 8
    assert any(b.id.startswith("README.md#") for b in BLOCKS)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code, capsys):
    exec(compile(code, "<docs block>", "exec"), {"__name__": "__docs__"})  # noqa: S102
    printed = capsys.readouterr().out
    lines = code.splitlines() + [""]
    for line, after in zip(lines, lines[1:]):
        call = re.match(r"\s*print\(.*\)\s*(#\s*(.+))?$", line)
        claim = call and (call.group(2) or re.match(r"\s*#\s*(.+)$", after)
                          and re.match(r"\s*#\s*(.+)$", after).group(1))
        if claim:
            for piece in re.findall(r"\[[^\]]*\]|'[^']*'|\b[A-Z]\w+\b", claim):
                assert piece.replace(" ", "") in printed.replace(" ", ""), (piece, printed)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+\s+(.+)$", text, re.M)}


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_name(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_name(page)}: {target} (no such heading)")
    assert not broken, broken


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme)}
    missing = [_name(p) for p in sorted(DOCS.rglob("*.md")) if p.resolve() not in linked]
    assert not missing, missing


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_not_run_blocks_say_why():
    for ident, reason in NOT_RUN_BLOCKS:
        assert len(reason) >= 10, (ident, reason)


def test_the_not_run_marker_skips_exactly_the_block_below_it():
    page = ("Text.\n\n<!-- not run: needs the CLIP weights -->\n```python\nraise SystemExit\n```\n\n"
            "```python\nx = 1\n```\n")
    run, skipped = _page_blocks(page, "page.md")
    assert [p.values[0] for p in run] == ["x = 1\n"]
    assert skipped == [("page.md#0", "needs the CLIP weights")]
    with pytest.raises(AssertionError, match="not run: reason"):
        _page_blocks("<!-- not run -->\n```python\nx = 1\n```\n", "page.md")
