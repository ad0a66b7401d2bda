"""The commands that read rulebooks and show them: ``rulecheck show``, ``summary``, ``diff``
and ``report``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from rulecheck.cli.common import check_mappings, must_exist, rulebook_paths, say
from rulecheck.config import Bound
from rulecheck.errors import InvalidRulebook, InvalidSpec
from rulecheck.files import read_limited
from rulecheck.heap import import_model_libraries
from rulecheck.progress import rich_progress

if TYPE_CHECKING:
    from rulecheck.book import Rulebook


def run_show(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.report import print_rulebook

    format = args.format or ("table" if console.is_terminal else "plain")
    print_rulebook(args.file, console=console, format=format)
    return 0


def run_summary(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.report import summary_table
    from rulecheck.rulebook import load_rulebook

    if not args.directory.is_dir():
        raise InvalidSpec(
            "is not a directory", file=args.directory, fix="pass the --out directory of extract"
        )
    paths = sorted(args.directory.glob("L*H*.yaml"))
    books = [load_rulebook(p, measurements=True) for p in paths]
    if not books:
        raise InvalidSpec(
            "holds no L{layer}H{head}.yaml rulebooks",
            file=args.directory,
            fix="run rulecheck extract --out DIR first",
        )
    console.print(summary_table(books))
    return 0


def run_diff(args: argparse.Namespace, console: Console) -> int:
    """Without ``--mapping``: exit status 1 when a kept feature regressed past the tolerance.
    With it: the gate verdict of each old book on the new book's SAEs leads and sets the exit
    status; the regressions are its evidence."""
    from rulecheck.bookdiff import diff_books
    from rulecheck.report import diff_markdown, diff_tables, gate_markdown, print_gate
    from rulecheck.rulebook import load_rulebook

    tolerance = Bound(float, 0.0, 1.0).parse(args.tolerance, "--tolerance")
    limit = Bound(int, 0).parse(args.limit, "--limit")
    if args.mapping is not None:
        check_mappings(args.mapping)
    pairs = _book_pairs(args.old, args.new)
    heads, gates = [], []
    for a, b in pairs:
        old = load_rulebook(a, measurements=True)
        # a head whose book and measurements did not change is the same book: read once
        new = old if _same_bytes(a, b) else load_rulebook(b, measurements=True)
        mapping = None
        if args.mapping is not None and (old.sae_in, old.sae_out) != (new.sae_in, new.sae_out):
            mapping, verdict = _diff_gate(old, str(a), new, str(b), args)
            gates.append(verdict)
        elif args.mapping is not None:  # the same SAEs: paired through the files alone
            from rulecheck.mapping import mapping_for

            hook = f"blocks.{old.layer}.attn.hook_z"
            found = mapping_for(args.mapping, hook, (old.head, None), field="--mapping")
            mapping = found[1].mapping()
        heads.append(diff_books(old, new, mapping))
    if args.format == "md":
        console.file.write(
            (gate_markdown(gates) + "\n" if gates else "") + diff_markdown(heads, tolerance, limit)
        )
    else:
        if gates:
            print_gate(gates, console)
        for table in diff_tables(heads, tolerance, limit):
            console.print(table)
    if gates:
        return 0 if all(g["passed"] for g in gates) else 1
    return 1 if any(h.regressions(tolerance) for h in heads) else 0


def _diff_gate(
    old: Rulebook, file: str, new: Rulebook, new_file: str, args: argparse.Namespace
) -> tuple[dict[int, int] | None, dict]:
    """The old book gated on the new book's SAEs (``--mapping``: auto or mapping files):
    the output features' pairing (None: the SAE did not change) and the verdict's record."""
    import_model_libraries()
    from rulecheck.gate import gate_verdict, gated
    from rulecheck.session import DEFAULT_CACHE, Workbench, book_specs
    from rulecheck.specs import Specs

    written = book_specs(new, new_file)  # relative paths read from the new book's directory
    overrides = Specs(model=None, sae_in=written.sae_in, sae_out=written.sae_out)
    cache = args.cache or DEFAULT_CACHE
    bench = Workbench(overrides=overrides, device=args.device, cache_dir=cache).for_book(old)
    bench.announce(old, file)
    gate = gated(bench, old, file, args.mapping, option="--mapping")
    verdict = gate_verdict(bench, old, file, args.mapping)
    out_map = gate.maps["sae_out"]
    mapping = None if out_map is None else out_map.new_of
    return mapping, verdict.record(old.name)


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether rulebooks ``a`` and ``b`` and the measurement files beside them are equal."""
    from rulecheck.rulebook import MAX_BYTES, MAX_MEASURED_BYTES, measured_path

    def content(path: Path) -> tuple[bytes, bytes | None]:
        extra = measured_path(path)
        book = read_limited(path, MAX_BYTES, noun="rulebook", error=InvalidRulebook)
        if not os.path.lexists(extra):
            return book, None
        return book, read_limited(
            extra, MAX_MEASURED_BYTES, noun="measurements file", error=InvalidRulebook
        )

    return a.name == b.name and content(a) == content(b)


def _book_pairs(old: Path, new: Path) -> list[tuple[Path, Path]]:
    """Two rulebooks, or the books of the same name in two directories."""
    must_exist([old, new])
    if old.is_dir() != new.is_dir():
        raise InvalidSpec(
            "compares a file with a directory", file=new, fix="give two files or two directories"
        )
    if not old.is_dir():
        return [(old, new)]
    names = sorted({p.name for d in (old, new) for p in d.glob("L*H*.yaml")})
    missing = [(d, n) for n in names for d in (old, new) if not (d / n).exists()]
    if missing:
        d, n = missing[0]
        raise InvalidSpec(
            f"has no {n}, which the other directory has",
            file=d,
            fix="diff the books one by one, or add the missing head",
        )
    if not names:
        raise InvalidSpec("holds no L{layer}H{head}.yaml rulebooks", file=old, fix="check the path")
    return [(old / n, new / n) for n in names]


def run_report(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.html import build_report, check_output, write_report
    from rulecheck.html.outcomes import read_run

    out = check_output(args.out, "--out")
    n = Bound(int, 0, 50).parse(args.exemplars, "--exemplars")
    paths = rulebook_paths(args.paths)
    run = None if args.run is None else read_run(args.run)
    bench = None
    if n:
        import_model_libraries()
        from rulecheck.session import DEFAULT_CACHE, Workbench

        bench = Workbench(device=args.device, cache_dir=args.cache or DEFAULT_CACHE)
    with rich_progress(console) as progress:
        html = build_report(
            [(p, str(p)) for p in paths], run, bench=bench, exemplars=n, progress=progress
        )
    write_report(out, html)
    say(console, f"wrote {out}")
    return 0
