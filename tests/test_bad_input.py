"""Bad input through the real command line and the real plugin: every case is one line that
names the file or option, the field and the fix, with a nonzero exit or a failed item, and
nothing is half-written."""

from __future__ import annotations

import os
import pathlib
import time

import pytest
from conftest import PLANTED_BOOK
from hypothesis import given, settings
from hypothesis import strategies as st

from rulecheck.atomic import atomic_write_many
from rulecheck.cli import build_parser, extract_config, main
from rulecheck.config import CheckConfig, ExemplarConfig, ExtractConfig, parse_config
from rulecheck.errors import InvalidRulebook, InvalidSpec
from rulecheck.rulebook import MAX_BYTES, load_rulebook, parse_rulebook

pytest_plugins = ["pytester"]

# the slow run (RULECHECK_FUZZ_EXAMPLES=10000) drives the option parsers much harder
FUZZ_EXAMPLES = int(os.environ.get("RULECHECK_FUZZ_EXAMPLES", "100"))


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["extract", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def one_line(err: str) -> str:
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------- CLI options

CLI_CASES = [
    # args, the option named, part of the message
    (["--tolerance", "nan"], "--tolerance", "must be a number in [0, 1), got nan"),
    (["--tolerance", "2"], "--tolerance", "must be a number in [0, 1)"),
    (["--tolerance", "1"], "--tolerance", "must be a number in [0, 1), got 1.0"),
    (["--features", "-1"], "--features", "must be a whole number >= 1, got -1"),
    (["--features", "0"], "--features", "got 0"),
    (["--features", ","], "--features", "names no feature"),
    (["--features", "3,-1"], "--features", "must be a whole number >= 0, got -1"),
    (["--keys", "0"], "--keys", "must be a whole number >= 1, got 0"),
    (["--queries-per-key", "1.5"], "--queries-per-key", "got '1.5'"),
    (["--max-terms", "-5"], "--max-terms", "got -5"),
    (["--term-margin", "inf"], "--term-margin", "must be a number in [0, 1], got inf"),
    (["--term-margin", "-0.1"], "--term-margin", "got -0.1"),
    (["--n-pos", "0"], "--n-pos", "got 0"),
    (["--n-neg", "x"], "--n-neg", "got 'x'"),
    (["--min-active", "0"], "--min-active", "got 0"),
    (["--batch-size", "0"], "--batch-size", "got 0"),
    (["--seed", "-3"], "--seed", "got -3"),
    (["--heads", ","], "--heads", "names no head"),
    (["--heads", "1,x"], "--heads", "cannot read heads"),
    (["--heads", "-1"], "--heads", "head -1 is out of range"),
    (["--layer", "-1"], "--layer", "got -1"),
    (["--method", "magic"], "--method", "invalid choice"),
    (["--shard", "1/0"], "--shard", "n must be a whole number >= 1, got 0 (fix: give i/n"),
    (["--shard", "3/2"], "--shard", "i must be a whole number in [1, 2], got 3 (fix: give i/n"),
    (["--shard", "x/4"], "--shard", "i must be a whole number in [1, 4], got 'x' (fix: give i/n"),
    (["--bogus", "1"], "", "unrecognized arguments: --bogus 1"),
]


@pytest.mark.parametrize(
    ("args", "option", "what"), CLI_CASES, ids=[c[0][0] + "=" + c[0][1] for c in CLI_CASES]
)
def test_cli_refuses_bad_options_before_any_work(capsys, tmp_path, args, option, what):
    out = tmp_path / "books"
    code, err = run_cli(capsys, *args, "--out", str(out))
    assert code == 2
    assert option in one_line(err) and what in err and "(fix: " in err
    assert not out.exists()  # refused before --out was even created


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(
        [
            "tolerance",
            "features",
            "keys",
            "queries-per-key",
            "max-terms",
            "term-margin",
            "n-pos",
            "n-neg",
            "min-active",
            "min-inactive",
            "batch-size",
            "seed",
            "layer",
            "heads",
        ]
    ),
    value=st.one_of(
        st.text(max_size=12),
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
    ),
)
def test_cli_option_parsing_sees_only_documented_errors(name, value):
    """Any text for any numeric option: a config within every bound, or ``InvalidSpec``."""
    try:
        args = build_parser().parse_args(["extract", f"--{name}", value, "--out", "x"])
        cfg = extract_config(args)
    except InvalidSpec as e:
        assert "\n" not in str(e) and e.fix
        return
    for obj in (cfg, cfg.exemplars):
        type(obj)(**{f: getattr(obj, f) for f in obj.__dataclass_fields__})  # checks again
    assert 0 <= cfg.tolerance < 1 and cfg.keys >= 1 and cfg.exemplars.n_pos >= 1
    assert 0 <= cfg.term_margin <= 1


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True)
@given(
    tolerance=st.none() | st.text(max_size=8) | st.floats().map(repr),
    examples=st.none() | st.text(max_size=8) | st.integers(-(2**40), 2**40).map(str),
)
def test_plugin_option_parsing_sees_only_documented_errors(tolerance, examples):
    texts = {"tolerance": tolerance, "examples": examples}
    try:
        cfg = parse_config(CheckConfig, texts, "--rulecheck-{}")
    except InvalidSpec as e:
        assert str(e).startswith("--rulecheck-") and "\n" not in str(e)
        return
    assert 0 <= cfg.tolerance < 1 and 1 <= cfg.examples <= 100_000


