"""The round-trip writer: canonical fresh files, and updates that keep people's edits.

Hypothesis runs ``RULECHECK_FUZZ_EXAMPLES`` examples per property (default 50; ``make fuzz``
runs 10,000).
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rulecheck import roundtrip
from rulecheck.book import book_dict, measured_dict
from rulecheck.roundtrip import render
from rulecheck.roundtrip.emit import emit
from rulecheck.roundtrip.style import _build
from rulecheck.rulebook import load_rulebook
from rulecheck.schema import Block, Flow

EXAMPLES = int(os.environ.get("RULECHECK_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SHIPPED = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny"
HEADER = ("# yaml-language-server: $schema=../rulebook.schema.json", "# written by rulecheck")


def same(a: Any, b: Any) -> bool:
    """Equal plain values: floats by value (nan equals nan), no 1 == 1.0 == True, dict
    subclasses as dicts."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or len(a) != len(b):
            return False
        keys = {(type(k), k): k for k in b}
        return all((type(k), k) in keys and same(v, b[keys[type(k), k]]) for k, v in a.items())
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def changed_lines(before: str, after: str) -> list[str]:
    return [
        line
        for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


def book(*features: dict[str, Any], **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"rulecheck": 1, "model": "rulecheck-tiny", "layer": 0, "head": 2}
    out.update(top)
    out["features"] = list(features)
    return out


def feature(fid: int, f1: float = 0.9, label: str | None = None, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"feature": fid, "source": "extracted"}
    out["label"] = label if label is not None else f"[ un{fid}] ... [po]"
    out["skipgrams"] = [
        {
            "key": Flow({"feature": 501, "tokens": [" un", "Un", " Un"]}),
            "query": Flow({"feature": 200 + fid, "tokens": ["po", "lo"]}),
            "attn_score": 0.0768,
        }
    ]
    out["expect"] = Flow({"f1": f1, "precision": 0.891})
    out.update(more)
    return out


def full_merge(new: dict[str, Any], old_text: str, keep: Any = lambda item: False) -> str:
    """``render`` with every old item parsed by ruamel.yaml (no item cut out of the text)."""
    return roundtrip._merged(old_text, new, keep, "features", "feature", None)


def manual(item: Any) -> bool:
    return item.get("source") == "manual"


# ---------------------------------------------------------------------------- a fresh file


def test_a_fresh_file_is_written_in_the_canonical_style() -> None:
    new = book(
        feature(1, refs=Flow({501: [" un", "Un"]}), pairs=[[501, 200], [7]]),
        extraction={"tolerance": 0.05, "tiny": 1e-05, "seed": None, "on": True},
    )
    assert render(new, header=HEADER) == (
        "# yaml-language-server: $schema=../rulebook.schema.json\n"
        "# written by rulecheck\n"
        "rulecheck: 1\n"
        "model: rulecheck-tiny\n"
        "layer: 0\n"
        "head: 2\n"
        "extraction:\n"
        "  tolerance: 0.05\n"
        "  tiny: 1.0e-05\n"
        "  seed: null\n"
        "  'on': true\n"
        "features:\n"
        "  - feature: 1\n"
        "    source: extracted\n"
        "    label: '[ un1] ... [po]'\n"
        "    skipgrams:\n"
        "      - key: {feature: 501, tokens: [' un', Un, ' Un']}\n"
        "        query: {feature: 201, tokens: [po, lo]}\n"
        "        attn_score: 0.0768\n"
        "    expect: {f1: 0.9, precision: 0.891}\n"
        "    refs: {501: [' un', Un]}\n"
        "    pairs:\n"
        "      - [501, 200]\n"
        "      - [7]\n"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("Un", "Un"),
        ("a:b", "a:b"),
        (" un", "' un'"),
        ("trailing ", "'trailing '"),
        ("1", "'1'"),
        ("0.5", "'0.5'"),
        ("1e3", "'1e3'"),
        ("1e-05", "'1e-05'"),
        ("0o17", "'0o17'"),
        ("1:20", "'1:20'"),
        ("true", "'true'"),
        ("yes", "'yes'"),
        ("Off", "'Off'"),
        ("null", "'null'"),
        ("~", "'~'"),
        ("", "''"),
        ("-", "'-'"),
        ("...", "'...'"),
        ("---", "'---'"),
        ("=", "'='"),
        ("<<", "'<<'"),
        ("2001-12-14", "'2001-12-14'"),
        ("[if] ... [then]", "'[if] ... [then]'"),
        ("a: b", "'a: b'"),
        ("a #b", "'a #b'"),
        ("#", "'#'"),
        ("it's", "it's"),
        ("'q", '"\'q"'),  # a quote inside: double quotes, not a doubled one
        ('say "hi"', 'say "hi"'),
        ("é ü 日本 \U0001f600", "é ü 日本 \U0001f600"),
        ("a\nb", '"a\\nb"'),
        ("\n", '"\\n"'),
        ("a\rb", '"a\\rb"'),
        ("a\x85b", '"a\\Nb"'),
        ("a\u2028b", '"a\\Lb"'),
        ("a\u2029b", '"a\\Pb"'),
        ("tab\there", '"tab\\there"'),
        ("nul\x00", '"nul\\0"'),
    ],
)
def test_strings_are_plain_where_they_read_back_as_themselves(value: str, text: str) -> None:
    assert render({"s": value}) == f"s: {text}\n"
    in_flow = "'a:b'" if value == "a:b" else text  # PyYAML reads a:b in a flow as a key
    assert render({"s": [value]}) == f"s: [{in_flow}]\n"
    assert yaml.safe_load(render({"s": value, value: [value]})) == {"s": value, value: [value]}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.901, "0.901"),
        (0.05, "0.05"),
        (11.8, "11.8"),
        (1.0, "1.0"),
        (-0.0, "-0.0"),
        (1e-05, "1.0e-05"),
        (2.5e-07, "2.5e-07"),
        (1e16, "1.0e+16"),
        (1.5e20, "1.5e+20"),
        (5e-324, "5.0e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (float("nan"), ".nan"),
        (float("inf"), ".inf"),
        (float("-inf"), "-.inf"),
    ],
)
def test_floats_are_their_shortest_text_that_pyyaml_reads_as_a_float(
    value: float, text: str
) -> None:
    assert render({"x": value}) == f"x: {text}\n"
    back = yaml.safe_load(render({"x": value}))["x"]
    assert isinstance(back, float)
    assert same(back, value)


