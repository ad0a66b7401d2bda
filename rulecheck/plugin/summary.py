"""The end of a run: every checked rule's outcome collected (from xdist workers too), a
table per head printed, and the JSON (``--rulecheck-report``) and HTML (``--rulecheck-html``)
reports written, never after an interrupt."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any, cast

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rulecheck.atomic import interrupted
from rulecheck.errors import RulecheckError
from rulecheck.plugin.settings import cache_dir, setting
from rulecheck.plugin.state import STASH_CHECK, relative, workbench


class Summary:
    """Collects every checked rule's outcome (from workers too, under xdist) and prints a
    table per head at the end; optionally writes them as JSON."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.gates: list[dict[str, Any]] = []  # each gate item's verdict (--rulecheck-remap)
        self.items: list[Any] = []  # every rulebook item's outcome, for the HTML report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and not (
            report.when == "setup" and (report.failed or report.skipped)
        ):
            return
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        records = [
            cast(dict, value) for name, value in report.user_properties if name == "rulecheck"
        ]
        if report.when == "call" or report.failed:
            for record in records:
                self.results.append(dict(record, outcome=outcome, nodeid=report.nodeid))
            for name, value in report.user_properties:
                if name == "rulecheck-gate":
                    gate = dict(
                        cast(dict, value), rule="gate", outcome=outcome, nodeid=report.nodeid
                    )
                    self.gates.append(gate)
                    records.append(gate)
        if setting(self.config, "html") and report.nodeid.split("::", 1)[0].endswith(
            (".yaml", ".yml")
        ):
            self.items.append(_outcome(report, outcome, records))

    def table(self) -> Table:
        """Rules by head: features, outcomes and the median F1."""
        table = Table(title="rulecheck: rules by head")
        for col in ("head", "features", "passed", "failed", "skipped", "xfailed", "median F1"):
            table.add_column(col, justify="left" if col == "head" else "right")
        by_head = _by_head(self.results)
        for head in sorted(by_head, key=_head_order):
            row = by_head[head]
            f1 = statistics.median(row["f1"].values()) if row.get("f1") else None
            counts = [str(row[k]) for k in ("passed", "failed", "skipped", "xfailed")]
            table.add_row(
                escape(head), str(len(row["features"])), *counts, "" if f1 is None else f"{f1:.2f}"
            )
        return table

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config) -> None:
        # 120 columns: the gate's table holds each statistic against its threshold unwrapped
        console = Console(file=terminalreporter._tw._file, width=120)
        if self.gates:
            from rulecheck.report import print_gate

            print_gate(sorted(self.gates, key=lambda g: _head_order(g["head"])), console)
        stopped = exitstatus == pytest.ExitCode.INTERRUPTED or interrupted()
        if self.results or self.gates:
            if self.results:
                console.print(self.table())
            path = setting(self.config, "report")
            if path:
                entries = [*self.gates, *self.results]
                data = json.dumps(entries, indent=2, sort_keys=True) + "\n"
                self.write_output("report", Path(path), data, stopped, terminalreporter)
        html = setting(self.config, "html")
        if html and not hasattr(self.config, "workerinput"):
            if stopped:
                terminalreporter.write_line(f"rulecheck: interrupted; {html} not written")
            else:
                self.write_html(Path(html), terminalreporter)

    def write_output(self, name: str, path: Path, data: str, stopped: bool, reporter) -> None:
        """Write a run's output atomically, or say in one line why it was not: an
        interrupted run's outcomes are not the run's."""
        from rulecheck.atomic import atomic_write

        if stopped:
            reporter.write_line(f"rulecheck: interrupted; {path} not written")
            return
        try:
            atomic_write(path, data.encode())
        except (OSError, RulecheckError) as e:
            what = relative(self.config, e) if isinstance(e, RulecheckError) else str(e)
            reporter.write_line(f"rulecheck: --rulecheck-{name}: {what}", red=True)

    def write_html(self, path: Path, terminalreporter) -> None:
        """The HTML report of the run's rulebooks, measured on the books' own checkpoints
        (the retrained SAEs' ids mean nothing to a book's features)."""
        import time

        from rulecheck.html import build_report, write_report

        start = time.perf_counter()
        root = self.config.rootpath
        files = sorted({o.file for o in self.items})
        books = [(root / f, f) for f in files if (root / f).is_file()]
        if not books:
            terminalreporter.write_line(f"rulecheck: no rulebook items ran; {path} not written")
            return
        bench = self.report_bench()
        try:
            html = build_report(books, self.items, bench=bench, root=root)
            write_report(path, html, "--rulecheck-html")
        except RulecheckError as e:
            terminalreporter.write_line(
                f"rulecheck: --rulecheck-html: {relative(self.config, e)}", red=True
            )
            return
        seconds = time.perf_counter() - start
        terminalreporter.write_line(f"rulecheck: wrote {path} ({seconds:.1f} s)")

    def report_bench(self):
        """The Workbench the HTML report measures on: the session's, or in a gate run a
        fresh one without the retrained SAEs' overrides."""
        if not self.config.stash[STASH_CHECK].remap:
            return workbench(self.config)
        from rulecheck.session import Workbench

        return Workbench(
            device=setting(self.config, "device", "auto"), cache_dir=cache_dir(self.config)
        )


def _by_head(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The results counted per head: its features, outcomes and F1 per feature."""
    by_head: dict[str, dict[str, Any]] = {}
    for r in results:
        row = by_head.setdefault(
            r["head"],
            {"features": set(), "passed": 0, "failed": 0, "skipped": 0, "xfailed": 0},
        )
        row["features"].add(r["feature"])
        kept = ("passed", "skipped", "xfailed")
        row[r["outcome"] if r["outcome"] in kept else "failed"] += 1
        if "f1" in r:
            row.setdefault("f1", {})[r["feature"]] = r["f1"]
    return by_head


def _outcome(report: pytest.TestReport, outcome: str, records: list[dict[str, Any]]):
    """A rulebook item's outcome, as the HTML report takes it."""
    from rulecheck.html.outcomes import Outcome

    failed = report.failed or outcome == "xfailed"
    return Outcome(
        nodeid=report.nodeid,
        outcome=outcome,
        record=dict(records[0]) if records else {},
        message=_message(report, records) if failed else None,
    )


def _message(report: pytest.TestReport, records: list[dict[str, Any]]) -> str:
    """A failed item's message: its record's, else its report's text (without the line
    naming the xdist worker)."""
    for record in records:
        if isinstance(record.get("message"), str):
            return record["message"]
    lines = report.longreprtext.splitlines()
    return "\n".join(line for line in lines if not _WORKER_LINE.match(line)).strip()


_WORKER_LINE = re.compile(r"^\[gw\d+\] .* -- Python ")


def _head_order(name: str) -> tuple[str, int, int]:
    """Rows by model, then layer and head (``"model L0H3"``)."""
    model, _, name = name.rpartition(" ")
    layer, head = name[1:].split("H")
    return model, int(layer), int(head)
