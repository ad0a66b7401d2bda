"""Command line: ``rulecheck extract``, ``rulecheck show`` and ``rulecheck summary``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from rulecheck.config import METHODS, ExemplarConfig, ExtractConfig
from rulecheck.errors import InvalidSpec, RulecheckError

T = TypeVar("T")


def _features(text: str) -> int | tuple[int, ...]:
    """``--features 20`` samples 20 features; ``--features 3,17`` names them."""
    try:
        if "," in text:
            return tuple(int(x) for x in text.split(",") if x.strip())
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--features: cannot read {text!r} (fix: a count such as 20 or ids such as 3,17)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rulecheck",
        description="Extract rule-based descriptions of attention-head SAE features and "
        "check them as tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    cfg, exemplars = ExtractConfig(), ExemplarConfig()
    ex = sub.add_parser("extract", help="extract skip-gram rulebooks for the heads of a layer")
    ex.add_argument("--model", default=None, help="model directory, zoo name or TL model name")
    ex.add_argument("--sae-in", default=None, help="input SAE spec ({layer} template)")
    ex.add_argument("--sae-out", default=None, help="output SAE spec ({layer}/{head} templates)")
    ex.add_argument("--corpus", default=None, help=".npy [N, T], .txt, .jsonl or dataset name")
    ex.add_argument("--layer", type=int, default=None, help="layer (default: every layer)")
    ex.add_argument("--heads", default="all", help="heads, e.g. 0,3 or all")
    ex.add_argument("--features", type=_features, default=cfg.features, help="count or ids")
    ex.add_argument(
        "--method",
        default=cfg.method,
        choices=list(METHODS),
        help="rank terms by attn*value (weight) or by mean gradient (gradient)",
    )
    ex.add_argument("--keys", type=int, default=cfg.keys, help="candidate keys per feature")
    ex.add_argument("--queries-per-key", type=int, default=cfg.queries_per_key)
    ex.add_argument("--max-terms", type=int, default=cfg.max_terms, help="most terms kept")
    ex.add_argument(
        "--tolerance", type=float, default=cfg.tolerance, help="expect = measured - this"
    )
    ex.add_argument("--min-active", type=int, default=exemplars.min_active)
    ex.add_argument("--min-inactive", type=int, default=exemplars.min_inactive)
    ex.add_argument("--n-pos", type=int, default=exemplars.n_pos, help="positives per feature")
    ex.add_argument("--n-neg", type=int, default=exemplars.n_neg, help="negatives per feature")
    ex.add_argument("--batch-size", type=int, default=cfg.batch_size)
    ex.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ex.add_argument("--seed", type=int, default=exemplars.seed)
    ex.add_argument("--out", required=True, type=Path, help="directory for L{l}H{h}.yaml")

    show = sub.add_parser("show", help="print a rulebook as a table")
    show.add_argument("file", type=Path)

    summary = sub.add_parser("summary", help="per-head summary of a directory of rulebooks")
    summary.add_argument("directory", type=Path)
    return parser


@contextmanager
def rich_progress(console: Console) -> Iterator:
    """A progress callback ``(task, advance, total)`` drawing one rich bar per task."""
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, int] = {}

    def update(task: str, advance: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total)
        bars.update(tasks[task], advance=advance)

    with bars:
        yield update


def _config(cls: type[T], args: argparse.Namespace) -> T:
    """A config dataclass with the fields the command line gives, defaults for the rest."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def run_extract(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.api import extract_rulebooks
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    ckpt = Specs(args.model, args.sae_in, args.sae_out, args.corpus).resolve()
    cfg = replace(_config(ExtractConfig, args), exemplars=_config(ExemplarConfig, args))
    bench = Workbench(device=args.device, cache_dir=None, batch_size=args.batch_size)
    layers = [args.layer] if args.layer is not None else range(bench.n_layers(ckpt))
    written = []
    with rich_progress(console) as progress:
        for layer in layers:
            written += extract_rulebooks(bench, ckpt, layer, args.heads, args.out, cfg, progress)
    for path in written:
        console.print(f"wrote {path}")
    return 0


def run_show(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.report import print_rulebook

    print_rulebook(args.file, console=console)
    return 0


def run_summary(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.report import summary_table
    from rulecheck.rulebook import load_rulebook

    if not args.directory.is_dir():
        raise InvalidSpec(
            "is not a directory", file=args.directory, fix="pass the --out directory of extract"
        )
    books = [load_rulebook(p) for p in sorted(args.directory.glob("L*H*.yaml"))]
    if not books:
        raise InvalidSpec(
            "holds no L{layer}H{head}.yaml rulebooks",
            file=args.directory,
            fix="run rulecheck extract --out DIR first",
        )
    console.print(summary_table(books))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")
    args = build_parser().parse_args(argv)
    console = Console(stderr=False)
    err = Console(stderr=True)
    commands = {"extract": run_extract, "show": run_show, "summary": run_summary}
    try:
        return commands[args.command](args, console)
    except RulecheckError as e:
        err.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
