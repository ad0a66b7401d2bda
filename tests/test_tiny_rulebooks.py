"""The shipped rulecheck-tiny rulebooks are what ``rulecheck extract`` writes.

Float rounding differs between CPUs, so on another machine a re-extracted book (and the
measurements beside it) makes the same claims as the shipped one (features, terms and their
order, absence and counting rules, labels, tokens, settings) and its numbers agree within one
unit of their last stored digit. On one machine, a second extraction writes each feature exactly
as the first did.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rulecheck.cli import main

SHIPPED_BOOKS = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny"
BOOK = "L0H1.yaml"
MEASURED = "L0H1.measured.json"

# Numbers are compared to within one unit of the last significant digit stored: a book keeps 3,
# the measurements beside it 4. A value computed with float32 reductions summed in another order
# (vector width, BLAS blocking) differs by about 1e-6 relative, so rounded it is the same value
# unless it lies on a rounding boundary, where it reads one unit apart; a change of formula,
# setting or input moves scores far more, and reorders terms, which are claims and compared
# exactly. F1, precision and recall are ratios of counts on 100 test prefixes (steps of 0.005
# or more), so they agree only if every prediction does.
DIGITS = {BOOK: 3, MEASURED: 4}

NUMBER = "<number>"  # where a claim has a float, the claim is that a number is there


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # a path that only the other book has


def extract(out: Path, *more: str) -> Path:
    args = ["extract", "--model", "rulecheck-tiny", "--layer", "0", "--heads", "1", *more]
    assert main([*args, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, as the shipped rulebooks were made with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, one_thread) -> Path:
    return extract(tmp_path_factory.mktemp("extracted"))


def read_tree(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same results, five times faster
    return yaml.load(text, Loader=loader)


def leaves(tree: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` of every scalar in document order; an empty list or mapping is a leaf."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            sub = (f"{path}.{key}" if path else key) if isinstance(key, str) else f"{path}[{key!r}]"
            yield from leaves(value, sub)
    elif isinstance(tree, list) and tree:
        for i, value in enumerate(tree):
            yield from leaves(value, f"{path}[{i}]")
    else:
        yield path, tree


def claims_of(tree: Any) -> dict[str, Any]:
    """Everything but the values of floats, by path; which paths hold a float is a claim too."""
    return {p: NUMBER if isinstance(v, float) else v for p, v in leaves(tree)}


def numbers_of(tree: Any) -> dict[str, float]:
    """The floats, by path."""
    return {p: v for p, v in leaves(tree) if isinstance(v, float)}


def same_number(a: float, b: float, digits: int) -> bool:
    """Equal to within one unit of the last of ``digits`` significant digits."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    scale = max(abs(a), abs(b))
    if scale == 0:
        return True
    unit = 10 ** (math.floor(math.log10(scale)) - digits + 1)
    return abs(a - b) <= unit * (1 + 1e-9)


def differences(new: Any, old: Any, digits: int) -> list[str]:
    """``path: new vs old`` for each differing claim, in document order; then, only if every
    claim agrees, for each number not the same to ``digits`` significant digits."""
    new_claims, old_claims = claims_of(new), claims_of(old)
    paths = [*old_claims, *(p for p in new_claims if p not in old_claims)]
    pairs = [(p, new_claims.get(p, ABSENT), old_claims.get(p, ABSENT)) for p in paths]
    found = [f"{p}: {a!r} vs {b!r}" for p, a, b in pairs if a != b]
    if found:
        return found
    new_numbers, old_numbers = numbers_of(new), numbers_of(old)
    return [
        f"{p}: {new_numbers[p]!r} vs {old!r}"
        for p, old in old_numbers.items()
        if not same_number(new_numbers[p], old, digits)
    ]


def explain(found: list[str], what: str) -> str:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{what}, first difference (extracted vs shipped): {found[0]}{more}"


@pytest.mark.parametrize("name", [BOOK, MEASURED])
def test_extraction_reproduces_the_shipped_rulebook(extracted, name):
    shipped = read_tree(SHIPPED_BOOKS / name)
    assert len(numbers_of(shipped)) > 10 and len(claims_of(shipped)) > 500  # walked the file
    found = differences(read_tree(extracted / name), shipped, DIGITS[name])
    assert not found, explain(found, f"{name} does not reproduce the shipped one")


def test_extracting_again_on_one_machine_writes_each_feature_as_before(
    extracted, tmp_path, one_thread
):
    """A second extraction on this machine, of every fifth feature of the first
    (``--features``), streams the corpus again and writes each of them exactly as the first
    did, every claim and every number: extraction is deterministic, and a feature's rules do
    not depend on which features are extracted with it."""
    first = {name: read_tree(extracted / name) for name in (BOOK, MEASURED)}
    some = [f["feature"] for f in first[BOOK]["features"]][::5]
    again = extract(tmp_path, "--features", ",".join(map(str, some)))
    for name, tree in first.items():
        second = read_tree(again / name)
        assert [f["feature"] for f in second["features"]] == some
        kept = {**tree, "features": [f for f in tree["features"] if f["feature"] in some]}
        if name == BOOK:  # the input features these features name, as the first named them
            refs = second.pop("refs")
            assert refs and refs == {i: tree["refs"][i] for i in refs}
            kept.pop("refs")
        assert second == kept, name


def test_comparison_tolerates_rounding_and_names_the_first_changed_claim():
    shipped = read_tree(SHIPPED_BOOKS / MEASURED)
    i = next(i for i, f in enumerate(shipped["features"]) if 0.1 < f["f1"] < 0.99)
    f1 = shipped["features"][i]["f1"]

    rounded = copy.deepcopy(shipped)
    rounded["features"][i]["f1"] = f1 + 10 ** (math.floor(math.log10(f1)) - 3)  # one unit
    assert differences(rounded, shipped, 4) == []

    moved = copy.deepcopy(shipped)
    moved["features"][i]["f1"] = f1 * 1.01
    assert differences(moved, shipped, 4) == [f"features[{i}].f1: {f1 * 1.01!r} vs {f1!r}"]

    book = read_tree(SHIPPED_BOOKS / BOOK)
    swapped = copy.deepcopy(book)
    k, j = next(
        (k, j)
        for k, f in enumerate(swapped["features"])
        for j, (a, b) in enumerate(itertools.pairwise(f["skipgrams"]))
        if a != b
    )
    terms = swapped["features"][k]["skipgrams"]
    terms[j], terms[j + 1] = terms[j + 1], terms[j]
    found = differences(swapped, book, 3)
    assert found[0].startswith(f"features[{k}].skipgrams[{j}][")

    shorter = copy.deepcopy(shipped)
    curve = shorter["features"][i]["f1_by_terms"]
    last = list(curve)[-1]
    del curve[last]
    assert differences(shorter, shipped, 4) == [
        f"features[{i}].f1_by_terms.{last}: (absent) vs '{NUMBER}'"
    ]
