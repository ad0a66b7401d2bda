"""Rulebook files: loading, validation errors, deterministic dumping, saving, merging, tables."""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from rulecheck.book import HEADER_KEYS, FeatureRules, Rulebook, merge_manual
from rulecheck.errors import RulecheckError
from rulecheck.kinds import refs_of
from rulecheck.kinds.absence import AbsenceRule
from rulecheck.kinds.base import STRENGTH_FLOOR
from rulecheck.kinds.counting import CountingRule
from rulecheck.kinds.skipgram import SkipGram
from rulecheck.refs import TokenRef
from rulecheck.report import print_rulebook, rulebook_table, summary_table
from rulecheck.rulebook import (
    dump_measured,
    dump_rulebook,
    is_rulebook_file,
    load_measured,
    load_rulebook,
    parse_rulebook,
    save_rulebook,
    write_rulebook,
)
from rulecheck.schema import dump, significant

EXAMPLE = """\
rulecheck: 1                      # schema version
model: rulecheck-tiny
sae_in: rulecheck-tiny:sae_in/L0
sae_out: rulecheck-tiny:sae_out/L0H3
corpus: rulecheck-tiny:eval
fingerprints: {model: "sha256:aa", sae_in: "sha256:bb", sae_out: "sha256:cc", corpus: "sha256:dd"}
layer: 0
head: 3
extraction: {method: weight, keys: 100, queries_per_key: 100, max_terms: 64, seed: 0, ln_scale: 0.93, rulecheck: 0.1.0}
features:
  - feature: 94
    source: extracted
    label: "[If] ... [ then]"
    skipgrams:
      - key: {feature: 1234, tokens: ["If", " If"]}
        query: {feature: 567, tokens: [" then"]}
        attn_score: 0.132
        value_score: 0.139
        importance: 0.021
    absence:
      - key: {feature: 1234, tokens: ["://"]}
        query: {feature: 567, tokens: ["com"]}
        distractor: {feature: 89, tokens: ["twitter"]}
        attn_score: 0.097
        value_score: -0.007
        drop: [0.41, 0.63, 0.71, 0.74]
    counting:
      - key: {feature: 77, tokens: [" games"]}
        direction: increasing
        threshold_count: 2
        spearman: 0.93
    expect: {f1: 0.72, precision: 0.70, recall: 0.65}
    measured: {f1: 0.80, precision: 0.78, recall: 0.83, spearman: 0.61, n_test: 100, n_terms: 8, f1_by_terms: {4: 0.5, 8: 0.8}}
"""

MINIMAL = """\
rulecheck: 1
layer: 0
head: 3
features:
  - feature: 94
    source: manual
    skipgrams:
      - key: {tokens: [If]}
        query: {tokens: [" then"]}
"""


def write(directory: Path, text: str | bytes, name: str = "L0H3.yaml") -> Path:
    path = directory / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(directory: Path, text: str | bytes, name: str = "L0H3.yaml") -> RulecheckError:
    path = write(directory, text, name)
    with pytest.raises(RulecheckError) as info:
        load_rulebook(path)
    assert info.value.file == str(path)
    return info.value


def example_rulebook() -> Rulebook:
    return parse_rulebook(EXAMPLE)


# ---------------------------------------------------------------------------- loading


def test_load_full_example(tmp_path: Path) -> None:
    book = load_rulebook(write(tmp_path, EXAMPLE))
    assert (book.layer, book.head, book.schema) == (0, 3, 1)
    assert book.sae_out == "rulecheck-tiny:sae_out/L0H3"
    assert book.fingerprints["corpus"] == "sha256:dd"
    assert book.extraction["rulecheck"] == "0.1.0"
    entry = book.feature(94)
    assert entry.skipgrams[0] == SkipGram(
        TokenRef(1234, ["If", " If"]), TokenRef(567, [" then"]), 0.132, 0.139, 0.021
    )
    assert entry.absence[0].distractor == TokenRef(89, ["twitter"])
    assert entry.absence[0].drop == [0.41, 0.63, 0.71, 0.74]
    assert entry.counting[0] == CountingRule(TokenRef(77, [" games"]), "increasing", 2, 0.93)
    assert entry.expect == {"f1": 0.72, "precision": 0.70, "recall": 0.65}
    assert entry.measured["f1_by_terms"] == {4: 0.5, 8: 0.8}


def test_load_manual_hypothesis_without_header(tmp_path: Path) -> None:
    book = load_rulebook(write(tmp_path, MINIMAL))
    assert book.model is None and book.fingerprints == {} and book.extraction == {}
    entry = book.features[0]
    assert entry.source == "manual" and entry.label == ""
    assert entry.skipgrams[0].key == TokenRef(None, ["If"])
    assert entry.skipgrams[0].attn_score is None
    assert entry.absence == [] and entry.counting == [] and entry.measured == {}