def test_scalars_other_than_strings() -> None:
    assert render({"a": 3, "b": -7, "c": True, "d": False, "e": None, 5: "five"}) == (
        "a: 3\nb: -7\nc: true\nd: false\ne: null\n5: five\n"
    )


def test_no_anchors_no_folding_and_one_final_newline() -> None:
    shared = [{"a": 1}]
    long = "word " * 400 + "end"
    text = render({"x": shared, "y": shared, "long": long, "tokens": [long]})
    assert "&" not in text and "*" not in text
    assert text.count("- a: 1") == 2
    assert len(text.splitlines()) == 6
    assert text.endswith(" end]\n") and not text.endswith("\n\n")


def test_equal_inputs_give_identical_text() -> None:
    a = book(feature(1), feature(2, f1=0.5))
    b = book(feature(1), feature(2, f1=0.5))
    assert render(a, header=HEADER) == render(b, header=HEADER)


@pytest.mark.parametrize(
    "new",
    [
        book(feature(1), feature(2, f1=0.05, refs=Flow({501: [" un", "Un"]}))),
        book(extraction={"tolerance": 1e-05, "nan": float("nan"), "seed": None}),
        {"a": [[1, [2, {"b": "c"}]], {"d": ["\n", "1", "[x]"]}], 7: Flow({"e": [Flow()]})},
        {"same": ["x"] * 3, "twice": [{"k": 1}] * 2},
    ],
)
def test_a_written_file_is_written_again_as_it_is(new: dict[Any, Any]) -> None:
    fresh = render(new, header=HEADER)
    assert render(new, fresh, header=HEADER) == fresh
    assert full_merge(new, fresh) == fresh  # also when ruamel.yaml parses all of it
    assert same(yaml.safe_load(fresh), new)


