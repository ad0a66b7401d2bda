"""Command line: ``rulecheck extract``, ``show``, ``summary``, ``diff``, ``upgrade``,
``match``, ``remap`` and ``report``.

``parser`` holds the options, ``extract``, ``show`` (show, summary, diff, report) and
``migrate`` (upgrade, match, remap) the commands; this module runs one."""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from rich.console import Console
from rich.text import Text

from rulecheck.atomic import interrupted, noting_interrupts
from rulecheck.cli.extract import extract_config, run_extract
from rulecheck.cli.migrate import match_summary, run_match, run_remap, run_upgrade
from rulecheck.cli.parser import build_parser
from rulecheck.cli.show import run_diff, run_report, run_show, run_summary
from rulecheck.errors import RulecheckError
from rulecheck.heap import skip_final_collection
from rulecheck.paths import check_cache_dir

__all__ = ["build_parser", "extract_config", "main", "match_summary"]


def main(argv: list[str] | None = None) -> int:
    """The ``rulecheck`` command: its command's exit status, 2 after a one-line error,
    130 after Ctrl-C."""
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
            skip_final_collection()
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
