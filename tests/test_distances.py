"""Skip-grams bounded in distance (``max_distance``/``min_distance``): read and written by the
book, measured through the real check path on rulecheck-tiny, and named in failures."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from rulecheck.errors import InvalidRulebook
from rulecheck.kinds.skipgram import measure
from rulecheck.paths import exemplar_cache
from rulecheck.rulebook import dump_rulebook, load_rulebook, parse_rulebook
from rulecheck.session import Workbench

pytest_plugins = ["pytester"]

SHIPPED = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny" / "L0H1.yaml"

BOOK = """rulecheck: 2
model: rulecheck-tiny
layer: 0
head: 1
features:
  - feature: 5
    source: manual
    skipgrams:
      - {key: "(", query: ")", max_distance: 3}
      - {key: a, query: b, min_distance: 1, max_distance: 1}
      - "[if] ... [then]"
    expect: {f1: 0.5}
"""


def test_distances_are_read_written_and_checked() -> None:
    book = parse_rulebook(BOOK)
    terms = book.features[0].skipgrams
    assert [(t.min_distance, t.max_distance) for t in terms] == [(None, 3), (1, 1), (None, None)]
    text = dump_rulebook(book)
    assert "{key: (, query: ), max_distance: 3}" in text
    assert "{key: a, query: b, max_distance: 1, min_distance: 1}" in text
    assert "'[if] ... [then]'" in text  # a term without bounds keeps its shorthand
    assert parse_rulebook(text).features[0].skipgrams == terms
    with pytest.raises(InvalidRulebook, match=r"skipgrams\[0\]\.min_distance: min_distance 4 is"):
        parse_rulebook(BOOK.replace("max_distance: 3}", "max_distance: 3, min_distance: 4}"))
    with pytest.raises(InvalidRulebook, match=r"max_distance: must be >= 0, got -1"):
        parse_rulebook(BOOK.replace("max_distance: 3}", "max_distance: -1}"))


@pytest.fixture(scope="module")
def exemplars() -> Path:
    """The run's exemplar cache: the shipped L0H1 book's layer is streamed once a run."""
    return exemplar_cache()


def bounded(rules, **bounds):
    terms = [replace(t, **bounds) for t in rules.skipgrams]
    return replace(rules, claims={**rules.claims, "skipgrams": terms})


def test_a_bound_changes_what_the_terms_predict_on_the_model(exemplars: Path) -> None:
    """Through the check's own measurement on rulecheck-tiny: a bound no prefix reaches
    changes nothing, a window no key can sit in predicts nothing, and a tight window
    predicts at most what the unbounded terms predict."""
    book = load_rulebook(SHIPPED)
    bench = Workbench(cache_dir=exemplars)
    bench.announce(book, str(SHIPPED))
    head = bench.head_of(book, str(SHIPPED))
    rules = book.features[0]
    base = measure(bench, head, rules, str(SHIPPED))
    assert base.recall > 0
    wide = measure(bench, head, bounded(rules, max_distance=10_000), str(SHIPPED))
    assert wide == base
    none = measure(bench, head, bounded(rules, min_distance=10_000), str(SHIPPED))
    assert none.recall == 0 and none.f1 == 0
    near = measure(bench, head, bounded(rules, max_distance=0), str(SHIPPED))
    assert near.recall <= base.recall
    assert near != base  # the keys of this feature's terms are not all on the query itself


def test_a_failing_bounded_claim_says_its_distance(
    pytester: pytest.Pytester, exemplars: Path
) -> None:
    book = load_rulebook(SHIPPED)
    rules = replace(bounded(book.features[0], min_distance=10_000), label="")
    path = pytester.path / "L0H1.yaml"
    path.write_text(dump_rulebook(replace(book, features=[rules])))
    result = pytester.runpytest("-p", "no:cacheprovider", "-q", f"--rulecheck-cache={exemplars}")
    text = result.stdout.str()
    assert result.ret == 1 and "Traceback" not in text
    assert "(distance >= 10000)" in text and "recall is 0.000" in text


def test_the_report_boxes_a_key_only_at_the_terms_distances() -> None:
    from rulecheck.html.evidence import _Term

    term = _Term(key=None, query=None, label="", min_distance=1, max_distance=3)  # type: ignore[arg-type]
    assert [i for i in range(10) if term.reaches(i, 8)] == [5, 6, 7]
    free = _Term(key=None, query=None, label="")  # type: ignore[arg-type]
    assert [i for i in range(10) if free.reaches(i, 8)] == list(range(9))
