"""Running the plugin's items: a claim checked by its kind, on the book's own checkpoints or,
in a retraining gate run (``--rulecheck-remap``), translated into the retrained SAEs' ids,
where a claim that no longer holds is evidence (xfailed) and the book's gate item decides."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pytest

from rulecheck.errors import RulecheckError
from rulecheck.plugin.state import STASH_CHECK, head_name, relative, workbench


class ClaimItem(Protocol):
    """What running a claim needs of its item."""

    config: pytest.Config
    path: Path
    kind: Any
    index: int
    remapped_to: int | None

    @property
    def book(self) -> Any: ...

    @property
    def rules(self) -> Any: ...

    def record(self, values: dict[str, Any]) -> None: ...


def run_claim(item: ClaimItem) -> None:
    """Check ``item``'s claim under the protocol its book was measured with, and record the
    outcome; a failure raises its one-line error (in a gate run, a changed claim xfails)."""
    from rulecheck.errors import RuleFailed
    from rulecheck.kinds import CheckContext

    config = item.config
    bench = workbench(config).for_book(item.book)
    settings = config.stash[STASH_CHECK]
    file = str(item.path)
    if settings.remap:
        head, rules = _remapped(item, bench, file)
        item.remapped_to = rules.feature
    else:
        head, rules = bench.head_of(item.book, file), item.rules
        bench.check_fingerprints(item.book, head, file, settings.accept_changed)
    ctx = CheckContext(bench, head, file, tolerance=settings.tolerance, examples=settings.examples)
    try:
        record = item.kind.check(ctx, rules, item.index)
    except RulecheckError as failed:
        if rules is not item.rules:
            from rulecheck.gate import note_remapped

            note_remapped(failed, item.rules.feature, rules.feature)
        if isinstance(failed, RuleFailed):
            item.record({**failed.record, "message": relative(config, failed)})
        as_evidence(config, failed)
        raise
    item.record(record)


def _remapped(item: ClaimItem, bench, file: str) -> tuple[Any, Any]:
    """The retrained head and the feature's claims in its ids; a lost feature or a claim that
    does not translate is recorded and reported (xfailed as changed, or its error)."""
    from rulecheck.gate import gated, untranslatable

    settings = item.config.stash[STASH_CHECK]
    gate = gated(bench, item.book, file, settings.remap)
    bench.check_fingerprints(item.book, gate.old, file, settings.accept_changed)
    feature, key = item.rules.feature, item.kind.key
    translated = gate.remapped.rules(feature)
    if translated is None:
        item.record({"rule": key, "lost": True, "passed": False})
        changed(lost_reason(gate, gate.remapped.lost[feature]))
    if (translated.feature, key, item.index) in gate.remapped.untranslatable:
        item.record({"rule": key, "passed": False})
        try:
            untranslatable(gate, feature, key, item.index, file)
        except RulecheckError as lost:
            as_evidence(item.config, lost)
            raise
    return gate.new, translated


def run_lost(config: pytest.Config, book, rules, file: str) -> None:
    """A feature under a remapped book's ``lost:``: in a gate run, why it has no partner
    (xfailed); else it fails with one line, or skips within ``--rulecheck-allow-lost``."""
    from rulecheck.gate import gated, lost_verdict

    settings = config.stash[STASH_CHECK]
    if settings.remap:
        bench = workbench(config).for_book(book)
        gate = gated(bench, book, file, settings.remap)
        changed(lost_reason(gate, rules))
    pytest.skip(lost_verdict(book, rules, settings.allow_lost, file))


def run_gate(config: pytest.Config, book, file: str, keep: Callable[[dict], None]) -> None:
    """The head's verdict under the retrained SAEs, handed to ``keep`` as its item's record;
    a head that fails the gate raises ``GateFailed``."""
    from rulecheck.errors import GateFailed
    from rulecheck.gate import gate_verdict

    settings = config.stash[STASH_CHECK]
    bench = workbench(config).for_book(book)
    verdict = gate_verdict(
        bench, book, file, settings.remap, settings.gate, accept_changed=settings.accept_changed
    )
    keep(verdict.record(head_name(book)))
    if not verdict.passed:
        raise GateFailed(verdict.reason(), file=file, field="gate")


def lost_reason(gate, entry) -> str:
    """Why a feature of the book has no partner in the retrained SAE."""
    from rulecheck.gate import lost_reason

    return lost_reason(gate.remapped.book, entry, gate.specs["sae_out"], gate.threshold)


def changed(reason: str) -> NoReturn:
    """A claim that no longer holds under the retrained SAEs: evidence for the reviewer,
    reported as xfailed; the gate items decide the run."""
    pytest.xfail(f"changed under the retrained SAEs: {reason}")


def as_evidence(config: pytest.Config, error: RulecheckError) -> None:
    """In a gate run, a claim that does not hold (not bad input) is reported by ``changed``."""
    from rulecheck.errors import NotEligible, RemapLost, RuleFailed

    if config.stash[STASH_CHECK].remap and isinstance(error, RuleFailed | RemapLost | NotEligible):
        changed(relative(config, error))