def test_empty_rule_lists_and_any_file_name(tmp_path: Path) -> None:
    text = MINIMAL.replace("    skipgrams:", "    absence: []\n    counting: []\n    skipgrams:")
    book = load_rulebook(write(tmp_path, text, "my_hypothesis.yaml"))
    assert book.features[0].absence == [] and book.features[0].counting == []


def test_exponent_without_dot_reads_as_float() -> None:
    book = parse_rulebook(MINIMAL + "        attn_score: 1e-05\n        value_score: 2E3\n")
    assert book.features[0].skipgrams[0].attn_score == 1e-05
    assert book.features[0].skipgrams[0].value_score == 2000.0


# ---------------------------------------------------------------------------- errors


def _replace(old: str, new: str, text: str = MINIMAL) -> str:
    assert old in text
    return text.replace(old, new, 1)


ERROR_CASES = [
    # id, text, line, field, part of what, part of fix
    ("top-level-list", "- a\n- b\n", 1, None, "top level must be a mapping", "rulecheck: 2"),
    ("top-level-scalar", "just text\n", 1, None, "top level must be a mapping", None),
    ("no-rulecheck-key", "layer: 0\nhead: 3\n", 1, None, "not a rulebook", "rulecheck: 2"),
    (
        "schema-3",
        _replace("rulecheck: 1", "rulecheck: 3"),
        1,
        "rulecheck",
        "version integer 3",
        "rulecheck: 2",
    ),
    (
        "schema-str",
        _replace("rulecheck: 1", "rulecheck: '1'"),
        1,
        "rulecheck",
        "version string",
        None,
    ),
    (
        "unknown-top-key",
        _replace("layer: 0\n", "layer: 0\nmodle: x\n"),
        3,
        "modle",
        "unknown key",
        "`model`",
    ),
    (
        "unknown-rule-key",
        _replace(
            'query: {tokens: [" then"]}', 'query: {tokens: [" then"]}\n        atn_score: 0.1'
        ),
        10,
        "features[0].skipgrams[0].atn_score",
        "unknown key",
        "`attn_score`",
    ),
    (
        "unknown-ref-key",
        _replace("key: {tokens: [If]}", "key: {featur: 3, tokens: [If]}"),
        8,
        "features[0].skipgrams[0].key.featur",
        "unknown key",
        "`feature`",
    ),
    (
        "layer-string",
        _replace("layer: 0", 'layer: "zero"'),
        2,
        "layer",
        "expected an integer, got string 'zero'",
        None,
    ),
    ("head-bool", _replace("head: 3", "head: true"), 3, "head", "got boolean true", None),
    (
        "feature-float",
        _replace("feature: 94", "feature: 1.5"),
        5,
        "features[0].feature",
        "got number 1.5",
        None,
    ),
    (
        "tokens-string",
        _replace("key: {tokens: [If]}", "key: {tokens: If}"),
        8,
        "features[0].skipgrams[0].key.tokens",
        "expected a list of strings, got string 'If'",
        '["If"]',
    ),
    (
        "token-int",
        _replace("key: {tokens: [If]}", "key: {tokens: [If, 1]}"),
        8,
        "features[0].skipgrams[0].key.tokens[1]",
        "expected a string, got integer 1",
        "quotes",
    ),
    (
        "token-date",
        _replace("key: {tokens: [If]}", "key: {tokens: [2024-01-01]}"),
        8,
        "features[0].skipgrams[0].key.tokens[0]",
        "unsupported date",
        "quotes",
    ),
    (
        "missing-layer",
        _replace("layer: 0\n", ""),
        1,
        "layer",
        "missing required field `layer`",
        "layer: N",
    ),
    ("missing-head", _replace("head: 3\n", ""), 1, "head", "missing required field `head`", None),
    (
        "missing-feature",
        _replace("  - feature: 94\n    source: manual\n", "  - source: manual\n"),
        5,
        "features[0].feature",
        "missing required field `feature`",
        None,
    ),
    (
        "missing-source",
        _replace("    source: manual\n", ""),
        5,
        "features[0].source",
        "missing required field `source`",
        "source: manual",
    ),
    (
        "missing-key",
        _replace("      - key: {tokens: [If]}\n        query", "      - query"),
        8,
        "features[0].skipgrams[0].key",
        "missing required field `key`",
        None,
    ),
    (
        "missing-query",
        _replace('        query: {tokens: [" then"]}\n', ""),
        8,
        "features[0].skipgrams[0].query",
        "missing required field `query`",
        None,
    ),
    ("negative-layer", _replace("layer: 0", "layer: -1"), 2, "layer", "must be >= 0, got -1", None),
    (
        "negative-ref-feature",
        _replace("key: {tokens: [If]}", "key: {feature: -5}"),
        8,
        "features[0].skipgrams[0].key.feature",
        "must be >= 0",
        None,
    ),
    (
        "empty-ref",
        _replace("key: {tokens: [If]}", "key: {tokens: []}"),
        8,
        "features[0].skipgrams[0].key",
        "needs `feature` or `tokens`",
        "tokens:",
    ),
    (
        "ref-not-a-reference",
        _replace("key: {tokens: [If]}", "key: [If]"),
        8,
        "features[0].skipgrams[0].key",
        "expected a mapping, got a list",
        None,
    ),
    (
        "bad-source",
        _replace("source: manual", "source: hand"),
        6,
        "features[0].source",
        "must be extracted or manual",
        None,
    ),
    (
        "bad-direction",
        MINIMAL + "    counting:\n      - key: {feature: 7}\n        direction: up\n",
        12,
        "features[0].counting[0].direction",
        "must be increasing or decreasing, got string 'up'",
        None,
    ),
    (
        "expect-out-of-range",
        MINIMAL + "    expect: {f1: 1.5}\n",
        10,
        "features[0].expect.f1",
        "must be in [0, 1], got 1.5",
        None,
    ),
    (
        "expect-spearman-range",
        MINIMAL + "    expect: {spearman: -2}\n",
        10,
        "features[0].expect.spearman",
        "must be in [-1, 1]",
        None,
    ),
    (
        "expect-unknown-metric",
        MINIMAL + "    expect:\n      f2: 0.5\n",
        11,
        "features[0].expect.f2",
        "unknown key",
        "`f1`",
    ),
    (
        "duplicate-feature",
        MINIMAL + "  - feature: 94\n    source: extracted\n",
        10,
        "features[1].feature",
        "duplicate feature id 94 (first at line 5)",
        None,
    ),
    (
        "duplicate-key",
        _replace("head: 3\n", "head: 3\nhead: 4\n"),
        4,
        "head",
        "duplicate key (first at line 3)",
        None,
    ),
    (
        "fingerprint-key",
        _replace("layer: 0\n", "layer: 0\nfingerprints:\n  sae: sha256:00\n"),
        4,
        "fingerprints.sae",
        "unknown key",
        "`sae_in`",
    ),
    (
        "score-not-number",
        MINIMAL + "        attn_score: high\n",
        10,
        "features[0].skipgrams[0].attn_score",
        "expected a number",
        None,
    ),
    (
        "score-infinite",
        MINIMAL + "        attn_score: .inf\n",
        10,
        "features[0].skipgrams[0].attn_score",
        "finite",
        None,
    ),
    (
        "skipgrams-not-list",
        _replace(MINIMAL[MINIMAL.index("    skipgrams:") :], "    skipgrams: 3\n"),
        7,
        "features[0].skipgrams",
        "expected a list of rules",
        None,
    ),
    (  # a list item on the list's line: the line of the list
        "flow-item",
        MINIMAL + "      - [12, true]\n",
        10,
        "features[0].skipgrams[1][1]",
        "expected a reference",
        None,
    ),
    (  # a list item on a line of its own: its line
        "flow-item-own-line",
        MINIMAL + "      - [12,\n         true]\n",
        11,
        "features[0].skipgrams[1][1]",
        "expected a reference",
        None,
    ),
    (
        "python-tag",
        MINIMAL + "    label: !!python/object/apply:os.system [ls]\n",
        10,
        "features[0].label",
        "unsupported YAML tag",
        None,
    ),
    ("merge-key", "rulecheck: 1\nbase: &b {layer: 0}\nx:\n  <<: *b\n", 4, "x", "merge keys", None),
    (
        "recursive-alias",
        "rulecheck: 1\nextraction: &x {a: *x}\n",
        2,
        "extraction.a",
        "recursive",
        None,
    ),
    (
        "bad-int-tag",
        _replace("layer: 0", "layer: !!int zero"),
        2,
        "layer",
        "cannot read value",
        None,
    ),
    ("layer-empty", _replace("layer: 0", "layer:"), 2, "layer", "required field", "layer: N"),
    (
        "source-empty",
        _replace("source: manual", "source:"),
        6,
        "features[0].source",
        "`source` is empty",
        "source: manual",
    ),
    ("syntax-error", _replace("head: 3", "head: [3"), 4, None, "not valid YAML", None),
    ("tab-indent", "rulecheck: 1\nlayer:\n\t- 0\n", 3, None, "not valid YAML", None),
    ("empty-file", "", 1, None, "empty file", "rulecheck: 2"),
    ("comment-only", "# nothing here\n\n", 1, None, "empty file", None),
    ("two-documents", "rulecheck: 1\n---\nlayer: 0\n", 2, None, "not valid YAML", None),
    (
        "min-drop-below-the-floor",
        MINIMAL + "    absence:\n      - {key: if, query: then, distractor: the, min_drop: 0.05}\n",
        11,
        "features[0].absence[0].min_drop",
        "min_drop 0.05 is below 0.1: a token with no effect measures about 0 and would pass",
        "state min_drop >= 0.1, or remove min_drop",
    ),
    (
        "drop-shorthand-below-the-floor",
        MINIMAL + '    absence:\n      - "[if] ... [then] unless [the] (drop >= 0.01)"\n',
        11,
        "features[0].absence[0].min_drop",
        "min_drop 0.01 is below 0.1",
        "remove min_drop",
    ),
    (
        "drop-shorthand-misspelt",
        MINIMAL + '    absence:\n      - "[if] ... [then] unless [the] (drops >= 0.3)"\n',
        11,
        "features[0].absence[0].min_drop",
        "cannot read '(drops >= 0.3)'",
        "(drop >= 0.3)",
    ),
    (
        "spearman-shorthand-above-1",
        MINIMAL + '    counting:\n      - "count [x] >= 2 (spearman >= 2)"\n',
        11,
        "features[0].counting[0].min_spearman",
        "min_spearman must be at most 1, got 2",
        None,
    ),
    ("not-utf8", b"rulecheck: 1\nlayer: \xff\n", 2, None, "not UTF-8", None),
    ("nul-char", "rulecheck: 1\nlayer: \x00\n", 2, None, "not valid YAML", None),
]


