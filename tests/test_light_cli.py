"""YAML work stays light: ``rulecheck show``, ``summary``, ``diff`` and reading a rulebook
import neither torch nor the model and SAE libraries (their start-up is seconds)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BOOKS = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny"
HEAVY = ("torch", "transformer_lens", "sae_lens", "hypothesis", "numpy", "scipy")

SCRIPT = """
import sys
from rulecheck.cli import main
from rulecheck.rulebook import load_rulebook
books, mapping = sys.argv[1:]
assert main(["show", f"{books}/L0H1.yaml"]) == 0
assert main(["summary", books]) == 0
assert main(["diff", books, books, "--format", "md"]) == 0
book = f"{books}/L0H1.yaml"
assert main(["diff", book, book, "--mapping", mapping, "--format", "md"]) == 0
load_rulebook(f"{books}/L1H3.yaml", measurements=True)
print("LOADED", sorted(m for m in HEAVY if m in sys.modules))
"""


def test_yaml_commands_import_no_model_libraries(tmp_path: Path) -> None:
    from rulecheck.core.pairs import Matching, Pair
    from rulecheck.mapping import MappingHeader, save_mapping
    from rulecheck.rulebook import load_rulebook

    features = [rules.feature for rules in load_rulebook(BOOKS / "L0H1.yaml").features]
    matching = Matching([Pair(f, f, 1.0, None, 1.0, "matched") for f in features], [], [])
    header = MappingHeader("rulecheck-tiny:sae_out/L0H1", "retrained", "blocks.0.attn.hook_z", 1)
    save_mapping(matching, tmp_path / "L0H1.yaml", header)
    script = f"HEAVY = {HEAVY!r}\n{SCRIPT}"
    argv = [sys.executable, "-c", script, str(BOOKS), str(tmp_path / "L0H1.yaml")]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    assert out.strip().splitlines()[-1] == "LOADED []"


CONTROLLER = """
import sys
from rulecheck.plugin.settings import check_device

class Options:  # a pytest config with --rulecheck-device as given, nothing in the ini file
    def __init__(self, device):
        self.device = device
    def getoption(self, name, default=None):
        return self.device if name == "rulecheck_device" else default
    def getini(self, name):
        return ""

for device in (None, "auto", "cpu"):
    check_device(Options(device))
print("LOADED", sorted(m for m in HEAVY if m in sys.modules))
"""


def test_the_plugin_checks_the_default_device_without_torch() -> None:
    """The xdist controller, which runs no test, checks the options before its workers
    start: for ``auto`` and ``cpu``, which every machine has, it does not import torch."""
    script = f"HEAVY = {HEAVY!r}\n{CONTROLLER}"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "LOADED []"
