"""Translating rulebooks into a retrained SAE's ids (``rulecheck.remap``), checked against
books translated by hand, and exemplar draws keyed by old ids."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import torch
import yaml

from rulecheck.book import book_dict
from rulecheck.config import ExemplarConfig
from rulecheck.core.exemplars import ExemplarCollector
from rulecheck.core.pairs import Matching, Pair
from rulecheck.remap import FeatureMap, remap_book
from rulecheck.rulebook import dump_rulebook, parse_rulebook

SCHEMA = json.loads(
    (Path(__file__).parents[1] / "rulecheck/schemas/rulebook.schema.json").read_text()
)

BOOK = """\
rulecheck: 2
model: rulecheck-tiny
sae_in: old/L{layer}
sae_out: old/L{layer}H{head}
layer: 0
head: 1
refs:
  3: [' if']
  5: [' then']
  8: []
  9: [' else']
features:
- feature: 0
  source: extracted
  skipgrams:
  - [3, 5]
  - [8, 5]
  - [9, 5]
  absence:
  - '[#3] ... [#5] unless [#8]'
  - '[#3] ... [#5] unless [#9]'
  expect: {f1: 0.5}
- feature: 1
  source: manual
  label: by hand
  skipgrams:
  - '[if] ... [then]'
  counting:
  - count [#3] >= 2
  expect: {f1: 0.6}
  xfail: known
- feature: 2
  source: extracted
  skipgrams:
  - [3, 5]
  expect: {f1: 0.7}
"""

# the same book translated by hand: output 0 -> 10, 1 -> 11, 2 lost (best 7 at 0.3); input
# 3 -> 30, 5 -> 50; 8 lost with no tokens (its skip-gram leaves the set, its absence rule
# cannot be translated), 9 lost with tokens (checked by its token)
TRANSLATED = """\
rulecheck: 2
model: rulecheck-tiny
sae_in: new/L{layer}
sae_out: new/L{layer}H{head}
layer: 0
head: 1
refs:
  8: []
  30: [' if']
  50: [' then']
features:
- feature: 10
  source: extracted
  skipgrams:
  - [30, 50]
  - '[ else] ... [#50]'
  absence:
  - '[#30] ... [#50] unless [#8]'
  - '[#30] ... [#50] unless [ else]'
  expect: {f1: 0.5}
- feature: 11
  source: manual
  label: by hand
  skipgrams:
  - '[if] ... [then]'
  counting:
  - count [#30] >= 2
  expect: {f1: 0.6}
  xfail: known
lost:
- feature: 2
  source: extracted
  skipgrams:
  - [30, 50]
  expect: {f1: 0.7}
  best_candidate: {feature: 7, confidence: 0.3}
"""


def maps() -> tuple[FeatureMap, FeatureMap]:
    outputs = FeatureMap({0: 10, 1: 11}, {2: (7, 0.3)})
    inputs = FeatureMap({3: 30, 5: 50})
    return outputs, inputs


def test_a_book_is_translated_as_by_hand() -> None:
    outputs, inputs = maps()
    r = remap_book(parse_rulebook(BOOK), outputs, inputs, sae_in="new/L{layer}")
    r.book.sae_out = "new/L{layer}H{head}"
    assert book_dict(r.book) == book_dict(parse_rulebook(TRANSLATED))
    assert r.new_id == {0: 10, 1: 11} and sorted(r.lost) == [2]
    assert (r.by_tokens, r.dropped) == (2, 1)  # [ else] twice; [8, 5] left the set
    assert r.untranslatable == {(10, "absence", 0)}
    assert r.rules(1) is r.book.feature(11) and r.rules(2) is None


def test_the_written_book_leaves_untranslatable_rules_out_and_validates() -> None:
    outputs, inputs = maps()
    r = remap_book(parse_rulebook(BOOK), outputs, inputs)
    written = r.written()
    assert [str(a.distractor.tokens) for a in written.feature(10).absence] == ["[' else']"]
    assert len(r.book.feature(10).absence) == 2  # the in-memory book keeps item indices
    text = dump_rulebook(written)
    jsonschema.validate(yaml.safe_load(text), SCHEMA)
    again = parse_rulebook(text)
    assert book_dict(again) == book_dict(written)
    assert again.lost[0].best_candidate.feature == 7


def test_unchanged_saes_translate_nothing() -> None:
    book = parse_rulebook(BOOK)
    r = remap_book(book, None, None)
    assert book_dict(r.book) == book_dict(book)
    assert r.new_id == {0: 0, 1: 1, 2: 2} and not r.lost and not r.untranslatable


def test_lost_entries_of_an_earlier_remap_are_kept_as_they_are() -> None:
    outputs, inputs = maps()
    once = remap_book(parse_rulebook(BOOK), outputs, inputs).book
    twice = remap_book(once, FeatureMap({10: 20, 11: 21}), None).book
    assert [f.feature for f in twice.features] == [20, 21]
    assert [f.feature for f in twice.lost] == [2]


def test_a_best_candidate_outside_lost_is_an_error() -> None:
    bad = BOOK.replace(
        "  expect: {f1: 0.7}\n", "  expect: {f1: 0.7}\n  best_candidate: {feature: 1}\n"
    )
    try:
        parse_rulebook(bad, "L0H1.yaml")
    except Exception as exc:
        assert "only a lost feature has a best candidate" in str(exc)
        assert "features[2].best_candidate" in str(exc)
    else:
        raise AssertionError("a best candidate under features was accepted")


def test_sample_ids_from_a_matching() -> None:
    pairs = [Pair(0, 2, 1.0, None, 1.0, "matched"), Pair(2, 0, 1.0, None, 1.0, "matched")]
    fmap = FeatureMap.of(Matching(pairs, lost=[1], new=[1, 3], best={1: (3, 0.2)}))
    assert fmap.sample_ids(3, 4).tolist() == [2, 4, 0, 6]  # unmatched new j: n_old + j
    assert fmap.lost_mark(1).feature == 3 and fmap.lost_mark(1).confidence == 0.2


def test_draws_keyed_by_old_ids_reproduce_the_old_exemplars() -> None:
    """A permuted SAE's feature j, keyed by its old id perm[j], gets the very sequences,
    positions and split the old feature perm[j] got."""
    g = torch.Generator().manual_seed(0)
    d_sae, n_seq, seq_len = 12, 400, 9
    acts = torch.relu(torch.randn(n_seq, seq_len, d_sae, generator=g) - 1.2)  # sparse
    perm = torch.randperm(d_sae, generator=g)  # new j is old perm[j]
    cfg = ExemplarConfig(n_pos=20, n_neg=20, min_active=20, min_inactive=20)
    old = ExemplarCollector(d_sae, seq_len, cfg, torch.device("cpu"))
    new = ExemplarCollector(d_sae, seq_len, cfg, torch.device("cpu"), sample_ids=perm)
    plain = ExemplarCollector(d_sae, seq_len, cfg, torch.device("cpu"))
    for start in range(0, n_seq, 64):
        old.update(acts[start : start + 64])
        new.update(acts[start : start + 64, :, perm])
        plain.update(acts[start : start + 64, :, perm])
    assert torch.equal(new.eligible(), torch.sort(torch.argsort(perm)[old.eligible()]).values)
    differs = False
    for j in new.eligible().tolist():
        a, b = old.examples(int(perm[j])), new.examples(j)
        for name in ("seq", "t", "act", "split"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (j, name)
        c = plain.examples(j)
        differs |= not torch.equal(a.split, c.split) or not torch.equal(a.seq, c.seq)
    assert differs  # keyed by their new ids, the draws differ: the keying is what matters


def test_a_feature_merged_away_names_the_feature_it_joined() -> None:
    pairs = [Pair(0, 0, 0.9, None, 0.9, "merged")]
    matching = Matching(pairs, lost=[], new=[], merged={0: [1]}, best={1: (0, 0.8)})
    assert FeatureMap.of(matching).lost_mark(1).feature == 0
    from_file = Matching(pairs, lost=[], new=[], merged={0: [1]})  # a file keeps no score
    mark = FeatureMap.of(from_file).lost_mark(1)
    assert (mark.feature, mark.confidence) == (0, None)


def test_the_lost_verdict_says_why_and_counts_against_the_budget() -> None:
    import pytest

    from rulecheck.book import BestCandidate
    from rulecheck.config import Budget, parse_budget
    from rulecheck.errors import RemapLost
    from rulecheck.gate import lost_reason, lost_verdict

    outputs, inputs = maps()
    book = remap_book(parse_rulebook(BOOK), outputs, inputs).book
    entry = book.lost[0]
    why = lost_reason(book, entry, "new.sae", threshold=0.5)
    assert why.startswith("feature 2 ") and "in the new output SAE new.sae" in why
    assert "(best candidate 7, confidence 0.300 < 0.5); 1 of 3 features of L0H1 lost" in why
    with pytest.raises(RemapLost) as failed:
        lost_verdict(book, entry, Budget(), "L0H1.yaml")
    line = str(failed.value)
    assert line.startswith("L0H1.yaml: lost[2]: feature 2 ")
    assert "(best candidate 7, confidence 0.300); 1 of 3 features of L0H1 lost" in line
    assert "--rulecheck-allow-lost allows 0" in line and "\n" not in line
    assert "within --rulecheck-allow-lost 34%" in lost_verdict(
        book, entry, parse_budget("34%", "x"), "L0H1.yaml"
    )
    with pytest.raises(RemapLost):  # 33% of 3 features allows none
        lost_verdict(book, entry, parse_budget("33%", "x"), "L0H1.yaml")
    entry.best_candidate = BestCandidate(feature=7, confidence=0.6)
    assert "confidence 0.600, paired with another feature" in lost_reason(book, entry, None, 0.5)


def test_a_lost_reference_keeps_only_the_tokens_that_name_one() -> None:
    """A token shown with U+FFFD was decoded from part of a character: it names no token of
    the tokenizer, so a reference falling back on its tokens leaves it out (and with nothing
    else left, cannot be translated)."""
    text = BOOK.replace("9: [' else']", "9: [' else', \"\\ufffd\"]").replace(
        "8: []", '8: ["\\ufffd\\ufffd"]'
    )
    book = parse_rulebook(text)
    assert book.refs[9] == [" else", "\ufffd"]
    outputs, inputs = maps()
    r = remap_book(book, outputs, inputs)
    assert book_dict(r.book)["features"] == book_dict(parse_rulebook(TRANSLATED))["features"]
    assert (r.by_tokens, r.dropped) == (2, 1)