@pytest.mark.parametrize(
    ("text", "line", "field", "what", "fix"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_load_errors(
    tmp_path: Path, text: str | bytes, line: int, field: str | None, what: str, fix: str | None
) -> None:
    err = load_error(tmp_path, text)
    assert (err.line, err.field) == (line, field), str(err)
    assert what in err.what, str(err)
    assert err.fix, f"no fix: {err}"  # every error says how to correct it
    if fix is not None:
        assert fix in err.fix, str(err)
    assert str(err).startswith(f"{tmp_path / 'L0H3.yaml'}:{line}: {field + ': ' if field else ''}")
    assert "\n" not in str(err)


def test_reading_leaves_the_cycle_collector_as_it_was(tmp_path: Path) -> None:
    assert gc.isenabled()
    load_rulebook(write(tmp_path, MINIMAL))
    load_error(tmp_path, MINIMAL + "      - [12, true]\n")
    assert gc.isenabled()
    gc.disable()
    try:
        load_rulebook(write(tmp_path, MINIMAL))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError, match="no such file") as info:
        load_rulebook(tmp_path / "L0H3.yaml")
    assert info.value.file == str(tmp_path / "L0H3.yaml")


def test_directory_is_not_a_rulebook(tmp_path: Path) -> None:
    (tmp_path / "L0H3.yaml").mkdir()
    with pytest.raises(RulecheckError, match="directory"):
        load_rulebook(tmp_path / "L0H3.yaml")


def test_file_name_must_match_layer_and_head(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL, "L1H3.yaml")
    assert (err.line, err.field) == (2, "layer")
    assert "L1H3" in err.what and "L0H3.yaml" in (err.fix or "")
    err = load_error(tmp_path, MINIMAL, "L0H4.yml")
    assert (err.line, err.field) == (3, "head")


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    err = load_error(tmp_path, "rulecheck: 1\nextraction:\n  " + "\n  ".join(levels) + "\n")
    assert "too many YAML nodes" in err.what


def test_from_dict_validates_without_a_file() -> None:
    data = example_rulebook().to_dict()
    data["features"][0]["skipgrams"][0] = {"key": {"feature": True}, "query": 1}
    with pytest.raises(RulecheckError) as info:
        Rulebook.from_dict(data)
    assert info.value.file is None
    assert info.value.field == "features[0].skipgrams[0].key.feature"
    with pytest.raises(RulecheckError, match="needs `feature` or `tokens`"):
        TokenRef.from_dict({})
    with pytest.raises(RulecheckError, match="unknown key"):
        SkipGram.from_dict({"key": {"feature": 1}, "query": {"feature": 2}, "score": 1.0})


# ---------------------------------------------------------------------------- is_rulebook_file


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("L0H3.yaml", MINIMAL, True),
        ("hyp.yml", "# hand-written\n'rulecheck': 1\nlayer: 0\n", True),
        ("broken.yaml", "rulecheck: 1\nlayer: [0\n", True),
        ("ci.yaml", "name: ci\non: [push]\njobs: {}\n", False),
        ("nested.yaml", "tool:\n  rulecheck: 1\n", False),
        ("prefix.yaml", "rulecheck_version: 1\n", False),
        ("garbage.yaml", b"\xff\xfe\x00rulecheck\x00", False),
        ("L0H3.txt", MINIMAL, False),
    ],
)
def test_is_rulebook_file(tmp_path: Path, name: str, content: str | bytes, expected: bool) -> None:
    assert is_rulebook_file(write(tmp_path, content, name)) is expected


