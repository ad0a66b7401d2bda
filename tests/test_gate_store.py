"""A gate's measurements kept in the cache: computed once for the sessions sharing it (pytest
workers, a run again with other thresholds), measured again when anything they depend on
changes, and a broken entry is a warning, never a wrong verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PLANTED_BOOK, at_once, permuted_copy

import rulecheck.gate
from rulecheck.config import GateConfig
from rulecheck.exemplar_store import CacheWarning
from rulecheck.gate import gate_verdict
from rulecheck.rulebook import parse_rulebook
from rulecheck.session import Workbench
from rulecheck.specs import Specs


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A permuted, slightly noisy copy of planted's L0H0 output SAE, as a spec."""
    root = tmp_path_factory.mktemp("retrained")
    permuted_copy("planted:sae_out/L0H0", root / "L0H0", seed=3, noise=0.01)
    return f"{root}/L{{layer}}H{{head}}"


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a book's features were measured before and after (not read)."""
    calls: list[int] = []
    real = rulecheck.gate.feature_changes

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rulecheck.gate, "feature_changes", counted)
    return calls


def verdict(cache: Path, sae_out: str, book: str = PLANTED_BOOK, **thresholds: float):
    bench = Workbench(device="cpu", cache_dir=cache, overrides=Specs(model=None, sae_out=sae_out))
    return gate_verdict(bench, parse_rulebook(book), "book.yaml", "auto", GateConfig(**thresholds))


def test_sessions_sharing_a_cache_measure_a_gate_once(tmp_path, retrained, measured):
    """Two sessions at once (pytest workers) measure the book once: one measures, the other
    waits and reads; a third judging by other thresholds reads it too, and judges anew."""
    got = at_once(lambda: verdict(tmp_path, retrained), lambda: verdict(tmp_path, retrained))
    assert len(measured) == 1
    assert got[0].statistics == got[1].statistics and got[0].passed == got[1].passed
    strict = verdict(tmp_path, retrained, holding=1.0, f1_change=1.0)
    assert len(measured) == 1
    assert strict.statistics == got[0].statistics and not strict.passed


def test_a_changed_book_or_sae_is_measured_again(tmp_path, retrained, measured):
    verdict(tmp_path, retrained)
    verdict(tmp_path, retrained, book=PLANTED_BOOK.replace("f1: 0.5", "f1: 0.6"))
    assert len(measured) == 2
    other = tmp_path / "other"
    permuted_copy("planted:sae_out/L0H0", other / "L0H0", seed=4, noise=0.01)
    verdict(tmp_path, f"{other}/L{{layer}}H{{head}}")
    assert len(measured) == 3


DAMAGES = {
    "missing": lambda e: e.update(changes=e["changes"][:0]),  # features missing
    "string": lambda e: e["changes"][0].update(after="0.9"),  # a number that is not one
    "field": lambda e: e["changes"][0].update(surprise=1),  # a field of another version
    "key": lambda e: e.update(key=e["key"].replace("cpu", "cuda")),  # copied from elsewhere
    "inputs": lambda e: e.update(inputs=[1]),
}


def test_a_broken_entry_is_a_warning_and_is_measured_again(tmp_path, retrained, measured):
    first = verdict(tmp_path, retrained)
    [path] = tmp_path.glob("gate-*.json")
    whole = path.read_text()
    for name, damage in DAMAGES.items():
        entry = json.loads(whole)
        damage(entry)
        path.write_text(json.dumps(entry))
        with pytest.warns(CacheWarning, match="unreadable gate cache entry"):
            assert verdict(tmp_path, retrained).statistics == first.statistics, name
    path.write_bytes(b"\xff not json")
    with pytest.warns(CacheWarning, match="unreadable gate cache entry"):
        assert verdict(tmp_path, retrained).statistics == first.statistics
    assert len(measured) == len(DAMAGES) + 2


def test_a_full_disk_under_the_gate_cache_is_a_warning_and_the_verdict_stands(
    tmp_path, retrained, monkeypatch
):
    import errno

    import rulecheck.gate_store

    first = verdict(tmp_path / "one", retrained)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rulecheck.gate_store, "atomic_write", full)
    with pytest.warns(CacheWarning, match="gate cache entry not written .No space left"):
        again = verdict(tmp_path / "two", retrained)
    assert again.statistics == first.statistics and again.passed == first.passed
    assert not list((tmp_path / "two").glob("gate-*.json"))


def test_the_diff_command_gates_through_the_cache_sessions_share(
    tmp_path, retrained, measured, capsys
):
    """``rulecheck diff --mapping auto`` gates through the exemplar cache Python and pytest
    share (``--cache``, else the default): a gate a session measured is read, not measured
    again."""
    from dataclasses import replace

    from rulecheck.cli import main
    from rulecheck.rulebook import dump_rulebook

    cache = tmp_path / "cache"
    first = verdict(cache, retrained)
    old, new = tmp_path / "old", tmp_path / "new"
    for directory, sae_out in ((old, None), (new, retrained.format(layer=0, head=0))):
        directory.mkdir()
        book = parse_rulebook(PLANTED_BOOK)
        book = book if sae_out is None else replace(book, sae_out=sae_out)
        (directory / "L0H0.yaml").write_text(dump_rulebook(book))
    code = main(["diff", str(old), str(new), "--mapping", "auto", "--cache", str(cache)])
    assert code == (0 if first.passed else 1)
    assert "rulecheck gate" in capsys.readouterr().out
    assert len(measured) == 1
