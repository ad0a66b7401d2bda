"""Command line: ``rulecheck extract``, ``show``, ``summary``, ``diff``, ``upgrade``,
``match``, ``remap`` and ``report``."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rulecheck.atomic import interrupted, noting_interrupts, output_directory, recover
from rulecheck.config import (
    METHODS,
    Bound,
    ExemplarConfig,
    ExtractConfig,
    parse_config,
    parse_features,
    parse_shard,
    shard_of,
)
from rulecheck.errors import InvalidRulebook, InvalidSpec, RulecheckError, printable
from rulecheck.files import check_replaceable, file_kind, read_limited
from rulecheck.paths import check_cache_dir
from rulecheck.progress import rich_progress

if TYPE_CHECKING:
    from rulecheck.book import Rulebook


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one-line ``InvalidSpec`` like every other error."""

    def error(self, message: str) -> NoReturn:
        raise InvalidSpec(message, fix=f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rulecheck",
        description="Extract rule-based descriptions of attention-head SAE features and "
        "check them as tests.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extract", help="extract rulebooks for the heads of a model")
    ex.add_argument(
        "--model",
        default=None,
        help="model directory, zoo name or TL model name (a HookedTransformer), or bridge: and "
        "a Hugging Face directory (a TransformerBridge)",
    )
    ex.add_argument("--sae-in", default=None, help="input SAE spec ({layer} template)")
    ex.add_argument("--sae-out", default=None, help="output SAE spec ({layer}/{head} templates)")
    ex.add_argument("--corpus", default=None, help=".npy [N, T], .txt, .jsonl or dataset name")
    ex.add_argument("--layer", default=None, help="layer (default: every layer)")
    ex.add_argument("--heads", default="all", help="heads, e.g. 0,3 or all")
    ex.add_argument("--features", default=str(ExtractConfig.features), help="count or ids")
    ex.add_argument(
        "--method",
        default=ExtractConfig.method,
        choices=list(METHODS),
        help="rank terms by attn*value (weight) or by mean gradient (gradient)",
    )
    helps = {
        "keys": "candidate keys per feature",
        "queries_per_key": "candidate queries per key",
        "max_terms": "most terms kept per feature",
        "term_margin": "keep the fewest terms whose validation F1 is within this of the best",
        "tolerance": "expect = measured - this",
        "n_pos": "positives per feature",
        "n_neg": "negatives per feature",
    }
    # every bounded setting of extraction is an option, its range in its help
    for cls in (ExtractConfig, ExemplarConfig):
        for f in fields(cls):
            bound = f.metadata.get("bound")
            if bound is not None and f.name not in ("top_tokens", "max_features"):
                name = f.name.replace("_", "-")
                text = f"{helps.get(f.name, name.replace('-', ' '))}: {bound.describe()}"
                ex.add_argument(f"--{name}", default=str(f.default), help=text)
    ex.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ex.add_argument(
        "--shard",
        default=None,
        help="i/n: extract only the i-th of n shares of the heads (a job array or CI matrix "
        "over machines; the shards' files together are the whole extraction)",
    )
    ex.add_argument("--out", required=True, type=Path, help="directory for L{l}H{h}.yaml")

    show = sub.add_parser("show", help="print a rulebook as a table")
    show.add_argument("file", type=Path)
    show.add_argument(
        "--format",
        choices=("table", "plain", "markdown"),
        default=None,
        help="table (the default in a terminal; as wide as the terminal), plain (one "
        "tab-separated line per feature, the default when piped) or markdown (a GitHub table)",
    )

    summary = sub.add_parser("summary", help="per-head summary of a directory of rulebooks")
    summary.add_argument("directory", type=Path)

    diff = sub.add_parser("diff", help="what changed between two rulebooks or directories")
    diff.add_argument("old", type=Path, help="a rulebook, or a directory of L{l}H{h}.yaml")
    diff.add_argument("new", type=Path, help="the same kind of path")
    diff.add_argument("--format", choices=("table", "md"), default="table")
    diff.add_argument(
        "--limit",
        default="50",
        help="changed features listed, the most important first (default 50; 0 lists all)",
    )
    diff.add_argument(
        "--tolerance", default="0.05", help="a kept feature regressed when its F1 fell by more"
    )
    diff.add_argument(
        "--mapping",
        default=None,
        help="when NEW was extracted with retrained SAEs: auto (match them on the fly) or the "
        "mapping files of rulecheck match (a file or a directory). OLD is then gated on NEW's "
        "SAEs first (the verdict of pytest --rulecheck-remap, which sets the exit status), and "
        "features are paired through the matching; where both books name the same SAEs, "
        "through the mapping files alone",
    )
    diff.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")

    upgrade = sub.add_parser("upgrade", help="rewrite rulebooks in the current format")
    upgrade.add_argument("paths", nargs="+", type=Path, help="rulebook files or directories")

    match = sub.add_parser("match", help="match the features of an old and a retrained SAE")
    match.add_argument("--old", required=True, help="the old SAE (path, zoo spec or registry id)")
    match.add_argument("--new", required=True, help="the new SAE of the same hook")
    match.add_argument("--model", default=None, help="model to correlate activations on")
    match.add_argument("--corpus", default=None, help="corpus (default: a zoo model's own)")
    match.add_argument("--tokens", default="4096", help="corpus tokens to correlate over: >= 1")
    match.add_argument("--k", default="8", help="candidates per old feature: >= 1")
    match.add_argument("--threshold", default="0.5", help="least score of a pair: -1..1")
    match.add_argument("--split-threshold", default="0.7", help="least score of a split: -1..1")
    match.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    match.add_argument("--out", required=True, type=Path, help="mapping file to write (YAML)")

    remap = sub.add_parser("remap", help="translate rulebooks into the ids of retrained SAEs")
    remap.add_argument("paths", nargs="+", type=Path, help="rulebook files or directories")
    remap.add_argument("--sae-in", default=None, help="the retrained input SAE ({layer})")
    remap.add_argument("--sae-out", default=None, help="the retrained output SAE ({layer}/{head})")
    remap.add_argument(
        "--mapping", default="auto", help="auto (match on the fly), or a mapping file or directory"
    )
    remap.add_argument("--threshold", default="0.5", help="least score of a pair: -1..1")
    remap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    remap.add_argument("--out", required=True, type=Path, help="directory for the new books")

    report = sub.add_parser(
        "report", help="write an HTML report of rulebooks: figures and every feature's evidence"
    )
    report.add_argument("paths", nargs="+", type=Path, help="rulebook files or directories")
    report.add_argument("-o", "--out", required=True, type=Path, help="HTML file to write")
    report.add_argument(
        "--run",
        type=Path,
        default=None,
        help="the JSON of a run (pytest --rulecheck-report PATH): each claim's outcome",
    )
    report.add_argument(
        "--exemplars", default="5", help="top exemplars per feature, 0 to skip the model: 0..50"
    )
    report.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    report.add_argument(
        "--cache",
        default=None,
        type=Path,
        help="directory of cached exemplars (default: exemplars/ in $RULECHECK_CACHE,"
        " ~/.cache/rulecheck)",
    )
    return parser


