"""Rulebook format 2: the refs table, one-line rules, the shorthand and its quoting rule,
3 significant digits, measurements beside the book, and format 1 still loading."""

from __future__ import annotations

import json
import re
import statistics
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from rulecheck.book import FormatWarning, Rulebook, book_dict
from rulecheck.cli import main
from rulecheck.errors import InvalidRulebook
from rulecheck.kinds.absence import AbsenceRule
from rulecheck.kinds.counting import CountingRule
from rulecheck.kinds.skipgram import SkipGram
from rulecheck.refs import RefTable, ShorthandError, TokenRef, split_shorthand
from rulecheck.rulebook import (
    dump_rulebook,
    load_measured,
    load_rulebook,
    measured_path,
    parse_rulebook,
    save_rulebook,
)

ROOT = Path(__file__).resolve().parents[1]

BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: 3
refs:
  200: [po, lo]
  501: [' un', Un]
  858: ["\\n"]
features:
  - feature: 1
    source: extracted
    label: '[ un] ... [po]'
    skipgrams:
      - [501, 200]
      - [858, 200]
    absence:
      - '[#501] ... [#200] unless [#858]'
    counting:
      - count [#501] >= 2
    expect: {f1: 0.9, precision: 0.891, recall: 0.91}
  - feature: 7
    source: manual
    skipgrams:
      - '[if] ... [then]'
      - [858, ' then']
      - {key: {tokens: [if, If]}, query: 200}
      - '["[x]"] ... [ then]'
    absence:
      - '[if] ... [then] unless [unless]'
    counting:
      - count [games] < 6
      - count [x] decreasing
      - {key: {feature: 5, tokens: [a, b]}, direction: increasing, threshold_count: 3}
"""


def parsed(text: str = BOOK) -> Rulebook:
    return parse_rulebook(text, "L0H3.yaml")


def test_references_by_id_take_their_tokens_from_the_refs_table() -> None:
    book = parsed()
    f1 = book.feature(1)
    assert f1.skipgrams[0] == SkipGram(TokenRef(501, [" un", "Un"]), TokenRef(200, ["po", "lo"]))
    assert f1.skipgrams[1].key == TokenRef(858, ["\n"])
    assert f1.absence == [
        AbsenceRule(
            TokenRef(501, [" un", "Un"]), TokenRef(200, ["po", "lo"]), TokenRef(858, ["\n"])
        )
    ]
    assert f1.counting == [CountingRule(TokenRef(501, [" un", "Un"]), "increasing", 2)]


def test_shorthand_and_mixed_forms_read_as_the_long_form() -> None:
    f7 = parsed().feature(7)
    assert f7.skipgrams == [
        SkipGram(TokenRef(None, ["if"]), TokenRef(None, ["then"])),
        SkipGram(TokenRef(858, ["\n"]), TokenRef(None, [" then"])),
        SkipGram(TokenRef(None, ["if", "If"]), TokenRef(200, ["po", "lo"])),
        SkipGram(TokenRef(None, ["[x]"]), TokenRef(None, [" then"])),
    ]
    assert f7.absence[0].distractor == TokenRef(None, ["unless"])
    assert f7.counting == [
        CountingRule(TokenRef(None, ["games"]), "decreasing", 6),
        CountingRule(TokenRef(None, ["x"]), "decreasing", None),
        CountingRule(TokenRef(5, ["a", "b"]), "increasing", 3),
    ]


def test_written_form_is_canonical_and_reads_back_the_same() -> None:
    book = parsed()
    text = dump_rulebook(book)
    again = parse_rulebook(text, "L0H3.yaml")
    assert again.features == book.features
    assert dump_rulebook(again) == text
    data = yaml.safe_load(text)
    assert data["rulecheck"] == 2
    assert data["refs"] == {5: ["a", "b"], 200: ["po", "lo"], 501: [" un", "Un"], 858: ["\n"]}
    f1, f7 = data["features"]
    assert f1["skipgrams"] == [[501, 200], [858, 200]]
    assert f1["absence"] == ["[#501] ... [#200] unless [#858]"]
    assert f1["counting"] == ["count [#501] >= 2"]
    assert f7["skipgrams"] == [
        "[if] ... [then]",
        "[#858] ... [ then]",
        {"key": {"tokens": ["if", "If"]}, "query": 200},
        '["[x]"] ... [ then]',
    ]
    assert f7["counting"] == ["count [games] < 6", "count [x] decreasing", "count [#5] >= 3"]
    # one line a rule
    lines = text.splitlines()
    assert "      - [501, 200]" in lines and "      - count [#501] >= 2" in lines


def test_a_reference_whose_tokens_differ_from_the_table_is_written_long() -> None:
    text = BOOK.replace(
        "      - [858, 200]\n", "      - {key: {feature: 501, tokens: [x]}, query: 200}\n"
    )
    book = parsed(text)
    assert book.feature(1).skipgrams[1].key == TokenRef(501, ["x"])
    again = parse_rulebook(dump_rulebook(book), "L0H3.yaml")
    assert again.feature(1).skipgrams[1].key == TokenRef(501, ["x"])
    assert again.feature(1).skipgrams[0].key == TokenRef(501, [" un", "Un"])


_TOKENS = st.text(min_size=1, max_size=8) | st.sampled_from(
    ["[", "]", '"', "\\", "#12", " then", "\n", "\t", " ", "...", "unless", "count", "[#1]"]
)


@given(key=_TOKENS, query=_TOKENS, distractor=_TOKENS)
def test_quoting_rule_round_trips_any_token(key: str, query: str, distractor: str) -> None:
    table = RefTable()
    refs = [TokenRef(None, [t]) for t in (key, query, distractor)]
    text = "{} ... {} unless {}".format(*(table.bracket(r) for r in refs))
    words, got = split_shorthand(text)
    assert words == ["", "...", "unless", ""]
    assert got == refs


def test_bracket_forms() -> None:
    words, refs = split_shorthand('count [ then] >= 2 [#12] ["\\"]"]')
    assert refs == [TokenRef(None, [" then"]), TokenRef(12), TokenRef(None, ['"]'])]
    assert words == ["count", ">= 2", "", ""]
    with pytest.raises(ShorthandError, match="empty brackets"):
        split_shorthand("[] ... [x]")


# ---------------------------------------------------------------------------- errors

HEAD = "rulecheck: 2\nlayer: 0\nhead: 3\nfeatures:\n  - feature: 1\n    source: manual\n"

ERRORS = {
    "dots": (
        "    skipgrams:\n      - '[if] .. [then]'\n",
        8,
        "skipgrams[0]",
        '"[key] ... [query]"',
    ),
    "unclosed": (
        "    skipgrams:\n      - '[if] ... [then'\n",
        8,
        "skipgrams[0]",
        "a bracket holds",
    ),
    "empty": ("    skipgrams:\n      - '[] ... [then]'\n", 8, "skipgrams[0]", "name a token"),
    "bad_json": (
        "    skipgrams:\n      - '[\"\\x\"] ... [a]'\n",
        8,
        "skipgrams[0]",
        "JSON string",
    ),
    "three": ("    skipgrams:\n      - [1, 2, 3]\n", 8, "skipgrams[0]", "write [key, query]"),
    "null_ref": ("    skipgrams:\n      - [1, null]\n", 8, "skipgrams[0][1]", "input feature id"),
    "unles": (
        "    absence:\n      - '[a] ... [b] unles [c]'\n",
        8,
        "absence[0]",
        "unless [distractor]",
    ),
    "count_word": (
        "    counting:\n      - count [x] >= two\n",
        8,
        "counting[0]",
        "count [key] >= N",
    ),
    "count_bare": ("    counting:\n      - count [x]\n", 8, "counting[0]", "count [key] >= N"),
    "counts": ("    counting:\n      - counts [x] >= 2\n", 8, "counting[0]", "count [key] >= N"),
    "measured_key": (
        "    skipgrams:\n      - {key: 1, query: 2, attn_score: 0.5}\n",
        8,
        "skipgrams[0].attn_score",
        ".measured.json",
    ),
    "measured_block": ("    measured: {f1: 0.5}\n", 7, "features[0].measured", ".measured.json"),
    "spearman": ("    expect: {spearman: 0.5}\n", 7, "expect.spearman", "f1, precision and recall"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_malformed_format_2_names_file_line_field_and_fix(tmp_path: Path, case: str) -> None:
    body, line, field, fix = ERRORS[case]
    path = tmp_path / "L0H3.yaml"
    path.write_text(HEAD + body, encoding="utf-8")
    with pytest.raises(InvalidRulebook) as info:
        load_rulebook(path)
    error = info.value
    assert (error.file, error.line) == (str(path), line)
    assert error.field is not None and error.field.endswith(field)
    assert error.fix is not None and fix in error.fix + error.what
    assert "\n" not in str(error)


def test_bad_refs_table_key(tmp_path: Path) -> None:
    path = tmp_path / "L0H3.yaml"
    path.write_text("rulecheck: 2\nlayer: 0\nhead: 3\nrefs:\n  abc: [x]\nfeatures: []\n")
    with pytest.raises(InvalidRulebook, match=r"L0H3.yaml:5: refs.abc: keys are input feature ids"):
        load_rulebook(path)


def test_unquoted_shorthand_gets_a_hint_to_quote_it(tmp_path: Path) -> None:
    path = tmp_path / "L0H3.yaml"
    path.write_text(HEAD + "    skipgrams:\n      - [if] ... [then]\n", encoding="utf-8")
    with pytest.raises(InvalidRulebook) as info:
        load_rulebook(path)
    assert info.value.line == 8
    assert "quote" in (info.value.fix or "")


# ---------------------------------------------------------------------------- numbers

FLOAT = re.compile(r"(?<![\w.#\[])-?\d+\.\d+(?:e-?\d+)?")


def significant_digits(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0")) or 1


@pytest.mark.parametrize("path", sorted((ROOT / "rulebooks").rglob("*.yaml")), ids=str)
def test_shipped_books_are_format_2_with_three_significant_digits(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert yaml.safe_load(text.split("\nfeatures:", 1)[0])["rulecheck"] == 2  # the header
    assert text.startswith("# yaml-language-server: $schema=") or path.parent.name == "examples"
    for number in FLOAT.findall(text.split("\nfeatures:", 1)[-1]):
        assert significant_digits(number) <= 3, (path.name, number)


# ---------------------------------------------------------------------------- measurements


def v1_text() -> str:
    return (ROOT / "tests" / "data" / "format1_book.txt").read_text(encoding="utf-8")


def test_format_1_loads_with_a_warning_naming_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "L0H3.yaml"
    path.write_text(v1_text(), encoding="utf-8")
    with pytest.warns(FormatWarning, match=r"L0H3.yaml: rulebook format 1 .*rulecheck upgrade"):
        book = load_rulebook(path)
    assert book.schema == 1
    assert book.feature(94).skipgrams[0].attn_score == 0.132
    assert book.feature(94).measured["f1_by_terms"] == {4: 0.5, 8: 0.8}


def test_upgrade_rewrites_format_1_keeping_comments_and_moving_measurements(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "L0H3.yaml"
    path.write_text(v1_text(), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatWarning)
        before = load_rulebook(path)
    assert main(["upgrade", str(tmp_path)]) == 0
    assert "format 1 -> 2" in capsys.readouterr().out
    text = path.read_text(encoding="utf-8")
    assert "# a hand-written note that survives the upgrade" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", FormatWarning)
        after = load_rulebook(path)
    assert after.schema == 2
    for old, new in zip(before.features, after.features, strict=True):
        assert book_dict(Rulebook(layer=0, head=3, features=[old])) == book_dict(
            Rulebook(layer=0, head=3, features=[new])
        )
    measured = load_measured(path)
    assert measured[94]["f1_by_terms"] == {"4": 0.5, "8": 0.8}
    assert measured[94]["skipgrams"][0] == {
        "attn_score": 0.132,
        "value_score": 0.139,
        "importance": 0.021,
    }
    assert measured[94]["absence"][0]["drop"] == [0.41, 0.63, 0.71, 0.74]
    # a second upgrade changes nothing
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(["upgrade", str(path)]) == 0
    assert "already format 2" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_measurements_are_written_beside_the_book_not_in_it(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatWarning)
        book = parse_rulebook(v1_text())
    path = save_rulebook(book, tmp_path / "L0H3.yaml")
    text = path.read_text(encoding="utf-8")
    for word in ("attn_score", "value_score", "drop", "spearman", "f1_by_terms", "measured"):
        assert word not in text
    data = json.loads(measured_path(path).read_text(encoding="utf-8"))
    assert data["features"][0]["n_terms"] == 8
    assert measured_path(path).name == "L0H3.measured.json"


# ---------------------------------------------------------------------------- shipped books


def test_shipped_books_are_small_and_at_least_as_good_as_the_former_ones() -> None:
    """Every head's book <= 100 KB, the set <= 600 KB, and per layer a median test F1 on the
    paper's protocol (the one the format-1 books were measured on, without hard negatives) at
    least that of the format-1 books they replaced (numbers kept in the model card's
    builder)."""
    from rulecheck.build.train_tiny import FORMER_BOOKS

    books = sorted((ROOT / "rulebooks" / "rulecheck-tiny").glob("L*H*.yaml"))
    assert len(books) == 8
    sizes = {p.name: p.stat().st_size for p in books}
    assert max(sizes.values()) <= 100_000, sizes
    assert sum(sizes.values()) <= 600_000, sizes
    f1: dict[int, list[float]] = {}
    for path in books:
        book = load_rulebook(path, measurements=True)
        f1.setdefault(book.layer, []).extend(f.measured["protocol_f1"] for f in book.features)
    for layer, values in f1.items():
        assert statistics.median(values) >= FORMER_BOOKS[layer]["f1"][1], layer


def test_the_card_counts_the_shipped_books_rules_and_precisions() -> None:
    """The model card's census section is the one ``rulecheck.build.census`` writes from the
    shipped books, and its counts are the books' own."""
    from rulecheck.build.census import census, census_lines

    shipped = ROOT / "rulebooks" / "rulecheck-tiny"
    card = (ROOT / "rulecheck" / "zoo" / "tiny" / "MODEL_CARD.md").read_text()
    assert "\n".join(census_lines(shipped)).strip("\n") in card
    rows = census(shipped)
    for layer in (0, 1):
        books = [load_rulebook(p, measurements=True) for p in shipped.glob(f"L{layer}H*.yaml")]
        features = [f for b in books for f in b.features]
        assert rows[layer]["features"] == len(features)
        assert rows[layer]["absence"] == sum(bool(f.absence) for f in features)
        assert rows[layer]["counting"] == sum(bool(f.counting) for f in features)
        assert rows[layer]["bounded"] == sum(
            any(s.max_distance is not None for s in f.skipgrams) for f in features
        )
        assert rows[layer]["corpus_precision"] < rows[layer]["protocol_precision"]
