"""What changed between two rulebooks of one head: the review a pull request needs.

Features are paired by id (after translating the old ids through a feature ``mapping`` when
the output SAE was retrained): *kept* in both, *lost* (only the old book), *new* (only the new
one). For a kept feature, rules are compared per kind (``book.claim_changes``, the comparison
regeneration uses too), and its F1 is the measured one where the book has measurements, else
its ``expect`` minimum. A kept feature
*regressed* when its F1 fell by more than the tolerance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from rulecheck.book import FeatureRules, Rulebook, claim_changes

Status = Literal["kept", "lost", "new"]


@dataclass(frozen=True)
class FeatureDiff:
    """One feature across the two books (``old`` id in the old book, ``new`` in the new)."""

    status: Status
    old: int | None
    new: int | None
    added: dict[str, list[str]] = field(default_factory=dict)  # kind -> rules, as written
    removed: dict[str, list[str]] = field(default_factory=dict)
    f1_old: float | None = None
    f1_new: float | None = None

    @property
    def delta_f1(self) -> float | None:
        if self.f1_old is None or self.f1_new is None:
            return None
        return self.f1_new - self.f1_old

    @property
    def changed(self) -> bool:
        return self.status != "kept" or bool(self.added or self.removed) or bool(self.delta_f1)

    def regressed(self, tolerance: float) -> bool:
        delta = self.delta_f1
        return self.status == "kept" and delta is not None and delta < -tolerance


@dataclass(frozen=True)
class HeadDiff:
    """Every feature of one head across the two books."""

    head: str
    features: list[FeatureDiff]

    def count(self, status: Status) -> int:
        return sum(1 for f in self.features if f.status == status)

    def rules(self, which: Literal["added", "removed"]) -> int:
        return sum(len(r) for f in self.features for r in getattr(f, which).values())

    def regressions(self, tolerance: float) -> list[FeatureDiff]:
        return [f for f in self.features if f.regressed(tolerance)]


def f1_of(rules: FeatureRules) -> float | None:
    """The measured F1 when the book has it, else the ``expect`` minimum."""
    value = rules.measured.get("f1", rules.expect.get("f1"))
    return None if value is None else float(value)


def diff_books(old: Rulebook, new: Rulebook, mapping: Mapping[int, int] | None = None) -> HeadDiff:
    """The features of ``old`` and ``new`` paired by id, old ids translated through
    ``mapping`` (old -> new) when given: an old feature the mapping does not name is lost."""
    after = {f.feature: f for f in new.features}
    seen: set[int] = set()
    out = []
    for rules in old.features:
        target = rules.feature if mapping is None else mapping.get(rules.feature)
        if target is None or target not in after:
            out.append(FeatureDiff("lost", rules.feature, None, f1_old=f1_of(rules)))
            continue
        seen.add(target)
        changes = claim_changes(rules, after[target])
        added = {k: v[0] for k, v in changes.items()}
        removed = {k: v[1] for k, v in changes.items()}
        out.append(
            FeatureDiff(
                "kept",
                rules.feature,
                target,
                added={k: v for k, v in added.items() if v},
                removed={k: v for k, v in removed.items() if v},
                f1_old=f1_of(rules),
                f1_new=f1_of(after[target]),
            )
        )
    for feature, rules in after.items():
        if feature not in seen:
            out.append(FeatureDiff("new", None, feature, f1_new=f1_of(rules)))
    return HeadDiff(new.name, out)
