"""Settings of extraction and of the evaluation protocol, as dataclasses, and the one place
their values are checked.

Every numeric setting carries its :class:`Bound` (type and range) in its field's metadata.
The dataclasses check themselves when built, and the command line, the pytest plugin and a
rulebook's recorded ``extraction:`` settings parse text through the same bounds, so a value
out of range (``nan``, ``-1``, ``0`` terms) is refused before any work starts, as one line
naming the option and the range. No heavy imports: the command line reads its defaults here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rulecheck.errors import InvalidSpec

METHODS = ("weight", "gradient")
# what a rulebook's `fingerprints:` record and a check compares (`--rulecheck-accept-changed`)
FINGERPRINTED = ("model", "sae_in", "sae_out", "corpus")


@dataclass(frozen=True)
class Bound:
    """A numeric setting: ``int`` or ``float``, in ``[low, high]`` (``[low, high)`` when
    ``open_high``), finite."""

    kind: type
    low: float
    high: float = math.inf
    open_high: bool = False
    why: str = ""  # what a value out of range would do, said in the fix

    def describe(self) -> str:
        noun = "a whole number" if self.kind is int else "a number"
        low, high = (int(self.low), self.high) if self.kind is int else (self.low, self.high)
        if high == math.inf:
            return f"{noun} >= {low:g}" if self.kind is float else f"{noun} >= {low}"
        high = int(high) if self.kind is int else high
        close = ")" if self.open_high else "]"
        return (
            f"{noun} in [{low:g}, {high:g}{close}"
            if self.kind is float
            else f"{noun} in [{low}, {high}{close}"
        )

    def contains(self, value: float) -> bool:
        """Whether a finite ``value`` lies in the range."""
        below = value < self.high if self.open_high else value <= self.high
        return self.low <= value and below

    def check(self, value: Any, name: str, **where: Any) -> Any:
        """``value`` if it is of the kind and in range, else ``InvalidSpec`` on ``name``."""
        ok_type = isinstance(value, int) if self.kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            self._fail(value, name, where)
        if not (math.isfinite(value) and self.contains(value)):
            self._fail(value, name, where)
        return self.kind(value)

    def parse(self, text: str, name: str, **where: Any) -> Any:
        """``text`` (from a command line or an ini file) read as this setting."""
        try:
            value = int(text, 10) if self.kind is int else float(text)
        except (TypeError, ValueError):
            self._fail(text, name, where)
        return self.check(value, name, **where)

    def _fail(self, value: Any, name: str, where: dict[str, Any]) -> None:
        why = f": {self.why}" if self.why else ""
        raise InvalidSpec(
            f"must be {self.describe()}, got {value!r}",
            field=name,
            fix=f"give {self.describe()}{why}",
            **where,
        )


def bounded(kind: type, low: float, high: float = math.inf, **field_kw: Any) -> Any:
    """A dataclass field whose values are checked against ``Bound(kind, low, high)``."""
    return dataclasses.field(metadata={"bound": Bound(kind, low, high)}, **field_kw)


# how far below a measured metric a minimum is set (extraction) or lowered (checking): the
# metrics lie in [0, 1], so a tolerance of 1 would turn every minimum into 0, a claim that
# holds whatever is measured
TOLERANCE = Bound(
    float, 0.0, 1.0, open_high=True, why="1 lowers every minimum to 0, so no claim would be checked"
)


def tolerance_field(default: float) -> Any:
    """A dataclass field holding a tolerance, checked against ``TOLERANCE``."""
    return dataclasses.field(metadata={"bound": TOLERANCE}, default=default)


def bound_of(cls: type, name: str) -> Bound | None:
    """The bound of field ``name`` of a config dataclass (None for an unbounded field)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("bound")
    return None


