"""The shipped JSON Schema of rulebook format 2 (``rulecheck/schemas/rulebook.schema.json``):
a valid 2020-12 schema, that accepts the books the format allows and rejects, at the right
place, the ones it does not; whose shorthand patterns agree with a reference parser; and that
the modeline of a book points at it.

YAML reaches the validator as an editor hands it over: read by ``yaml.safe_load``'s loader
(plus YAML 1.2's ``1e-05`` floats, as rulecheck reads them), then every mapping key made
text. An integer key (``29:`` under ``refs``) becomes ``"29"``; a key of another type
becomes its JSON text (``true``, ``1.5``, ``null``), which ``refs``' ``propertyNames`` then
rejects; left as a bool or a float it would pass unchecked, since ``pattern`` ignores values
that are not strings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft7Validator, Draft202012Validator, ValidationError
from jsonschema.exceptions import best_match

import rulecheck.schemas
from rulecheck.schemas import MODELINE_PREFIX, SCHEMA_FILE, modeline

ROOT = Path(__file__).parents[1]
SHIPPED_SCHEMA = ROOT / "rulecheck" / "schemas" / "rulebook.schema.json"
BOOKS = sorted((ROOT / "rulebooks").rglob("*.yaml"))
EXAMPLES = int(os.environ.get("RULECHECK_FUZZ_EXAMPLES", "300"))

SCHEMA = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA)
# editors that validate as draft-07 (yaml-language-server before its 2020-12 support)
DRAFT_07 = Draft7Validator(SCHEMA)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: books are MiBs
    """``yaml.safe_load``'s loader, reading ``1e-05`` (no dot) as a float as YAML 1.2 (and
    rulecheck's reader, and editors) do."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def as_json(value: Any) -> Any:
    """``value`` as read from YAML, with every mapping key as text (see the module doc)."""
    if isinstance(value, dict):
        return {_key_text(k): as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)  # 29 -> "29", True -> "true", None -> "null"
    return str(key)


def load(text: str) -> Any:
    return as_json(yaml.load(textwrap.dedent(text), Loader=_Loader))


def book(features: str = "", top: str = "") -> str:
    """A minimal valid header, ``top`` keys and ``features`` (YAML of the list's items)."""
    text = "rulecheck: 2\nlayer: 0\nhead: 0\n" + textwrap.dedent(top)
    if features:
        text += "features:\n" + textwrap.indent(textwrap.dedent(features), "  ")
    return text


def errors(doc: Any) -> list[ValidationError]:
    return sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.absolute_path))


def show(errs: list[ValidationError]) -> str:
    return "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errs)


# ---------------------------------------------------------------------------- the schema


def test_the_schema_is_a_valid_2020_12_schema():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"] == "rulecheck-rulebook-2.schema.json"