def test_is_rulebook_file_never_raises(tmp_path: Path) -> None:
    assert is_rulebook_file(tmp_path / "missing.yaml") is False
    (tmp_path / "dir.yaml").mkdir()
    assert is_rulebook_file(tmp_path / "dir.yaml") is False


# ---------------------------------------------------------------------------- dumping


def test_dump_format_is_fixed() -> None:
    book = Rulebook(
        layer=2,
        head=5,
        model="rulecheck-tiny",
        features=[
            FeatureRules(
                feature=7,
                source="extracted",
                label="[If] ... [ then]",
                skipgrams=[
                    SkipGram(
                        TokenRef(1234, ["If", " If"]),
                        TokenRef(None, [" then", "yes"]),
                        0.1234567,
                        1e-05,
                    ),
                    SkipGram(TokenRef(1234, ["If", " If"]), TokenRef(3, ["ü: x"])),
                ],
                absence=[
                    AbsenceRule(
                        TokenRef(1), TokenRef(2), TokenRef(3, ["ü: x"]), drop=[100000.0, -0.5]
                    )
                ],
                expect={"recall": 0.5, "f1": 0.7},
                measured={"n_test": 10, "f1": 0.8, "f1_by_terms": {8: 0.8, 4: 0.5}},
            )
        ],
    )
    assert dump_rulebook(book) == (
        "rulecheck: 2\n"
        "model: rulecheck-tiny\n"
        "layer: 2\n"
        "head: 5\n"
        "refs:\n"
        "  1: []\n"
        "  2: []\n"
        "  3: ['ü: x']\n"
        "  1234: [If, ' If']\n"
        "features:\n"
        "  - feature: 7\n"
        "    source: extracted\n"
        "    label: '[If] ... [ then]'\n"
        "    skipgrams:\n"
        "      - {key: 1234, query: {tokens: [' then', 'yes']}}\n"
        "      - [1234, 3]\n"
        "    absence:\n"
        "      - '[#1] ... [#2] unless [#3]'\n"
        "    expect: {f1: 0.7, recall: 0.5}\n"
    )
    assert dump_measured(book) == (
        '{"rulecheck": 2, "layer": 2, "head": 5, "features": [\n'
        '{"feature": 7, "f1": 0.8, "n_test": 10, "f1_by_terms": {"4": 0.5, "8": 0.8}, '
        '"skipgrams": [{"attn_score": 0.1234567, "value_score": 1e-05}, {}], '
        '"absence": [{"drop": [100000.0, -0.5]}]}\n'
        "]}\n"
    )