class Checked:
    """Base of the config dataclasses: every bounded field is checked when one is built."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            bound = f.metadata.get("bound")
            if bound is not None:
                object.__setattr__(self, f.name, bound.check(getattr(self, f.name), f.name))


# the exemplar protocol's settings a rulebook records and is checked with (its measurements
# were made under them: a book extracted on a small corpus with lowered minimums is checked so)
PROTOCOL = ("seed", "n_pos", "n_neg", "min_active", "min_inactive", "n_held")


@dataclass(frozen=True)
class ExemplarConfig(Checked):
    """Thresholds of the evaluation protocol; the paper's values are the defaults."""

    n_pos: int = bounded(int, 1, default=150)
    n_neg: int = bounded(int, 1, default=150)
    min_active: int = bounded(int, 1, default=150)
    min_inactive: int = bounded(int, 1, default=150)
    max_features: int = bounded(int, 1, default=100)
    seed: int = bounded(int, 0, 2**31 - 1, default=0)
    # sequences kept at every position, for precision where a rule fires (``core.heldout``)
    n_held: int = bounded(int, 0, default=512)

    def recorded(self) -> dict[str, int]:
        """The settings a rulebook's ``extraction:`` block records (``PROTOCOL``)."""
        return {name: getattr(self, name) for name in PROTOCOL}

    @property
    def min_sequences(self) -> int:
        return max(self.min_active + self.min_inactive, self.n_pos + self.n_neg)


