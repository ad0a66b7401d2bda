"""What the README and CONTRIBUTING say of the tests: every test they name as the evidence of
a promise (``test_file.py`` or ``test_file.py::test_name``) exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
DOCS = ("README.md", "CONTRIBUTING.md")
NAMED = re.compile(r"`(test_[a-z0-9_]+\.py)(?:::([A-Za-z0-9_]+))?")


def named_tests(text: str) -> set[tuple[str, str]]:
    """``(file, name)`` of each test a document names (``name`` empty for a whole file)."""
    return set(NAMED.findall(text))


def test_the_docs_name_tests_that_exist():
    named = {ref for doc in DOCS for ref in named_tests((ROOT / doc).read_text(encoding="utf-8"))}
    assert len(named) > 50  # the Guarantees section was read
    missing = []
    for file, name in sorted(named):
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif name and not re.search(rf"^(?:def|class) {name}\b", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"named in {' or '.join(DOCS)} but not in tests/: {missing}"


def test_a_test_is_named_with_or_without_its_function():
    assert named_tests("see `test_x.py::test_gone` and `test_y.py`") == {
        ("test_x.py", "test_gone"),
        ("test_y.py", ""),
    }
