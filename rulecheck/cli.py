"""Command line: ``rulecheck extract`` and ``rulecheck show``."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("not yet")
