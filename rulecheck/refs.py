"""References to input features: an input-SAE feature id, the tokens that fire it, or both.

One resolver serves every rule kind. A reference resolves to the input feature (when an id is
given, checked against the input SAE) and to token ids:

- with no feature id, the tokens *are* the reference: every listed token must be one token of
  the model's tokenizer (a typo in a hand-written rule is an error, not a silently empty match);
- with a feature id, the tokens describe it: those that are one token are kept, the rest are
  ignored; at layer 0 a feature with no usable token is read as the token that activates it
  most.

Skip-grams read the feature when there is one, else the token set; counterfactual checks
insert :attr:`Resolved.token`. :func:`ref_shown` is how a reference is shown to a person
(messages, tables: every character of a token visible), :func:`ref_name` how items and
labels name it.

In a rulebook (format 2) a reference is written short: an integer is an input feature whose
tokens the book's ``refs:`` table gives (:class:`RefTable`), a string is one token, and the long
form ``{feature: N, tokens: [...]}`` says anything else. Rules may be written as shorthand text,
``"[if] ... [then]"``, whose brackets hold references (:func:`split_shorthand`):

- ``[text]``: the token ``text`` exactly as written, spaces included (no ``[``, ``]``, ``"``
  or line break inside);
- ``["..."]``: the token as a JSON string (the quoting rule, for any other token);
- ``[#123]``: input feature 123.

A bare id takes its tokens from the table (none when the table has no row for it); only the long
form gives an id other tokens, or none where the table has some.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, overload

from rulecheck import schema
from rulecheck.errors import InvalidRulebook, printable

REFERENCE = "#/$defs/reference"  # a reference, in the editors' JSON Schema


@dataclass(frozen=True)
class TokenRef(schema.Record):
    """An SAE feature, the tokens that typically fire it, or both."""

    feature: int | None = schema.entry(
        schema.integer(), default=None, doc="The input SAE feature id."
    )
    tokens: list[str] = schema.entry(
        schema.list_of(schema.text, "strings"),
        default_factory=list,
        dump=list,
        omit=lambda v: not v,
        doc="Tokens, as decoded text.",
    )
    # what ``__schema_check__`` checks, in JSON Schema
    __json_schema__: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {"required": ["feature"]},
            {
                "required": ["tokens"],
                "properties": {
                    "tokens": {
                        "description": "Without a feature id: at least one token.",
                        "minItems": 1,
                    }
                },
            },
        ]
    }

    def __schema_check__(self, where: schema.Where, path: str) -> None:
        if self.feature is None and not self.tokens:
            where.fail(
                path, "a reference needs `feature` or `tokens`", 'write e.g. {tokens: [" then"]}'
            )


def read_ref(where: schema.Where, value: Any, path: str) -> TokenRef:
    """A reference as written: an input feature id, one token, or the long form."""
    if isinstance(value, bool) or value is None:
        where.fail(
            path,
            f"expected a reference, got {schema.describe(value)}",
            'write an input feature id (858), a token (" then") or {feature: N, tokens: [...]}',
        )
    if isinstance(value, int):
        ref = where.ref_cache.get(value)
        if ref is None:  # one reference a feature id and book: a book names each many times
            feature = schema.integer()(where, value, path)
            ref = where.ref_cache[value] = TokenRef(feature, list(where.refs.get(feature, [])))
        return ref
    if isinstance(value, str):
        return TokenRef(tokens=[value])
    return schema.parse(TokenRef, where, value, path)


schema.hinted(read_ref, {"$ref": REFERENCE})


def reference_schema() -> dict[str, Any]:
    """What ``read_ref`` takes, as JSON Schema (``$defs/reference``)."""
    long_form = (
        "The long form: an input feature id, tokens, or both (with an id, the tokens describe "
        "the feature; without, they are the reference)."
    )
    return {
        "description": "One input feature or token: an integer (an input feature id, its "
        "tokens in `refs`), a string (exactly one token of the model's tokenizer, as decoded "
        'text: " then" with its space), or the long form {feature, tokens}.',
        "anyOf": [
            {
                "description": "An input feature id; its tokens are listed in `refs`.",
                **schema.json_hint(schema.integer()),
            },
            {
                "description": "Exactly one token of the model's tokenizer, as decoded text, "
                "spaces included.",
                **schema.json_hint(schema.text),
                "minLength": 1,
            },
            {"description": long_form, **schema.json_schema(TokenRef)},
        ],
    }


def ref_entry(**kw: Any) -> Any:
    """A schema field holding a reference, written on one line."""
    return schema.entry(read_ref, flow=True, **kw)


# ---------------------------------------------------------------------------- shorthand

_BRACKET = re.compile(
    r'\[(?:#(?P<id>[0-9]+)|(?P<json>"(?:[^"\\\n]|\\.)*")|(?P<text>[^\[\]"\n]+))\]'
)
_PLAIN = re.compile(r'^[^\[\]"\\]+$')
# a bracket as the editors' JSON Schema matches it: a JSON string is checked to be one
BRACKET_PATTERN = (
    r'\[(?:#[0-9]+|"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})+"|[^\[\]"\n]+)\]'
)
BRACKET_DOC = (
    "A bracket names one reference: [text] is the token `text` exactly as written, spaces "
    'included (no [, ], " or newline inside); ["..."] is the token as a JSON string (for '
    "tokens with brackets, quotes, backslashes or newlines, or to make spaces visible: "
    '[" then"]); [#123] is input feature 123, described in `refs`.'
)
BRACKET_COMMENT = (
    "Each bracket is a [, then one of: # and digits (an input feature); a JSON string (a "
    "double quote, one or more of: a character other than the double quote, the backslash and "
    "U+0000 to U+001F, or a JSON escape; a double quote); plain text (one or more characters "
    "other than [, ], the double quote and newline); then a ]. The pattern ends with "
    "(?![\\s\\S]), not $, which in Python's re also matches before a final newline. "
    "tests/test_schema_file.py checks the patterns against a parser."
)
END = r"(?![\s\S])"  # the end of the text (``$`` also matches before a final newline)


class ShorthandError(ValueError):
    """A shorthand rule that does not parse: what is wrong and how to write it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


