"""The pytest plugin end to end, with pytester: rulebooks on planted as test files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rulecheck.loading import load_model, save_model
from rulecheck.rulebook import load_rulebook
from rulecheck.specs import locate

pytest_plugins = ["pytester"]

HEAD0 = """\
rulecheck: 1
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    label: "[if] ... [then] or [when] ... [do]"
    skipgrams:
      - {key: {tokens: [if]}, query: {tokens: [then]}}
      - {key: {tokens: [when]}, query: {tokens: [do]}}
    expect: {f1: 0.95, precision: 0.95, recall: 0.95}
  - feature: 0
    source: manual
    label: "a false claim: [from] ... [to] drives the open/close feature"
    skipgrams:
      - {key: {tokens: [from]}, query: {tokens: [to]}}
    expect: {f1: 0.9}
"""

HEAD1 = """\
rulecheck: 1
model: planted
layer: 0
head: 1
features:
  - feature: 1
    source: manual
    skipgrams:
      - {key: {tokens: [from]}, query: {tokens: [to]}}
    expect: {f1: 0.95}
"""


@pytest.fixture
def books(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makefile(".yaml", L0H0=HEAD0, L0H1=HEAD1)
    pytester.makefile(".yaml", other="just: some yaml\nrulecheck_like: false\n")
    return pytester


def run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", *args)


def test_true_rule_passes_false_rule_fails_with_an_explanation(books):
    result = run(books, "-v")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*L0H0.yaml::feature[[]1[]]::f1 PASSED*",
            "*L0H0.yaml::feature[[]1[]]::precision PASSED*",
            "*L0H0.yaml::feature[[]0[]]::f1 FAILED*",
            "*L0H1.yaml::feature[[]1[]]::f1 PASSED*",
            "*feature 0 of L0H0 (a false claim*): f1 is 0.*, expected >= 0.900*",
            "*measured on 100 test prefixes: precision*",
        ]
    )
    assert "other.yaml" not in result.stdout.str()  # YAML without `rulecheck:` is left alone
    result.stdout.fnmatch_lines(["*rulecheck: rules by head*", "*L0H0*2*3*1*"])


def test_json_report_and_serial_equals_two_workers(books):
    serial = books.path / "serial.json"
    parallel = books.path / "parallel.json"
    run(books, f"--rulecheck-report={serial}")
    result = run(books, "-n", "2", f"--rulecheck-report={parallel}")
    result.assert_outcomes(passed=4, failed=1)

    def outcomes(path):
        return {
            (r["nodeid"], r["outcome"], round(r["measured"], 6))
            for r in json.loads(path.read_text())
        }

    assert outcomes(serial) == outcomes(parallel)
    assert len(outcomes(serial)) == 5


def test_breaking_the_model_fails_that_heads_rules(books, tmp_path):
    model = load_model(locate("planted"))
    with torch.no_grad():
        model.blocks[0].attn.W_V[0].zero_()
    save_model(model, tmp_path / "broken")
    result = run(books, "-v", f"--rulecheck-model={tmp_path / 'broken'}")
    result.stdout.fnmatch_lines(
        [
            "*L0H0.yaml::feature[[]1[]]::f1 FAILED*",
            "*L0H1.yaml::feature[[]1[]]::f1 PASSED*",
            "*feature 1 of L0H0 is active in 0 of 4000 sequences*",
        ]
    )


def test_extract_regenerates_then_runs_keeping_manual_entries(books):
    stale = HEAD1 + (
        "  - feature: 0\n"
        "    source: extracted\n"
        "    label: stale\n"
        "    skipgrams:\n"
        "      - {key: {tokens: [if]}, query: {tokens: [then]}}\n"
        "    expect: {f1: 0.99}\n"
    )
    books.makefile(".yaml", L0H1=stale)
    assert run(books, "L0H1.yaml").ret == 1  # the stale entry fails
    result = run(books, "L0H1.yaml", "--rulecheck-extract", "-v")
    result.assert_outcomes(passed=5)  # f1, precision, recall, counting[games]; the manual f1
    book = load_rulebook(books.path / "L0H1.yaml")
    manual = book.feature(1)
    assert manual.source == "manual" and manual.skipgrams[0].key.tokens == ["from"]
    regenerated = book.feature(0)
    assert regenerated.source == "extracted" and regenerated.label == "[games] ... [score]"
    assert [c.key.tokens for c in regenerated.counting] == [["games"]]
    result.stdout.fnmatch_lines(["*rulecheck: regenerated*L0H1.yaml*"])


def test_extract_loads_and_streams_once_per_layer(books, monkeypatch):
    """Two rulebooks of one layer are regenerated from one model load and one corpus pass,
    and the items that follow reuse both."""
    import rulecheck.session

    calls = {"load_model": 0, "collect_layer": 0}

    def counted(name):
        real = getattr(rulecheck.session, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in calls:
        monkeypatch.setattr(rulecheck.session, name, counted(name))
    result = run(books, "L0H0.yaml", "L0H1.yaml", "--rulecheck-extract")
    result.stdout.fnmatch_lines(["*rulecheck: regenerated*L0H0.yaml*", "*regenerated*L0H1.yaml*"])
    assert calls == {"load_model": 1, "collect_layer": 1}


MALFORMED = {
    "syntax": ("rulecheck: 1\nlayer: [0\n", ":2:"),
    "type": ("rulecheck: 1\nlayer: zero\nhead: 0\nfeatures: []\n", ":2: layer:"),
    "unknown_key": ("rulecheck: 1\nlayer: 0\nhead: 0\nfeaturez: []\n", ":4:"),
    "missing_head": ("rulecheck: 1\nlayer: 0\nfeatures: []\n", "head"),
    "tokens_not_list": (
        "rulecheck: 1\nlayer: 0\nhead: 0\nfeatures:\n  - feature: 1\n    source: manual\n"
        "    skipgrams:\n      - {key: {tokens: if}, query: {feature: 2}}\n",
        ":8:",
    ),
    "expect_range": (
        "rulecheck: 1\nlayer: 0\nhead: 0\nfeatures:\n  - feature: 1\n    source: manual\n"
        "    expect: {f1: 1.5}\n",
        ":7:",
    ),
    "bad_source": (
        "rulecheck: 1\nlayer: 0\nhead: 0\nfeatures:\n  - feature: 1\n    source: guessed\n",
        ":6:",
    ),
    "duplicate": (
        "rulecheck: 1\nlayer: 0\nhead: 0\nfeatures:\n  - {feature: 1, source: manual}\n"
        "  - {feature: 1, source: manual}\n",
        ":6:",
    ),
    "empty_ref": (
        "rulecheck: 1\nlayer: 0\nhead: 0\nfeatures:\n  - feature: 1\n    source: manual\n"
        "    skipgrams:\n      - {key: {}, query: {feature: 2}}\n",
        ":8:",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_rulebook_is_one_line_with_file_and_line(pytester, kind):
    text, where = MALFORMED[kind]
    pytester.makefile(".yaml", **{f"bad_{kind}": text})
    result = run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED  # a collection error
    out = result.stdout.str()
    line = next(ln for ln in out.splitlines() if ln.startswith(f"bad_{kind}.yaml:"))
    assert len(line) > len(f"bad_{kind}.yaml:1: ")
    assert where in line and "Traceback" not in out and "fix" in out


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("{tokens: [xyzzy]}", "token 'xyzzy' is not in the model's vocabulary"),
        ("{feature: 999}", "input feature 999 is out of range: the input SAE has 56 features"),
    ],
)
def test_refs_the_checkpoint_cannot_read_fail_in_one_line(books, ref, message):
    books.makefile(".yaml", L0H1=HEAD1.replace("{tokens: [from]}", ref))
    result = run(books, "L0H1.yaml")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*L0H1.yaml*skipgrams[[]0[]].key*{message}*fix*"])


def test_feature_fixture_runs_the_same_assertions(books):
    books.makepyfile(
        test_hypothesis="""
        def test_if_then(feature):
            f = feature("planted", layer=0, head=0, id=1)
            assert f.activation("the if a then")[-1] > 0
            assert f.activation("the a then")[-1] == 0
            f.assert_rule([("if", "then"), ("when", "do")], f1=0.95)

        def test_wrong(feature):
            feature("planted", layer=0, head=0, id=1).assert_rule([("open", "close")], f1=0.5)
        """
    )
    result = run(books, "test_hypothesis.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        ["*feature 1 of L0H0 ([[]open[]] ... [[]close[]]): f1 is 0.*, expected >= 0.500*"]
    )


def test_xdist_workers_share_the_cores(pytester, monkeypatch):
    """Each of n workers gets cores // n torch threads (all cores each oversubscribes them and
    runs many times slower); an explicit OMP_NUM_THREADS is left alone."""
    pytester.makepyfile(
        test_threads="""
        import os, torch

        def test_threads():
            want = os.environ.get("WANT")
            assert torch.get_num_threads() == int(want), (torch.get_num_threads(), want)
        """
    )
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("WANT", str(max(1, (os.cpu_count() or 1) // 2)))
    run(pytester, "-n", "2").assert_outcomes(passed=1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANT", "1")
    run(pytester, "-n", "2").assert_outcomes(passed=1)