def _say(console: Console, line: str) -> None:
    """Print a line naming user paths: as it is (``errors.printable``), never as markup."""
    console.print(Text(printable(line)), soft_wrap=True)


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
        _say(console, f"wrote {path}")
    return 0


def _check_book_paths(out: Path) -> None:
    """Before extraction starts: every book or measurements file already in ``out`` is a
    regular file that writing may replace (``files.check_replaceable``)."""
    for path in sorted([*out.glob("L*H*.yaml"), *out.glob("L*H*.measured.json")]):
        check_replaceable(path, "--out")


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
        _check_mappings(args.mapping)
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
    from rulecheck.gate import gate_verdict, gated
    from rulecheck.session import Workbench, book_specs
    from rulecheck.specs import Specs

    written = book_specs(new, new_file)  # relative paths read from the new book's directory
    overrides = Specs(model=None, sae_in=written.sae_in, sae_out=written.sae_out)
    bench = Workbench(overrides=overrides, device=args.device, cache_dir=None).for_book(old)
    bench.announce(old, file)
    gate = gated(bench, old, file, args.mapping, option="--mapping")
    verdict = gate_verdict(bench, old, file, args.mapping)
    out_map = gate.maps["sae_out"]
    mapping = None if out_map is None else out_map.new_of
    return mapping, verdict.record(old.name)


def _check_mappings(source: str) -> None:
    """``--mapping``: ``auto``, or mapping files read and checked now, before any work (even
    where no SAE changed, so that a bad file is never passed over)."""
    from rulecheck.mapping import AUTO, read_mappings

    if source != AUTO:
        read_mappings(source, "--mapping")


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


