"""``rulecheck extract``: the settings it is given, and the rulebooks of a model's heads."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from rulecheck.atomic import output_directory
from rulecheck.cli.common import say
from rulecheck.config import (
    Bound,
    ExemplarConfig,
    ExtractConfig,
    parse_config,
    parse_features,
    parse_shard,
    shard_of,
)
from rulecheck.files import check_replaceable
from rulecheck.heap import import_model_libraries
from rulecheck.progress import rich_progress


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    """The extraction settings the command line gives, each checked against its bound;
    ``InvalidSpec`` naming the option otherwise (before any work starts)."""
    texts = vars(args)
    return parse_config(
        ExtractConfig,
        texts,
        method=args.method,
        features=parse_features(args.features, "--features"),
        exemplars=parse_config(ExemplarConfig, texts),
    )


def run_extract(args: argparse.Namespace, console: Console) -> int:
    cfg = extract_config(args)
    layer = None if args.layer is None else Bound(int, 0).parse(args.layer, "--layer")
    shard = None if args.shard is None else parse_shard(args.shard)
    if args.out.is_dir():
        _check_book_paths(args.out)  # before the seconds of importing torch and sae_lens

    import_model_libraries()
    from rulecheck.api import extract_books, write_rulebooks
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs, parse_heads

    heads = parse_heads(args.heads)
    ckpt = Specs(args.model, args.sae_in, args.sae_out, args.corpus).resolve()
    with output_directory(args.out, "--out") as out:
        bench = Workbench(device=args.device, cache_dir=None, batch_size=cfg.batch_size)
        layers = [layer] if layer is not None else range(bench.n_layers(ckpt))
        work = [(n, heads) for n in layers]
        if shard is not None:
            every = [(h.layer, h.head) for n in layers for h in bench.layer_heads(ckpt, n, heads)]
            mine = shard_of(every, shard)
            work = [(n, [h for m, h in mine if m == n]) for n in sorted({m for m, _ in mine})]
            console.print(
                f"shard {shard[0]}/{shard[1]}: {len(mine)} of {len(every)} heads", soft_wrap=True
            )
        books = []
        with rich_progress(console) as progress:
            for n, group in work:
                books += extract_books(bench, ckpt, n, group, cfg, progress)
        written = write_rulebooks([(book, out / f"{book.name}.yaml") for book in books])
    for path in written:
        say(console, f"wrote {path}")
    return 0


def _check_book_paths(out: Path) -> None:
    """Before extraction starts: every book or measurements file already in ``out`` is a
    regular file that writing may replace (``files.check_replaceable``)."""
    for path in sorted([*out.glob("L*H*.yaml"), *out.glob("L*H*.measured.json")]):
        check_replaceable(path, "--out")
