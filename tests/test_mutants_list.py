"""The mutation list in tests/mutants.py stays honest: every mutation still applies.

A mutation whose ``old`` text is gone from the code checks nothing, and the
mutation runner only reports it as stale. This reads the list and the source
files as text (no test run, milliseconds), so a refactor that moves the text
fails here until the mutation follows it.
"""

import pathlib
import re

import pytest

import mutants

ROOT = pathlib.Path(__file__).resolve().parent.parent
MUTATIONS = mutants.all_mutations()


def test_the_list_is_not_empty_and_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) > 40
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_old_text_occurs_exactly_once(mutation):
    path = ROOT / mutation.file
    assert path.is_file(), f"{mutation.name}: no such file {mutation.file}"
    count = path.read_text().count(mutation.old)
    assert count == 1, (f"{mutation.name}: its old text occurs {count} times in {mutation.file} "
                        "(it must occur exactly once); update the mutation to the current code")
    assert mutation.new != mutation.old, f"{mutation.name}: new text equals old text"


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_named_tests_exist(mutation):
    assert mutation.tests, f"{mutation.name} names no test"
    for node in mutation.tests:
        file, _, name = node.partition("::")
        path = ROOT / file
        assert path.is_file(), f"{mutation.name}: no test file {file}"
        function = name.split("[")[0]
        assert re.search(rf"^def {re.escape(function)}\(", path.read_text(), re.M), (
            f"{mutation.name}: {file} has no test {function!r}")
