"""The retraining gate's verdict: a head's rulebook judged as a whole under retrained SAEs
(pure functions, no I/O).

A retrained SAE shares only part of its features one to one with the SAE a book was written
for, and a re-identified feature's rules hold less exactly than on the features they were
extracted for; single claims are therefore evidence, and the verdict is taken on statistics
of the whole book (:class:`GateStatistics`):

- ``reidentified``: the share of the book's features with a confident partner in the new
  output SAE (1 when the output SAE did not change; a feature merged with another into one
  new feature counts). It explains the others and is not judged: a narrower retrain merges
  features on purpose, and a lost feature already counts against ``holding``;
- ``holding``: the share of the book's features with skip-grams whose skip-grams, translated,
  reach on the partner an F1 at most ``HOLDING_DROP`` below the F1 they reach on the book's
  own SAEs (a lost feature's do not hold);
- ``f1_change``: the median of that F1 change over the re-identified features;
- ``fresh``: what the new SAE has in each feature's place (its partner, else its best
  candidate) as rules extracted afresh for it can describe it: the median fresh F1 over the
  book's features (0 where there is no candidate or it cannot be measured), relative to the
  book's median F1 before;
- ``inputs``: the share of the input features the book's rules name (by id) with a confident
  partner in the new input SAE (1 when the input SAE did not change). Claims whose input
  features are lost are still checked by their tokens, so an input SAE broken while the
  output SAE is not leaves ``holding`` high: this statistic is what fails it.

The last four are judged, each against a threshold (:class:`GateConfig`); the defaults sit
midway between the healthy and the broken retrains of the calibration on rulecheck-tiny
(``rulecheck.build.calibration``; the model card's table).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rulecheck.config import GateConfig

HOLDING_DROP = 0.2  # a feature's skip-grams hold when their F1 fell by at most this much


@dataclass(frozen=True)
class FeatureChange:
    """One of the book's features under the new SAEs: its skip-grams' test F1 before (on the
    book's SAEs; None without skip-grams) and after (translated, on the partner; None when
    lost), its partner or best candidate (``new``), and the F1 of rules extracted afresh for
    that candidate (``fresh``; 0 when it cannot be measured, None without a candidate)."""

    old: int
    new: int | None
    reidentified: bool
    before: float | None
    after: float | None
    fresh: float | None

    @property
    def holds(self) -> bool:
        """Re-identified, and its skip-grams within ``HOLDING_DROP`` of their F1 before."""
        if not self.reidentified or self.before is None or self.after is None:
            return False
        return self.after >= self.before - HOLDING_DROP - 1e-9


@dataclass(frozen=True)
class GateStatistics:
    """A book's statistics under the new SAEs (``None``: nothing to measure it on)."""

    features: int  # the book's features
    measured: int  # of them, with skip-grams (the F1 statistics' population)
    reidentified: float
    holding: float | None
    f1_change: float | None
    fresh: float | None
    f1_before: float | None  # medians, for the reader
    f1_after: float | None
    f1_fresh: float | None
    inputs: float = 1.0
    inputs_named: int = 0  # the input features the book's rules name by id


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def gate_statistics(
    changes: Sequence[FeatureChange], inputs: tuple[int, int] | None = None
) -> GateStatistics:
    """The statistics of a book from its features' changes and, where the input SAE changed,
    ``inputs``: how many of the input features its rules name have a partner, of how many."""
    n = len(changes)
    measured = [c for c in changes if c.before is not None]
    kept = [c for c in measured if c.reidentified and c.after is not None]
    before = _median([c.before for c in measured])  # type: ignore[misc]
    fresh = _median([c.fresh or 0.0 for c in measured])
    ratio = None
    if fresh is not None and before is not None:
        ratio = 1.0 if before <= 0 else fresh / before
    return GateStatistics(
        features=n,
        measured=len(measured),
        reidentified=sum(c.reidentified for c in changes) / n if n else 1.0,
        holding=sum(c.holds for c in measured) / len(measured) if measured else None,
        f1_change=_median([c.after - c.before for c in kept]),  # type: ignore[operator]
        fresh=ratio,
        f1_before=before,
        f1_after=_median([c.after for c in kept]),  # type: ignore[misc]
        f1_fresh=fresh,
        inputs=inputs[0] / inputs[1] if inputs and inputs[1] else 1.0,
        inputs_named=inputs[1] if inputs else 0,
    )