def split_shorthand(text: str) -> tuple[list[str], list[TokenRef]]:
    """The words between brackets (``n + 1`` of them, whitespace-normalised) and the ``n``
    references in them: ``"[if] ... [then]"`` gives ``(["", "...", ""], [if, then])``."""
    words: list[str] = []
    refs: list[TokenRef] = []
    start = 0
    for match in _BRACKET.finditer(text):
        words.append(_words(text[start : match.start()]))
        refs.append(_bracket_ref(match))
        start = match.end()
    words.append(_words(text[start:]))
    return words, refs


def _words(between: str) -> str:
    if "[" in between or "]" in between:
        at = between.find("[") if "[" in between else between.find("]")
        bad = between[at:]
        if bad.startswith("[]"):
            raise ShorthandError("empty brackets `[]`", 'name a token inside, e.g. [" then"]')
        raise ShorthandError(
            f"cannot read the bracket at {bad[:20]!r}",
            'a bracket holds a token as written ([then]), a JSON string (["[x]"]) or an input '
            "feature ([#858])",
        )
    return " ".join(between.split())


def _bracket_ref(match: re.Match[str]) -> TokenRef:
    if match["id"] is not None:
        return TokenRef(feature=int(match["id"]))
    if match["json"] is not None:
        try:
            token = json.loads(match["json"])
        except json.JSONDecodeError as exc:
            raise ShorthandError(
                f"cannot read the quoted token {match['json']}: {exc.msg}",
                'write it as a JSON string, e.g. ["\\n"]',
            ) from None
        return TokenRef(tokens=[token])
    return TokenRef(tokens=[match["text"]])


