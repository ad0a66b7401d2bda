"""Checks run with the settings a rulebook was measured with, and never silently check
nothing: mapping files read before any work, non-finite weights named where they are, the
exemplar protocol recorded and used, relative paths read from the rulebook's directory."""

from __future__ import annotations

import pytest

from rulecheck.cli import main

pytest_plugins = ["pytester"]

BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    skipgrams:
      - {key: {tokens: [if]}, query: {tokens: [then]}}
    expect: {f1: 0.5}
"""

# a mapping file whose first pair has three values instead of six
BAD_MAPPING = """\
rulecheck_mapping: 1
old: planted:sae_out/L0H0
new: planted:sae_out/L0H0
hook: blocks.0.attn.hook_z
settings: {k: 8, threshold: 0.5, split_threshold: 0.7}
pairs:
  - [1, 2, 0.9]
lost: []
new_features: []
"""


def pytest_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:cacheprovider", *args)


@pytest.fixture
def planted_books(pytester: pytest.Pytester, monkeypatch, tmp_path) -> pytest.Pytester:
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makefile(".yaml", L0H0=BOOK)
    return pytester


def one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------- mapping files


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("maps/bad.yaml", "maps/bad.yaml:7: pairs[0]: expected [old, new, "),
        ("nowhere", "nowhere: --rulecheck-remap: no such file or directory"),
        ("maps", "maps: --rulecheck-remap: holds no mapping file"),
    ],
    ids=["bad-file", "missing", "empty-directory"],
)
def test_a_bad_mapping_is_refused_before_collection_though_no_sae_changed(
    planted_books: pytest.Pytester, where: str, message: str
) -> None:
    (planted_books.path / "maps").mkdir()
    if where.endswith(".yaml"):
        (planted_books.path / where).write_text(BAD_MAPPING)
    result = pytest_run(planted_books, f"--rulecheck-remap={where}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    escaped = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in message)
    result.stderr.fnmatch_lines([f"ERROR: *{escaped}*(fix: *"])
    assert "passed" not in result.stdout.str()


def test_remap_reads_a_bad_mapping_file_though_no_sae_changed(tmp_path, capsys) -> None:
    book, mapping, out = tmp_path / "L0H0.yaml", tmp_path / "bad.yaml", tmp_path / "out"
    book.write_text(BOOK)
    mapping.write_text(BAD_MAPPING)
    argv = ["remap", str(book), "--sae-out", "planted:sae_out/L{layer}H{head}"]
    assert main([*argv, "--mapping", str(mapping), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{mapping}:7: pairs[0]: expected [old, new, " in err and "(fix: " in err
    assert not out.exists()