@dataclass(frozen=True)
class ExtractConfig(Checked):
    """Settings of one extraction; recorded in the rulebook's ``extraction`` field."""

    method: str = "gradient"
    keys: int = bounded(int, 1, default=100)
    queries_per_key: int = bounded(int, 1, default=100)
    max_terms: int = bounded(int, 1, default=64)
    # the fewest terms whose validation F1 is within this much of the best (0: the best)
    term_margin: float = bounded(float, 0.0, 1.0, default=0.05)
    features: int | tuple[int, ...] = 100  # a sample size, or feature ids
    tolerance: float = tolerance_field(0.05)
    batch_size: int = bounded(int, 1, default=64)
    top_tokens: int = bounded(int, 0, default=3)
    rules: bool = True  # also search the other rule kinds' claims
    # distance bounds and hard negatives (``core.heldout``); without, the paper's protocol alone
    held_out: bool = True
    # the other ranking's F1 curve beside the book (``f1_by_ranking``)
    compare_rankings: bool = True
    exemplars: ExemplarConfig = dataclasses.field(default_factory=ExemplarConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise InvalidSpec(
                f"unknown ranking method {self.method!r}",
                field="method",
                fix=f"use one of {', '.join(METHODS)}",
            )
        object.__setattr__(self, "features", parse_features(self.features, "features"))

    @property
    def seed(self) -> int:
        return self.exemplars.seed


@dataclass(frozen=True)
class MatchConfig(Checked):
    """Settings of matching an old SAE's features to a retrained one's
    (``rulecheck.core.matching``): candidates per old feature, the least score of a pair and
    of a split, and the corpus tokens activations are correlated over."""

    k: int = bounded(int, 1, default=8)
    threshold: float = bounded(float, -1.0, 1.0, default=0.5)
    split_threshold: float = bounded(float, -1.0, 1.0, default=0.7)
    tokens: int = bounded(int, 1, default=4096)


@dataclass(frozen=True)
class GateConfig(Checked):
    """The retraining gate's thresholds (``rulecheck.core.verdict``): the least share of a
    book's features whose skip-grams still hold, the least median F1 change of the
    re-identified ones, the least fresh-to-before F1 ratio, and the least share of the input
    features its rules name found again in a retrained input SAE. The defaults sit midway
    between the healthy and broken retrains of the calibration (the model card's table)."""

    holding: float = bounded(float, 0.0, 1.0, default=0.385)
    f1_change: float = bounded(float, -1.0, 1.0, default=-0.25)
    fresh: float = bounded(float, 0.0, 10.0, default=0.5)
    inputs: float = bounded(float, 0.0, 1.0, default=0.45)


@dataclass(frozen=True)
class Budget:
    """How many features of a rulebook may be lost in remapping: ``count`` features, or a
    ``share`` of the book's features (rounded down)."""

    count: int = 0
    share: float | None = None

    def allows(self, total: int) -> int:
        """The number of lost features allowed in a book of ``total``."""
        if self.share is not None:
            return math.floor(self.share * total + 1e-9)
        return self.count

    def __str__(self) -> str:
        return f"{self.share * 100:g}%" if self.share is not None else str(self.count)


def parse_budget(text: str, name: str) -> Budget:
    """``5%`` (a share of each book's features) or ``3`` (features per book)."""
    text = str(text).strip()
    if text.endswith("%"):
        share = Bound(float, 0.0, 100.0).parse(text[:-1].strip(), name)
        return Budget(share=share / 100)
    return Budget(count=Bound(int, 0).parse(text, name))


@dataclass(frozen=True)
class CheckConfig(Checked):
    """Settings of checking rulebooks (the pytest plugin's ``--rulecheck-*`` options)."""

    tolerance: float = tolerance_field(0.0)  # lowers every expected minimum
    examples: int = bounded(int, 1, 100_000, default=25)  # Hypothesis examples per property
    # the parts (FINGERPRINTED) whose recorded fingerprints may differ from what is loaded
    accept_changed: frozenset[str] = frozenset()
    # translate claims into retrained SAEs' ids: "auto" (match on the fly) or mapping files
    remap: str | None = None
    allow_lost: Budget = dataclasses.field(default_factory=Budget)
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        accepted = parse_accept_changed(self.accept_changed, "accept_changed")
        object.__setattr__(self, "accept_changed", accepted)


def parse_config(cls: type, texts: dict[str, Any], option: str = "--{}", **given: Any) -> Any:
    """A config dataclass from option texts by field name (None or absent: the default), each
    read through its field's bound (errors name ``option.format(name with dashes)``), plus
    the fields ``given`` as they are."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        text = texts.get(f.name)
        if text is not None and "bound" in f.metadata:
            values[f.name] = f.metadata["bound"].parse(
                text, option.format(f.name.replace("_", "-"))
            )
    return cls(**values)


def parse_accept_changed(value: str | Iterable[str], name: str) -> frozenset[str]:
    """The parts named by a comma list (``sae_out,corpus``) or an iterable of names, each one
    of ``FINGERPRINTED`` or ``all`` (every part); empty names nothing."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = [p.strip() if isinstance(p, str) else p for p in parts]
    allowed = (*FINGERPRINTED, "all")
    for part in names:
        if part and part not in allowed:
            raise InvalidSpec(
                f"unknown name {part!r}",
                field=name,
                fix=f"give a comma list of {', '.join(FINGERPRINTED)}, or all",
            )
    return frozenset(FINGERPRINTED if "all" in names else (n for n in names if n))


def parse_shard(text: str, name: str = "--shard") -> tuple[int, int]:
    """``i/n``: the ``i``-th of ``n`` shares of the work, ``1 <= i <= n``."""
    parts = str(text).split("/")
    fix = "give i/n with 1 <= i <= n, e.g. --shard 2/4 (a SLURM array: $SLURM_ARRAY_TASK_ID/4)"
    if len(parts) != 2:
        raise InvalidSpec(f"expected i/n, got {text!r}", field=name, fix=fix)
    n = _shard_part("n", Bound(int, 1), parts[1], name, fix)
    return _shard_part("i", Bound(int, 1, n), parts[0], name, fix), n


def _shard_part(part: str, bound: Bound, text: str, name: str, fix: str) -> int:
    """``i`` or ``n`` of ``--shard i/n`` within ``bound``; an error names the part."""
    try:
        return bound.parse(text.strip(), name)
    except InvalidSpec as exc:
        raise InvalidSpec(f"{part} {exc.what}", field=name, fix=fix) from None


def shard_of(items: list[Any], shard: tuple[int, int]) -> list[Any]:
    """Shard ``i`` of ``n`` of ``items``: the ``i``-th of ``n`` contiguous, balanced slices
    (heads of one layer stay together, so a shard streams few layers), the same on every
    machine; the shards' union is ``items``."""
    i, n = shard
    return items[(i - 1) * len(items) // n : i * len(items) // n]


def parse_features(value: Any, name: str, **where: Any) -> int | tuple[int, ...]:
    """A feature sample size (``20``) or feature ids (``3,17``, or a list of ints)."""
    if isinstance(value, str):
        text = value.strip()
        if "," not in text:
            return Bound(int, 1).parse(text, name, **where)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        value = tuple(Bound(int, 0).parse(p, name, **where) for p in parts)
    if isinstance(value, list | tuple):
        ids = tuple(Bound(int, 0).check(v, name, **where) for v in value)
        if not ids:
            raise InvalidSpec(
                "names no feature", field=name, fix="give a count such as 20 or ids such as 3,17"
            )
        return ids
    return Bound(int, 1).check(value, name, **where)
