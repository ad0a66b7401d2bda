"""The gate verdict's statistics and judgement (``rulecheck.core.verdict``), against a slow
reference written out here, on hand-built feature changes."""

from __future__ import annotations

import random
import statistics

import pytest

from rulecheck.config import GateConfig
from rulecheck.core.verdict import HOLDING_DROP, FeatureChange, gate_statistics, judge
from rulecheck.errors import InvalidSpec


def reference(changes: list[FeatureChange]) -> dict[str, float | None]:
    """The statistics computed the obvious way, one loop each."""
    with_rules = [c for c in changes if c.before is not None]
    held = 0
    for c in with_rules:
        if c.reidentified and c.after is not None and c.before - c.after <= HOLDING_DROP + 1e-9:
            held += 1
    deltas = [c.after - c.before for c in with_rules if c.reidentified and c.after is not None]
    before = statistics.median([c.before for c in with_rules]) if with_rules else None
    fresh = [c.fresh if c.fresh is not None else 0.0 for c in with_rules]
    return {
        "reidentified": sum(1 for c in changes if c.reidentified) / len(changes),
        "holding": held / len(with_rules) if with_rules else None,
        "f1_change": statistics.median(deltas) if deltas else None,
        "fresh": statistics.median(fresh) / before if with_rules and before else None,
    }


def random_changes(seed: int, n: int) -> list[FeatureChange]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kept = rng.random() < 0.7
        before = None if rng.random() < 0.1 else round(rng.uniform(0.3, 1.0), 3)
        after = round(rng.uniform(0.0, 1.0), 3) if kept and before is not None else None
        fresh = None if rng.random() < 0.1 else round(rng.uniform(0.0, 1.0), 3)
        out.append(FeatureChange(i, i + 100, kept, before, after, fresh))
    return out


@pytest.mark.parametrize("seed", range(20))
def test_the_statistics_match_the_reference(seed: int) -> None:
    changes = random_changes(seed, 1 + seed * 7)
    got = gate_statistics(changes)
    want = reference(changes)
    for name, value in want.items():
        if value is None:
            assert getattr(got, name) is None, name
        else:
            assert getattr(got, name) == pytest.approx(value), name


def test_a_feature_holds_up_to_the_drop_and_not_beyond() -> None:
    at = FeatureChange(1, 2, True, 0.9, 0.9 - HOLDING_DROP, 0.9)
    past = FeatureChange(1, 2, True, 0.9, 0.9 - HOLDING_DROP - 0.001, 0.9)
    lost = FeatureChange(1, None, False, 0.9, None, None)
    assert at.holds and not past.holds and not lost.holds


def test_a_verdict_names_each_statistic_past_its_threshold_worst_first() -> None:
    changes = [FeatureChange(i, i, i < 3, 0.9, 0.2, 0.0) for i in range(10)]
    verdict = judge(gate_statistics(changes), GateConfig())
    assert not verdict.passed
    reason = verdict.reason()
    assert "\n" not in reason
    # holding 0 (by 0.385), f1_change -0.7 (by 0.45), fresh 0 (by 0.5): furthest first
    assert reason.startswith("fresh 0.000 < 0.5 (by 0.500), f1_change -0.700 < -0.25 (by 0.450)")
    assert "holding 0.000 < 0.385 (by 0.385)" in reason
    assert "rules extracted afresh for the new features reach F1 0.000 against 0.900" in reason
    assert "look at" in reason
    record = verdict.record("L0H0")
    assert record["passed"] is False and record["statistics"]["reidentified"]["value"] == 0.3
    assert record["statistics"]["holding"] == {"value": 0.0, "threshold": 0.385, "passed": False}


def test_a_healthy_book_passes_and_the_thresholds_decide() -> None:
    changes = [FeatureChange(i, i, True, 0.9, 0.8, 0.85) for i in range(10)]
    stats = gate_statistics(changes)
    assert judge(stats, GateConfig()).passed
    strict = judge(stats, GateConfig(f1_change=-0.05))
    assert not strict.passed and strict.reason().startswith("f1_change -0.100 < -0.05 (by 0.050)")


def test_a_book_without_skip_grams_is_judged_on_nothing_and_passes() -> None:
    changes = [FeatureChange(i, None, False, None, None, None) for i in range(3)]
    stats = gate_statistics(changes)
    assert stats.reidentified == 0 and stats.holding is None and stats.fresh is None
    assert judge(stats, GateConfig()).passed


@pytest.mark.parametrize(
    ("field", "value"), [("holding", 1.5), ("f1_change", -2.0), ("fresh", -0.1)]
)
def test_thresholds_out_of_range_are_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidSpec, match=f"{field}: must be a number in"):
        GateConfig(**{field: value})


def test_the_gate_table_and_markdown_lead_with_the_verdict() -> None:
    from rich.console import Console

    from rulecheck.report import gate_markdown, print_gate

    good = judge(gate_statistics([FeatureChange(1, 1, True, 0.9, 0.9, 0.9)]), GateConfig())
    bad = judge(gate_statistics([FeatureChange(1, None, False, 0.9, None, 0.0)]), GateConfig())
    records = [good.record("L0H0"), bad.record("L0H1")]
    text = gate_markdown(records)
    lines = text.splitlines()
    assert lines[0] == "**rulecheck gate: FAILED** (1 of 2 heads pass)"
    assert lines[2] == "| head | gate | reidentified | holding | f1_change | fresh | inputs |"
    assert lines[4] == (
        "| L0H0 | pass | 1.000 | 1.000 >= 0.385 | 0.000 >= -0.25 | 1.000 >= 0.5 | 1.000 >= 0.45 |"
    )
    assert lines[5] == "| L0H1 | FAIL | 0.000 | 0.000 < 0.385 | n/a | 0.000 < 0.5 | 1.000 >= 0.45 |"
    assert lines[-1] == f"- L0H1: {bad.reason()}"
    console = Console(width=100, record=True)
    print_gate(records, console)
    shown = console.export_text()
    assert "rulecheck gate: FAILED (1 of 2 heads pass)" in shown.splitlines()[0]
    assert f"L0H1: gate failed: {bad.reason()}" in shown


def test_an_input_sae_that_lost_the_books_inputs_fails_on_them_alone() -> None:
    """Claims checked by their tokens can hold on an unchanged output feature while the new
    input SAE has none of the features they name: ``inputs`` fails the book."""
    changes = [FeatureChange(i, i, True, 0.9, 0.9, 0.9) for i in range(5)]
    healthy = judge(gate_statistics(changes, (60, 100)), GateConfig())
    assert healthy.passed and healthy.statistics.inputs == 0.6
    broken = judge(gate_statistics(changes, (2, 100)), GateConfig())
    assert not broken.passed
    assert broken.reason() == (
        "inputs 0.020 < 0.45 (by 0.430): 2 of the 100 input features the rules name have a "
        "confident partner in the new input SAE; look at the new input SAE's matching "
        "(rulecheck match) and its training"
    )
    assert gate_statistics(changes).inputs == 1.0  # the input SAE did not change
