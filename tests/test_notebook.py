"""examples/notebook.py in a real Jupyter kernel, cell by cell: the Python API from loading to a
checked edit, its progress bars and its displays as a notebook shows them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "examples" / "notebook.py"
REPLY_SECONDS = 600  # the longest a cell may run (extraction, on a loaded machine)


def code_cells(path: Path) -> list[str]:
    """The code cells of a percent-format script (``# %%``); markdown cells are left out."""
    cells: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# %%"):
            cells.append([] if "[markdown]" not in line else ["# markdown"])
        elif cells:
            cells[-1].append(line)
    return ["\n".join(c).strip() for c in cells if c and c[0] != "# markdown"]


class Kernel:
    """An IPython kernel of this interpreter, started from a kernel spec of its own (no
    kernel installed for the user is used), that runs cells and returns what they published."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        from jupyter_client.kernelspec import KernelSpecManager
        from jupyter_client.manager import KernelManager

        spec = directory / "kernels" / "rulecheck-test"
        spec.mkdir(parents=True)
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        kernel = {"argv": argv, "display_name": "rulecheck test", "language": "python"}
        (spec / "kernel.json").write_text(json.dumps(kernel))
        specs = KernelSpecManager(kernel_dirs=[str(spec.parent)], ensure_native_kernel=False)
        # Unix sockets in ``directory``, not TCP ports: nothing but the file system is needed
        self.manager = KernelManager(
            kernel_name="rulecheck-test",
            kernel_spec_manager=specs,
            transport="ipc",
            ip=str(directory / "kernel"),
        )
        self.manager.start_kernel(cwd=str(directory), env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=REPLY_SECONDS)

    def run(self, code: str) -> list[dict[str, Any]]:
        """Run ``code`` as a cell: the messages it published (``display_data``, ``stream``,
        ``clear_output``, widget ``comm_open``, ...), failing with the cell's traceback."""
        msg_id = self.client.execute(code)
        published = []
        while True:
            msg = self.client.get_iopub_msg(timeout=REPLY_SECONDS)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            published.append(msg)
        reply = self.client.get_shell_msg(timeout=REPLY_SECONDS)["content"]
        if reply["status"] != "ok":
            pytest.fail(f"cell failed:\n{code}\n" + "\n".join(reply.get("traceback", [])))
        return published

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel()  # asked to stop, it exits as a closed notebook does


def texts(published: list[dict[str, Any]], mime: str = "text/plain") -> str:
    """Everything the messages show as ``mime`` (streams count as plain text)."""
    out = []
    for msg in published:
        content = msg["content"]
        if msg["msg_type"] == "stream" and mime == "text/plain":
            out.append(content["text"])
        elif msg["msg_type"] in ("display_data", "execute_result"):
            out.append(content["data"].get(mime, ""))
    return "\n".join(out)


def test_the_notebook_runs_in_a_kernel_with_progress_tables_and_cards(tmp_path, monkeypatch):
    """Every cell runs; extraction draws its progress bar live in a widget (a bar updated in
    place, not lines of text); the result and the check display as the report's cards; the
    book is written, edited and checked, the edited claim failing with its message; the
    kernel, closed, leaves no temporary file behind."""
    # the kernel's connection file and IPython's profile in the test's directory, not $HOME
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    out = tmp_path / "books"
    env = {**os.environ, "RULECHECK_NOTEBOOK_OUT": str(out)}
    # the kernel's torch on this process's share of the cores (one, beside another xdist
    # worker): more threads than cores spin against each other, three times the CPU
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    # the kernel's temporary files (wandb's, which sae_lens imports, among them) where the test
    # can see that a closed kernel leaves none behind
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    cells = code_cells(NOTEBOOK)
    kernel = Kernel(tmp_path, env)
    try:
        published = [kernel.run(cell) for cell in cells]
    finally:
        kernel.close()
    assert not list((tmp_path / "tmp").iterdir())
    [extracting] = [i for i, cell in enumerate(cells) if "rulecheck.extract(" in cell]
    shown = published[extracting]
    # the progress bar: an output widget, cleared and redrawn as the corpus pass goes on
    widgets = [
        m["content"]["data"]["state"].get("_model_name")
        for m in shown
        if m["msg_type"] == "comm_open"
    ]
    assert "OutputModel" in widgets
    bars = [t for t in texts(shown).splitlines() if "L0 exemplars" in t]
    assert len(bars) >= 2 and bars[-1].split()[-2].endswith("2000/2000\x1b[0m")
    assert any(m["msg_type"] == "clear_output" for m in shown)
    # the result is a table in text and the report's cards in HTML
    [result] = [m for m in shown if m["msg_type"] == "execute_result"]
    assert "L0H1: 3 features" in result["content"]["data"]["text/plain"]
    assert '<details class="card not-run" id="L0H1-f18"' in result["content"]["data"]["text/html"]
    [checking] = [i for i, cell in enumerate(cells) if "rulecheck.check(" in cell]
    [checked] = [m for m in published[checking] if m["msg_type"] == "execute_result"]
    assert '<details class="card failed" id="L0H1-f18"' in checked["content"]["data"]["text/html"]
    lines = texts([m for cell in published for m in cell]).splitlines()
    assert "feature 18 f1: failed" in lines
    assert any(line.endswith("expected >= 0.990") for line in lines)
    assert any("8 passed, 1 failed" in line for line in lines)
    book = yaml.safe_load((out / "L0H1.yaml").read_text())
    assert (book["model"], book["layer"], book["head"]) == ("rulecheck-tiny", 0, 1)
    assert [f["feature"] for f in book["features"]] == [18, 30, 47]
    edited = book["features"][0]
    assert (edited["source"], edited["expect"]["f1"]) == ("manual", 0.99)
    assert (out / "L0H1.measured.json").is_file()
