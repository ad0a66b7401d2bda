"""The rule kinds, one module each, and their registry.

A kind module holds everything about one kind of rule (``rulecheck.kinds.base`` says what):
its claim dataclass (the schema of its rulebook entries), its finder (extraction), its check
(the assertion the pytest plugin runs) and its item names. Built in:

- ``skipgrams`` (``rulecheck.kinds.skipgram``): ``[key] ... [query] -> feature``;
- ``absence`` (``rulecheck.kinds.absence``): a distractor key suppresses the feature;
- ``counting`` (``rulecheck.kinds.counting``): the feature follows the count of a key.

A new kind is one new module that subclasses ``RuleKind`` and calls :func:`register`; its key
then reads and writes in rulebooks, yields test items, shows on the HTML report's cards and in
``rulecheck show`` (``rulecheck.kinds.card``) and, when it finds claims, is extracted.
``CONTRIBUTING.md`` walks through it.
"""

from __future__ import annotations

from rulecheck.kinds.base import CheckContext, Found, RuleKind, refs_of
from rulecheck.kinds.card import CardClaim, CardPart, Column, Mark

KINDS: dict[str, RuleKind] = {}  # by rulebook key, in the order they are written


def register(kind: RuleKind) -> RuleKind:
    """Add ``kind`` to the registry (a kind of the same key is replaced)."""
    KINDS[kind.key] = kind
    return kind


def unregister(key: str) -> None:
    """Remove a registered kind (a test's toy kind, say)."""
    KINDS.pop(key, None)


def kinds() -> list[RuleKind]:
    """The registered kinds, in the order their keys are written."""
    return list(KINDS.values())


def _register_builtins() -> None:
    from rulecheck.kinds.absence import Absence
    from rulecheck.kinds.counting import Counting
    from rulecheck.kinds.skipgram import SkipGrams

    for kind in (SkipGrams(), Absence(), Counting()):
        register(kind)


_register_builtins()

__all__ = [
    "KINDS",
    "CardClaim",
    "CardPart",
    "CheckContext",
    "Column",
    "Found",
    "Mark",
    "RuleKind",
    "kinds",
    "refs_of",
    "register",
    "unregister",
]
