"""Every Python code block in docs/*.md runs as it stands (each in a fresh namespace)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        for i, match in enumerate(BLOCK.finditer(page.read_text())):
            out.append(pytest.param(match.group(1), id=f"{page.relative_to(DOCS)}#{i}"))
    return out


BLOCKS = _blocks()


def test_the_docs_have_code_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code, capsys):
    exec(compile(code, "<docs block>", "exec"), {"__name__": "__docs__"})  # noqa: S102
    printed = capsys.readouterr().out
    # A "# ..." comment after a print (on its line or the next) states what it prints:
    # its lists, quoted strings and capitalised names must appear in the output.
    lines = code.splitlines() + [""]
    for line, after in zip(lines, lines[1:]):
        call = re.match(r"\s*print\(.*\)\s*(#\s*(.+))?$", line)
        claim = call and (call.group(2) or re.match(r"\s*#\s*(.+)$", after)
                          and re.match(r"\s*#\s*(.+)$", after).group(1))
        if claim:
            for piece in re.findall(r"\[[^\]]*\]|'[^']*'|\b[A-Z]\w+\b", claim):
                assert piece.replace(" ", "") in printed.replace(" ", ""), (piece, printed)
