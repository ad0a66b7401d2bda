"""Translating a rulebook into the feature ids of retrained SAEs (no I/O, no model).

A rulebook's claims name output features (``feature:``) and input features (the ``[#id]``
references of keys, queries and distractors). When an SAE is retrained its features are
permuted, split and merged; a matching (``rulecheck.core.matching``) pairs old ids with new
ones. :func:`remap_book` translates every claim through the output SAE's and the input SAE's
matchings:

- an output feature with a partner takes the partner's id; one without is *lost*: its entry
  moves to the book's ``lost:`` list under its old id, with the best candidate and its score;
- an input reference with a partner takes the partner's id and keeps its tokens; one whose
  input feature is lost keeps only its tokens, so that the claim is checked on the tokens as
  written (``by_tokens`` counts these), less any shown with U+FFFD (decoded from part of a
  character, they name no token). A reference lost with no tokens cannot be translated:
  a rule of a kind checked as a set (skip-gram terms) leaves the set; any other rule stays,
  untranslated, and is listed in ``untranslatable`` (its item fails; a written book leaves it
  out).

Manual entries are translated like extracted ones; labels, tokens, minimums and ``xfail`` stay
as written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rulecheck import kinds
from rulecheck.book import BestCandidate, FeatureRules, Rulebook
from rulecheck.core.pairs import Matching
from rulecheck.refs import TokenRef


@dataclass(frozen=True)
class FeatureMap:
    """Old -> new ids of one SAE's features (``new_of``); ``best`` gives each old feature
    without a partner its best-scoring candidate and the score; ``merged_into`` each old
    feature merged away the new feature it joined (a confident partner it shares with another
    old feature). ``None`` as a map means the SAE did not change."""

    new_of: dict[int, int]
    best: dict[int, tuple[int, float]] = field(default_factory=dict)
    merged_into: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, matching: Matching) -> FeatureMap:
        best = dict(matching.best)
        merged_into = {old: new for new, olds in matching.merged.items() for old in olds}
        for old, new in merged_into.items():
            best.setdefault(old, (new, math.nan))
        return cls(matching.mapping(), best, merged_into)

    def sample_ids(self, n_old: int, n_new: int) -> torch.Tensor:
        """``[n_new]``: each new feature's old partner, or ``n_old + j`` for a new feature
        ``j`` without one (the ids exemplar draws are keyed by: a re-identified feature is
        checked on the sequences its claims were measured on)."""
        ids = torch.arange(n_old, n_old + n_new)
        for old, new in self.new_of.items():
            ids[new] = old
        return ids

    def lost_mark(self, old: int) -> BestCandidate:
        """What a lost feature's entry records about its best candidate."""
        best = self.best.get(old)
        if best is None:
            return BestCandidate()
        score = None if math.isnan(best[1]) else round(best[1], 3)
        return BestCandidate(feature=best[0], confidence=score)


@dataclass
class Remapped:
    """A rulebook in the new SAEs' ids: ``book`` (kept features under their new ids, lost
    ones under ``lost:``), ``new_id`` (old -> new output id of each kept feature), ``lost``
    (old id -> the lost entry), ``by_tokens`` (input references now given by their tokens
    only), ``dropped`` (rules left out of a set) and ``untranslatable`` (``(new feature id,
    kind key, index)`` of rules that could not be translated)."""

    book: Rulebook
    new_id: dict[int, int]
    lost: dict[int, FeatureRules]
    by_tokens: int = 0
    dropped: int = 0
    untranslatable: set[tuple[int, str, int]] = field(default_factory=set)

    def rules(self, old: int) -> FeatureRules | None:
        """The translated entry of old output feature ``old`` (None when it was lost)."""
        if old not in self.new_id:
            return None
        return self.book.feature(self.new_id[old])

    def written(self) -> Rulebook:
        """The translated book as ``rulecheck remap`` writes it: untranslatable rules left out."""
        if not self.untranslatable:
            return self.book

        def kept(rules: FeatureRules) -> FeatureRules:
            claims = {
                key: [
                    c
                    for i, c in enumerate(cs)
                    if (rules.feature, key, i) not in self.untranslatable
                ]
                for key, cs in rules.claims.items()
            }
            return replace(rules, claims=claims)

        return replace(self.book, features=[kept(f) for f in self.book.features])