@dataclass(frozen=True)
class Judged:
    """One statistic against its threshold; ``margin`` is how far it is on the passing side
    (negative: past the threshold)."""

    name: str
    value: float | None
    threshold: float
    meaning: str

    @property
    def margin(self) -> float | None:
        return None if self.value is None else self.value - self.threshold

    @property
    def passed(self) -> bool:
        return self.margin is None or self.margin >= -1e-12


STATISTICS = {
    "holding": f"share of the book's features whose skip-grams stay within {HOLDING_DROP:g} F1 "
    "of before",
    "f1_change": "median F1 change of the re-identified features' skip-grams",
    "fresh": "median F1 of rules extracted afresh for the new features in their place, "
    "relative to before",
    "inputs": "share of the input features the rules name with a confident partner in the "
    "new input SAE",
}

LOOK_AT = {
    "holding": "the items marked xfail (the claims that changed) and rulecheck match's pairs",
    "f1_change": "the items marked xfail: the claims that changed",
    "fresh": "the new SAE's dead and dense features",
    "inputs": "the new input SAE's matching (rulecheck match) and its training",
}


@dataclass(frozen=True)
class Verdict:
    """A head's gate verdict: every statistic judged; it passes when each does."""

    statistics: GateStatistics
    judged: tuple[Judged, ...]

    @property
    def passed(self) -> bool:
        return all(j.passed for j in self.judged)

    def record(self, head: str) -> dict[str, Any]:
        """The verdict as plain values (the run report, tables, the HTML report)."""
        s = self.statistics
        return {
            "head": head,
            "passed": self.passed,
            "features": s.features,
            "measured": s.measured,
            "medians": {"before": s.f1_before, "after": s.f1_after, "fresh": s.f1_fresh},
            "statistics": {
                "reidentified": {"value": s.reidentified, "threshold": None, "passed": True},
                **{
                    j.name: {"value": j.value, "threshold": j.threshold, "passed": j.passed}
                    for j in self.judged
                },
            },
            "reason": self.reason(),
        }

    def reason(self) -> str:
        """One line: each statistic past its threshold and by how much (the furthest first),
        what the worst one means for this book, and what to look at."""
        failed = sorted((j for j in self.judged if not j.passed), key=lambda j: j.margin or 0)
        if not failed:
            return "; ".join(
                f"{j.name} {j.value:.3f} >= {j.threshold:g}"
                for j in self.judged
                if j.value is not None
            )
        past = ", ".join(
            f"{j.name} {j.value:.3f} < {j.threshold:g} (by {-(j.margin or 0):.3f})" for j in failed
        )
        worst = failed[0].name
        return f"{past}: {self._meaning(worst)}; look at {LOOK_AT[worst]}"

    def _meaning(self, name: str) -> str:
        s = self.statistics
        if name == "holding":
            held = round((s.holding or 0) * s.measured)
            kept = round(s.reidentified * s.features)
            return (
                f"the skip-grams of {held} of {s.measured} features stay within "
                f"{HOLDING_DROP:g} F1 of before ({kept} of {s.features} re-identified)"
            )
        if name == "inputs":
            kept = round(s.inputs * s.inputs_named)
            return (
                f"{kept} of the {s.inputs_named} input features the rules name have a "
                "confident partner in the new input SAE"
            )
        if name == "f1_change":
            return (
                f"the re-identified features' skip-grams changed F1 by {s.f1_change:+.3f} (median)"
            )
        return (
            f"rules extracted afresh for the new features reach F1 {s.f1_fresh:.3f} against "
            f"{s.f1_before:.3f} before (medians)"
        )


def judge(stats: GateStatistics, cfg: GateConfig) -> Verdict:
    """``stats`` against ``cfg``'s thresholds (a statistic with nothing to measure passes)."""
    judged = tuple(
        Judged(name, getattr(stats, name), getattr(cfg, name), STATISTICS[name])
        for name in STATISTICS
    )
    return Verdict(stats, judged)
