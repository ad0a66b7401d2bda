"""The HTML report: ``rulecheck report BOOKS -o report.html`` and the pytest plugin's
``--rulecheck-html``. One self-contained file (plotly.js, style, script and data inline) with
the overview of a set of rulebooks, the paper's figures, and a card per feature with its
evidence: top exemplars shaded by the feature's activation with the head's attention to the
rule's keys marked, its F1 curve, distractor drops and counting curves, and a failed claim's
counterexample.

``gather`` puts together what the page shows (no I/O), ``evidence`` measures on the model,
``figures`` draws, ``page`` renders; this module loads, runs and writes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rulecheck.errors import InvalidSpec, RulecheckError
from rulecheck.html.outcomes import Outcome, by_book

if TYPE_CHECKING:
    from rulecheck.session import Workbench

Progress = Callable[[str, int, int], None]


def check_output(path: Path, option: str) -> Path:
    """``path`` as a file the report can be written to, checked before any work starts
    (``files.check_output_file``)."""
    from rulecheck.files import check_output_file

    return check_output_file(path, option)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread while the report measures, unless ``OMP_NUM_THREADS`` says
    otherwise: its batches are small, and on a busy machine a second thread costs more than
    it gives (the shipped books of rulecheck-tiny: 8 s on one thread, 48 s on two, BENCHMARKS.md)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_report(
    books: list[tuple[Path, str]],
    run: list[Outcome] | None = None,
    *,
    bench: Workbench | None = None,
    root: Path | None = None,
    exemplars: int = 5,
    progress: Progress | None = None,
) -> str:
    """The report's HTML for the rulebooks at ``books`` (each path and how it is shown), with
    a run's outcomes (items matched to books by their node ids, relative to ``root``). With
    ``bench`` (a ``Workbench``) each feature's exemplars and curves are measured on the
    model; a head that cannot be measured says why on its section."""
    from rulecheck.html.gather import BookInput, report_data
    from rulecheck.html.page import render_page
    from rulecheck.rulebook import load_rulebook

    loaded = [(path, shown, load_rulebook(path, measurements=True)) for path, shown in books]
    if bench is not None:
        for path, _, book in loaded:
            bench.announce(book, str(path))  # a layer's heads then share one corpus pass
    matched = by_book(run or [], [p for p, _, _ in loaded], root)
    entries = []
    for path, shown, book in loaded:
        entry = BookInput(book, shown, matched[path])
        if bench is not None and exemplars > 0:
            from rulecheck.html.evidence import head_evidence

            try:
                with one_thread():
                    entry.evidence = head_evidence(
                        bench,
                        book,
                        str(path),
                        exemplars,
                        progress,
                        Path(shown).name,
                    )
            except RulecheckError as e:
                entry.error = str(e)
        entries.append(entry)
    context, data = report_data(entries, run)
    return render_page(context, data)


def write_report(path: Path, html: str, option: str = "--out") -> Path:
    """Write the report atomically; ``InvalidSpec`` naming ``option`` when it cannot be."""
    from rulecheck.atomic import atomic_write

    try:
        return atomic_write(path, html.encode("utf-8"))
    except OSError as exc:
        raise InvalidSpec(
            f"cannot write it: {exc.strerror or exc}",
            file=path,
            field=option,
            fix="choose a file in a directory you can write to",
        ) from None