def test_the_shipped_schema_is_what_the_schema_dataclasses_make():
    """``python -m rulecheck.schemas --check``, in a process of its own (only the built-in
    kinds registered), passes on the shipped file."""
    argv = [sys.executable, "-m", "rulecheck.schemas", "--check"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


def test_a_stale_schema_file_is_named_with_how_to_write_it_again(tmp_path, monkeypatch, capsys):
    from rulecheck.schemas import main

    stale = tmp_path / "rulebook.schema.json"
    stale.write_text(SHIPPED_SCHEMA.read_text(encoding="utf-8").replace("Minimum F1", "F1"))
    monkeypatch.setattr("rulecheck.schemas.SCHEMA_FILE", stale)
    assert main(["--check"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert str(stale) in line and "run `python -m rulecheck.schemas`" in line
    assert main([]) == 0
    assert stale.read_bytes() == SHIPPED_SCHEMA.read_bytes()
    assert main(["--check"]) == 0


def test_a_registered_kind_is_in_the_schema_made_with_it():
    """A kind a project registers gets its key under each feature, its long form (the claim's
    book fields) and the forms its ``json_forms`` gives: the project's own copy of the schema."""
    from dataclasses import dataclass

    from rulecheck import kinds, schema
    from rulecheck.kinds.base import shorthand_form, shorthand_pattern
    from rulecheck.refs import TokenRef, ref_entry
    from rulecheck.schemas import json_schema

    @dataclass
    class Prompt(schema.Record):
        text: str = schema.entry(schema.text, required=True, doc="The prompt.")
        token: TokenRef | None = ref_entry(default=None, doc="Where it fires.")
        score: float | None = schema.entry(schema.number(), default=None, measured=True)

    class Prompts(kinds.RuleKind):
        key, claim, item = "prompts", Prompt, "prompt"
        doc, rule_doc = "Prompts the feature fires on.", "One prompt."

        def json_forms(self):
            return [shorthand_form("Shorthand.", shorthand_pattern("on {}"), ["on [x]"])]

    kinds.register(Prompts())
    try:
        made = json_schema()
    finally:
        kinds.unregister("prompts")
    assert made["$defs"]["feature"]["properties"]["prompts"]["description"] == Prompts.doc
    [short, long] = made["$defs"]["prompts"]["anyOf"]
    assert short["type"] == "string" and short["pattern"].startswith("^on \\[")
    assert set(long["properties"]) == {"text", "token"} and long["required"] == ["text"]
    validator = Draft202012Validator(made)
    good = load(feature("prompts: ['on [ then]', {text: hi, token: 3}, {text: x}]\n"))
    assert not (errs := sorted(validator.iter_errors(good), key=str)), show(errs)
    for bad in (
        "prompts: ['on []']\n",
        "prompts: [{token: 3}]\n",
        "prompts: [{text: a, score: 1}]\n",
    ):
        assert not validator.is_valid(load(feature(bad))), bad
    assert "prompts" not in json_schema()["$defs"]  # unregistered: gone again


def test_schema_file_is_the_file_beside_the_module():
    beside = Path(rulecheck.schemas.__file__).with_name("rulebook.schema.json")
    assert beside == SCHEMA_FILE
    assert SCHEMA_FILE.is_file() and SCHEMA_FILE.is_absolute()


def _properties(node: Any, path: str = "#") -> list[tuple[str, Any]]:
    """Every property schema in the schema, with its JSON pointer."""
    out = []
    if isinstance(node, dict):
        for name, sub in (node.get("properties") or {}).items():
            out.append((f"{path}/properties/{name}", sub))
        for key, sub in node.items():
            out += _properties(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            out += _properties(sub, f"{path}/{i}")
    return out


def test_every_property_has_a_description_for_hover_help():
    props = _properties(SCHEMA)
    assert len(props) > 40
    missing = [path for path, sub in props if not sub.get("description")]
    assert not missing, missing
    assert SCHEMA["title"] and SCHEMA["description"]


def _nodes(node: Any) -> list[dict]:
    """Every schema object in the schema (and some plain mappings: properties, $defs)."""
    if isinstance(node, dict):
        return [node, *(n for sub in node.values() for n in _nodes(sub))]
    if isinstance(node, list):
        return [n for sub in node for n in _nodes(sub)]
    return []


def test_the_schema_keeps_to_keywords_draft_07_reads_the_same_way():
    newer = {"prefixItems", "unevaluatedProperties", "unevaluatedItems", "dependentRequired"}
    newer |= {"dependentSchemas", "$anchor", "$dynamicRef", "$dynamicAnchor", "minContains"}
    for node in _nodes(SCHEMA):
        assert not newer & set(node), node
        if "$ref" in node:  # draft-07 ignores what is beside a $ref
            assert set(node) <= {"$ref", "description"}, node


def test_the_description_says_how_to_upgrade_a_version_1_book():
    for text in (SCHEMA["description"], SCHEMA["properties"]["rulecheck"]["description"]):
        assert "rulecheck upgrade PATH" in text
    assert "$defs/feature/properties" in SCHEMA["description"]  # books using plugin kinds


# ---------------------------------------------------------------------------- valid books

FINGERPRINTS = """\
    fingerprints:
      model: sha256:81901bfe30bfda1d2c3213f6f35c0eb5fe7bd053a3e40f8ef6bec05378ea8515
      sae_in: sha256:e7080c599734df6ccc64206df057d795ef276c9727a7ab2ae8485a28b0f7a4dd
      sae_out: sha256:2ff2e318312f48387121e73ff3037c059ec963a4163c37f445cfee5eb6a5b156
      corpus: sha256:1b7aee0907eb36edb6d621e467effb9f832a2252b8aa0bca982e76ac0994d73b
"""

# the canonical written form of the format notes (fingerprints in full)
CANONICAL = f"""\
    # yaml-language-server: $schema=../../rulecheck/schemas/rulebook.schema.json
    rulecheck: 2
    model: rulecheck-tiny
    sae_in: rulecheck-tiny:sae_in/L0
    sae_out: rulecheck-tiny:sae_out/L0H0
    corpus: rulecheck-tiny:eval
{FINGERPRINTS}\
    layer: 0
    head: 0
    extraction:
      method: gradient
      keys: 100
      queries_per_key: 100
      max_terms: 64
      term_margin: 0.02
      seed: 0
      tolerance: 0.05
      ln_scale: 11.8
      n_eligible: 247
      n_sequences: 20565
      rulecheck: 0.1.0
    refs:                                   # input features: id -> the tokens that fire it most
      29: [email, ' email', collections]
      200: [po, lo, ca]
      501: [' un', Un, ' Un']
      858: ["\\n", ' Vi']
    features:
      - feature: 1
        source: extracted                   # or manual
        label: '[ un] ... [po]'
        skipgrams:
          - [501, 200]                      # [key, query]: ids in refs
          - [29, 574]
        absence:
          - '[#113] ... [#321] unless [#986]'
        counting:
          - 'count [#806] >= 2'
        expect: {{f1: 0.9, precision: 0.891, recall: 0.91}}
      - feature: 7
        source: manual
        label: "[if] ... [then]"
        skipgrams:
          - "[if] ... [then]"
          - [858, " then"]                  # mixed: an id and a token
          - {{key: {{tokens: [if, If]}}, query: {{feature: 200}}}}   # long form (v1 style)
        absence:
          - "[if] ... [then] unless [unless]"
        counting:
          - count [games] >= 2               # increasing, turns on at 2 copies
          - count [https] < 6                # decreasing, on while fewer than 6
          - count [x] increasing             # no threshold
        expect: {{f1: 0.95, precision: 0.95, recall: 0.9}}
        xfail: "reason"                      # optional
"""

GOOD = {
    "canonical": CANONICAL,
    "minimal": book(),
    "header without features": book(
        top=textwrap.dedent(FINGERPRINTS) + "model: m\nextraction: {}\nrefs: {}\n"
    ),
    "extraction keys beyond the known ones": book(
        top="extraction: {method: weight, term_margin: 1e-05, batch_size: 64, note: [a]}\n"
    ),
    "refs with an empty list and odd tokens": book(
        top="refs: {0: [], 12: ['[x]', '\"', ' ', '\\']}\n"
    ),
    "every shorthand form": book(
        r"""
        - feature: 0
          source: manual
          label: anything at all
          skipgrams:
            - "[if] ... [then]"
            - "[ un] ... [po]"                 # leading space is part of the token
            - "[#12] ... [ then]"
            - '["[x]"] ... ["\""]'               # brackets and quotes through JSON quoting
            - '["\n"] ... ["\\"]'              # newline and backslash, JSON escapes
            - '["\u00e9t\u00e9"] ... [été]'
            - "[a ... b] ... [c]"              # the separator inside a bracket is text
            - "[#] ... [#1a]"                  # not feature ids: tokens
            - "[count] ... [unless]"
          absence:
            - "[if] ... [then] unless [unless]"
            - '[#1] ... ["x y"] unless [#2]'
            - "[if] ... [then] unless [unless] (drop >= 0.3)"
            - "[if] ... [then] unless [unless] (drop >= 1)"
          counting:
            - count [games] >= 2
            - count [https] < 6
            - count [x] increasing
            - 'count ["]"] decreasing'
            - count [#806] >= 0
            - count [games] >= 2 (spearman >= 0.6)
            - count [x] decreasing (spearman >= 0.1)
        """
    ),
    "mixed references": book(
        """
        - feature: 3
          source: manual
          skipgrams:
            - [858, " then"]
            - [" if", 0]
            - [{feature: 3}, {tokens: [a, b]}]
            - [{feature: 3, tokens: []}, "x"]
        """
    ),
    "long forms": book(
        """
        - feature: 4
          source: extracted
          skipgrams:
            - {key: {feature: 501, tokens: [' un', Un]}, query: {feature: 200, tokens: [po]}}
            - {key: 5, query: " then"}
          absence:
            - {key: 1, query: {tokens: [then]}, distractor: "unless"}
            - {key: 1, query: 2, distractor: 3, min_drop: 0.25}
          counting:
            - {key: {feature: 806}}
            - {key: games, threshold_count: 2, min_spearman: 0.55}
            - {key: games, direction: increasing, threshold_count: 2}
            - {key: https, direction: decreasing, threshold_count: 6}
        """
    ),
    "null and empty lists": book(
        """
        - feature: 5
          source: manual
          skipgrams:
          absence:
          counting: []
        - feature: 6
          source: extracted
        """
    ),
    "xfail and partial expect": book(
        """
        - feature: 8
          source: manual
          label: ''
          skipgrams: ["[a] ... [b]"]
          expect: {recall: 0}
          xfail: the head is polysemantic here
        - feature: 9
          source: manual
          expect: {}
        """
    ),
}


@pytest.mark.parametrize("text", GOOD.values(), ids=GOOD.keys())
def test_valid_books_validate(text):
    assert not (errs := errors(load(text))), show(errs)
    assert DRAFT_07.is_valid(load(text))


def test_the_mapping_forms_have_the_fields_the_claims_write():
    """Each kind's mapping form in the schema allows exactly the keys its claim class writes
    in a book (measurements are not in a book); a new field changes both."""
    from rulecheck import kinds, schema

    for kind in kinds.kinds():
        name = {"skipgrams": "skipgram"}.get(kind.key, kind.key)
        [form] = [alt for alt in SCHEMA["$defs"][name]["anyOf"] if alt.get("type") == "object"]
        assert set(form["properties"]) == set(schema.keys(kind.claim, measured=False)), name


def test_the_books_are_read_as_meant():
    doc = load(CANONICAL)
    assert list(doc["refs"]) == ["29", "200", "501", "858"]
    assert doc["refs"]["858"] == ["\n", " Vi"]
    assert doc["features"][1]["counting"][1] == "count [https] < 6"
    assert doc["extraction"]["rulecheck"] == "0.1.0"
    nulls = load(GOOD["null and empty lists"])["features"][0]
    assert nulls["skipgrams"] is None and nulls["absence"] is None
    assert load(GOOD["extraction keys beyond the known ones"])["extraction"]["term_margin"] == 1e-05


# ---------------------------------------------------------------------------- invalid books


def feature(keys: str) -> str:
    """A book with one feature: a valid start and ``keys`` (one line)."""
    return book("- feature: 0\n  source: manual\n  " + keys)


BAD = [
    # id, book, where the error is and its keyword (jsonschema's best match: for a value that
    # can take several forms, the error of the form of its type)
    ("version 1", "rulecheck: 1\nlayer: 0\nhead: 0\n", ["rulecheck"], "const"),
    ("no version", "layer: 0\nhead: 0\n", [], "required"),
    ("no head", "rulecheck: 2\nlayer: 0\n", [], "required"),
    ("negative layer", "rulecheck: 2\nlayer: -1\nhead: 0\n", ["layer"], "minimum"),
    ("head as text", "rulecheck: 2\nlayer: 0\nhead: '0'\n", ["head"], "type"),
    ("unknown top key", book(top="measured: {}\n"), [], "additionalProperties"),
    ("misspelt top key", book(top="feature: []\n"), [], "additionalProperties"),
    ("model not a string", book(top="model: 3\n"), ["model"], "type"),
    ("fingerprint not sha256", book(top="fingerprints: {model: md5:abc}\n"), ["fingerprints", "model"], "pattern"),
    ("fingerprint in capitals", book(top="fingerprints: {corpus: sha256:" + "AB" * 32 + "}\n"), ["fingerprints", "corpus"], "pattern"),
    ("fingerprint too short", book(top="fingerprints: {sae_in: sha256:" + "ab" * 31 + "}\n"), ["fingerprints", "sae_in"], "pattern"),
    ("unknown fingerprint", book(top="fingerprints: {tokenizer: sha256:" + "ab" * 32 + "}\n"), ["fingerprints"], "additionalProperties"),
    ("extraction not a mapping", book(top="extraction: [gradient]\n"), ["extraction"], "type"),
    ("unknown ranking method", book(top="extraction: {method: random}\n"), ["extraction", "method"], "enum"),
    ("term_margin above 1", book(top="extraction: {term_margin: 2}\n"), ["extraction", "term_margin"], "maximum"),
    ("negative refs key", book(top="refs: {-1: [a]}\n"), ["refs"], "pattern"),
    ("text refs key", book(top="refs: {email: [a]}\n"), ["refs"], "pattern"),
    ("bool refs key", book(top="refs: {true: [a]}\n"), ["refs"], "pattern"),
    ("refs tokens not strings", book(top="refs: {29: [1, a]}\n"), ["refs", "29", 0], "type"),
    ("refs value not a list", book(top="refs: {29: email}\n"), ["refs", "29"], "type"),
    ("features not a list", book(top="features: {feature: 0}\n"), ["features"], "type"),
    ("feature without source", book("- feature: 0\n"), ["features", 0], "required"),
    ("feature without id", book("- source: manual\n"), ["features", 0], "required"),
    ("negative feature id", book("- feature: -2\n  source: manual\n"), ["features", 0, "feature"], "minimum"),
    ("bad source", book("- feature: 0\n  source: hand\n"), ["features", 0, "source"], "enum"),
    ("unknown feature key", feature("measured: {f1: 0.5}\n"), ["features", 0], "additionalProperties"),
    ("extra rule kind key", feature("prompts: [a]\n"), ["features", 0], "additionalProperties"),
    ("label not a string", feature("label: [a]\n"), ["features", 0, "label"], "type"),
    ("xfail not a string", feature("xfail: true\n"), ["features", 0, "xfail"], "type"),
    ("f1 above 1", feature("expect: {f1: 1.5}\n"), ["features", 0, "expect", "f1"], "maximum"),
    ("negative recall", feature("expect: {recall: -0.1}\n"), ["features", 0, "expect", "recall"], "minimum"),
    ("spearman in expect", feature("expect: {spearman: 0.9}\n"), ["features", 0, "expect"], "additionalProperties"),
    ("skipgrams not a list", feature("skipgrams: '[a] ... [b]'\n"), ["features", 0, "skipgrams"], "type"),
    ("skip-gram of 3", feature("skipgrams: [[1, 2, 3]]\n"), ["features", 0, "skipgrams", 0], "maxItems"),
    ("skip-gram of 1", feature("skipgrams: [[1]]\n"), ["features", 0, "skipgrams", 0], "minItems"),
    ("two dots", feature("skipgrams: ['[if] .. [then]']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("query not bracketed", feature("skipgrams: ['[if] ... then']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("no spaces", feature("skipgrams: ['[if]...[then]']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("empty bracket", feature("skipgrams: ['[] ... [then]']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("quote unquoted", feature("skipgrams: ['[a\"b] ... [c]']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("bad JSON escape", feature("skipgrams: ['[\"\\q\"] ... [c]']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("trailing newline", feature("skipgrams: [\"[a] ... [b]\\n\"]\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("absence as skip-gram", feature("skipgrams: ['[a] ... [b] unless [c]']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("skip-gram key missing", feature("skipgrams: [{query: 1}]\n"), ["features", 0, "skipgrams", 0], "required"),
    ("skip-gram with scores", feature("skipgrams: [{key: 1, query: 2, attn_score: 0.1}]\n"), ["features", 0, "skipgrams", 0], "additionalProperties"),
    ("ref with unknown key", feature("skipgrams: [[{feature: 3, tokn: [a]}, 1]]\n"), ["features", 0, "skipgrams", 0, 0], "additionalProperties"),
    ("ref with nothing", feature("skipgrams: [[{}, 1]]\n"), ["features", 0, "skipgrams", 0, 0], "anyOf"),
    ("ref with no tokens", feature("skipgrams: [[{tokens: []}, 1]]\n"), ["features", 0, "skipgrams", 0, 0, "tokens"], "minItems"),
    ("negative ref id", feature("skipgrams: [[-3, 1]]\n"), ["features", 0, "skipgrams", 0, 0], "minimum"),
    ("empty token", feature("skipgrams: [['', 1]]\n"), ["features", 0, "skipgrams", 0, 0], "minLength"),
    ("absence without unless", feature("absence: ['[a] ... [b]']\n"), ["features", 0, "absence", 0], "pattern"),
    ("absence as a list", feature("absence: [[1, 2, 3]]\n"), ["features", 0, "absence", 0], "anyOf"),
    ("absence without distractor", feature("absence: [{key: 1, query: 2}]\n"), ["features", 0, "absence", 0], "required"),
    ("count in words", feature("counting: ['count [x] >= two']\n"), ["features", 0, "counting", 0], "pattern"),
    ("count with >", feature("counting: ['count [x] > 2']\n"), ["features", 0, "counting", 0], "pattern"),
    ("count without claim", feature("counting: ['count [x]']\n"), ["features", 0, "counting", 0], "pattern"),
    ("count negative", feature("counting: ['count [x] >= -1']\n"), ["features", 0, "counting", 0], "pattern"),
    ("counting direction", feature("counting: [{key: x, direction: up}]\n"), ["features", 0, "counting", 0, "direction"], "enum"),
    ("counting threshold", feature("counting: [{key: x, threshold_count: -1}]\n"), ["features", 0, "counting", 0, "threshold_count"], "minimum"),
    ("counting with spearman", feature("counting: [{key: x, spearman: 0.9}]\n"), ["features", 0, "counting", 0], "additionalProperties"),
    ("counting without key", feature("counting: [{direction: increasing}]\n"), ["features", 0, "counting", 0], "required"),
    ("min_drop below the floor", feature("absence: [{key: 1, query: 2, distractor: 3, min_drop: 0.05}]\n"), ["features", 0, "absence", 0, "min_drop"], "minimum"),
    ("min_drop above 1", feature("absence: [{key: 1, query: 2, distractor: 3, min_drop: 1.5}]\n"), ["features", 0, "absence", 0, "min_drop"], "maximum"),
    ("min_drop as text", feature("absence: [{key: 1, query: 2, distractor: 3, min_drop: '0.3'}]\n"), ["features", 0, "absence", 0, "min_drop"], "type"),
    ("drop shorthand below the floor", feature("absence: ['[a] ... [b] unless [c] (drop >= 0.05)']\n"), ["features", 0, "absence", 0], "pattern"),
    ("spearman in an absence", feature("absence: ['[a] ... [b] unless [c] (spearman >= 0.5)']\n"), ["features", 0, "absence", 0], "pattern"),
    ("drop in a skip-gram", feature("skipgrams: ['[a] ... [b] (drop >= 0.5)']\n"), ["features", 0, "skipgrams", 0], "pattern"),
    ("min_spearman below the floor", feature("counting: [{key: x, min_spearman: 0}]\n"), ["features", 0, "counting", 0, "min_spearman"], "minimum"),
    ("spearman shorthand above 1", feature("counting: ['count [x] >= 2 (spearman >= 1.5)']\n"), ["features", 0, "counting", 0], "pattern"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "path", "keyword"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_invalid_books_fail_where_they_are_wrong(text, path, keyword):
    errs = errors(load(text))
    assert errs, "validated"
    # nothing else is wrong: every error is on the way to the one place
    assert all(list(e.absolute_path) == path[: len(e.absolute_path)] for e in errs), show(errs)
    best = best_match(errs)
    assert (list(best.absolute_path), best.validator) == (path, keyword), show([best])
    assert not DRAFT_07.is_valid(load(text))


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"refs": {"010": []}}, ["refs"]),  # leading zero: octal to a YAML 1.1 reader
        ({"refs": {"1.5": []}}, ["refs"]),
        ({"refs": {"": []}}, ["refs"]),
        ({"refs": {"7\n": []}}, ["refs"]),
        ({"features": [{"feature": 0, "source": "manual", "skipgrams": ["[a] ... [b]\n"]}]}, ["features", 0, "skipgrams", 0]),
    ],
)  # fmt: skip
def test_invalid_documents_beyond_what_yaml_can_write(doc, path):
    errs = errors({"rulecheck": 2, "layer": 0, "head": 0, **doc})
    assert {tuple(e.absolute_path) for e in errs} == {tuple(path)}, show(errs)


# ---------------------------------------------------------------------------- shipped books


def _version(path: Path) -> Any:
    """The book's ``rulecheck:`` version: its top-level line where the header has one (books
    put it first), else the whole document's (collection reads every shipped book)."""
    with path.open(encoding="utf-8") as lines:
        for _, line in zip(range(40), lines, strict=False):
            if line.startswith("rulecheck:"):
                data = yaml.load(line, Loader=_Loader)
                return data.get("rulecheck") if isinstance(data, dict) else None
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    return data.get("rulecheck") if isinstance(data, dict) else None


VERSIONS = {path: _version(path) for path in BOOKS}
V2_BOOKS = [path for path, version in VERSIONS.items() if version == 2]


def test_rulebooks_are_found():
    assert BOOKS, ROOT / "rulebooks"


def test_every_shipped_book_is_version_2():
    old = [str(path.relative_to(ROOT)) for path, version in VERSIONS.items() if version != 2]
    assert not old, f"not version 2: {old}"


@pytest.mark.parametrize("path", V2_BOOKS, ids=[str(p.relative_to(ROOT)) for p in V2_BOOKS])
def test_shipped_version_2_books_validate(path):
    text = path.read_text(encoding="utf-8")
    assert not (errs := errors(load(text))), show(errs)
    first = text.splitlines()[0]
    if first.startswith(MODELINE_PREFIX):
        assert editor_schema_path(path, first) == SHIPPED_SCHEMA


# ---------------------------------------------------------------------------- modeline


def editor_schema_path(book_path: Path, line: str) -> Path:
    """The file yaml-language-server loads for the modeline ``line`` of ``book_path``: a
    ``file:`` URI as it is, an absolute path as it is, a relative one joined to the book's
    directory (``..`` taken lexically, like Node's ``path.resolve``)."""
    match = re.match(r"^#\s+yaml-language-server\s*:.*?\$schema=(\S+)", line)
    assert match, line
    value = match[1]
    if value.startswith("file:"):
        return Path(unquote(urlparse(value).path))
    if os.path.isabs(value):
        return Path(value)
    return Path(os.path.normpath(os.path.join(os.path.abspath(book_path.parent), value)))


def test_modeline_of_a_shipped_book_resolves_to_the_schema(monkeypatch):
    path = ROOT / "rulebooks" / "rulecheck-tiny" / "L0H0.yaml"
    line = modeline(path)
    assert line.startswith(MODELINE_PREFIX) and "\n" not in line
    assert editor_schema_path(path, line) == SCHEMA_FILE
    monkeypatch.chdir(ROOT)  # a relative book path gives the same line
    assert modeline(Path("rulebooks/rulecheck-tiny/L0H0.yaml")) == line
    if SCHEMA_FILE == SHIPPED_SCHEMA:  # the form the format notes show
        assert line == MODELINE_PREFIX + "../../rulecheck/schemas/rulebook.schema.json"


def test_modeline_from_elsewhere_and_the_uri_fallback(tmp_path, monkeypatch):
    book_path = tmp_path / "deep" / "L1H2.yaml"
    line = modeline(book_path)
    assert editor_schema_path(book_path, line) == SCHEMA_FILE
    # a schema path the modeline cannot carry as a relative path: whitespace, a fragment
    odd = tmp_path / "my schemas #2" / "rulebook.schema.json"
    monkeypatch.setattr("rulecheck.schemas.SCHEMA_FILE", odd)
    line = modeline(book_path)
    assert line.startswith(MODELINE_PREFIX + "file:///")
    assert " " not in line.removeprefix(MODELINE_PREFIX)
    assert editor_schema_path(book_path, line) == odd
    # a relative path that an editor would take for a URL is made explicitly relative
    monkeypatch.setattr("rulecheck.schemas.SCHEMA_FILE", tmp_path / "http" / "s.json")
    line = modeline(tmp_path / "L0H0.yaml")
    assert line == MODELINE_PREFIX + "./http/s.json"


# ---------------------------------------------------------------------------- shorthands


def _pattern(kind: str) -> str:
    [pattern] = [alt["pattern"] for alt in SCHEMA["$defs"][kind]["anyOf"] if "pattern" in alt]
    return pattern


PATTERNS = {kind: _pattern(kind) for kind in ("skipgram", "absence", "counting")}


class Unparsed(Exception):
    pass


def parse_bracket(text: str, i: int) -> tuple[Any, int]:
    """The reference at ``text[i]`` (``[`` ... ``]``) and the index after it: ``("feature",
    id)`` or ``("token", text)``."""
    if not text.startswith("[", i):
        raise Unparsed(i)
    i += 1
    if text.startswith('"', i):  # a JSON string: up to the first quote not escaped
        j = i + 1
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        try:
            token = json.loads(text[i : j + 1])
        except ValueError as e:
            raise Unparsed(i) from e
        if not token or not text.startswith("]", j + 1):
            raise Unparsed(j)
        return ("token", token), j + 2
    end = text.find("]", i)
    if end < 0:
        raise Unparsed(i)
    inner = text[i:end]
    if not inner or any(c in inner for c in '["\n'):
        raise Unparsed(i)
    if inner[0] == "#" and inner[1:].isascii() and inner[1:].isdigit():
        return ("feature", int(inner[1:])), end + 1
    return ("token", inner), end + 1


def parse_shorthand(kind: str, text: str) -> tuple[Any, ...]:
    """The parts of a shorthand rule of ``kind``; ``Unparsed`` when it is not one."""

    def literal(word: str, i: int) -> int:
        if not text.startswith(word, i):
            raise Unparsed(i)
        return i + len(word)

    parts: list[Any] = []
    i = 0
    if kind == "counting":
        i = literal("count ", i)
        ref, i = parse_bracket(text, i)
        i = literal(" ", i)
        rest, strength = split_strength(text[i:], "spearman")
        for op in (">= ", "< "):
            number = rest.removeprefix(op)
            if rest.startswith(op) and number.isascii() and number.isdigit():
                return (ref, op.strip(), int(number), *strength)
        if rest in ("increasing", "decreasing"):
            return (ref, rest, None, *strength)
        raise Unparsed(i)
    ref, i = parse_bracket(text, i)
    parts.append(ref)
    for word in (" ... ", " unless ")[: 2 if kind == "absence" else 1]:
        i = literal(word, i)
        ref, i = parse_bracket(text, i)
        parts.append(ref)
    rest, strength = split_strength(text[i:], "drop") if kind == "absence" else (text[i:], ())
    if rest:
        raise Unparsed(i)
    return (*parts, *strength)


def split_strength(tail: str, word: str) -> tuple[str, tuple[float, ...]]:
    """``tail`` without a final `` (word >= X)`` and X, X a number in [0.1, 1] written with
    a leading digit (``0.25``, ``1``, ``1.00``); ``tail`` as it is when it has none."""
    start = tail.rfind(f" ({word} >= ")
    if start < 0 or not tail.endswith(")"):
        return tail, ()
    number = tail[start + len(f" ({word} >= ") : -1]
    whole, dot, digits = number.partition(".")
    if not number.isascii() or whole not in ("0", "1") or (dot and not digits.isdigit()):
        return tail, ()
    if not 0.1 <= float(number) <= 1:
        return tail, ()
    return tail[:start], (float(number),)


def reference_accepts(kind: str, text: str) -> bool:
    try:
        parse_shorthand(kind, text)
    except Unparsed:
        return False
    return True


def schema_accepts(kind: str, text: str) -> bool:
    return Draft202012Validator({"type": "string", "pattern": PATTERNS[kind]}).is_valid(text)


# bracket contents as the format writes them: plain text (spaces, `#`, backslashes and any
# other character but [ ] " and newline), a JSON string (any token), an input feature
plain_texts = st.text(st.characters(exclude_characters='[]"\n'), min_size=1, max_size=6)
json_texts = st.builds(
    lambda text, ascii_only: json.dumps(text, ensure_ascii=ascii_only),
    st.text(min_size=1, max_size=6),
    st.booleans(),
)
feature_ids = st.integers(0, 10**6).map(lambda n: f"#{n}")
contents = st.one_of(
    plain_texts,
    json_texts,
    feature_ids,
    st.sampled_from([" then", "if", "a ... b", "#", "#x", "# 1", "\\n", "\\", "count"]),
)
# one thing wrong, or nearly: a character put in, a near miss
SPOILERS = '[]"\n\\\x00\x1f #u'
NEAR_MISSES = ["", "\n", '""', '"a\\"', '""a"', '"a" ', ' "a"']  # empty, quotes astray
NEAR_MISSES += ['"\\q"', '"\\u12"', '"\\uzzzz"', '"\\x41"']  # not JSON escapes
SEPARATOR_MISSES = [" .. ", "...", "  ...  ", " … ", " ... ... ", " ...", "... "]
UNLESS_MISSES = [" unless", "unless ", " UNLESS ", "  unless ", " unless  "]
CLAIMS = [">= 2", "< 6", "increasing", "decreasing", ">= 0", "< 10", ">= 007"]
STRENGTHS = ["", " ({} >= 0.3)", " ({} >= 0.1)", " ({} >= 1)", " ({} >= 1.00)", " ({} >= 0.25)"]
STRENGTH_MISSES = [
    " ({} >= 0.05)",
    " ({} >= 1.5)",
    " ({} >= .3)",
    " ({} > 0.3)",
    " ({} >= 0.3",
    "({} >= 0.3)",
    " ({}>= 0.3)",
    " (x >= 0.3)",
    " ({} >= 0.3) ",
    " ({} >= 1e-1)",
    " ({} >= 0.)",
    " ({} >= 0.09)",
    " ({} >= 0.3)(spearman >= 0.3)",
]
CLAIM_MISSES = ["> 2", ">=2", "<= 1", ">= -1", ">= two", ">= 1.5", "Increasing", ">= ２", ""]
TAIL_MISSES = ["\n", " ", "x", "]", "\r\n"]


@st.composite
def spoiled(draw: st.DrawFn, content: str) -> str:
    if draw(st.booleans()):
        return draw(st.sampled_from(NEAR_MISSES))
    at = draw(st.integers(0, len(content)))
    return content[:at] + draw(st.sampled_from(SPOILERS)) + content[at:]


@st.composite
def shorthands(draw: st.DrawFn) -> tuple[str, str]:
    """A shorthand rule of some kind, well formed or with one part spoiled."""
    kind = draw(st.sampled_from(["skipgram", "absence", "counting"]))
    parts = [draw(contents) for _ in range({"skipgram": 2, "absence": 3, "counting": 1}[kind])]
    dots, unless, claim, tail = " ... ", " unless ", draw(st.sampled_from(CLAIMS)), ""
    word = {"absence": "drop", "counting": "spearman"}.get(kind, "drop")
    strength = draw(st.sampled_from(STRENGTHS)).format(word)
    spoil = draw(st.sampled_from(["none", "none", "content", "content", "separator", "tail"]))
    spoil = draw(st.sampled_from([spoil, "strength"]))
    if spoil == "content":
        i = draw(st.integers(0, len(parts) - 1))
        parts[i] = draw(spoiled(parts[i]))
    elif spoil == "separator" and kind == "counting":
        claim = draw(st.sampled_from(CLAIM_MISSES))
    elif spoil == "separator":
        dots = draw(st.sampled_from(SEPARATOR_MISSES))
        if kind == "absence" and draw(st.booleans()):
            dots, unless = " ... ", draw(st.sampled_from(UNLESS_MISSES))
    elif spoil == "tail":
        tail = draw(st.sampled_from(TAIL_MISSES))
    elif spoil == "strength":
        strength = draw(st.sampled_from(STRENGTH_MISSES)).format(word)
    if kind == "skipgram" and spoil != "strength":
        strength = ""  # a skip-gram states no strength
    b = [f"[{part}]" for part in parts]
    if kind == "counting":
        return kind, f"count {b[0]} {claim}{strength}{tail}"
    if kind == "skipgram":
        return kind, f"{b[0]}{dots}{b[1]}{strength}{tail}"
    return kind, f"{b[0]}{dots}{b[1]}{unless}{b[2]}{strength}{tail}"


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(rule=shorthands())
def test_the_shorthand_patterns_agree_with_a_parser(rule):
    kind, text = rule
    assert schema_accepts(kind, text) == reference_accepts(kind, text), (kind, text)


token_texts = st.text(min_size=1, max_size=8)


def _written(ref: tuple[str, Any], quote: bool) -> str:
    kind, value = ref
    if kind == "feature":
        return f"[#{value}]"
    plain = not any(c in value for c in '[]"\n') and not re.fullmatch(r"#[0-9]+", value)
    return f"[{value}]" if plain and not quote else f"[{json.dumps(value)}]"


references = st.one_of(
    st.tuples(st.just("feature"), st.integers(0, 10**9)),
    st.tuples(st.just("token"), token_texts),
)


@settings(max_examples=EXAMPLES, deadline=None, database=None)
@given(key=references, query=references, dis=references, quote=st.booleans())
def test_every_reference_can_be_written_in_a_shorthand(key, query, dis, quote):
    """Written by the quoting rule (brackets, quotes, newlines and text that reads as a
    feature id in JSON quotes), any tokens make a shorthand the schema accepts and the
    parser reads back."""
    k, q, d = (_written(r, quote) for r in (key, query, dis))
    skipgram, absence = f"{k} ... {q}", f"{k} ... {q} unless {d}"
    assert schema_accepts("skipgram", skipgram)
    assert parse_shorthand("skipgram", skipgram) == (key, query)
    assert schema_accepts("absence", absence)
    assert parse_shorthand("absence", absence) == (key, query, dis)
    counting = f"count {k} < 3"
    assert schema_accepts("counting", counting)
    assert parse_shorthand("counting", counting) == (key, "<", 3)


@pytest.mark.parametrize(
    ("kind", "text", "parts"),
    [
        ("skipgram", "[if] ... [then]", (("token", "if"), ("token", "then"))),
        ("skipgram", "[ un] ... [#200]", (("token", " un"), ("feature", 200))),
        ("skipgram", '["[x]"] ... ["#12"]', (("token", "[x]"), ("token", "#12"))),
        ("skipgram", "[#] ... [#1a]", (("token", "#"), ("token", "#1a"))),
        ("absence", "[a] ... [b] unless [c d]", (("token", "a"), ("token", "b"), ("token", "c d"))),
        ("counting", "count [games] >= 2", (("token", "games"), ">=", 2)),
        ("counting", "count [x] decreasing", (("token", "x"), "decreasing", None)),
        (
            "absence",
            "[a] ... [b] unless [c] (drop >= 0.3)",
            (("token", "a"), ("token", "b"), ("token", "c"), 0.3),
        ),
        (
            "absence",
            "[a] ... [b] unless [c (drop >= 0.3)]",
            (("token", "a"), ("token", "b"), ("token", "c (drop >= 0.3)")),
        ),
        ("counting", "count [x] >= 2 (spearman >= 1)", (("token", "x"), ">=", 2, 1.0)),
    ],
)
def test_the_reference_parser(kind, text, parts):
    assert parse_shorthand(kind, text) == parts
    assert schema_accepts(kind, text)
