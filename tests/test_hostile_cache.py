"""Caches that cannot be used, full disks and interrupts, through the real command line and the
real plugin: a bad cache location is one line before any work, a cache that cannot be written
is a warning, an output that cannot be written is one line with nothing half-written, Ctrl-C
writes nothing, and a set of files a killed run was renaming is completed by the next run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rulecheck.api
from rulecheck.cli import main

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: {head}
features:
  - feature: 1
    source: manual
    skipgrams:
      - {{key: {{tokens: [if]}}, query: {{tokens: [then]}}}}
    expect: {{f1: 0.5}}
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", *args, no_reraise_ctrlc=True)


@pytest.fixture
def books(pytester, monkeypatch, tmp_path):
    """A directory with a true claim on the planted model, the zoo built under tmp_path."""
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makefile(".yaml", L0H0=BOOK.format(head=0))
    return pytester


def one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def unwritable(tmp_path: Path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


def bad_places(tmp_path: Path) -> dict[str, Path]:
    """Places no cache can go: a file, a path under a file, and (not as root, who writes
    anywhere) a read-only directory and ``/``."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    places = {"file": a_file, "under-a-file": a_file / "sub"}
    if not IS_ROOT:
        places |= {"read-only": unwritable(tmp_path), "root": Path("/")}
    return places


# ------------------------------------------------------------------------- cache locations


