"""What a matching of two SAEs' features is: pairs, and the features without a partner.

Plain records, no tensors: a mapping file is read into them without loading torch
(``rulecheck.core.matching`` computes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pair:
    """One matched pair; ``status`` is ``"matched"``, ``"split"`` (the old feature has extra new
    partners) or ``"merged"`` (the new feature has extra old partners)."""

    old: int
    new: int
    cosine: float
    correlation: float | None
    confidence: float
    status: str


@dataclass
class Matching:
    """Pairs in increasing old id; ``split`` maps an old feature to its extra new partners,
    ``merged`` a new feature to its extra old partners; ``best`` gives each old feature without a
    partner (lost, or merged away) its best-scoring candidate and that score (the evidence that
    it has no confident partner of its own)."""

    pairs: list[Pair]
    lost: list[int]
    new: list[int]
    split: dict[int, list[int]] = field(default_factory=dict)
    merged: dict[int, list[int]] = field(default_factory=dict)
    best: dict[int, tuple[int, float]] = field(default_factory=dict)

    def mapping(self) -> dict[int, int]:
        """Old -> new for the kept pairs."""
        return {p.old: p.new for p in self.pairs}