def test_config_dataclasses_check_themselves():
    with pytest.raises(InvalidSpec, match="max_terms: must be a whole number >= 1"):
        ExtractConfig(max_terms=0)
    with pytest.raises(InvalidSpec, match="n_pos"):
        ExemplarConfig(n_pos=-1)
    with pytest.raises(InvalidSpec, match="method"):
        ExtractConfig(method="magic")
    assert ExtractConfig(features="3,17").features == (3, 17)


# ---------------------------------------------------------------------------- output


@pytest.mark.parametrize(
    ("model", "what"),
    [
        ("plantd", "(did you mean planted?)"),
        ("rulecheck-tinyy", "(did you mean rulecheck-tiny?)"),
        ("{tmp}", "not a model directory: no config.json"),
    ],
)
def test_a_model_spec_that_names_nothing_is_blamed_on_model(capsys, tmp_path, model, what):
    """A misspelt zoo name, or a directory without a model, is refused naming --model and
    before any work, not blamed on the SAE options a zoo model would fill in."""
    model = model.format(tmp=tmp_path)
    code, err = run_cli(capsys, "--model", model, "--out", str(tmp_path / "out"))
    assert code == 2
    assert one_line(err).startswith(f"error: {model}: --model: ") and what in err, err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused_and_left_alone(capsys, tmp_path):
    target = tmp_path / "books"
    target.write_text("not a directory")
    code, err = run_cli(capsys, "--out", str(target))
    assert code == 2 and f"{target}: --out: exists and is not a directory" in one_line(err)
    assert target.read_text() == "not a directory"


def test_out_under_a_file_is_refused(capsys):
    code, err = run_cli(capsys, "--out", "/dev/null/books")
    assert code == 2 and "/dev/null/books: --out: cannot write here" in one_line(err)


def test_out_that_cannot_be_written_is_refused(capsys, tmp_path, monkeypatch):
    real = pathlib.Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test."):
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", read_only)
    out = tmp_path / "a" / "b"
    code, err = run_cli(capsys, "--out", str(out))
    assert code == 2 and "--out: cannot write here: Permission denied" in one_line(err)
    assert not (tmp_path / "a").exists()  # the directories it made are gone again


