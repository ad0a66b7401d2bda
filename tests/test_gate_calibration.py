"""The retraining gate's calibration on rulecheck-tiny's L0H0: the recorded table behind the
model card and its default thresholds, and the broken kinds gated live, each failing with its
one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rulecheck.rulebook import load_rulebook
from rulecheck.session import Workbench
from rulecheck.specs import Specs

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "rulebooks" / "rulecheck-tiny"


def test_the_model_card_shows_the_calibration() -> None:
    """The card's gate section is the one written from ``calibration/gate.json``, whose
    thresholds are the defaults: every case got the verdict it was expected to get,
    identically in every run."""
    from dataclasses import asdict

    from rulecheck.build.calibration import CASES, gate_lines
    from rulecheck.config import GateConfig

    tiny = ROOT / "rulecheck/zoo/tiny"
    report = json.loads((tiny / "calibration/gate.json").read_text())
    card = (tiny / "MODEL_CARD.md").read_text()
    assert card.endswith("\n".join(gate_lines(report)) + "\n")
    assert report["thresholds"] == asdict(GateConfig())
    assert [c.name for c in CASES] == list(report["cases"])
    healthy = [c for c in CASES if c.healthy and not c.held_out]
    broken = [c for c in CASES if not c.healthy and not c.held_out]
    assert len(healthy) >= 3 and len(broken) >= 4
    for case in CASES:
        row = report["cases"][case.name]
        assert row["identical"] and len(row["exit"]) == report["reruns"] >= 5, case.name
        assert row["exit"] == [0 if case.healthy else 1] * report["reruns"], case.name
        assert row["passed"] == case.healthy, case.name


def test_the_calibration_command_writes_the_card_s_gate_section(tmp_path: Path) -> None:
    """``python -m rulecheck.build.calibration card``, as the model card names it, writes the
    card's gate section under ``--out`` from its ``calibration/gate.json``: a card without the
    section, given the shipped table, becomes the shipped card."""
    tiny = ROOT / "rulecheck/zoo/tiny"
    shipped = (tiny / "MODEL_CARD.md").read_text()
    (tmp_path / "calibration").mkdir()
    shutil.copy(tiny / "calibration/gate.json", tmp_path / "calibration/gate.json")
    (tmp_path / "MODEL_CARD.md").write_text(shipped.split("\n## The retraining gate\n")[0])
    argv = [sys.executable, "-m", "rulecheck.build.calibration", "card", "--out", str(tmp_path)]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "MODEL_CARD.md").read_text() == shipped


@pytest.fixture(scope="module")
def calibration_bench() -> Workbench:
    """One workbench for the calibration cases: the model, the shipped SAEs and the book's
    measurements on them are loaded and taken once; exemplars go to the run's cache (each entry
    keyed by the output SAE it was measured with), so the shipped SAEs' passes are shared with
    the shipped books' checks."""
    return Workbench()


# gated live here: a broken input SAE, beside the healthy input retrain below (``test_gate``
# gates the retrained input and output SAEs, an untrained and another head's output SAE end to
# end through pytest; the recorded table holds every case, each gated five times identically
# when ``python -m rulecheck.build.calibration`` recorded it)
LIVE = ("in-untrained",)


@pytest.mark.parametrize("name", LIVE)
def test_each_calibration_case_gets_its_verdict(calibration_bench: Workbench, name: str) -> None:
    """Gated live, each broken kind fails with its one line (and a healthy retrain passes),
    with the statistics the calibration recorded, within a tolerance of 0.03 across
    machines."""
    from rulecheck.build.calibration import CASES
    from rulecheck.gate import gate_verdict

    [case] = [c for c in CASES if c.name == name]
    recorded = json.loads((ROOT / "rulecheck/zoo/tiny/calibration/gate.json").read_text())
    bench = calibration_bench.with_overrides(Specs(sae_in=case.sae_in, sae_out=case.sae_out))
    path = SHIPPED / f"{case.book}.yaml"
    book = load_rulebook(path)
    bench.announce(book, str(path))
    verdict = gate_verdict(bench, book, str(path), "auto")
    assert verdict.passed == case.healthy
    record = verdict.record("L0H0")
    for stat, value in recorded["cases"][name]["statistics"].items():
        assert record["statistics"][stat]["value"] == pytest.approx(value, abs=0.03), stat
    if not case.healthy:
        reason = verdict.reason()
        assert "\n" not in reason and " < " in reason and "(by " in reason and "look at" in reason


def test_an_input_sae_retrained_alone_passes_the_gate(calibration_bench: Workbench) -> None:
    """The retrained input SAE with each head's own output SAE: L0H1's book (whose lost input
    features fall back on tokens, one of them shown with U+FFFD) passes, every feature
    re-identified."""
    from rulecheck.gate import gate_verdict

    path = SHIPPED / "L0H1.yaml"
    book = load_rulebook(path)
    bench = calibration_bench.with_overrides(
        Specs(sae_in="rulecheck-tiny:retrained/sae_in/L{layer}")
    )
    bench.announce(book, str(path))
    verdict = gate_verdict(bench, book, str(path), "auto")
    assert verdict.passed, verdict.reason()
    assert verdict.statistics.reidentified == 1.0 and (verdict.statistics.holding or 0) > 0.8
