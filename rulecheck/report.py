"""Rich tables of rulebooks: one head's features, or a summary over many heads."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rulecheck import kinds
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.bookdiff import FeatureDiff, HeadDiff
from rulecheck.errors import printable
from rulecheck.kinds.card import Column
from rulecheck.kinds.skipgram import shown_label
from rulecheck.rulebook import load_rulebook


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    return "nan" if math.isnan(value) else f"{value:.2f}"


FIRST_COLUMNS = (Column("feature"), Column("src"), Column("label"))
SHOW_SCORES = ("F1", "prec", "recall", "≥F1")
WIDE_TABLE = 120  # a narrower table leaves out the kinds' text columns, so the label keeps room


def show_columns() -> list[Column]:
    """The columns of ``rulecheck show``: the feature's, each registered kind's
    (``RuleKind.columns``: skip-grams' ``terms`` and ``next terms``, ``abs``, ``cnt``, ...),
    then the scores."""
    kind_columns = [c for kind in kinds.kinds() for c in kind.columns()]
    return [*FIRST_COLUMNS, *kind_columns, *(Column(n) for n in SHOW_SCORES)]


def rulebook_rows(rulebook: Rulebook) -> list[list[str]]:
    """One row per feature (``show_columns``), each cell on one line: its label, each kind's
    cells (the strongest terms, rule counts), and its scores."""
    rows = []
    for entry in rulebook.features:
        rows.append(
            [
                str(entry.feature),
                "manual" if entry.source == "manual" else "ext",
                shown_label(entry),
                *(cell for kind in kinds.kinds() for cell in kind.cells(entry)),
                _number(entry.measured.get("f1")),
                _number(entry.measured.get("precision")),
                _number(entry.measured.get("recall")),
                _number(entry.expect.get("f1")),
            ]
        )
    return rows


def _rulebook_title(rulebook: Rulebook) -> str:
    count = len(rulebook.features)
    return f"{rulebook.name}: {count} feature{'' if count == 1 else 's'}"


def rulebook_table(rulebook: Rulebook, width: int | None = None) -> Table:
    """``rulebook_rows`` as a table for a console ``width`` columns wide (None: wide). The
    ids, counts and scores never wrap; the label wraps, and below ``WIDE_TABLE`` columns the
    kinds' text columns (the next terms) are left out (``--format plain`` lists them), so
    that a narrow terminal or a pipe still shows every number."""
    wide = width is None or width >= WIDE_TABLE
    table = Table(title=_rulebook_title(rulebook))
    columns = show_columns()
    shown = [i for i, c in enumerate(columns) if wide or not c.text]
    for i in shown:
        name = columns[i].name
        if name == "label":  # shrinks, wrapping
            table.add_column(name, min_width=8)
        elif columns[i].text:  # shrinks, cut
            table.add_column(name)
        else:
            table.add_column(name, justify="left" if name == "src" else "right", no_wrap=True)
    for row in rulebook_rows(rulebook):
        cells = [_rich_cell(c, cell) for c, cell in zip(columns, row, strict=True)]
        table.add_row(*(cells[i] for i in shown))
    return table


def _rich_cell(column: Column, cell: str) -> str | Text:
    """Text cells as ``Text`` (a label such as ``[b]x[/b]`` is not markup): the label wraps,
    a kind's text is cut."""
    if column.name == "label":
        return Text(cell, overflow="fold")
    return Text(cell, no_wrap=True, overflow="ellipsis") if column.text else cell


def rulebook_plain(rulebook: Rulebook) -> str:
    """``rulebook_rows`` as tab-separated lines under a header line: one line per feature,
    for ``cut``, ``sort`` and ``grep``."""
    lines = ["\t".join(c.name for c in show_columns())]
    lines += ["\t".join(row) for row in rulebook_rows(rulebook)]
    return "\n".join(lines) + "\n"


def _markdown_cell(text: str, code: bool = False) -> str:
    """A table cell of GitHub Markdown: ``|`` escaped; ``code`` in a code span whose fence is
    longer than any run of backticks inside, so tokens show as written."""
    if code and text:
        fence = "`" * (max((len(r) for r in re.findall("`+", text)), default=0) + 1)
        text = f"{fence} {text} {fence}"
    return text.replace("|", "\\|")


def _left(column: Column) -> bool:
    return column.text or column.name in ("src", "label")


def rulebook_markdown(rulebook: Rulebook, path: str | Path) -> str:
    """The rulebook as GitHub Markdown: its path, header fields, then ``rulebook_rows`` as a
    table, labels and terms as code."""
    header = rulebook_fields(rulebook)
    lines = [f"### {printable(str(path))}", "", *(f"- {k}: {v}" for k, v in header.items()), ""]
    lines.append(f"**{_rulebook_title(rulebook)}**")
    lines.append("")
    columns = show_columns()
    lines.append("| " + " | ".join(c.name for c in columns) + " |")
    lines.append("|" + "|".join("---" if _left(c) else "--:" for c in columns) + "|")
    for row in rulebook_rows(rulebook):
        cells = [
            _markdown_cell(cell, code=c.name == "label" or c.text)
            for c, cell in zip(columns, row, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if rulebook.lost:
        lines += ["", lost_line(rulebook)]
    return "\n".join(lines) + "\n"


def rulebook_fields(rulebook: Rulebook) -> dict[str, str]:
    """Which head, model, SAEs, corpus and extraction method the rulebook is about."""
    fields = {
        "head": f"layer {rulebook.layer}, head {rulebook.head}",
        "model": rulebook.model,
        "sae_in": rulebook.sae_in,
        "sae_out": rulebook.sae_out,
        "corpus": rulebook.corpus,
        "extraction": rulebook.extraction.get("method"),
    }
    return {
        name: printable(str(value)) if value is not None else "-" for name, value in fields.items()
    }


def rulebook_header(rulebook: Rulebook) -> Text:
    """``rulebook_fields``, one a line."""
    text = Text()
    for name, value in rulebook_fields(rulebook).items():
        text.append(f"{name}: ", style="bold")
        text.append(f"{value}\n")
    return text


def print_rulebook(
    path: str | Path, console: Console | None = None, format: str = "table"
) -> Rulebook:
    """Load the rulebook at ``path`` and print it: its header and feature table
    (``format`` table, as wide as the console), its feature lines (plain) or GitHub
    Markdown."""
    rulebook = load_rulebook(path, measurements=True)
    console = console or Console()
    if format == "plain":
        console.file.write(rulebook_plain(rulebook))
        return rulebook
    if format == "markdown":
        console.file.write(rulebook_markdown(rulebook, path))
        return rulebook
    console.print(Text(printable(str(path)), style="bold underline"))
    console.print(rulebook_header(rulebook), end="")
    console.print(rulebook_table(rulebook, console.width))
    if rulebook.lost:
        console.print(lost_line(rulebook), soft_wrap=True)
    return rulebook


def lost_line(rulebook: Rulebook) -> str:
    """The features a remapped book lists under ``lost:``, by old id and best candidate."""
    parts = []
    for f in rulebook.lost:
        best = f.best_candidate
        to = "" if best is None or best.feature is None else f" (best candidate {best.feature})"
        parts.append(f"{f.feature}{to}")
    n = len(parts)
    return (
        f"{n} lost feature{'' if n == 1 else 's'}, by the ids of the SAE the book was remapped "
        f"from: {', '.join(parts)}"
    )


def _median(values: Iterable[Any]) -> float | None:
    numbers = [
        float(v)
        for v in values
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
    ]
    return statistics.median(numbers) if numbers else None


def _summary_row(name: str, features: list[FeatureRules]) -> list[str]:
    def metric(key: str) -> str:
        return _number(_median(f.measured.get(key) for f in features))

    terms = _median(len(f.skipgrams) for f in features)
    shown = "" if terms is None else f"{terms:g}"
    return [name, str(len(features)), metric("f1"), metric("precision"), metric("recall"), shown]


def summary_table(rulebooks: list[Rulebook]) -> Table:
    """One row per head (medians over its features) and an ``all`` row over every feature."""
    table = Table(title=f"{len(rulebooks)} heads")
    table.add_column("head")
    for name in ("features", "median F1", "median precision", "median recall", "median terms"):
        table.add_column(name, justify="right")
    ordered = sorted(rulebooks, key=lambda r: (r.layer, r.head))
    for rulebook in ordered:
        table.add_row(*_summary_row(rulebook.name, rulebook.features))
    everything = [f for r in ordered for f in r.features]
    table.add_section()
    table.add_row(*_summary_row("all", everything), style="bold")
    lost = sum(len(r.lost) for r in ordered)
    if lost:
        table.caption = f"{lost} lost feature{'' if lost == 1 else 's'} not counted (`lost:`)"
    return table


# ---------------------------------------------------------------------------------- diffs

DIFF_COLUMNS = ("head", "kept", "lost", "new", "rules added", "rules removed", "regressed")


def _diff_row(head: HeadDiff, tolerance: float) -> list[str]:
    counts = [head.count("kept"), head.count("lost"), head.count("new")]
    rules = [head.rules("added"), head.rules("removed")]
    return [head.head, *map(str, counts + rules), str(len(head.regressions(tolerance)))]


def _feature_rows(heads: list[HeadDiff], tolerance: float) -> list[list[str]]:
    """The changed features of every head, the ones a reviewer must see first: regressed,
    lost, new, rules changed, then by how far the F1 moved (heads and ids breaking ties)."""
    order = ("regressed", "lost", "new")

    def rank(item: tuple[str, FeatureDiff, str]) -> tuple[int, bool, float]:
        status, f, _ = item
        first = order.index(status) if status in order else len(order)
        return first, not (f.added or f.removed), -abs(f.delta_f1 or 0.0)

    changed = [
        ("regressed" if f.regressed(tolerance) else f.status, f, h.head)
        for h in heads
        for f in h.features
        if f.changed
    ]
    rows = []
    for status, f, head in sorted(changed, key=rank):
        if f.old is None or f.new in (None, f.old):
            name = str(f.new if f.old is None else f.old)
        else:
            name = f"{f.old} -> {f.new}"
        delta = "" if f.delta_f1 is None else f"{f.delta_f1:+.3f}"
        f1 = " -> ".join(_number(x) for x in (f.f1_old, f.f1_new) if x is not None)
        rules = [f"+{k} {r}" for k, rs in f.added.items() for r in rs]
        rules += [f"-{k} {r}" for k, rs in f.removed.items() for r in rs]
        rows.append([head, name, status, f1, delta, "; ".join(rules)])
    return rows


def _shown_rows(
    heads: list[HeadDiff], tolerance: float, limit: int
) -> tuple[list[list[str]], str | None]:
    """The first ``limit`` (0: all) of ``_feature_rows``, and the line saying how many more
    there are (None when none are left out)."""
    rows = _feature_rows(heads, tolerance)
    shown = rows[:limit] if limit else rows
    if len(shown) == len(rows):
        return shown, None
    more = _count(len(rows) - len(shown), "more changed feature")
    return shown, f"... and {more} (--limit 0 lists all)"


FEATURE_COLUMNS = ("head", "feature", "status", "F1", "change", "rules")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _gate_value(stat: dict[str, Any]) -> str:
    value = stat["value"]
    if value is None:
        return "n/a"
    if stat["threshold"] is None:
        return f"{value:.3f}"
    mark = ">=" if stat["passed"] else "<"
    return f"{value:.3f} {mark} {stat['threshold']:g}"


def gate_rows(gates: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The gate verdicts (``Verdict.record``) as a header and rows: head, verdict, each
    statistic against its threshold."""
    names = list(gates[0]["statistics"]) if gates else []
    rows = [
        [
            g["head"],
            "pass" if g["passed"] else "FAIL",
            *(_gate_value(g["statistics"][n]) for n in names),
        ]
        for g in gates
    ]
    return ["head", "gate", *names], rows


def gate_table(gates: list[dict[str, Any]]) -> Table:
    """The retraining gate's verdict per head, then why each failing head failed."""
    passed = sum(g["passed"] for g in gates)
    verdict = "passed" if passed == len(gates) else "FAILED"
    table = Table(title=f"rulecheck gate: {verdict} ({passed} of {len(gates)} heads pass)")
    header, rows = gate_rows(gates)
    for col in header:
        table.add_column(col, justify="left" if col in ("head", "gate") else "right")
    for g, row in zip(gates, rows, strict=True):
        table.add_row(*row, style=None if g["passed"] else "red")
    return table


def print_gate(gates: list[dict[str, Any]], console: Console) -> None:
    """``gate_table``, then each failing head's reason on its own line."""
    console.print(gate_table(gates))
    for g in gates:
        if not g["passed"]:
            line = Text(f"{g['head']}: gate failed: {g['reason']}", style="red")
            console.print(line, soft_wrap=True)


def gate_markdown(gates: list[dict[str, Any]]) -> str:
    """``gate_table`` as Markdown (a pull request's comment, a job summary)."""
    passed = sum(g["passed"] for g in gates)
    verdict = "passed" if passed == len(gates) else "FAILED"
    header, rows = gate_rows(gates)
    lines = [f"**rulecheck gate: {verdict}** ({passed} of {len(gates)} heads pass)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""] + [f"- {g['head']}: {g['reason']}" for g in gates if not g["passed"]]
    return "\n".join(lines).rstrip() + "\n"


def diff_tables(heads: list[HeadDiff], tolerance: float, limit: int = 0) -> list[Table]:
    """A table of heads (kept, lost, new features; rules added and removed; regressions) and
    one of the features that changed, the first ``limit`` of them (0: all) in the order a
    reviewer reads them (``_feature_rows``)."""
    summary = Table(
        title=f"rulebook diff: {_count(len(heads), 'head')} (F1 tolerance {tolerance:g})"
    )
    for col in DIFF_COLUMNS:
        summary.add_column(col, justify="left" if col == "head" else "right")
    for head in heads:
        summary.add_row(*_diff_row(head, tolerance))
    shown, more = _shown_rows(heads, tolerance, limit)
    changed = Table(title="changed features", caption=more)
    for col in FEATURE_COLUMNS:
        changed.add_column(col, justify="right" if col in ("F1", "change") else "left")
    for row in shown:
        changed.add_row(*(Text(cell) for cell in row))
    return [summary, changed]


def diff_markdown(heads: list[HeadDiff], tolerance: float, limit: int = 0) -> str:
    """The same as ``diff_tables``, as Markdown for a pull-request comment."""

    def table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
        cells = [[c.replace("|", "\\|") for c in row] for row in rows]
        return [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(row) + " |" for row in cells),
        ]

    regressed = sum(len(h.regressions(tolerance)) for h in heads)
    verdict = (
        f"**{_count(regressed, 'kept feature')} regressed** (F1 fell by more than {tolerance:g})"
    )
    lines = ["### rulecheck diff", "", verdict if regressed else "No kept feature regressed.", ""]
    lines += table(DIFF_COLUMNS, [_diff_row(h, tolerance) for h in heads])
    shown, more = _shown_rows(heads, tolerance, limit)
    if shown:
        lines += ["", "Changed features:", "", *table(FEATURE_COLUMNS, shown)]
        lines += ["", more] if more else []
    return "\n".join(lines) + "\n"