def test_a_failed_run_leaves_no_empty_out_and_clears_stale_temporaries(capsys, tmp_path):
    out = tmp_path / "new"
    code, err = run_cli(
        capsys, "--model", "planted", "--corpus", str(tmp_path / "no.npy"), "--out", str(out)
    )
    assert code == 2 and "no.npy" in one_line(err)
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    stale = kept / ".L0H0.yaml.0123456789ab.tmp"
    stale.write_text("half")
    live = kept / ".L0H1.yaml.ba9876543210.tmp"  # another run's, being written now
    live.write_text("half")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    run_cli(capsys, "--model", "planted", "--corpus", str(tmp_path / "no.npy"), "--out", str(kept))
    assert kept.is_dir() and not stale.exists() and live.exists()


def test_books_are_written_as_one_set(tmp_path, monkeypatch):
    old = {tmp_path / f"L0H{h}.yaml": f"old {h}".encode() for h in range(3)}
    for path, data in old.items():
        path.write_bytes(data)
    calls = {"n": 0}
    real = os.fsync

    def failing(fd):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="No space"):
        atomic_write_many([(p, b"new") for p in old])
    assert {p: p.read_bytes() for p in old} == old  # every old file as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in old)


# ---------------------------------------------------------------------------- rulebooks

BOOK = PLANTED_BOOK


def pytest_run(pytester, *args: str):
    return pytester.runpytest("-p", "no:cacheprovider", *args)


@pytest.fixture
def planted_books(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    return pytester


PLUGIN_OPTION_CASES = [
    ("--rulecheck-tolerance=abc", "--rulecheck-tolerance: must be a number in [0, 1), got 'abc'"),
    ("--rulecheck-tolerance=nan", "--rulecheck-tolerance: must be a number in [0, 1), got nan"),
    ("--rulecheck-tolerance=1", "--rulecheck-tolerance: must be a number in [0, 1), got 1.0"),
    ("--rulecheck-examples=abc", "--rulecheck-examples: must be a whole number in [1, 100000]"),
    ("--rulecheck-examples=-1", "got -1"),
    ("--rulecheck-report=nowhere/r.json", "--rulecheck-report: no such directory"),
    ("--rulecheck-html=nowhere/r.html", "--rulecheck-html: no such directory"),
    ("--rulecheck-html=.", "--rulecheck-html: is a directory"),
    ("--hypothesis-profile=nosuch", "--hypothesis-profile: no profile 'nosuch' is registered"),
    ("--rulecheck-device=cuda:99", "--rulecheck-device: cuda:99 requested but "),
    ("--rulecheck-device=gpu", "--rulecheck-device: 'gpu' is not a device name"),
]


@pytest.mark.parametrize(("option", "message"), PLUGIN_OPTION_CASES)
def test_plugin_refuses_bad_options_before_collection(planted_books, option, message):
    planted_books.makefile(".yaml", L0H0=BOOK)
    result = pytest_run(planted_books, option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    escaped = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in message)
    result.stderr.fnmatch_lines([f"ERROR: *{escaped}*(fix: *"])
    assert "passed" not in result.stdout.str()


def test_a_tolerance_that_empties_every_claim_is_refused_naming_the_ini_key(planted_books):
    planted_books.makefile(".yaml", L0H0=BOOK)
    planted_books.makeini("[pytest]\nrulecheck_tolerance = 1\n")
    result = pytest_run(planted_books)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: *tox.ini: rulecheck_tolerance: must be a number in [[]0, 1), got 1.0 "
            "(fix: give a number in [[]0, 1): 1 lowers every minimum to 0*"
        ]
    )
    assert "passed" not in result.stdout.str()


def test_plugin_reports_an_empty_rulebook_named_on_the_command_line(planted_books):
    planted_books.makefile(".yaml", L0H0="")
    result = pytest_run(planted_books, "L0H0.yaml")
    result.stdout.fnmatch_lines(["L0H0.yaml:1: empty file, not a rulebook (fix: *"])
    assert result.ret != 0 and "not found" not in result.stdout.str()