@dataclass
class _Counts:
    by_tokens: int = 0
    dropped: int = 0


def _ref(ref: TokenRef, inputs: FeatureMap | None) -> TokenRef | None:
    """``ref`` in the new input SAE's ids: by its partner, or by its tokens alone when its
    feature was lost (those that name one token: a token shown with U+FFFD was decoded from
    part of a character and names none); None when it has neither."""
    if inputs is None or ref.feature is None:
        return ref
    new = inputs.new_of.get(ref.feature)
    if new is not None:
        return TokenRef(new, list(ref.tokens))
    tokens = [t for t in ref.tokens if "\ufffd" not in t]
    if tokens:
        return TokenRef(None, tokens)
    return None


def referenced_inputs(book: Rulebook) -> set[int]:
    """The input features the claims of ``book``'s features name by id."""
    return {
        value.feature
        for rules in book.features
        for claims in rules.claims.values()
        for claim in claims
        for f in dataclasses.fields(claim)
        if isinstance(value := getattr(claim, f.name), TokenRef) and value.feature is not None
    }


def _claim(claim: Any, inputs: FeatureMap | None) -> tuple[Any, int, bool]:
    """``claim`` with its references translated, how many of them fell back on their tokens,
    and whether all could be translated (one that cannot keeps its old id)."""
    changes, by_tokens, whole = {}, 0, True
    for f in dataclasses.fields(claim):
        value = getattr(claim, f.name)
        if isinstance(value, TokenRef):
            new = _ref(value, inputs)
            whole &= new is not None
            by_tokens += int(new is not None and new.feature is None and value.feature is not None)
            changes[f.name] = value if new is None else new
    return replace(claim, **changes), by_tokens, whole


def _rules(
    rules: FeatureRules, feature: int, inputs: FeatureMap | None, counts: _Counts
) -> tuple[FeatureRules, list[tuple[str, int]]]:
    """``rules`` as feature ``feature`` with its claims translated, and ``(kind key, index)``
    of the claims that could not be."""
    claims: dict[str, list[Any]] = {}
    untranslatable = []
    for key, old in rules.claims.items():
        together = key in kinds.KINDS and kinds.KINDS[key].together
        claims[key] = []
        for claim in old:
            new, by_tokens, whole = _claim(claim, inputs)
            if not whole and together:
                counts.dropped += 1
                continue
            if not whole:
                untranslatable.append((key, len(claims[key])))
            claims[key].append(new)
            counts.by_tokens += by_tokens
    entry = FeatureRules(
        feature,
        rules.source,
        rules.label,
        claims=claims,
        expect=dict(rules.expect),
        xfail=rules.xfail,
    )
    return entry, untranslatable


def remap_book(
    book: Rulebook,
    outputs: FeatureMap | None,
    inputs: FeatureMap | None,
    **header: Any,
) -> Remapped:
    """``book`` translated through the output SAE's and the input SAE's maps (``None``: that
    SAE did not change); ``header`` replaces header fields (``sae_in``, ``sae_out``,
    ``fingerprints``) of the translated book. Entries already under ``lost:`` (ids of an
    older SAE) are kept as they are."""
    counts = _Counts()
    kept: list[FeatureRules] = []
    new_id: dict[int, int] = {}
    lost: dict[int, FeatureRules] = {}
    untranslatable: set[tuple[int, str, int]] = set()
    for rules in book.features:
        new = rules.feature if outputs is None else outputs.new_of.get(rules.feature)
        if new is None:
            entry, _ = _rules(rules, rules.feature, inputs, counts)
            entry.best_candidate = outputs.lost_mark(rules.feature) if outputs else None
            lost[rules.feature] = entry
            continue
        new_id[rules.feature] = new
        entry, bad = _rules(rules, new, inputs, counts)
        kept.append(entry)
        untranslatable |= {(new, key, i) for key, i in bad}
    translated = replace(
        book,
        features=sorted(kept, key=lambda f: f.feature),
        lost=[*book.lost, *(lost[i] for i in sorted(lost))],
        refs={},
        **header,
    )
    return Remapped(translated, new_id, lost, counts.by_tokens, counts.dropped, untranslatable)
