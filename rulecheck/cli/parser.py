"""The command line's parser: every command and option, with its help."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from rulecheck.config import METHODS, ExemplarConfig, ExtractConfig
from rulecheck.errors import InvalidSpec


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
    add_cache_option(diff)

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
    add_cache_option(report)
    return parser


def add_cache_option(command: argparse.ArgumentParser) -> None:
    """``--cache``: the exemplar cache a command shares with Python and pytest."""
    command.add_argument(
        "--cache",
        default=None,
        type=Path,
        help="directory of cached exemplars (default: exemplars/ in $RULECHECK_CACHE,"
        " ~/.cache/rulecheck)",
    )
