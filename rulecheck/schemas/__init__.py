"""The JSON Schema of rulebook files (format version 2), shipped with the package.

``rulebook.schema.json`` gives editors that read JSON Schema (yaml-language-server, and
through it VS Code's YAML extension) completion, hover help and validation while a rulebook
is written by hand. A book names it in its first line, the modeline::

    # yaml-language-server: $schema=../../rulecheck/schemas/rulebook.schema.json

yaml-language-server resolves a relative ``$schema`` path against the directory of the YAML
file (``path.resolve`` of the file's directory and the path), takes a path it sees as
absolute as a file path, and passes ``file:`` and ``http...`` values through as URIs; the
value ends at the first whitespace and a ``#`` starts a fragment. :func:`modeline` writes a
relative path where those rules read it back as this file, and a file URI otherwise.

The schema is JSON Schema 2020-12 written with the keywords that draft-07 reads the same way
(editors that validate as draft-07, as yaml-language-server did until it read 2019-09 and
2020-12, see the same schema): no ``prefixItems`` (a skip-gram pair is ``items`` with
``minItems`` and ``maxItems`` 2), no ``unevaluatedProperties``, and nothing but a description
beside a ``$ref``. It describes the format; rulecheck's own reader (``rulecheck.rulebook``) is
what decides, and checks more than a schema can (see the schema's description).

The file is made, not written by hand: :func:`json_schema` builds it from the schema
dataclasses (each field's ``doc`` and what its parser takes, ``rulecheck.schema.json_schema``)
and each registered kind's forms (``RuleKind.json_schema``); ``python -m rulecheck.schemas``
writes it again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path, PurePath
from typing import Any

SCHEMA_FILE: Path = Path(os.path.abspath(__file__)).with_name("rulebook.schema.json")
MODELINE_PREFIX = "# yaml-language-server: $schema="


def modeline(book_path: Path) -> str:
    """The first line that points editors at :data:`SCHEMA_FILE` from the rulebook at
    ``book_path``: the schema's path relative to the book's directory, with ``/``
    separators, when there is one that yaml-language-server reads back as the schema;
    else (another drive, or a path with whitespace or ``#``) its absolute ``file://`` URI.
    Both paths are made absolute without resolving symbolic links: the editor takes ``..``
    in the path lexically too."""
    schema = os.path.abspath(SCHEMA_FILE)
    book_dir = os.path.dirname(os.path.abspath(book_path))
    try:
        relative = PurePath(os.path.relpath(schema, book_dir)).as_posix()
    except ValueError:  # Windows: on another drive than the book
        relative = None
    if relative is None or any(c.isspace() or c == "#" for c in relative):
        return MODELINE_PREFIX + Path(schema).as_uri()
    if relative.startswith(("file:", "http")):  # would be read as a URI
        relative = "./" + relative
    return MODELINE_PREFIX + relative


# ---------------------------------------------------------------------------- the schema, made

TITLE = "rulecheck rulebook (format version 2)"
DESCRIPTION = (
    "The rules claimed about the output SAE features of one attention head, in one file per "
    "head named L{layer}H{head}.yaml; `pytest` runs every claim as a test. This schema is for "
    "`rulecheck: 2` only: rulecheck still reads version 1 books (with a deprecation warning) "
    "and `rulecheck upgrade PATH` rewrites one as version 2. Unknown keys are errors, at the "
    "top level and in each feature: rule kinds that a plugin registers add keys to features "
    "that this schema cannot know, so a book that uses one fails here although rulecheck reads "
    "it; validate such books with a copy of this schema that adds the kind's key under "
    "$defs/feature/properties. Not checked here: that feature ids are unique and that layer "
    "and head agree with the file name (rulecheck checks both when it reads the book), that "
    "tokens are single tokens of the model's tokenizer and feature ids within the SAEs "
    "(checked when the rules run). Measured values (f1/precision/recall/spearman, scores, term "
    "counts) are not part of a book: they live beside it in L{layer}H{head}.measured.json."
)
COMMENT = (
    "Written with the 2020-12 keywords that draft-07 reads the same way, for editors that "
    "validate as draft-07: no prefixItems, unevaluatedProperties or dependentRequired, and only "
    "a description beside a $ref. Each description is what an editor shows on hover."
)
FEATURE_DOC = (
    "The claims about one output feature. Besides the keys here, rule kinds registered by "
    "plugins add keys (each a list); this schema does not know them and rejects them."
)
LOST_DOC = (
    "A feature of the output SAE this book was remapped from (`rulecheck remap`) that the new "
    "SAE has no confident partner for, with its claims as they were: `feature` is its id in "
    "the old SAE. Its tests fail (or skip within --rulecheck-allow-lost) until a person "
    "re-homes the claims under `features` with the new id, or removes them."
)
LOST_ID_DOC = "The feature's id in the output SAE the book was remapped from."
SHA256 = {
    "description": "A SHA-256 digest: sha256: and 64 lowercase hex digits.",
    "type": "string",
    "pattern": "^sha256:[0-9a-f]{64}(?![\\s\\S])",
}
REGENERATE = "python -m rulecheck.schemas"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of rulebook format 2, made from the schema dataclasses
    (``rulecheck.book``, each registered kind's claim and shorthands): what
    :data:`SCHEMA_FILE` holds for the built-in kinds, and a project's own copy when it
    registered its own."""
    from rulecheck import kinds
    from rulecheck import schema as sc
    from rulecheck.book import FeatureRules, Rulebook
    from rulecheck.refs import reference_schema

    top = sc.json_schema(Rulebook)
    lost = sc.json_schema(FeatureRules)
    lost["properties"]["feature"] = {**lost["properties"]["feature"], "description": LOST_ID_DOC}
    defs = {
        "sha256": SHA256,
        "feature": {"description": FEATURE_DOC, **sc.json_schema(FeatureRules, ["best_candidate"])},
        "fraction": sc.json_hint(sc.number((0.0, 1.0))),
        "reference": reference_schema(),
        **{kind.json_ref.rpartition("/")[2]: kind.json_schema() for kind in kinds.kinds()},
        "lost_feature": {"description": LOST_DOC, **lost},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "rulecheck-rulebook-2.schema.json",
        "title": TITLE,
        "description": DESCRIPTION,
        "$comment": COMMENT,
        **top,
        "$defs": defs,
    }


def schema_text(schema: Any | None = None) -> str:
    """``schema`` (by default :func:`json_schema`) as the file holds it: indented by 2, a list
    of plain values on one line."""
    return _json(json_schema() if schema is None else schema, "") + "\n"


def _json(value: Any, indent: str) -> str:
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(k)}: {_json(v, inner)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(inner + _json(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def main(argv: list[str] | None = None) -> int:
    """``python -m rulecheck.schemas`` writes :data:`SCHEMA_FILE`; with ``--check``, says
    whether it is what the schema dataclasses make (exit 1 if not)."""
    args = sys.argv[1:] if argv is None else argv
    text = schema_text()
    if args == ["--check"]:
        if SCHEMA_FILE.read_text(encoding="utf-8") == text:
            return 0
        print(
            f"{SCHEMA_FILE}: not what the schema dataclasses make; run `{REGENERATE}` to "
            "write it again",
            file=sys.stderr,
        )
        return 1
    if args:
        print(f"usage: {REGENERATE} [--check]", file=sys.stderr)
        return 2
    SCHEMA_FILE.write_text(text, encoding="utf-8")
    return 0