def test_a_layer_past_the_model_names_the_rulebook_and_field(planted_books):
    planted_books.makefile(".yaml", L3H0=BOOK.replace("layer: 0", "layer: 3"))
    result = pytest_run(planted_books, "-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["L3H0.yaml:3: layer: layer 3 is out of range: the model has 1 layers (fix: *"]
    )


def test_a_header_spec_that_does_not_load_names_the_rulebook_line(planted_books):
    header = "model: planted\nsae_out: ./nowhere\n"
    planted_books.makefile(".yaml", L0H0=BOOK.replace("model: planted\n", header))
    result = pytest_run(planted_books, "-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["L0H0.yaml:3: sae_out: './nowhere' does not load: *(fix: *"])


def test_extract_over_a_malformed_extraction_block_is_one_line(planted_books):
    book = BOOK.replace("head: 0\n", "head: 0\nextraction: {keys: many, seed: 0}\n")
    planted_books.makefile(".yaml", L0H0=book)
    result = pytest_run(planted_books, "--rulecheck-extract=all", "L0H0.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --rulecheck-extract: L0H0.yaml:5: extraction.keys: must be a whole number >= 1*"]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_a_corrupt_cache_entry_is_rebuilt_with_a_warning(planted_books):
    planted_books.makefile(".yaml", L0H0=BOOK)
    cache = planted_books.path / "cache"
    pytest_run(planted_books, f"--rulecheck-cache={cache}").assert_outcomes(passed=1)
    entries = sorted(cache.glob("exemplars-*.safetensors"))
    assert entries
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:100])  # truncated
    result = pytest_run(planted_books, f"--rulecheck-cache={cache}", "-W", "always")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*unreadable exemplar cache entry*rebuilt*"])
    assert all(len(e.read_bytes()) > 100 for e in entries)  # written again, whole


def test_a_rulebook_over_the_size_limit_is_refused_at_once(tmp_path):
    big = tmp_path / "L0H0.yaml"
    big.write_bytes(b"rulecheck: 2\n# " + b"x" * MAX_BYTES + b"\n")
    for read in (lambda: load_rulebook(big), lambda: parse_rulebook(big.read_text(), big)):
        with pytest.raises(InvalidRulebook) as err:
            read()
        assert err.value.line == 1 and "MiB; rulecheck reads rulebooks up to 8 MiB" in str(
            err.value
        )


# ---------------------------------------------------------------------------- never unpickled


class _Payload:
    """Unpickling this writes a file: the proof that a loader ran pickled code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "ran"))


def test_pickled_code_in_weights_or_corpus_is_never_run(tmp_path):
    import json
    import pickle

    import numpy as np

    from rulecheck.loading import load_corpus, load_sae

    marker = tmp_path / "ran.txt"
    name = tmp_path / "tiny_L0_H1_z_v0"
    cfg = {
        "act_name": "blocks.0.attn.hook_z",
        "layer": 0,
        "head": 1,
        "act_size": 8,
        "dict_size": 32,
        "enc_dtype": "fp32",
    }
    pathlib.Path(f"{name}_cfg.json").write_text(json.dumps(cfg))
    with open(f"{name}.pt", "wb") as handle:
        pickle.dump({"W_enc": _Payload(marker)}, handle)
    with pytest.raises(InvalidSpec) as err:
        load_sae(str(name))
    assert "\n" not in str(err.value) and not marker.exists()
    corpus = tmp_path / "c.npy"
    np.save(corpus, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidSpec):
        load_corpus(str(corpus))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "option", "what"),
    [
        (["diff", "a", "b", "--tolerance", "nan"], "--tolerance", "got nan"),
        (["diff", "a", "b", "--tolerance", "1.5"], "--tolerance", "must be a number in [0, 1]"),
        (["match", "--old", "a", "--new", "b", "--k", "0", "--out", "m"], "--k", "got 0"),
        (
            ["match", "--old", "a", "--new", "b", "--threshold", "inf", "--out", "m"],
            "--threshold",
            "inf",
        ),
        (
            ["match", "--old", "a", "--new", "b", "--tokens", "-1", "--out", "m"],
            "--tokens",
            "got -1",
        ),
    ],
)
def test_diff_and_match_refuse_bad_numbers_before_any_work(capsys, tmp_path, args, option, what):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert option in one_line(err) and what in err and "(fix: " in err
