"""What ``rulecheck.extract`` and ``rulecheck.check`` return: a table in a terminal (rich), the
HTML report's feature cards in a notebook, and plain records for a DataFrame
(``pandas.DataFrame(result.to_records())``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rulecheck.book import Rulebook

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType

    from rulecheck.html.outcomes import Outcome

METRICS = ("f1", "precision", "recall", "spearman")
OUTCOMES = ("passed", "failed", "xfailed", "error")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


@dataclass(frozen=True)
class ItemResult:
    """One checked claim: the feature, the item's name (``f1``, ``absence[unless]``), the
    outcome (passed, failed, xfailed or error), the failure's message and what was measured."""

    feature: int
    item: str
    outcome: str
    message: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.outcome in ("passed", "xfailed")

    def to_record(self, head: str) -> dict[str, Any]:
        """This item as a flat dict: its fields and the scalar values it measured."""
        measured = {k: v for k, v in self.record.items() if _scalar(v) and k != "message"}
        return {
            **measured,
            "head": head,
            "feature": self.feature,
            "item": self.item,
            "outcome": self.outcome,
            "message": self.message,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ItemResult:
        """The item a record of ``to_record`` was made from (its scalar measurements; a
        column another item filled, None here, is not one of its own)."""
        own = ("head", "feature", "item", "outcome", "message")
        rest = {k: v for k, v in record.items() if k not in own and v is not None}
        return cls(record["feature"], record["item"], record["outcome"], record["message"], rest)


def _cards(book: Rulebook, outcomes: list[Outcome], title: str) -> str:
    """The book's feature cards as the HTML report draws them, with the items' outcomes."""
    from rulecheck.html.gather import BookInput, report_data
    from rulecheck.html.page import render_cards

    context, _ = report_data([BookInput(book, f"{book.name}.yaml", outcomes)], outcomes or None)
    return render_cards(title, context["books"][0]["cards"])


@dataclass
class ExtractResult:
    """One head's extraction: ``book`` (the ``Rulebook``), written by ``save``."""

    book: Rulebook
    path: Path | None = None

    def save(self, path: str | Path) -> Path:
        """Write the book to ``path`` (a ``.yaml`` file, or a directory: ``L{l}H{h}.yaml``
        in it) as ``rulecheck extract`` writes it; returns the file."""
        from rulecheck.api import save_rulebook

        self.path = save_rulebook(self.book, path)
        return self.path

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per feature: its label, claims by kind, measurements and minimums."""
        records = []
        for rules in self.book.features:
            record: dict[str, Any] = {
                "head": self.book.name,
                "feature": rules.feature,
                "source": rules.source,
                "label": rules.label,
            }
            record |= {key: len(claims) for key, claims in rules.claims.items()}
            record |= {m: rules.measured.get(m) for m in METRICS}
            record |= {f"expect_{m}": v for m, v in rules.expect.items()}
            records.append(record)
        return records

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
        from rulecheck.report import rulebook_table

        yield rulebook_table(self.book, options.max_width)

    def _repr_html_(self) -> str:
        n = len(self.book.features)
        title = f"{self.book.name} of {self.book.model}: {n} feature{'' if n == 1 else 's'}"
        return _cards(self.book, [], title)

    def __repr__(self) -> str:
        return f"<ExtractResult {self.book.name}: {len(self.book.features)} features>"


@dataclass
class CheckResult:
    """Every checked claim of a rulebook, in the book's order."""

    book: Rulebook
    items: list[ItemResult]
    file: str = ""

    @property
    def passed(self) -> bool:
        """Whether every claim held (an ``xfail`` feature's claims failing, as expected)."""
        return all(i.passed for i in self.items)

    @property
    def failed(self) -> list[ItemResult]:
        return [i for i in self.items if not i.passed]

    def item(self, feature: int, name: str = "f1") -> ItemResult:
        """The item ``name`` of ``feature``; ``KeyError`` if it was not checked."""
        for i in self.items:
            if (i.feature, i.item) == (feature, name):
                return i
        raise KeyError((feature, name))

    def counts(self) -> dict[str, int]:
        return {o: sum(i.outcome == o for i in self.items) for o in OUTCOMES}

    def to_records(self) -> list[dict[str, Any]]:
        """One flat dict per item, every one with the same keys (None where an item measured
        nothing of that name), so that they make a DataFrame; ``ItemResult.from_record``
        reads one back."""
        records = [i.to_record(self.book.name) for i in self.items]
        columns = list(dict.fromkeys(k for r in records for k in r))
        return [{k: r.get(k) for k in columns} for r in records]

    def outcomes(self) -> list[Outcome]:
        """The items as the HTML report's outcomes."""
        from rulecheck.html.outcomes import Outcome

        return [
            Outcome(
                nodeid=f"{self.book.name}.yaml::feature[{i.feature}]::{i.item}",
                outcome=i.outcome,
                record=i.record,
                message=i.message,
            )
            for i in self.items
        ]

    def title(self) -> str:
        counts = ", ".join(f"{n} {o}" for o, n in self.counts().items() if n)
        return f"{self.book.name} of {self.book.model}: {counts or 'nothing checked'}"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Any]:
        yield self.table()

    def table(self) -> RenderableType:
        """Per item: feature, item, outcome and the failure's first line."""
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.title())
        table.add_column("feature", justify="right", no_wrap=True)
        table.add_column("item", no_wrap=True)
        table.add_column("outcome", no_wrap=True)
        table.add_column("message", overflow="fold")
        styles = {"passed": "green", "xfailed": "yellow"}
        for i in self.items:
            first = (i.message or "").splitlines()[0] if i.message else ""
            outcome = Text(i.outcome, style=styles.get(i.outcome, "bold red"))
            table.add_row(str(i.feature), Text(i.item), outcome, Text(first))
        return table

    def _repr_html_(self) -> str:
        return _cards(self.book, self.outcomes(), self.title())

    def __repr__(self) -> str:
        return f"<CheckResult {self.title()}>"
