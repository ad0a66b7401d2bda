"""YAML work stays light: ``rulecheck show``, ``summary``, ``diff`` and reading a rulebook
import neither torch nor the model and SAE libraries (their start-up is seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BOOKS = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny"
HEAVY = ("torch", "transformer_lens", "sae_lens", "hypothesis", "numpy", "scipy")

SCRIPT = f"""
import sys
from rulecheck.cli import main
from rulecheck.rulebook import load_rulebook
assert main(["show", {str(BOOKS / "L0H1.yaml")!r}]) == 0
assert main(["summary", {str(BOOKS)!r}]) == 0
assert main(["diff", {str(BOOKS)!r}, {str(BOOKS)!r}, "--format", "md"]) == 0
load_rulebook({str(BOOKS / "L1H3.yaml")!r}, measurements=True)
print("LOADED", sorted(m for m in {HEAVY!r} if m in sys.modules))
"""


def test_yaml_commands_import_no_model_libraries() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip().splitlines()[-1] == "LOADED []"