@pytest.mark.parametrize("place", ["file", "under-a-file", "read-only"])
def test_a_cache_option_that_cannot_hold_a_cache_is_a_usage_error(books, tmp_path, place):
    if place not in bad_places(tmp_path):
        pytest.skip("root writes into read-only directories")
    path = bad_places(tmp_path)[place]
    result = run(books, f"--rulecheck-cache={path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {path}: --rulecheck-cache: * (fix: *"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("place", ["file", "under-a-file", "read-only", "root"])
def test_a_rulecheck_cache_that_cannot_hold_a_cache_is_one_line(
    capsys, monkeypatch, tmp_path, place
):
    if place not in bad_places(tmp_path):
        pytest.skip("root writes into read-only directories and /")
    monkeypatch.setenv("RULECHECK_CACHE", str(bad_places(tmp_path)[place]))
    out = tmp_path / "out"
    code = main(["extract", "--model", "planted", "--out", str(out)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "RULECHECK_CACHE: " in err and "(fix: set RULECHECK_CACHE to" in err
    assert not out.exists()


def test_a_rulecheck_cache_naming_a_file_is_a_usage_error_of_the_plugin(books, monkeypatch):
    a_file = books.path / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("RULECHECK_CACHE", str(a_file))
    result = run(books)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *a-file: RULECHECK_CACHE: * (fix: *"])


def test_an_empty_rulecheck_cache_is_the_default_never_the_working_directory(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("RULECHECK_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["extract", "--model", "planted", "--corpus", "no.npy", "--out", "out"])
    assert code == 2 and "no.npy" in capsys.readouterr().err  # the zoo was built, then stopped
    assert (tmp_path / "home" / ".cache" / "rulecheck" / "zoo" / "planted").is_dir()
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------ full disks


def full_disk(monkeypatch, under: Path) -> None:
    """``os.fsync`` of any file under ``under`` fails as on a full disk."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(under)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_a_full_disk_under_the_exemplar_cache_is_a_warning_and_the_claim_passes(books, monkeypatch):
    cache = books.path / "cache"
    full_disk(monkeypatch, cache)
    result = run(books, f"--rulecheck-cache={cache}", "-W", "always")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*exemplar cache entry not written (No space left on device); going on uncached*"]
    )
    assert not list(cache.glob("exemplars-*")) and not list(cache.glob(".*.tmp"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_a_full_disk_while_extraction_writes_is_one_line_and_writes_nothing(
    capsys, monkeypatch, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "L0H0.yaml"
    old.write_text(BOOK.format(head=0))
    full_disk(monkeypatch, out)
    code = main(["extract", "--model", "planted", "--layer", "0", "--heads", "0", "--features",
                 "1", "--out", str(out)])  # fmt: skip
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "cannot write it: No space left on device (fix: free some" in err
    assert str(out) in err
    assert [p.name for p in out.iterdir()] == ["L0H0.yaml"]
    assert old.read_text() == BOOK.format(head=0)


def format_1_book(directory: Path) -> Path:
    path = directory / "L0H3.yaml"
    path.write_text((ROOT / "tests" / "data" / "format1_book.txt").read_text())
    return path


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_a_full_disk_during_upgrade_is_one_line_and_writes_nothing(capsys, monkeypatch, tmp_path):
    book = format_1_book(tmp_path)
    before = book.read_bytes()
    full_disk(monkeypatch, tmp_path)
    code = main(["upgrade", str(tmp_path)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"{tmp_path}" in err and "No space left on device" in err
    assert [p.name for p in tmp_path.iterdir()] == ["L0H3.yaml"] and book.read_bytes() == before


# ------------------------------------------------------------------------------ interrupts
# xdist's workers ignore SIGINT, and an ignored signal stays ignored in the processes they
# start: each test here gets Ctrl-C as a terminal delivers it, its own process and its children


def _sigint_as_at_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Python installs its handler over it


@pytest.fixture(autouse=True)
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in this process during the test, as in a shell."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_ctrl_c_during_extract_exits_130_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = out / "L0H0.yaml"
    old.write_text(BOOK.format(head=0))
    script = (
        "import sys; from rulecheck.cli import main; print('started', flush=True); "
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", script, "extract", "--model", "planted", "--out", str(out)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_sigint_as_at_a_terminal,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    time.sleep(1.0)  # at work: loading torch, the model, streaming the corpus
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; nothing was written"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [p.name for p in out.iterdir()] == ["L0H0.yaml"]
    assert old.read_text() == BOOK.format(head=0)


def swallowing_an_interrupt(real):
    """``real``, then a SIGINT that something catching everything swallows, as a cleanup hook
    once did."""

    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass
        return result

    return call


def test_an_interrupt_swallowed_during_extraction_still_writes_nothing(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setattr(
        rulecheck.api, "extract_books", swallowing_an_interrupt(rulecheck.api.extract_books)
    )
    out = tmp_path / "out"
    argv = ["extract", "--model", "planted", "--layer", "0", "--heads", "0", "--features", "1"]
    code = main([*argv, "--out", str(out)])
    assert code == 130
    assert capsys.readouterr().err.strip() == "interrupted; nothing was written"
    assert not out.exists()


def test_an_interrupt_swallowed_during_regeneration_rewrites_no_book(books, monkeypatch):
    real = rulecheck.api.regenerated
    monkeypatch.setattr(rulecheck.api, "regenerated", swallowing_an_interrupt(real))
    before = (books.path / "L0H0.yaml").read_bytes()
    result = run(books, "--rulecheck-extract=all", "L0H0.yaml")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert (books.path / "L0H0.yaml").read_bytes() == before
    assert not (books.path / "L0H0.measured.json").exists()
    assert "passed" not in result.stdout.str()


def test_an_interrupt_swallowed_while_a_claim_is_checked_is_no_pass(books, monkeypatch):
    from rulecheck.kinds.skipgram import SkipGrams

    monkeypatch.setattr(SkipGrams, "check", swallowing_an_interrupt(SkipGrams.check))
    report = books.path / "run.json"
    result = run(books, f"--rulecheck-report={report}")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "passed" not in result.stdout.str() and not report.exists()


# ------------------------------------------------------------------------------ kills


def killed_after_renaming(renames: int, call: str) -> None:
    """Run ``call`` (Python) in a process that dies (``os._exit``) after ``renames`` renames
    onto files a person reads (those of temporary files and journals not counted)."""
    script = f"""
import os
from pathlib import Path
real, done = os.replace, []
def replace(src, dst):
    real(src, dst)
    if not Path(dst).name.startswith("."):
        done.append(dst)
        if len(done) == {renames}:
            os._exit(9)
os.replace = replace
{call}
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert done.returncode == 9, done.stderr


def test_a_set_a_killed_extraction_was_renaming_is_completed_by_the_next_run(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for h in range(3):
        (out / f"L0H{h}.yaml").write_text(f"old {h}\n")
    files = [(str(out / f"L0H{h}.yaml"), f"new {h}\n") for h in range(3)]
    killed_after_renaming(
        1,
        "from rulecheck.atomic import atomic_write_many\n"
        f"atomic_write_many([(Path(p), d.encode()) for p, d in {files!r}])",
    )
    # the next run: one that stops at its corpus, after taking the directory
    code = main(["extract", "--model", "planted", "--corpus", str(tmp_path / "no.npy"),
                 "--out", str(out)])  # fmt: skip
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["L0H0.yaml", "L0H1.yaml", "L0H2.yaml"]
    assert [(out / f"L0H{h}.yaml").read_text() for h in range(3)] == [d for _, d in files]


def test_an_upgrade_killed_between_its_renames_keeps_the_measurements(capsys, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for directory in (whole, killed):
        directory.mkdir()
        format_1_book(directory)
    assert main(["upgrade", str(whole)]) == 0
    call = f"from rulecheck.cli import main\nmain(['upgrade', {str(killed)!r}])"
    killed_after_renaming(1, call)
    assert main(["upgrade", str(killed)]) == 0
    assert {p.name: p.read_bytes() for p in killed.iterdir()} == {
        p.name: p.read_bytes() for p in whole.iterdir()
    }
    assert json.loads((killed / "L0H3.measured.json").read_text())


# ------------------------------------------------------------------------------ foreign entries


def test_a_cache_entry_copied_under_another_head_s_key_is_rebuilt_with_a_warning(books):
    cache = books.path / "cache"
    run(books, f"--rulecheck-cache={cache}").assert_outcomes(passed=1)
    (mine,) = cache.glob("exemplars-*.safetensors")
    books.makefile(".yaml", L0H1=BOOK.format(head=1))
    run(books, f"--rulecheck-cache={cache}", "L0H1.yaml")
    (other,) = set(cache.glob("exemplars-*.safetensors")) - {mine}
    shutil.copyfile(other, mine)
    result = run(books, f"--rulecheck-cache={cache}", "-W", "always", "L0H0.yaml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*unreadable exemplar cache entry (its key is another*rebuilt*"])
    assert mine.read_bytes() != other.read_bytes()


def test_a_full_disk_while_a_zoo_entry_is_built_is_one_line_and_leaves_nothing(
    capsys, monkeypatch, tmp_path
):
    """The planted model is built under the cache on first use: a full disk there is one line
    naming the entry and the fix, and no half-built entry is left to be taken for a whole."""
    import numpy as np

    cache = tmp_path / "cache"
    monkeypatch.setenv("RULECHECK_CACHE", str(cache))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", no_space)  # the corpus, the last large file it writes
    code = main(["extract", "--model", "planted", "--out", str(tmp_path / "out")])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "Traceback" not in err
    assert "zoo/planted: cannot write it: No space left on device" in err
    assert "(fix: free some space, or set RULECHECK_CACHE" in err
    assert not list((cache / "zoo").iterdir()) and not (tmp_path / "out").exists()
