"""Processes that load models (a Workbench, a command that loads) exit without the cyclic
collector's last pass over what they loaded (``rulecheck.shutdown``); YAML commands leave the
exit as it is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GC_YOUNGEST, PLANTED_BOOK

import rulecheck.cli
import rulecheck.shutdown
from rulecheck.cli import main

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[1]

# garbage in a cycle whose finalizer speaks: only the exit's last collection can free it
SCRIPT = """
import gc, sys
gc.disable()

class Loud:
    def __del__(self):
        print("collected at exit", flush=True)

def cycle():
    loud = Loud()
    loud.me = loud

cycle()
if sys.argv[1] == "skip":
    import atexit
    from rulecheck.shutdown import skip_final_collection
    before = atexit._ncallbacks()
    skip_final_collection()
    skip_final_collection()  # once per process, however often asked
    print("registered", atexit._ncallbacks() - before)
print("done", flush=True)
"""


@pytest.mark.parametrize(
    ("mode", "printed"), [("skip", "registered 1\ndone"), ("keep", "done\ncollected at exit")]
)
def test_the_final_collection_is_skipped_only_when_asked(mode: str, printed: str) -> None:
    argv = [sys.executable, "-c", SCRIPT, mode]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == printed


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls of ``skip_final_collection`` from now on (none of them registers)."""
    calls: list[str] = []
    monkeypatch.setattr(rulecheck.cli, "skip_final_collection", lambda: calls.append("cli"))
    monkeypatch.setattr(rulecheck.shutdown, "skip_final_collection", lambda: calls.append("bench"))
    return calls


def test_commands_that_load_models_skip_it_and_yaml_commands_do_not(
    asked: list[str], tmp_path: Path
) -> None:
    book = ROOT / "rulebooks" / "rulecheck-tiny" / "L0H1.yaml"
    assert main(["show", str(book)]) == 0
    assert asked == []
    assert main(["extract", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    assert asked == ["cli"]


def test_a_workbench_skips_it_so_test_sessions_and_notebooks_do(
    asked: list[str], pytester: pytest.Pytester
) -> None:
    from rulecheck.session import Workbench

    Workbench(cache_dir=None)
    assert asked == ["bench"]
    pytester.makefile(".yaml", L0H0=PLANTED_BOOK)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
    assert result.ret == 0 and asked == ["bench", "bench"]


def test_the_test_processes_keep_the_libraries_out_of_the_collector() -> None:
    """This suite's own processes (``conftest.pytest_collection_finish``): the libraries and
    tests loaded before the first test are frozen out of the cyclic collector, which still
    runs, on what the tests make, less often."""
    import gc

    import transformer_lens

    assert gc.isenabled() and gc.get_threshold()[0] == GC_YOUNGEST
    assert gc.get_freeze_count() > 100_000
    assert gc.is_tracked(transformer_lens)  # a module: frozen, not among what a pass walks
    assert all(o is not transformer_lens for o in gc.get_objects())


PRINT_CACHE = """
import os

def pytest_collection_finish(session):
    print("cache:", os.environ["RULECHECK_TEST_CACHE"], os.path.isdir(os.environ["RULECHECK_TEST_CACHE"]))
"""


@pytest.mark.parametrize("given", [False, True], ids=["made", "given"])
def test_a_run_removes_the_cache_it_made_and_keeps_one_it_was_given(
    tmp_path: Path, given: bool
) -> None:
    """The suite's exemplar and zoo cache (``conftest.TEST_CACHE``, some hundred megabytes) is
    made per run under the temporary directory and removed when the run ends; a directory given
    in ``RULECHECK_TEST_CACHE`` (as xdist's workers are given their controller's) stays."""
    (tmp_path / "print_cache.py").write_text(PRINT_CACHE)
    env = {k: v for k, v in os.environ.items() if k != "RULECHECK_TEST_CACHE"}
    env |= {"TMPDIR": str(tmp_path), "PYTHONPATH": str(tmp_path)}
    if given:
        env["RULECHECK_TEST_CACHE"] = str(tmp_path / "given")
        (tmp_path / "given").mkdir()
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "print_cache"]
    run = subprocess.run(
        [*argv, "tests/conftest.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    [line] = [line for line in run.stdout.splitlines() if line.startswith("cache:")]
    _, cache, existed = line.split()
    assert Path(cache).parent == tmp_path and existed == "True"
    assert Path(cache).is_dir() == given
