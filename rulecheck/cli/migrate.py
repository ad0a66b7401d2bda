"""The commands that carry rulebooks over: ``rulecheck upgrade`` (to the current format),
``match`` (an old SAE's features to a retrained one's) and ``remap`` (books into the
retrained SAEs' ids)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rulecheck.atomic import recover
from rulecheck.cli.common import check_mappings, rulebook_paths, say
from rulecheck.errors import InvalidSpec, printable
from rulecheck.files import check_replaceable
from rulecheck.heap import import_model_libraries


def run_upgrade(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.atomic import atomic_write_many
    from rulecheck.book import SCHEMA_VERSION
    from rulecheck.rulebook import upgraded_files

    for given in args.paths:  # a set a killed upgrade was renaming is completed first
        recover(given if given.is_dir() else given.parent)
    paths = rulebook_paths(args.paths)
    files, rows = [], []
    for path in paths:
        version, out = upgraded_files(path)
        files += out
        rows.append((path, version))
    atomic_write_many(files)  # all or nothing
    for path, version in rows:
        if version == SCHEMA_VERSION:
            say(console, f"{path}: already format {SCHEMA_VERSION}")
        else:
            say(console, f"{path}: format {version} -> {SCHEMA_VERSION}")
    return 0


def _check_pair(old: Any, new: Any, old_spec: str, new_spec: str) -> None:
    """Two SAEs can be matched only when they read the same activations."""
    fix = "pass the old and the new SAE of the same hook"
    if old.cfg.d_in != new.cfg.d_in:
        raise InvalidSpec(
            f"--old {old_spec} has d_in={old.cfg.d_in}, --new {new_spec} has d_in={new.cfg.d_in}",
            field="d_in",
            fix=fix,
        )
    hooks = old.cfg.metadata.hook_name, new.cfg.metadata.hook_name
    if hooks[0] != hooks[1]:
        raise InvalidSpec(
            f"--old {old_spec} reads {hooks[0]!r}, --new {new_spec} reads {hooks[1]!r}",
            field="hook_name",
            fix=fix,
        )


def run_match(args: argparse.Namespace, console: Console) -> int:
    import_model_libraries()
    from rulecheck import zoo
    from rulecheck.config import MatchConfig, parse_config
    from rulecheck.loading import fingerprint_sae, load_corpus, load_model, load_sae
    from rulecheck.mapping import header_for, save_mapping
    from rulecheck.match import match_saes
    from rulecheck.specs import locate, processing_for

    texts = {"k": args.k, "threshold": args.threshold, "tokens": args.tokens}
    cfg = parse_config(MatchConfig, {**texts, "split_threshold": args.split_threshold})
    corpus = args.corpus
    if args.model is not None and corpus is None and zoo.is_zoo_spec(args.model):
        corpus = f"{args.model.split(':', 1)[0]}:eval"
    if (args.model is None) != (corpus is None):
        given, missing = ("--model", "--corpus") if corpus is None else ("--corpus", "--model")
        raise InvalidSpec(
            f"{given} is given without {missing}",
            field=missing,
            fix=f"pass {missing} too, or neither for a decoder-cosine match",
        )
    if args.out.is_dir():
        raise InvalidSpec("is a directory", file=args.out, field="--out", fix="name a file")
    check_replaceable(args.out, "--out")
    old = load_sae(locate(args.old), device=args.device)
    new = load_sae(locate(args.new), device=args.device)
    _check_pair(old, new, args.old, args.new)
    header = header_for(args.old, args.new, old, new, cfg, fingerprint_sae)
    model = tokens = None
    if args.model is not None:
        model = load_model(locate(args.model), device=args.device, **processing_for(old))
        model.eval()
        if header.hook not in model.hook_dict:
            raise InvalidSpec(
                f"the model has no hook {header.hook!r}",
                file=args.model,
                field="--model",
                fix="pass the model the SAEs were trained on",
            )
        tok = model.tokenizer
        seq_len = min(64, model.cfg.n_ctx)
        tokens = load_corpus(
            locate(corpus),
            tokenizer=tok,
            bos_token_id=None if tok is None else tok.bos_token_id,
            seq_len=seq_len,
            d_vocab=model.cfg.d_vocab,
            max_sequences=-(-cfg.tokens // (seq_len - 1)),
        )
        header.corpus = corpus
    matching, header.n_tokens = match_saes(old, new, cfg, model, tokens)
    try:
        path = save_mapping(matching, args.out, header)
    except OSError as exc:
        raise InvalidSpec(
            f"cannot write it: {exc.strerror or exc}",
            file=args.out,
            field="--out",
            fix="choose a file in a directory you can write to",
        ) from None
    table, verdict = match_summary(matching, old.cfg.d_sae, new.cfg.d_sae)
    method = "decoder cosine and activation correlation" if model is not None else "decoder cosine"
    console.print(f"matched by {method}", soft_wrap=True)
    console.print(table)
    console.print(verdict, soft_wrap=True)
    say(console, f"wrote {path}")
    return 0


def run_remap(args: argparse.Namespace, console: Console) -> int:
    import_model_libraries()
    from rulecheck.atomic import atomic_write_many
    from rulecheck.config import MatchConfig, parse_config
    from rulecheck.gate import gated
    from rulecheck.rulebook import _read_book_text, dump_rulebook, parse_rulebook
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    if args.sae_in is None and args.sae_out is None:
        raise InvalidSpec(
            "names no retrained SAE",
            field="--sae-out",
            fix="pass --sae-out (the retrained output SAEs), --sae-in, or both",
        )
    cfg = parse_config(MatchConfig, {"threshold": args.threshold})
    check_mappings(args.mapping)
    paths = rulebook_paths(args.paths)
    if args.out.exists() and not args.out.is_dir():
        raise InvalidSpec(
            "is not a directory", file=args.out, field="--out", fix="name a directory"
        )
    if any(p.resolve().parent == args.out.resolve() for p in paths):
        raise InvalidSpec(
            "holds the rulebooks being remapped",
            file=args.out,
            field="--out",
            fix="write the remapped books to another directory, then review and move them",
        )
    overrides = Specs(model=None, sae_in=args.sae_in, sae_out=args.sae_out)
    bench = Workbench(overrides=overrides, device=args.device, cache_dir=None)
    files, rows = [], []
    for path in paths:
        text = _read_book_text(path)
        book = parse_rulebook(text, path)
        book_bench = bench.for_book(book)  # the protocol the book was measured with
        gate = gated(book_bench, book, str(path), args.mapping, cfg, option="--mapping")
        book_bench.check_fingerprints(book, gate.old, str(path))
        out = args.out / path.name
        new = dump_rulebook(gate.remapped.written(), text, path=out, keep_manual=False)
        files.append((out, new.encode()))
        r = gate.remapped
        rows.append((book.name, len(r.new_id), len(r.lost), r.by_tokens, r.dropped, out))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_many(files)
    table = Table(title="rulecheck remap")
    for col in ("head", "kept", "lost", "refs by tokens", "rules left out", "written"):
        table.add_column(col, justify="left" if col in ("head", "written") else "right")
    for name, kept, lost, by_tokens, dropped, out in rows:
        cells = (name, str(kept), str(lost), str(by_tokens), str(dropped), str(out))
        table.add_row(*(Text(printable(cell)) for cell in cells))
    console.print(table)
    n_lost = sum(row[2] for row in rows)
    if n_lost:
        console.print(
            f"{n_lost} lost feature{'' if n_lost == 1 else 's'} written under `lost:` by their old "
            "ids: re-home or remove them before the books pass",
            soft_wrap=True,
        )
    return 0


def match_summary(matching: Any, n_old: int, n_new: int) -> tuple[Table, str]:
    """The counts of a matching as a rich table, and a one-line verdict."""
    kept = len(matching.pairs)
    table = Table()
    table.add_column("features")
    table.add_column("count", justify="right")
    table.add_row("kept", f"{kept} of {n_old} old")
    table.add_row("lost", str(len(matching.lost)))
    table.add_row("new", f"{len(matching.new)} of {n_new} new")
    table.add_row("split", str(len(matching.split)))
    table.add_row("merged", str(len(matching.merged)))
    if kept == n_old == n_new:
        verdict = "every feature has a partner"
    elif kept * 2 < n_old:
        verdict = "mostly lost and new: these SAEs share few features"
    else:
        verdict = f"{kept / max(1, n_old):.0%} of the old features kept"
    return table, verdict