def test_dump_is_independent_of_dict_order() -> None:
    one = example_rulebook()
    two = example_rulebook()
    two.extraction = dict(reversed(two.extraction.items()))
    two.features[0].measured = dict(reversed(two.features[0].measured.items()))
    two.features[0].expect = dict(reversed(two.features[0].expect.items()))
    assert dump_rulebook(one) == dump_rulebook(two)


def test_shared_lists_are_not_written_as_aliases() -> None:
    tokens = ["If"]
    book = Rulebook(
        layer=0,
        head=0,
        features=[
            FeatureRules(
                1, "manual", skipgrams=[SkipGram(TokenRef(None, tokens), TokenRef(None, tokens))]
            )
        ],
    )
    text = dump_rulebook(book)
    assert "&" not in text and "*" not in text
    assert parse_rulebook(text) == book


def test_save_then_load_example(tmp_path: Path) -> None:
    book = example_rulebook()
    path = save_rulebook(book, tmp_path / "out" / "L0H3.yaml")
    assert path == tmp_path / "out" / "L0H3.yaml"
    assert path.read_text(encoding="utf-8").split("\n", 1)[1] == dump_rulebook(book)
    assert path.read_text(encoding="utf-8").startswith("# yaml-language-server: $schema=")
    assert load_rulebook(path).to_dict() == book.to_dict()
    assert sorted(p.name for p in path.parent.iterdir()) == ["L0H3.measured.json", "L0H3.yaml"]
    assert load_measured(path)[94]["n_terms"] == 8


# ---------------------------------------------------------------------------- properties