def test_empty_containers() -> None:
    assert render({}) == "{}\n"
    assert render({"a": [], "b": {}, "c": Flow()}) == "a: []\nb: {}\nc: {}\n"


# ---------------------------------------------------------------------------- generated documents

# fmt: off
_TRICKY = [
    "1", "-1", "0.5", ".5", "1e3", "1e-05", "0x1F", "0o17", "0b11", "1_000", "1:20", "true",
    "True", "yes", "No", "on", "OFF", "y", "n", "null", "Null", "~", "", " ", "-", "- x", "?",
    "? x", ":", ": x", "x:", ",", "...", "---", "=", "<<", "2001-12-14", "2001-12-14 21:59:43",
    ".", "._", ".nan", ".inf", "-.inf", "#", "a #b", "a: b", "a:b", "[if] ... [then]", "[",
    "]", "{x}", "'q'", '"d"', "it's", "@x", "`x", "%x", "!x", "&x", "*x", "|", ">", "\n",
    "a\nb", "a\n", "\r", "\r\n", "\t", "\x85", "\u2028", "\u2029", "\ufeff", "\x00", "\x7f",
    " lead", "trail ", "é", "日本", "\U0001f600", "\\", "\\n", "a  b", " \n ",
]
# fmt: on
TEXT = st.one_of(
    st.sampled_from(_TRICKY),
    st.text(max_size=10),
    st.text(alphabet=" #:-[]{}'\",\n\t.!&*?|>%@`~\\xy01", max_size=8),
)
FLOATS = st.one_of(
    st.floats(),
    st.sampled_from([1e-05, 2.5e-07, 1.5e20, 0.901, 11.8, -0.0, 5e-324, 1e16, 100.0]),
)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), FLOATS, TEXT)
KEYS = st.one_of(TEXT, st.integers(-1000, 1000))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    mappings = st.dictionaries(KEYS, children, max_size=4)
    return st.one_of(st.lists(children, max_size=4), mappings, mappings.map(Flow))


VALUES = st.recursive(SCALARS, _containers, max_leaves=16)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=6)

_ITEMS = st.builds(
    lambda fid, label, f1, source, extra: {
        "feature": fid,
        "source": source,
        "label": label,
        "expect": Flow({"f1": f1, "precision": 0.5}),
        **extra,
    },
    st.integers(0, 12),
    TEXT,
    st.sampled_from([0.9, 0.5, 0.123]),
    st.sampled_from(["extracted", "manual"]),
    st.dictionaries(st.sampled_from(["note", "skipgrams", "refs"]), VALUES, max_size=2),
)
BOOKS = st.builds(
    lambda top, items, extra: {
        **top,
        "features": sorted({i["feature"]: i for i in items}.values(), key=lambda i: i["feature"]),
        **extra,
    },
    st.fixed_dictionaries({"rulecheck": st.just(1), "layer": st.integers(0, 2)}),
    st.lists(_ITEMS, max_size=6),
    st.dictionaries(st.sampled_from(["extraction", "head", "zzz"]), VALUES, max_size=2),
)


@FUZZ
@given(DOCUMENTS)
def test_fuzz_documents_read_back_and_rewrite_to_themselves(new: dict[Any, Any]) -> None:
    fresh = render(new, header=HEADER)
    assert same(yaml.safe_load(fresh), new)
    assert render(new, fresh, header=HEADER) == fresh
    assert fresh == render(new, header=HEADER)


@FUZZ
@given(DOCUMENTS)
def test_fuzz_an_update_leaves_the_text_of_unchanged_values_as_it_was(
    new: dict[Any, Any],
) -> None:
    # a new last key goes after the rest, so all else must be written back exactly
    extra = "zz-extra-key"
    assume(extra not in new)
    grown = {**new, extra: [1, "two"]}
    old_text = render(new, header=HEADER)
    assert render(grown, old_text, header=HEADER) == render(grown, header=HEADER)
    assert full_merge(grown, old_text) == render(grown, header=HEADER)
    assert full_merge(new, old_text) == old_text


