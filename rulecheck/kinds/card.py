"""What a rule kind shows of its claims: on a report's card and in ``rulecheck show``.

A kind's part of a card is a :class:`CardPart`, plain values the card template renders the
same way for every kind: a heading, then each claim (:class:`CardClaim`) as its text with
marks after it (:class:`Mark`: a score, a note, the outcome of its item) and, where the kind
draws one, a figure below the card. A figure is a plotly.js figure spec (``{"data": [...],
"layout": {...}}``, plain values); :func:`layout`, :func:`rounded` and the colours here are
shared with the report's own figures (``rulecheck.html.figures``).

In ``rulecheck show`` a kind has columns (:class:`Column`) of one line each per feature: by
default the number of its claims, headed by its key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

Figure = dict[str, Any]

BLUE, ORANGE, GREEN, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"


@dataclass(frozen=True)
class Mark:
    """What is shown after a claim on its card: a ``score`` or a ``note``, or an outcome
    (``badge passed``); its parts are shown separated by a middle dot."""

    style: str  # the CSS class: "score", "note", "badge failed"
    parts: tuple[str, ...]

    @classmethod
    def score(cls, *parts: str) -> Mark:
        return cls("score", parts)

    @classmethod
    def note(cls, text: str) -> Mark:
        return cls("note", (text,))

    @classmethod
    def outcome(cls, outcome: str | None) -> list[Mark]:
        """The badge of an item's outcome (none when the item did not run)."""
        return [cls(f"badge {outcome}", (outcome,))] if outcome else []


@dataclass(frozen=True)
class CardClaim:
    """One claim on a card: its ``index`` in the feature's list of its kind, its text, the
    input features it names (a tooltip), its marks and its figure."""

    index: int
    text: str
    ids: str
    marks: tuple[Mark, ...] = ()
    figure: Figure | None = None


@dataclass(frozen=True)
class CardPart:
    """A kind's part of a feature's card: a heading (with a ``note`` beside it), its claims
    (numbered when ``ordered``; ``more`` left out, counted), and the line shown when it has
    none (``empty``; None leaves the part out)."""

    title: str
    claims: tuple[CardClaim, ...]
    note: str | None = None
    ordered: bool = False
    more: int = 0
    empty: str | None = None


@dataclass(frozen=True)
class Column:
    """A column of ``rulecheck show``: its header, and whether it holds text (claims: cut
    with an ellipsis, code in Markdown, left out of a table narrower than ``WIDE_TABLE``)
    rather than a number."""

    name: str
    text: bool = False


SPACES = re.compile(r" {4,}")


def compact(text: str) -> str:
    """A run of four or more spaces as ``⎵`` and its length (indentation tokens are long)."""
    return SPACES.sub(lambda m: f"\u23b5{len(m[0])}", text)


def visible(text: str) -> str:
    """A token as a page shows it: line breaks and tabs visible, long runs of spaces counted."""
    text = text.replace("\r", "\u240d").replace("\n", "\u21b5").replace("\t", "\u21e5")
    return compact(text)


def fixed(value: Any, digits: int) -> str:
    """A number as a card shows it: a float with ``digits`` decimals, anything else as is."""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def rounded(x: float, digits: int = 3) -> float | None:
    """``x`` to ``digits`` significant digits; None for NaN (JSON has no NaN)."""
    if math.isnan(x) or math.isinf(x):
        return None
    return float(f"{x:.{digits}g}")


def layout(title: str, x: str, y: str, **more: Any) -> dict[str, Any]:
    """A figure's layout: its title and axis titles, then ``more``."""
    return {
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": x}},
        "yaxis": {"title": {"text": y}},
        **more,
    }