_numbers = st.floats(allow_nan=False, allow_infinity=False).map(significant)
_unit = st.floats(0.0, 1.0).map(significant)
_scores = st.none() | _numbers
_ids = st.integers(0, 2**24)
_tokens = st.lists(st.text(max_size=6), max_size=3)
_refs = st.builds(TokenRef, feature=_ids, tokens=_tokens) | st.builds(
    TokenRef, feature=st.none(), tokens=st.lists(st.text(max_size=6), min_size=1, max_size=3)
)
_skipgrams = st.builds(SkipGram, _refs, _refs, _scores, _scores, _scores)
_strengths = (
    st.none() | st.floats(STRENGTH_FLOOR, 1.0) | st.sampled_from([STRENGTH_FLOOR, 1.0, 0.3])
)
_absences = st.builds(
    AbsenceRule,
    _refs,
    _refs,
    _refs,
    _scores,
    _scores,
    st.lists(_numbers, max_size=4),
    min_drop=_strengths,
)
_countings = st.builds(
    CountingRule,
    _refs,
    st.sampled_from(["increasing", "decreasing"]),
    st.none() | st.integers(0, 50),
    st.none() | st.floats(-1.0, 1.0).map(significant),
    min_spearman=_strengths,
)
_expects = st.fixed_dictionaries(
    {},
    optional={
        "f1": _unit,
        "precision": _unit,
        "recall": _unit,
        "spearman": st.floats(-1.0, 1.0).map(significant),
    },
)
_measured = st.fixed_dictionaries(
    {},
    optional={
        "f1": _unit,
        "recall": st.none() | _unit,
        "n_test": st.integers(0, 10**6),
        "f1_by_terms": st.dictionaries(st.integers(0, 64), _unit, max_size=3),
        "note": st.text(max_size=10),
    },
)
_plain = st.none() | st.booleans() | st.integers() | _numbers | st.text(max_size=10)
_features = st.builds(
    FeatureRules,
    feature=_ids,
    source=st.sampled_from(["extracted", "manual"]),
    label=st.text(max_size=20),
    skipgrams=st.lists(_skipgrams, max_size=3),
    absence=st.lists(_absences, max_size=2),
    counting=st.lists(_countings, max_size=2),
    expect=_expects,
    measured=_measured,
)
_rulebooks = st.builds(
    Rulebook,
    layer=st.integers(0, 64),
    head=st.integers(0, 64),
    features=st.lists(_features, max_size=3, unique_by=lambda f: f.feature),
    model=st.none() | st.text(max_size=12),
    sae_in=st.none() | st.text(max_size=12),
    sae_out=st.none() | st.text(max_size=12),
    corpus=st.none() | st.text(max_size=12),
    fingerprints=st.fixed_dictionaries({}, optional={k: st.text(max_size=12) for k in HEADER_KEYS}),
    extraction=st.dictionaries(st.text(max_size=8), _plain, max_size=4),
)


def stated(claim: object) -> dict[str, object]:
    """What a claim states besides its references (measurements left out)."""
    refs = {name for name in dump(claim) if isinstance(getattr(claim, name, None), TokenRef)}
    return {k: v for k, v in dump(claim, measured=False).items() if k not in refs}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(book=_rulebooks)
def test_round_trip_property(book: Rulebook, tmp_path_factory: pytest.TempPathFactory) -> None:
    """What a book holds survives writing and reading; writing what was read changes nothing.
    (An id written short takes its tokens from the refs table, so the first reading may fill
    tokens in; after that the book is a fixed point.)"""
    text = dump_rulebook(book)
    again = parse_rulebook(text)
    assert dump_rulebook(again) == text
    assert Rulebook.from_dict(again.to_dict()).to_dict() == again.to_dict()
    for old, new in zip(book.features, again.features, strict=True):
        assert (new.feature, new.source, new.label, new.xfail) == (
            old.feature,
            old.source,
            old.label,
            old.xfail,
        )
        assert new.expect == {m: v for m, v in old.expect.items() if m != "spearman"}
        for key, claims in old.claims.items():
            assert len(new.claims[key]) == len(claims)
            for was, now in zip(claims, new.claims[key], strict=True):
                for ref, got in zip(refs_of(was), refs_of(now), strict=True):
                    assert got.feature == ref.feature
                    assert got.tokens == ref.tokens or (ref.feature is not None and not ref.tokens)
                assert stated(now) == stated(was)  # direction, strength, ... as they were
    path = save_rulebook(book, tmp_path_factory.mktemp("rt") / f"{book.name}.yaml")
    assert load_rulebook(path).to_dict() == again.to_dict()
    assert dump_rulebook(load_rulebook(path), path.read_text(encoding="utf-8")) == path.read_text(
        encoding="utf-8"
    )


# ---------------------------------------------------------------------------- fuzzing

