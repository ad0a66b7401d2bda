"""Hostile files and paths through the real command line and the real plugin: an output that
is not a regular file is never replaced, a read never trusts what a path claims to be, a
measurements file is checked against its book, and text from a file never reaches the
terminal as escape sequences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rulecheck.session  # noqa: F401  loaded once, so pytester's in-process runs share its libraries
from rulecheck.atomic import atomic_write
from rulecheck.cli import main
from rulecheck.errors import InvalidSpec

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[1]
ESC = "\x1b"
BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    label: "\\e[31mred\\e]0;title\\a\\rX"
    skipgrams:
      - {key: {tokens: [if]}, query: {tokens: [then]}}
    expect: {f1: 0.5}
"""
MEASURED = {"rulecheck": 2, "layer": 0, "head": 0, "features": [{"feature": 1, "f1": 0.9}]}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command line in its own process; a read that blocks fails, not hangs."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    return subprocess.run(
        [sys.executable, "-m", "rulecheck.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        env=env,
    )


def one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def hostile(kind: str, path: Path) -> Path:
    """A FIFO, or a symlink to a character device, at ``path`` (never the real device)."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero" if kind == "zero" else "/dev/null")
    return path


def untouched(kind: str, path: Path) -> bool:
    if kind == "fifo":
        return path.is_fifo()
    return path.is_symlink() and os.readlink(path).startswith("/dev/")


@pytest.fixture
def book(tmp_path: Path) -> Path:
    path = tmp_path / "books" / "L0H0.yaml"
    path.parent.mkdir()
    path.write_text(BOOK)
    return path


# ---------------------------------------------------------------------------- writing


@pytest.mark.parametrize("kind", ["fifo", "null"])
def test_report_out_that_is_not_a_regular_file_is_refused_before_any_work(
    capsys, tmp_path, book, kind
):
    out = hostile(kind, tmp_path / "report.html")
    code = main(["report", str(book), "--exemplars", "0", "-o", str(out)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"{out}: --out: is " in err and "only replaces a regular file" in err
    assert untouched(kind, out)


def test_report_out_in_a_directory_that_takes_no_file_is_refused_before_any_work(
    capsys, book, monkeypatch
):
    """/proc is a directory no file can be created in, even by root."""
    calls = []
    monkeypatch.setattr("rulecheck.html.build_report", lambda *a, **k: calls.append(a))
    code = main(["report", str(book), "--exemplars", "0", "-o", "/proc/report.html"])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "/proc: --out: cannot write here" in err and not calls


@pytest.mark.parametrize("kind", ["fifo", "null"])
def test_atomic_write_replaces_only_a_regular_file(tmp_path, kind):
    path = hostile(kind, tmp_path / "L0H0.yaml")
    with pytest.raises(InvalidSpec, match="only replaces a regular file"):
        atomic_write(path, b"rulecheck: 2\n")
    assert untouched(kind, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["L0H0.yaml"]  # no temporary left


def test_extract_into_an_out_holding_a_fifo_book_is_refused_before_any_work(tmp_path):
    out = tmp_path / "books"
    out.mkdir()
    fifo = hostile("fifo", out / "L0H0.measured.json")
    result = cli("extract", "--model", "planted", "--layer", "0", "--out", str(out))
    assert result.returncode == 2 and f"{fifo}: --out: is a FIFO" in one_line(result.stderr)
    assert fifo.is_fifo() and sorted(p.name for p in out.iterdir()) == [fifo.name]


@pytest.mark.parametrize(
    ("option", "kind"), [("html", "fifo"), ("html", "null"), ("report", "fifo"), ("report", "null")]
)
def test_plugin_output_that_is_not_a_regular_file_is_refused_before_collection(
    pytester, monkeypatch, tmp_path, option, kind
):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makefile(".yaml", L0H0=BOOK)
    out = hostile(kind, pytester.path / "out")
    args = ("-p", "no:cacheprovider", f"--rulecheck-{option}={out}")
    if (option, kind) == ("report", "fifo"):  # a plain write into a FIFO blocks: fail, not hang
        result = pytester.runpytest_subprocess(*args, timeout=60)
    else:
        result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: *out: --rulecheck-{option}: is *regular file*(fix: *"])
    assert untouched(kind, out)


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("kind", ["zero", "fifo"])
@pytest.mark.parametrize("which", ["book", "measured"])
def test_reads_refuse_what_is_not_a_regular_file_at_once(tmp_path, book, kind, which):
    """A book or its measurements that is a FIFO or a symlink to /dev/zero: one line from
    show, summary, diff and report, at once (no hang, no MemoryError)."""
    if which == "book":
        book.unlink()
        bad = hostile(kind, book)
    else:
        bad = hostile(kind, book.with_name("L0H0.measured.json"))
    other = tmp_path / "other"
    other.mkdir()
    (other / book.name).write_text(BOOK)
    out = tmp_path / "r.html"
    for args in (
        ["show", str(book)],
        ["summary", str(book.parent)],
        ["diff", str(other), str(book.parent)],
        ["report", str(book), "--exemplars", "0", "-o", str(out)],
    ):
        result = cli(*args)
        err = one_line(result.stderr)
        assert result.returncode == 2, args
        assert f"{bad}: is " in err and "not a regular file" in err, (args, err)
    assert not out.exists()


# ---------------------------------------------------------------------------- measurements


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "L0H0.measured.json: expected a JSON object, found a list"),
        ({"feature": "x"}, "L0H0.measured.json: layer: names no layer"),
        ({**MEASURED, "features": [{"f1": 0.9}]}, "features[0]: has no `feature` id"),
        ({**MEASURED, "features": [{"feature": "x"}]}, "features[0].feature: expected a feature"),
        ({**MEASURED, "features": [{"feature": 1, "f1": "x"}]}, "features[0].f1: expected a num"),
        ({**MEASURED, "head": 1}, "head: is 1, but the rulebook is about head 0"),
    ],
    ids=["list", "no-head", "no-feature", "feature-text", "f1-text", "other-head"],
)
def test_a_malformed_measurements_file_is_one_line(capsys, book, data, message):
    book.with_name("L0H0.measured.json").write_text(json.dumps(data))
    code = main(["show", str(book), "--format", "plain"])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and message in err and "(fix: regenerate the book" in err


def test_diff_refuses_measurements_of_another_head(capsys, tmp_path, book):
    """Another head's measurements would change the verdict: a kept feature's F1 fell."""
    book.with_name("L0H0.measured.json").write_text(json.dumps(MEASURED))
    new = tmp_path / "new"
    new.mkdir()
    (new / "L0H0.yaml").write_text(BOOK)
    other_head = {**MEASURED, "head": 1, "features": [{"feature": 1, "f1": 0.1}]}
    (new / "L0H0.measured.json").write_text(json.dumps(other_head))
    code = main(["diff", str(book.parent), str(new)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and "L0H0.measured.json: head: is 1, but the rulebook is about head 0" in err


# ---------------------------------------------------------------------------- terminal


@pytest.mark.parametrize("format", ["table", "markdown"])
def test_show_prints_no_escape_sequence_from_the_book(book, format):
    text = BOOK.replace("model: planted", 'model: "planted\\e[2J"')
    book.write_text(text)
    result = cli("show", str(book), "--format", format)
    assert result.returncode == 0, result.stderr
    assert ESC not in result.stdout and "\r" not in result.stdout
    assert "planted\\x1b[2J" in result.stdout


def test_errors_and_failures_print_no_escape_sequence_from_the_book(pytester, book):
    bad_key = BOOK.replace("expect: {f1: 0.5}", 'expect: {f1: 0.5, "\\e]0;owned\\a": 1}')
    book.write_text(bad_key)
    result = cli("show", str(book))
    assert ESC not in result.stderr and "\x07" not in result.stderr
    assert "expect.\\x1b]0;owned\\x07: unknown key" in one_line(result.stderr)
    pytester.makefile(".yaml", L0H0=bad_key)
    run = pytester.runpytest("-p", "no:cacheprovider", "L0H0.yaml")
    assert run.ret != 0
    output = run.stdout.str() + run.stderr.str()
    assert ESC not in output and "\x07" not in output
    run.stdout.fnmatch_lines(["*L0H0.yaml:11: features[[]0[]].expect.\\x1b]0;owned\\x07: unknown*"])


# ---------------------------------------------------------------------------- header specs


@pytest.mark.parametrize(
    ("model", "what"),
    [("../../../etc", "model: '../../../etc': "), ("./no-such-model", "no such model directory")],
)
def test_a_header_model_that_names_no_model_is_blamed_on_model(
    pytester, monkeypatch, tmp_path, model, what
):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makefile(".yaml", L0H0=BOOK.replace("model: planted", f"model: {model}"))
    result = pytester.runpytest("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1)
    line = next(x for x in result.stdout.lines if x.startswith("L0H0.yaml:2: model: "))
    assert what in line and "sae_in" not in line and "(fix: " in line