@dataclass
class RefTable:
    """A book's ``refs:`` table, input feature id -> tokens, and how each reference is
    written against it: short (an id the table describes, one token) or long."""

    tokens: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, refs: Iterable[TokenRef]) -> RefTable:
        """The table describing ``refs``: each id by the tokens of its first reference."""
        table: dict[int, list[str]] = {}
        for ref in refs:
            if ref.feature is not None:
                table.setdefault(ref.feature, list(ref.tokens))
        return cls(dict(sorted(table.items())))

    def fill(self, ref: TokenRef) -> TokenRef:
        """A bare id (``858``, ``[#858]``) as the reference the table describes."""
        if ref.feature is not None and not ref.tokens:
            return TokenRef(ref.feature, list(self.tokens.get(ref.feature, [])))
        return ref

    def short(self, ref: TokenRef) -> int | str | None:
        """``ref`` as an id or one token, or None when only the long form says it."""
        if ref.feature is not None:
            return ref.feature if self.tokens.get(ref.feature) == ref.tokens else None
        return ref.tokens[0] if len(ref.tokens) == 1 else None

    def bracket(self, ref: TokenRef) -> str | None:
        """``ref`` in shorthand brackets, or None when it needs the long form."""
        short = self.short(ref)
        if short is None:
            return None
        if isinstance(short, int):
            return f"[#{short}]"
        if _PLAIN.match(short) and short.isprintable() and not re.match(r"^#[0-9]+$", short):
            return f"[{short}]"
        return f"[{json.dumps(short, ensure_ascii=False)}]"

    def value(self, ref: TokenRef) -> Any:
        """``ref`` as written in a rule's long form: short when it can be."""
        short = self.short(ref)
        return short if short is not None else schema.Flow(ref.to_dict())


def ref_name(ref: TokenRef) -> str:
    """How a reference is named in item names and the labels extraction writes: its first
    listed token as it is, else ``f{id}`` (item names escape it: ``escaped``)."""
    return ref.tokens[0] if ref.tokens else f"f{ref.feature}"


def ref_shown(ref: TokenRef, token_text: str | None = None) -> str:
    """How a reference is shown to a person, in messages and tables: the token (``token_text``,
    the decoded text of the token a check uses, else its first listed token) in brackets as
    ``shown_token`` writes it, else ``[f{id}]``."""
    if token_text is None and not ref.tokens:
        return f"[f{ref.feature}]"
    return shown_token(ref.tokens[0] if token_text is None else token_text)


def shown_token(text: str) -> str:
    """A token in shorthand brackets, every character of it visible: ``[then]`` as written
    where that is unambiguous, else the JSON string the shorthand reads (``[" then"]``,
    ``["\\n"]``): a space at either end, a line break or other unprintable character, a
    bracket, a quote or a backslash is never left to the eye."""
    if (
        text
        and text == text.strip()
        and _PLAIN.match(text)
        and text.isprintable()
        and not re.match(r"^#[0-9]+$", text)
    ):
        return f"[{text}]"
    quoted = json.dumps(text, ensure_ascii=False)  # JSON escapes the control characters
    return "[" + "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in quoted) + "]"


