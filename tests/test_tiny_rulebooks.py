"""The shipped rulecheck-tiny rulebooks are what ``rulecheck extract`` writes.

Float rounding differs between CPUs, so on another machine a re-extracted book makes the same
claims as the shipped one (features, terms and their order, absence and counting rules, labels,
tokens, settings) and its numbers agree within ``NUMBER_TOLERANCE``. On one machine, two
extractions with the same settings are byte-identical.
"""

from __future__ import annotations

import copy
import itertools
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

# Every float in a rulebook (attn/value scores, importance, measured and expected metrics, drop,
# spearman, extraction.ln_scale) is compared with math.isclose at these tolerances:
# - books store 6 significant digits, so a value that lies on a rounding boundary reads one unit
#   apart in the 6th digit on another CPU: up to 1e-5 relative (0.115405 vs 0.115406);
# - float32 reductions summed in another order (vector width, BLAS blocking) differ by about
#   1e-6 relative each, more where a score is a small difference of large terms; the absolute
#   part covers scores near zero, where a relative bound alone would be too strict;
# - 1e-3 is a hundred times that noise yet far below what a change of formula, setting or input
#   moves a score by, and such changes reorder terms, which are claims and compared exactly.
# F1, precision and recall are ratios of counts on 100 test prefixes (steps of 0.005 or more), so
# within this tolerance they agree only if every prediction does.
NUMBER_TOLERANCE = {"rel_tol": 1e-3, "abs_tol": 1e-4}

NUMBER = "<number>"  # where a claim has a float, the claim is that a number is there


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # a path that only the other book has


def extract(out: Path) -> Path:
    args = ["extract", "--model", "rulecheck-tiny", "--layer", "0", "--heads", "1", "--out"]
    assert main([*args, str(out)]) == 0
    return out / BOOK


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
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # same results, five times faster
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


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


def same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, **NUMBER_TOLERANCE)


def differences(new: Any, old: Any) -> list[str]:
    """``path: new vs old`` for each differing claim, in document order; then, only if every
    claim agrees, for each number outside ``NUMBER_TOLERANCE``."""
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
        if not same_number(new_numbers[p], old)
    ]


def explain(found: list[str], what: str) -> str:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{what}, first difference (extracted vs shipped): {found[0]}{more}"


def test_extraction_reproduces_the_shipped_rulebook(extracted):
    shipped = read_tree(SHIPPED_BOOKS / BOOK)
    assert len(numbers_of(shipped)) > 1000 and len(claims_of(shipped)) > 1000  # walked the book
    found = differences(read_tree(extracted), shipped)
    assert not found, explain(found, f"{BOOK} does not reproduce the shipped book")


def test_extracting_twice_on_one_machine_is_byte_identical(extracted, tmp_path, one_thread):
    assert extract(tmp_path).read_bytes() == extracted.read_bytes()


def test_comparison_tolerates_rounding_and_names_the_first_changed_claim():
    shipped = read_tree(SHIPPED_BOOKS / BOOK)
    i, entry = next((i, f) for i, f in enumerate(shipped["features"]) if f.get("absence"))

    rounded = copy.deepcopy(shipped)
    rounded["features"][i]["absence"][0]["attn_score"] = 0.115405
    rounded["extraction"]["ln_scale"] *= 1 + 1e-5
    assert differences(rounded, shipped) == []

    moved = copy.deepcopy(shipped)
    moved["features"][i]["absence"][0]["attn_score"] = 0.1166  # 1% off
    path = f"features[{i}].absence[0].attn_score"
    assert differences(moved, shipped) == [f"{path}: 0.1166 vs 0.115406"]

    swapped = copy.deepcopy(shipped)
    k, j = next(
        (k, j)
        for k, f in enumerate(swapped["features"])
        for j, (a, b) in enumerate(itertools.pairwise(f["skipgrams"]))
        if a["key"] != b["key"]
    )
    terms = swapped["features"][k]["skipgrams"]
    terms[j], terms[j + 1] = terms[j + 1], terms[j]
    found = differences(swapped, shipped)
    assert found[0].startswith(f"features[{k}].skipgrams[{j}].key.feature: ")
    assert not any("attn_score" in f for f in found)  # numbers wait until the claims agree

    shorter = copy.deepcopy(shipped)
    del shorter["features"][i]["absence"][0]["drop"][-1]
    dropped = f"features[{i}].absence[0].drop[{len(entry['absence'][0]['drop']) - 1}]"
    assert differences(shorter, shipped) == [f"{dropped}: (absent) vs '{NUMBER}'"]