@FUZZ
@given(DOCUMENTS, DOCUMENTS)
def test_fuzz_an_update_reads_back_as_the_new_document(
    old: dict[Any, Any], new: dict[Any, Any]
) -> None:
    assert same(yaml.safe_load(render(new, render(old))), new)


def _expected_features(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[Any]:
    """The features an update gives, worked out the obvious way."""
    new_by_id = {i["feature"]: i for i in new}
    out = [
        item if manual(item) else new_by_id[item["feature"]]
        for item in old
        if manual(item) or item["feature"] in new_by_id
    ]
    placed = {i["feature"] for i in out}
    for item in new:
        if item["feature"] in placed:
            continue
        lower = [n for n, i in enumerate(out) if i["feature"] < item["feature"]]
        out.insert(lower[-1] + 1 if lower else 0, item)
    return out


@FUZZ
@given(BOOKS, BOOKS)
def test_fuzz_feature_updates(old: dict[str, Any], new: dict[str, Any]) -> None:
    old_text = render(old, header=HEADER)
    text = render(new, old_text, header=HEADER)
    assert same(yaml.safe_load(text), new)
    kept = render(new, old_text, header=HEADER, keep=manual)
    back = yaml.safe_load(kept)
    assert same(back["features"], _expected_features(old["features"], new["features"]))
    assert same(
        {k: v for k, v in back.items() if k != "features"},
        {k: v for k, v in new.items() if k != "features"},
    )
    # the text does not depend on which old items were parsed with ruamel.yaml
    assert kept == full_merge(new, old_text, keep=manual)
    for item in old["features"]:
        if manual(item):  # a kept item is the very text it was
            alone = render({"features": [item]}).split("\n", 1)[1]
            assert alone in kept


def _with_comments(text: str, data: st.DataObject) -> str:
    """``text`` with full-line and end-of-line comments added at drawn places."""
    lines = text.splitlines()
    out = []
    for number, line in enumerate(lines):
        if number > len(HEADER) and data.draw(st.booleans(), label=f"above line {number}"):
            indent = len(line) - len(line.lstrip(" "))
            blank = data.draw(st.booleans(), label="blank line first")
            out += [""] * blank + [" " * indent + f"# full {number}"]
        if data.draw(st.booleans(), label=f"after line {number}"):
            line += f"  # end {number}"
        out.append(line)
    return "".join(f"{line}\n" for line in out)


@FUZZ
@given(BOOKS, st.data())
def test_fuzz_comments_survive_insertions(old: dict[str, Any], data: st.DataObject) -> None:
    old_text = _with_comments(render(old, header=HEADER), data)
    assert same(yaml.safe_load(old_text), old)
    assert render(old, old_text, header=HEADER) == old_text
    assert full_merge(old, old_text) == old_text  # ruamel.yaml writes it back as it was
    free = sorted(set(range(13)) - {item["feature"] for item in old["features"]})
    added = data.draw(st.lists(st.sampled_from(free), unique=True, max_size=3), label="added")
    items = [*old["features"], *(feature(fid) for fid in added)]
    new = {**old, "features": sorted(items, key=lambda item: item["feature"]), "zz-new": 1}
    _renders_keeping_comments(new, old_text)


def _renders_keeping_comments(new: dict[str, Any], old_text: str) -> None:
    """``new`` written over ``old_text`` reads back as ``new``, is what a full ruamel.yaml
    merge writes, and keeps every comment ``_with_comments`` put in ``old_text``."""
    text = render(new, old_text, header=HEADER)
    assert same(yaml.safe_load(text), new)
    assert text == full_merge(new, old_text)
    comments = [line.split("#", 1)[1] for line in old_text.splitlines() if "# full" in line]
    comments += [line.rsplit("  #", 1)[1] for line in old_text.splitlines() if "  # end" in line]
    assert all(comment in text for comment in comments)


@FUZZ
@given(BOOKS, st.data())
def test_fuzz_changed_features_keep_their_comments(
    old: dict[str, Any], data: st.DataObject
) -> None:
    old_text = _with_comments(render(old, header=HEADER), data)
    new = {**old, "features": []}
    for item in old["features"]:
        if data.draw(st.booleans(), label=f"change feature {item['feature']}"):
            f1 = data.draw(st.sampled_from([0.25, 0.5, 0.9]), label="f1")
            item = {**item, "expect": Flow({**item["expect"], "f1": f1})}
            if data.draw(st.booleans(), label="and its label"):
                item["label"] = "changed"
        new["features"].append(item)
    _renders_keeping_comments(new, old_text)


@FUZZ
@given(BOOKS, BOOKS, st.data())
def test_fuzz_updates_of_commented_text_read_back(
    old: dict[str, Any], new: dict[str, Any], data: st.DataObject
) -> None:
    old_text = _with_comments(render(old, header=HEADER), data)
    text = render(new, old_text, header=HEADER)
    assert same(yaml.safe_load(text), new)
    assert text == full_merge(new, old_text)
    assert render(new, old_text, keep=manual) == full_merge(new, old_text, keep=manual)


# ---------------------------------------------------------------------------- updates by hand

HAND_EDITED = """\
# Rulebook for L0H2, regenerated by `rulecheck extract`; hand edits are kept.
# Second line of the top comment block.
layer: 0
rulecheck: 1
model: rulecheck-tiny   # the bundled model
head: 2
# how the features were found
extraction:
  seed: 0
  tolerance: 0.05
features:
  - feature: 1
    source: extracted
    label: '[ un1] ... [po]'
    expect: {f1: 0.9, precision: 0.891}   # measured 0.93
    skipgrams:
      - key: {feature: 501, tokens: [' un', Un, ' Un']}
        query: {feature: 201, tokens: [po, lo]}
        attn_score: 0.0768
  # feature 2 is the one that matters
  - feature: 2  # checked by hand
    source: extracted
    label: '[ un2] ... [po]'
    skipgrams:
      - key: {feature: 501, tokens: [' un', Un, ' Un']}
        query: {feature: 202, tokens: [po, lo]}
        attn_score: 0.0768
    expect: {f1: 0.9, precision: 0.891}
  - feature: 4
    source: manual
    # a rule written by hand
    label: "[://] ... [.]"
    skipgrams:
      - {key: {tokens: ["://"]}, query: {tokens: ["."]}}
    expect: {f1: 0.95, precision: 0.95, recall: 0.9}   # measured: 0.99, 1.00, 0.98
# the end of the features
"""
HAND_BOOK = book(
    feature(1),
    feature(2),
    {
        "feature": 4,
        "source": "manual",
        "label": "[://] ... [.]",
        "skipgrams": [Flow({"key": Flow({"tokens": ["://"]}), "query": Flow({"tokens": ["."]})})],
        "expect": Flow({"f1": 0.95, "precision": 0.95, "recall": 0.9}),
    },
    extraction={"seed": 0, "tolerance": 0.05},
)


def test_an_unchanged_document_is_left_as_it_is() -> None:
    assert yaml.safe_load(HAND_EDITED) == HAND_BOOK
    assert render(HAND_BOOK, HAND_EDITED, keep=manual) == HAND_EDITED


def test_comments_and_hand_ordered_keys_survive_changed_values() -> None:
    new = book(
        feature(1, f1=0.5, label="[ un1] ... [lo]"),
        feature(2, f1=0.7),
        {"feature": 4, "source": "manual", "label": "regenerated"},
        extraction={"seed": 1, "tolerance": 0.05},
    )
    new["model"] = "other"
    text = render(new, HAND_EDITED, keep=manual)
    # every comment, the hand order (layer first, expect before skipgrams) and the kept item
    # stay; only the lines of changed values change, their end-of-line comments in place
    assert changed_lines(HAND_EDITED, text) == [
        "-model: rulecheck-tiny   # the bundled model",
        "+model: other            # the bundled model",
        "-  seed: 0",
        "+  seed: 1",
        "-    label: '[ un1] ... [po]'",
        "-    expect: {f1: 0.9, precision: 0.891}   # measured 0.93",
        "+    label: '[ un1] ... [lo]'",
        "+    expect: {f1: 0.5, precision: 0.891}   # measured 0.93",
        "-    expect: {f1: 0.9, precision: 0.891}",
        "+    expect: {f1: 0.7, precision: 0.891}",
    ]


def test_changing_one_value_changes_one_line() -> None:
    old = render(book(*(feature(i) for i in range(1, 8))), header=HEADER)
    new = book(*(feature(i, f1=0.42 if i == 5 else 0.9) for i in range(1, 8)))
    assert changed_lines(old, render(new, old, header=HEADER)) == [
        "-    expect: {f1: 0.9, precision: 0.891}",
        "+    expect: {f1: 0.42, precision: 0.891}",
    ]
    assert changed_lines(HAND_EDITED, render({**HAND_BOOK, "head": 3}, HAND_EDITED)) == [
        "-head: 2",
        "+head: 3",
    ]


def test_a_kept_item_is_never_rewritten() -> None:
    start = HAND_EDITED.index("  - feature: 4")
    end = HAND_EDITED.index("# the end")
    kept_text = HAND_EDITED[start:end]
    new = book(feature(1), feature(2), {"feature": 4, "source": "manual", "label": "x"})
    assert kept_text in render(new, HAND_EDITED, keep=manual)
    # not in new at all: still kept
    text = render(book(feature(1), feature(2)), HAND_EDITED, keep=manual)
    assert kept_text in text
    # without keep, the same item is updated like any other
    text = render(new, HAND_EDITED)
    assert kept_text not in text
    assert "    # a rule written by hand\n    label: x\n" in text


def test_features_are_inserted_after_the_last_lower_id_and_deleted() -> None:
    old = HAND_EDITED.replace("  - feature: 1\n", "  - feature: 3\n", 1)  # ids 3, 2, 4
    start = old.index("  - feature: 3")
    item_3 = old[start : old.index("  # feature 2 is")]
    new = book(
        feature(0),
        feature(2),
        {**feature(1), "feature": 3},  # as it is in the old text
        {"feature": 4, "source": "manual"},
        feature(5),
        extraction={"seed": 0, "tolerance": 0.05},
    )
    text = render(new, old, keep=manual)
    ids = [line.split(":")[1].split()[0] for line in text.splitlines() if "- feature:" in line]
    assert ids == ["0", "3", "2", "4", "5"]  # 0 first (no lower id), 5 after 4
    assert item_3 in text
    assert "  # feature 2 is the one that matters\n  - feature: 2  # checked by hand\n" in text
    assert text.endswith("\n# the end of the features\n")  # after feature 5, as before
    # deleting the first feature keeps the comment that belongs to the second
    text = render(book(feature(2), extraction=new["extraction"]), HAND_EDITED)
    assert "features:\n  # feature 2 is the one that matters\n  - feature: 2  # checked" in text
    assert text.endswith("    expect: {f1: 0.9, precision: 0.891}\n# the end of the features\n")
    assert yaml.safe_load(text) == book(feature(2), extraction=new["extraction"])


def test_a_new_top_level_key_goes_after_its_predecessor_in_new() -> None:
    new = {**HAND_BOOK}
    new = {k: new[k] for k in ("rulecheck", "model", "layer", "head")}
    new |= {"corpus": "rulecheck-tiny:eval", "extraction": HAND_BOOK["extraction"]}
    new["features"] = HAND_BOOK["features"]
    new["zoo"] = 1
    text = render(new, HAND_EDITED)
    assert "head: 2\ncorpus: rulecheck-tiny:eval\n# how the features were found\n" in text
    assert text.endswith(
        "    expect: {f1: 0.95, precision: 0.95, recall: 0.9}   # measured: "
        "0.99, 1.00, 0.98\nzoo: 1\n# the end of the features\n"
    )
    first = render({"first": 0, **HAND_BOOK}, HAND_EDITED)
    assert first.startswith(HAND_EDITED.split("layer:")[0] + "first: 0\nlayer: 0\n")


def test_deleting_keys_keeps_the_comments_of_the_keys_after_them() -> None:
    old = """\
# top
a: 1
# about b
b:
  x: 1
  # about y
  y: 2
# about c
c: 3
# end
"""
    assert render({"b": {"x": 1, "y": 2}, "c": 3}, old) == old.replace("a: 1\n", "")
    assert render({"a": 1, "b": {"x": 1}, "c": 3}, old) == (
        "# top\na: 1\n# about b\nb:\n  x: 1\n  # about y\n# about c\nc: 3\n# end\n"
    )
    assert render({"a": 1, "b": {"y": 2}}, old) == (
        "# top\na: 1\n# about b\nb:\n  # about y\n  y: 2\n# about c\n# end\n"
    )
    # a comment inside a deleted value goes with it
    assert render({}, old) == "# top\n# about b\n# about c\n# end\n{}\n"


def test_the_modeline_is_added_once() -> None:
    old = "a: 1  # note\n"
    assert render({"a": 1}, old, header=HEADER) == "".join(f"{h}\n" for h in HEADER) + old
    assert render({"a": 1}, old, header=["# just a comment"]) == old
    with_modeline = render({"a": 1}, None, header=HEADER)
    assert render({"a": 2}, with_modeline, header=HEADER).count("yaml-language-server") == 1


@pytest.mark.parametrize("old", ["- 1\n- 2\n", "just text\n", "", "a: [\n", "a: 1\n---\nb: 2\n"])
def test_an_old_text_that_is_not_a_mapping_is_refused(old: str) -> None:
    with pytest.raises(ValueError):
        render({"a": 1}, old)


def test_unchanged_values_keep_their_hand_formatting() -> None:
    old = """\
rulecheck: 1
extraction:
  tolerance: 5.0e-2      # written by hand
  keys: 0x64
  note: "kept in double quotes"
  empty:
expect:
  f1: 0.90
  precision: .891
refs: {501: [' un', Un]}
"""
    plain = yaml.safe_load(old)
    assert render(plain, old) == old  # nothing changed: the very text
    new = {**plain, "rulecheck": 2}
    new["expect"] = Flow({"f1": 0.5, "precision": 0.891})
    new["refs"] = Flow({501: [" un", "Un"], 502: ["x"]})
    text = render(new, old)
    assert changed_lines(old, text) == [
        "-rulecheck: 1",
        "+rulecheck: 2",
        "-  empty:",
        "+  empty: null",  # ruamel.yaml cannot tell an empty null from a written one
        "-  f1: 0.90",  # a mapping written in block style stays in block style
        "+  f1: 0.5",
        "-refs: {501: [' un', Un]}",
        "+refs: {501: [' un', Un], 502: [x]}",
    ]
    assert yaml.safe_load(text) == new


def test_a_shipped_hand_written_rulebook_keeps_its_comments() -> None:
    from pathlib import Path

    path = Path(__file__).parents[1] / "rulebooks" / "examples" / "tiny_url.yaml"
    old = path.read_text()
    new = yaml.safe_load(old)
    new["features"][0]["expect"] = Flow({**new["features"][0]["expect"], "recall": 0.85})
    new["features"].append(feature(150))
    text = render(new, old)
    # one line changes (its end-of-line comment keeps its column), the new feature follows
    before, last_line, _ = old.rsplit("\n", 2)
    assert last_line.startswith("    expect: {f1: 0.95, precision: 0.95, recall: 0.9}   # ")
    last_line = last_line.replace("recall: 0.9}   #", "recall: 0.85}  #")
    added = render({"features": [feature(150)]}).split("\n", 1)[1]
    assert text == f"{before}\n{last_line}\n{added}"


@pytest.mark.parametrize(
    "text",
    [
        # comment lines above a flow item with an end-of-line comment
        "a:\n  - [b]\n  # above\n  - [a]  # end\n",
        "a:\n  - [b]\n  # above\n  - {a: 1}  # end\n",
        # comment lines after a list in a list
        "a:\n  -   - x\n      - [1]\n  # after\n  - b\n",
        "a:\n  - k:\n      -   - null\n          - []\n  # after\n  - b\n",
        # comment lines above a list whose first item is a flow collection
        "a:\n  # above\n  - {}\n  - a: 1\n    b: 2\n",
        "a:\n  # above\n  - {b: 1}  # end\n  - k: 1\n  - n  # end\n",
    ],
)
def test_ruamel_yaml_writes_these_comments_back_where_they_were(text: str) -> None:
    assert full_merge(yaml.safe_load(text), text) == text


def test_features_that_are_not_rewritten_are_copied_not_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = render(book(*(feature(i) for i in range(12))), header=HEADER)
    new = book(*(feature(i, f1=0.5 if i == 3 else 0.9) for i in range(12) if i != 1))
    parsed = []
    merged = roundtrip._merged
    monkeypatch.setattr(
        roundtrip, "_merged", lambda text, *a: parsed.append(text) or merged(text, *a)
    )
    text = render(new, old, header=HEADER)
    assert len(parsed) == 1  # no second try with the whole text
    assert text == full_merge(new, old)
    assert "feature: 3" in parsed[0] and "feature: 1\n" not in parsed[0]
    assert "feature: 10" not in parsed[0]
    assert "attn_score" not in parsed[0]  # nor feature 3's skipgrams, which did not change


def test_a_second_feature_with_the_same_id_is_written_too() -> None:
    old = render(book(feature(1), feature(3)))
    new = book(feature(1), feature(2, label="a"), feature(2, label="b"), feature(3, f1=0.5))
    new["features"].insert(1, feature(1, label="again"))
    text = render(new, old)
    assert yaml.safe_load(text) == new
    assert text == full_merge(new, old)


# ---------------------------------------------------------------------------- the direct writer

BLOCKS = st.recursive(
    SCALARS,
    lambda children: st.one_of(_containers(children), st.lists(children, max_size=4).map(Block)),
    max_leaves=16,
)


@FUZZ
@given(st.one_of(DOCUMENTS, BOOKS, st.dictionaries(KEYS, BLOCKS, max_size=6)))
def test_fuzz_the_direct_writer_writes_what_ruamel_yaml_writes(new: dict[Any, Any]) -> None:
    """A fresh file's text, written directly, is ruamel.yaml's text of the same document, byte
    for byte; a shape it leaves to ruamel.yaml is said (None)."""
    direct = emit(new)
    assert direct is None or direct == roundtrip._dump(_build(new))


@pytest.mark.parametrize("name", sorted(p.name for p in SHIPPED.glob("*.yaml")))
def test_shipped_books_and_measurements_are_written_directly(name: str) -> None:
    """Every shipped book of rulecheck-tiny takes the direct writer and gets ruamel.yaml's
    bytes from it; so do its measurements' values (written beside it as JSON, a larger document
    of the same shapes)."""
    book = load_rulebook(SHIPPED / name)
    for new in (book_dict(book), measured_dict(book)):
        direct = emit(new)
        assert direct is not None and direct == roundtrip._dump(_build(new))
        assert render(new) == direct


def test_shapes_left_to_ruamel_yaml_are_written_as_it_writes_them() -> None:
    """A block list right inside a block list (ruamel.yaml's ``-   - 1``) and a key too long to
    be a simple key are not written directly, and ``render`` writes them as ruamel.yaml does."""
    nested = {"k": [[1, [2, 3]], [4]]}
    long_key = {"k" * 130: 1}
    for new in (nested, long_key):
        assert emit(new) is None
        assert render(new) == roundtrip._dump(_build(new))
    assert render(nested) == "k:\n  -   - 1\n      - [2, 3]\n  - [4]\n"