_fuzz_settings = settings(
    max_examples=int(os.environ.get("RULECHECK_FUZZ_EXAMPLES", "150")),  # make fuzz: 10,000
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# YAML fragments to splice into rulebooks (a table: one fragment per line would take 33 lines)
_yaml_bits = st.sampled_from(
    [":", "- ", "[", "]", "{", "}", ",", "#", "&a ", "*a", "!!", "!!float ", "|", ">", "'", '"', "\n", "\t",
     "  ", "? ", "---", "...", "%YAML 1.1\n", "~", "null", "true", "-1", "1.5", "1e400", "<<: ", "\\", "é", "\x85"]
)  # fmt: skip


def _expect_only_rulecheck_errors(path: Path) -> None:
    try:
        book = load_rulebook(path)
    except RulecheckError as err:
        assert str(err).startswith(str(path))
        return
    again = parse_rulebook(dump_rulebook(book))
    assert dump_rulebook(again) == dump_rulebook(book)


@_fuzz_settings
@given(text=st.text(max_size=300))
def test_fuzz_random_text(tmp_path: Path, text: str) -> None:
    _expect_only_rulecheck_errors(write(tmp_path, text.encode("utf-8", "surrogatepass")))


@_fuzz_settings
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes) -> None:
    _expect_only_rulecheck_errors(write(tmp_path, data))


@st.composite
def _mutations(draw: st.DrawFn) -> str:
    text = EXAMPLE
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 12)))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "line"]))
        if kind == "delete":
            text = text[:start] + text[end:]
        elif kind == "line":
            lines = text.splitlines(keepends=True)
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines.insert(j, lines[i])
            text = "".join(lines)
        else:
            bit = draw(_yaml_bits | st.text(max_size=4))
            text = text[:start] + bit + text[end if kind == "replace" else start :]
    return text


@_fuzz_settings
@given(text=_mutations())
def test_fuzz_mutated_rulebook(tmp_path: Path, text: str) -> None:
    _expect_only_rulecheck_errors(write(tmp_path, text.encode("utf-8", "surrogatepass")))


def _readings(text: str) -> tuple[object, object]:
    """What the parser-event reading and the node walk make of ``text``: ``(values, lines,
    key lines)`` each, or None where that reading refuses the text."""
    from rulecheck import yamlread as rb
    from rulecheck.schema import Where

    def events() -> object:
        where, loader = Where(), rb._FastLoader(text)
        try:
            return rb._Events(loader, where).document(), where.lines, where.key_lines
        except (rb._Bail, yaml.YAMLError, RecursionError):
            return None
        finally:
            loader.dispose()

    def walk() -> object:
        where = Where()
        try:
            return rb._Walk(where).value(rb._compose(text, "x"), ""), where.lines, where.key_lines
        except RulecheckError:
            return None

    return events(), walk()


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "rulebooks").rglob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_books_are_read_from_parser_events_as_the_walk_reads_them(path: Path) -> None:
    fast, walked = _readings(path.read_text(encoding="utf-8"))
    assert fast is not None  # nothing in a book needs the node tree
    assert fast == walked


@_fuzz_settings
@given(text=_mutations() | st.text(max_size=300))
def test_fuzz_parser_events_read_what_the_walk_reads(text: str) -> None:
    """Where the event reading takes a text, values and every line are the walk's; where it
    does not, the walk reads it (and reports its errors)."""
    fast, walked = _readings(text)
    if fast is not None:
        assert fast == walked


# ---------------------------------------------------------------------------- saving


def test_save_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, EXAMPLE)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    changed = example_rulebook()
    changed.features[0].label = "changed"
    with pytest.raises(OSError, match="No space left"):
        save_rulebook(changed, path)
    assert path.read_text(encoding="utf-8") == EXAMPLE
    assert [p.name for p in tmp_path.iterdir()] == ["L0H3.yaml"]


