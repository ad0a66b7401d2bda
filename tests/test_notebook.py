"""examples/notebook.py, run as a script: the Python API from loading to a checked edit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def test_the_notebook_extracts_writes_edits_and_checks(tmp_path):
    out = tmp_path / "books"
    env = {**os.environ, "RULECHECK_NOTEBOOK_OUT": str(out), "COLUMNS": "120"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "notebook.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    book = yaml.safe_load((out / "L0H1.yaml").read_text())
    assert (book["model"], book["layer"], book["head"]) == ("rulecheck-tiny", 0, 1)
    assert [f["feature"] for f in book["features"]] == [18, 30, 47]
    edited = book["features"][0]
    assert (edited["source"], edited["expect"]["f1"]) == ("manual", 0.99)
    assert (out / "L0H1.measured.json").is_file()
    lines = done.stdout.splitlines()
    assert "feature 18 f1: failed" in lines
    assert any(line.endswith("expected >= 0.990") for line in lines)
    assert "L0 exemplars" in done.stdout  # extraction shows its progress by default
    assert "8 passed, 1 failed" in done.stdout