def escaped(text: str) -> str:
    """``text`` on one line: a backslash doubled, a line break, tab or other unprintable
    character as its escape (``\\n``, ``\\t``, ``\\x1b``, ``\\u2028``), the rest, spaces
    included, as it is. One to one: distinct texts stay distinct (test item names)."""
    return "".join(_escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    return "\\\\" if c == "\\" else printable(c)


@dataclass(frozen=True)
class Resolved:
    """A reference checked against a model: its input feature and its usable token ids."""

    feature: int | None
    token_ids: tuple[int, ...] = ()
    field: str = ""

    @property
    def token(self) -> int | None:
        """The token a counterfactual inserts for this reference (None when it has none)."""
        return self.token_ids[0] if self.token_ids else None


@dataclass
class Resolver:
    """Resolves the references of one rulebook against a tokenizer and an input SAE.

    ``top_tokens()`` gives ``[d_sae_in]``, the token that activates each input feature most
    (-1 where none does); it is called only when a layer-0 reference needs it.
    """

    tokenizer: Any
    d_sae_in: int
    layer: int
    file: str
    top_tokens: Callable[[], Any] | None = None
    _cache: dict[tuple[Any, ...], Resolved] = field(default_factory=dict, repr=False)
    _encoded: dict[str, list[int]] = field(default_factory=dict, repr=False)  # text -> ids

    def resolve(self, ref: TokenRef, field: str) -> Resolved:
        """``ref`` resolved (see module doc); a bad reference is ``InvalidRulebook`` naming
        ``file`` and ``field``."""
        cache_key = (ref.feature, tuple(ref.tokens), field)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._resolve(ref, field)
        return self._cache[cache_key]

    @overload
    def token(self, ref: TokenRef, field: str, *, required: Literal[True] = ...) -> int: ...

    @overload
    def token(self, ref: TokenRef, field: str, *, required: bool) -> int | None: ...

    def token(self, ref: TokenRef, field: str, *, required: bool = True) -> int | None:
        """The token a counterfactual inserts for ``ref``; an error when it has none (None
        when not ``required``)."""
        token = self.resolve(ref, field).token
        if token is None and required:
            self._fail(
                f"{field}",
                f"input feature {ref.feature} is given by id only; at layer {self.layer} a "
                "property check needs its token",
                'add `tokens: ["..."]` with the token that fires it',
            )
        return token

    def shown(self, ref: TokenRef, token: int | None = None) -> str:
        """``ref_shown`` of ``ref``, by the decoded text of ``token`` when there is one (its
        id without a tokenizer)."""
        if token is None:
            return ref_shown(ref)
        return ref_shown(
            ref, str(token) if self.tokenizer is None else self.tokenizer.decode([token])
        )

    def _resolve(self, ref: TokenRef, field: str) -> Resolved:
        if ref.feature is None:
            given = tuple(
                self._token_id(text, f"{field}.tokens[{i}]") for i, text in enumerate(ref.tokens)
            )
            return Resolved(None, given, field)
        if not 0 <= ref.feature < self.d_sae_in:
            self._fail(
                f"{field}.feature",
                f"input feature {ref.feature} is out of range: the input SAE has "
                f"{self.d_sae_in} features",
                f"use a feature id in 0..{self.d_sae_in - 1}",
            )
        ids: list[int] = []
        for i, text in enumerate(ref.tokens):
            try:
                ids.append(self._token_id(text, f"{field}.tokens[{i}]"))
            except InvalidRulebook:
                continue
        if not ids and self.layer == 0 and self.top_tokens is not None:
            top = int(self.top_tokens()[ref.feature])
            if top < 0:
                self._fail(
                    f"{field}.feature",
                    f"input feature {ref.feature} is not activated by any single token",
                    'add `tokens: ["..."]` with the token that fires it',
                )
            ids.append(top)
        return Resolved(ref.feature, tuple(ids), field)

    def _token_id(self, text: str, field: str) -> int:
        """The id of ``text`` as one token (rulebooks write tokens as decoded text)."""
        tok = self.tokenizer
        if tok is None:
            self._fail(
                field,
                f"names token {text!r} but the model has no tokenizer",
                "give the input feature id instead (feature: N)",
            )
        if text not in self._encoded:
            self._encoded[text] = tok.encode(text, add_special_tokens=False)
        ids = self._encoded[text]
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None and ids == [unk] and text != tok.unk_token:
            self._fail(
                field,
                f"token {text!r} is not in the model's vocabulary",
                "name a token of the model's tokenizer, or give the feature id",
            )
        if len(ids) != 1:
            pieces = [tok.decode([i]) for i in ids]
            self._fail(
                field,
                f"token {text!r} is not one token of the model's tokenizer (it splits into "
                f"{pieces})",
                "name a single token, e.g. one of those pieces, or give the feature id",
            )
        return int(ids[0])

    def _fail(self, field: str, what: str, fix: str) -> None:
        raise InvalidRulebook(what, file=self.file, field=field, fix=fix)
