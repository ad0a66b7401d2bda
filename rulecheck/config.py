"""Settings of extraction and of the evaluation protocol, as dataclasses (no heavy imports,
so the command line reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("weight", "gradient")


@dataclass(frozen=True)
class ExemplarConfig:
    """Thresholds of the evaluation protocol; the paper's values are the defaults."""

    n_pos: int = 150
    n_neg: int = 150
    min_active: int = 150
    min_inactive: int = 150
    max_features: int = 100
    seed: int = 0

    @property
    def min_sequences(self) -> int:
        return max(self.min_active + self.min_inactive, self.n_pos + self.n_neg)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extraction; recorded in the rulebook's ``extraction`` field."""

    method: str = "weight"
    keys: int = 100
    queries_per_key: int = 100
    max_terms: int = 64
    features: int | tuple[int, ...] = 100
    tolerance: float = 0.05
    batch_size: int = 64
    top_tokens: int = 3
    rules: bool = True  # also search absence and counting rules
    exemplars: ExemplarConfig = field(default_factory=ExemplarConfig)

    @property
    def seed(self) -> int:
        return self.exemplars.seed