def _must_exist(paths: list[Path]) -> None:
    """Each path is a regular file or a directory (symlinks followed)."""
    for path in paths:
        if not path.exists():
            raise InvalidSpec("no such file or directory", file=path, fix="check the path")
        kind = None if path.is_dir() else file_kind(path)
        if kind is not None:
            raise InvalidSpec(
                f"is {kind}, not a regular file or a directory", file=path, fix="check the path"
            )


def _rulebook_paths(given: list[Path]) -> list[Path]:
    """The rulebooks among ``given`` files and directories; an error when there are none."""
    from rulecheck.rulebook import rulebook_files

    _must_exist(given)
    paths = list(rulebook_files(given))
    if not paths:
        raise InvalidSpec(
            "holds no rulebook (a YAML file with a top-level `rulecheck:` key)",
            file=" ".join(map(str, given)),
            fix="pass rulebook files or the directories holding them",
        )
    return paths


def _book_pairs(old: Path, new: Path) -> list[tuple[Path, Path]]:
    """Two rulebooks, or the books of the same name in two directories."""
    _must_exist([old, new])
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


def run_upgrade(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.atomic import atomic_write_many
    from rulecheck.book import SCHEMA_VERSION
    from rulecheck.rulebook import upgraded_files

    for given in args.paths:  # a set a killed upgrade was renaming is completed first
        recover(given if given.is_dir() else given.parent)
    paths = _rulebook_paths(args.paths)
    files, rows = [], []
    for path in paths:
        version, out = upgraded_files(path)
        files += out
        rows.append((path, version))
    atomic_write_many(files)  # all or nothing
    for path, version in rows:
        if version == SCHEMA_VERSION:
            _say(console, f"{path}: already format {SCHEMA_VERSION}")
        else:
            _say(console, f"{path}: format {version} -> {SCHEMA_VERSION}")
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
    _say(console, f"wrote {path}")
    return 0


def run_remap(args: argparse.Namespace, console: Console) -> int:
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
    _check_mappings(args.mapping)
    paths = _rulebook_paths(args.paths)
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


def run_report(args: argparse.Namespace, console: Console) -> int:
    from rulecheck.html import build_report, check_output, write_report
    from rulecheck.html.outcomes import read_run

    out = check_output(args.out, "--out")
    n = Bound(int, 0, 50).parse(args.exemplars, "--exemplars")
    paths = _rulebook_paths(args.paths)
    run = None if args.run is None else read_run(args.run)
    bench = None
    if n:
        from rulecheck.session import DEFAULT_CACHE, Workbench

        bench = Workbench(device=args.device, cache_dir=args.cache or DEFAULT_CACHE)
    with rich_progress(console) as progress:
        html = build_report(
            [(p, str(p)) for p in paths], run, bench=bench, exemplars=n, progress=progress
        )
    write_report(out, html)
    _say(console, f"wrote {out}")
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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WANDB_MODE", "disabled")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    console = Console(stderr=False)
    err = Console(stderr=True)
    commands = {
        "extract": run_extract,
        "show": run_show,
        "summary": run_summary,
        "diff": run_diff,
        "upgrade": run_upgrade,
        "match": run_match,
        "remap": run_remap,
        "report": run_report,
    }
    try:
        args = build_parser().parse_args(argv)
        if args.command in LOADING:
            check_cache_dir()
        return run_noting_interrupts(commands[args.command], args, console)
    except RulecheckError as e:
        err.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
        return 2
    except KeyboardInterrupt as e:
        err.print(interrupted_line(e), soft_wrap=True, highlight=False)
        return INTERRUPTED


def run_noting_interrupts(command: Any, args: argparse.Namespace, console: Console) -> int:
    """``command``, where Ctrl-C is always an interrupt: one that the libraries below turned
    into another error (a lazy import's ``ModuleNotFoundError``) or swallowed is raised as
    ``KeyboardInterrupt`` when the command ends (writes after it were refused)."""
    with noting_interrupts():
        try:
            code = command(args, console)
        except Exception:
            if interrupted():
                raise KeyboardInterrupt from None
            raise
        if interrupted():
            raise KeyboardInterrupt
        return code


LOADING = ("extract", "diff", "match", "remap", "report")  # commands that may load models
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C stopped


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """What an interrupted command says: what it wrote, which is nothing unless the
    interrupt came while a set of files was renamed (they were completed first)."""
    written = getattr(exc, "written", [])
    if not written:
        return "interrupted; nothing was written"
    return "interrupted; wrote " + ", ".join(map(str, written))


if __name__ == "__main__":
    sys.exit(main())
