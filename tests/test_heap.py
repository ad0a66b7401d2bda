"""The cyclic collector around the model libraries (``rulecheck.heap``): they are imported with
it paused, a session about to run rulebook items freezes what it keeps out of its reach, and
processes that load models (a Workbench, a command that loads) exit without its last pass over
what they loaded; YAML commands leave the exit as it is."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_rulecheck
from conftest import GC_YOUNGEST, PLANTED_BOOK

import rulecheck
import rulecheck.cli
import rulecheck.heap
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
    from rulecheck.heap import skip_final_collection
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
    monkeypatch.setattr(rulecheck.heap, "skip_final_collection", lambda: calls.append("bench"))
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


# stands in for a model library: notes whether the collector ran while it was imported
LIBRARY = """
import gc
COLLECTOR_ON = gc.isenabled()
"""


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls of ``gc.freeze`` from now on (none of them freezes)."""
    calls: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    return calls


@pytest.mark.parametrize("kept", [False, True])
def test_model_libraries_are_imported_with_the_collector_paused(
    kept: bool, frozen: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"rulecheck_stand_in_{kept}"
    (tmp_path / f"{name}.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setattr(rulecheck.heap, "MODEL_LIBRARIES", ("sys", name))
    monkeypatch.delitem(sys.modules, name, raising=False)
    rulecheck.heap.import_model_libraries(kept=kept)
    assert sys.modules[name].COLLECTOR_ON is False and gc.isenabled()
    assert frozen == (["freeze"] if kept else [])
    rulecheck.heap.import_model_libraries()  # imported: nothing to do
    assert frozen == (["freeze"] if kept else [])


def test_the_collector_is_left_as_it_was() -> None:
    with rulecheck.heap.collector_paused():
        assert not gc.isenabled()
        gc.disable()
        with rulecheck.heap.collector_paused():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with rulecheck.heap.collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_api_s_first_names_import_with_the_collector_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rulecheck_stand_in_api.py").write_text(LIBRARY + "extract = COLLECTOR_ON\n")
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setitem(rulecheck.LAZY, "extract", "rulecheck_stand_in_api")
    monkeypatch.setitem(vars(rulecheck), "extract", None)  # restored (or removed) after
    monkeypatch.delitem(vars(rulecheck), "extract")
    assert rulecheck.extract is False and gc.isenabled()


def test_commands_that_load_models_import_them_with_the_collector_paused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    for module in (rulecheck.cli.extract, rulecheck.cli.migrate, rulecheck.cli.show):
        monkeypatch.setattr(module, "import_model_libraries", lambda: calls.append("import"))
    assert main(["extract", "--model", "no-such-model", "--out", str(tmp_path / "out")]) == 2
    assert calls == ["import"]
    book = str(ROOT / "rulebooks" / "rulecheck-tiny" / "L0H1.yaml")
    assert main(["remap", book, "--out", str(tmp_path / "remap")]) == 2
    assert calls == ["import"] * 2


ONLY_COLLECTED = """
def pytest_runtestloop(session):
    return True  # collected, not run
"""


@pytest.mark.parametrize(
    ("first", "program", "freezes"),
    [(True, "pytest", True), (True, "ipykernel_launcher", False), (False, "pytest", False)],
    ids=["first", "in-a-notebook", "nested"],
)
def test_a_session_with_rulebook_items_freezes_only_as_its_process_s_first(
    first: bool,
    program: str,
    freezes: bool,
    frozen: list[str],
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its model libraries imported, the first session of a process that runs pytest freezes
    every object alive before its items run; a session run inside another (pytester's) or by
    ``pytest.main`` in a notebook's kernel leaves its objects to the collector, and a session
    without rulebook items freezes nothing."""
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name=f"{program}.__main__")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "__main__", main)
    pytester.makeconftest(ONLY_COLLECTED)
    pytester.makepyfile(test_plain="def test_nothing():\n    pass\n")
    pytester.makefile(".yaml", L0H0=PLANTED_BOOK)
    for args in (["test_plain.py"], []):
        if first:
            monkeypatch.setattr(pytest_rulecheck, "_first_config", None)
        assert pytester.runpytest("-p", "no:cacheprovider", *args).ret == 0
        assert frozen == (["freeze"] if freezes and not args else [])


def test_a_process_runs_pytest_as_a_command_a_module_or_an_xdist_worker(
    monkeypatch: pytest.MonkeyPatch, pytestconfig: pytest.Config
) -> None:
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # a script's
    for script, runs in (("/venv/bin/pytest", True), ("/venv/bin/py.test", True), ("x.py", False)):
        monkeypatch.setattr(sys, "argv", [script])
        assert pytest_rulecheck.runs_the_process(pytestconfig) is (
            runs or hasattr(pytestconfig, "workerinput")
        )


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