def test_save_keeps_mode_of_existing_file(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    path.chmod(0o640)
    save_rulebook(example_rulebook(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    fresh = save_rulebook(example_rulebook(), tmp_path / "new" / "L0H3.yaml")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask


def test_save_refuses_a_name_for_another_head(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError, match=r"cannot be saved as L1H1\.yaml"):
        save_rulebook(example_rulebook(), tmp_path / "L1H1.yaml")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- regeneration


def _entry(feature: int, source: Literal["extracted", "manual"], label: str) -> FeatureRules:
    return FeatureRules(
        feature, source, label, skipgrams=[SkipGram(TokenRef(feature), TokenRef(None, ["x"]))]
    )


def test_merge_keeps_manual_entries() -> None:
    old = Rulebook(
        layer=0,
        head=3,
        features=[
            _entry(9, "manual", "old-9"),
            _entry(7, "extracted", "old-7"),
            _entry(5, "manual", "old-5"),
        ],
        model="m",
    )
    new = Rulebook(
        layer=0,
        head=3,
        features=[
            _entry(9, "extracted", "new-9"),
            _entry(7, "extracted", "new-7"),
            _entry(3, "extracted", "new-3"),
        ],
    )
    merged = merge_manual(new, old)
    assert [(f.feature, f.label) for f in merged.features] == [
        (3, "new-3"),
        (5, "old-5"),
        (7, "new-7"),
        (9, "old-9"),
    ]
    assert merged.feature(5) == old.feature(5)
    assert merged.model == "m"
    assert [f.feature for f in merge_manual(new, None).features] == [3, 7, 9]
    with pytest.raises(RulecheckError, match="cannot merge"):
        merge_manual(new, Rulebook(layer=1, head=3))


def test_write_rulebook_keeps_manual_entries_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "L0H3.yaml"
    old = Rulebook(
        layer=0, head=3, features=[_entry(5, "manual", "hand"), _entry(7, "extracted", "old-7")]
    )
    assert write_rulebook(old, path) == path
    new = Rulebook(
        layer=0, head=3, features=[_entry(5, "extracted", "auto"), _entry(8, "extracted", "new-8")]
    )
    write_rulebook(new, path)
    on_disk = load_rulebook(path)
    assert [(f.feature, f.source, f.label) for f in on_disk.features] == [
        (5, "manual", "hand"),
        (8, "extracted", "new-8"),
    ]


@pytest.mark.parametrize(
    "content",
    [MINIMAL.replace("layer: 0", "layer: x"), "name: ci\non: [push]\n", "rulecheck: 1\n  bad: [\n"],
)
def test_write_rulebook_never_overwrites_an_invalid_file(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(RulecheckError) as info:
        write_rulebook(Rulebook(layer=0, head=3, features=[_entry(1, "extracted", "x")]), path)
    assert info.value.file == str(path) and "left as it is" in (info.value.fix or "")
    assert path.read_text(encoding="utf-8") == content


# ---------------------------------------------------------------------------- report


def _render(renderable: object) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_rulebook_table_shows_each_feature() -> None:
    book = example_rulebook()
    terms = [
        SkipGram(TokenRef(1234), TokenRef(None, [f" q{i}"]), importance=i / 10) for i in range(5)
    ]
    book.features.append(
        FeatureRules(12, "manual", "[bold]not markup[/bold]", skipgrams=terms, expect={"f1": 0.4})
    )
    text = _render(rulebook_table(book))
    assert "94" in text and "12" in text and " ext " in text and "manual" in text
    assert '[If] ... [" then"]' in text  # the token's leading space shown
    assert "[bold]not markup[/bold]" in text
    assert '[f1234] ... [" q4"]' in text and '[f1234] ... [" q2"]' in text
    assert '[" q1"]' not in text and '[" q0"]' not in text
    row_94 = next(line for line in text.splitlines() if " 94 " in line)
    assert "0.80" in row_94 and "0.78" in row_94 and "0.83" in row_94 and "0.72" in row_94
    row_12 = next(line for line in text.splitlines() if " 12 " in line)
    assert "0.40" in row_12 and "0.80" not in row_12


def test_print_rulebook_prints_header_and_table(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    console = Console(record=True, width=200)
    book = print_rulebook(path, console)
    text = console.export_text()
    assert book == example_rulebook()
    for part in (
        "rulecheck-tiny",
        "rulecheck-tiny:sae_in/L0",
        "rulecheck-tiny:sae_out/L0H3",
        "layer 0, head 3",
    ):
        assert part in text
    assert "weight" in text and '[If] ... [" then"]' in text


def test_print_rulebook_reports_bad_files(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError):
        print_rulebook(write(tmp_path, "layer: 0\n"), Console(record=True, width=200))


def test_summary_table_has_a_row_per_head_and_all() -> None:
    def head(layer: int, h: int, f1s: list[float]) -> Rulebook:
        entries = [
            FeatureRules(i, "extracted", "", measured={"f1": f, "precision": 0.5, "recall": 0.25})
            for i, f in enumerate(f1s)
        ]
        return Rulebook(layer=layer, head=h, features=entries)

    text = _render(summary_table([head(1, 2, [0.9, 0.7]), head(0, 3, [0.1])]))
    lines = text.splitlines()
    l03 = next(i for i, line in enumerate(lines) if "L0H3" in line)
    l12 = next(i for i, line in enumerate(lines) if "L1H2" in line)
    assert l03 < l12
    assert "0.10" in lines[l03] and "0.80" in lines[l12]
    all_row = next(line for line in lines if "all" in line.split())
    assert "3" in all_row and "0.70" in all_row and "0.50" in all_row and "0.25" in all_row
