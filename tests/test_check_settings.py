"""Checks run with the settings a rulebook was measured with, and never silently check
nothing: mapping files read before any work, non-finite weights named where they are, the
exemplar protocol recorded and used, relative paths read from the rulebook's directory."""

from __future__ import annotations

import pytest
from conftest import PLANTED_BOOK

from rulecheck.cli import main

pytest_plugins = ["pytester"]

BOOK = PLANTED_BOOK

# a mapping file whose first pair has three values instead of six
BAD_MAPPING = """\
rulecheck_mapping: 1
old: planted:sae_out/L0H0
new: planted:sae_out/L0H0
hook: blocks.0.attn.hook_z
settings: {k: 8, threshold: 0.5, split_threshold: 0.7}
pairs:
  - [1, 2, 0.9]
lost: []
new_features: []
"""


def pytest_run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("-p", "no:cacheprovider", *args)


@pytest.fixture
def planted_books(pytester: pytest.Pytester, monkeypatch, tmp_path) -> pytest.Pytester:
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makefile(".yaml", L0H0=BOOK)
    return pytester


def one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------- mapping files


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("maps/bad.yaml", "maps/bad.yaml:7: pairs[0]: expected [old, new, "),
        ("nowhere", "nowhere: --rulecheck-remap: no such file or directory"),
        ("maps", "maps: --rulecheck-remap: holds no mapping file"),
    ],
    ids=["bad-file", "missing", "empty-directory"],
)
def test_a_bad_mapping_is_refused_before_collection_though_no_sae_changed(
    planted_books: pytest.Pytester, where: str, message: str
) -> None:
    (planted_books.path / "maps").mkdir()
    if where.endswith(".yaml"):
        (planted_books.path / where).write_text(BAD_MAPPING)
    result = pytest_run(planted_books, f"--rulecheck-remap={where}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    escaped = "".join({"[": "[[]", "]": "[]]"}.get(c, c) for c in message)
    result.stderr.fnmatch_lines([f"ERROR: *{escaped}*(fix: *"])
    assert "passed" not in result.stdout.str()


def test_remap_reads_a_bad_mapping_file_though_no_sae_changed(tmp_path, capsys) -> None:
    book, mapping, out = tmp_path / "L0H0.yaml", tmp_path / "bad.yaml", tmp_path / "out"
    book.write_text(BOOK)
    mapping.write_text(BAD_MAPPING)
    argv = ["remap", str(book), "--sae-out", "planted:sae_out/L{layer}H{head}"]
    assert main([*argv, "--mapping", str(mapping), "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{mapping}:7: pairs[0]: expected [old, new, " in err and "(fix: " in err
    assert not out.exists()


# ------------------------------------------------------------------------ non-finite weights


def _nan_sae(directory) -> str:
    """The planted head 0's output SAE with a NaN in ``W_enc``, saved with sae_lens under
    ``directory``; its spec as a template."""
    import torch

    from rulecheck.loading import load_sae
    from rulecheck.specs import locate

    sae = load_sae(locate("planted:sae_out/L0H0"))
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    sae.save_model(str(directory / "L0H0"))
    return f"{directory}/L{{layer}}H{{head}}"


def _inf_model(directory) -> str:
    """The planted model with an infinity in layer 0's ``W_Q``, saved as a model directory."""
    import torch

    from rulecheck.loading import load_model
    from rulecheck.loading.models import save_model
    from rulecheck.specs import locate

    model = load_model(locate("planted"))
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0, 0, 0] = float("inf")
    return str(save_model(model, directory))


def test_non_finite_weights_are_named_when_extracting(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    base = ["extract", "--model", "planted", "--layer", "0", "--heads", "0"]
    sae = _nan_sae(tmp_path / "nan")
    assert main([*base, "--sae-out", sae, "--out", str(tmp_path / "a")]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{tmp_path}/nan/L0H0: W_enc: SAE weight W_enc holds NaN or infinite values" in err
    assert "corpus" not in err and "(fix: retrain or save it again" in err
    model = _inf_model(tmp_path / "inf")
    argv = ["extract", "--model", model, "--layer", "0", "--heads", "0"]
    argv += ["--sae-in", "planted:sae_in/L{layer}", "--sae-out", "planted:sae_out/L{layer}H{head}"]
    assert main([*argv, "--corpus", "planted:eval", "--out", str(tmp_path / "b")]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{model}: blocks.0.attn.W_Q: model weight blocks.0.attn.W_Q holds NaN or" in err
    assert "corpus" not in err and not (tmp_path / "a").exists()


def test_non_finite_weights_are_named_when_checking(planted_books: pytest.Pytester) -> None:
    sae = _nan_sae(planted_books.path / "nan")
    result = pytest_run(planted_books, f"--rulecheck-sae-out={sae}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*nan/L0H0: W_enc: SAE weight W_enc holds NaN or infinite*"])
    model = _inf_model(planted_books.path / "inf")
    header = f"model: {model}\nsae_in: planted:sae_in/L0\nsae_out: planted:sae_out/L0H0\n"
    book = BOOK.replace("model: planted\n", header + "corpus: planted:eval\n")
    planted_books.makefile(".yaml", L0H0=book)
    result = pytest_run(planted_books)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*model weight blocks.0.attn.W_Q holds NaN or infinite values*"])


# ---------------------------------------------------------------------- exemplar protocol

LOWERED = {"n_pos": 30, "n_neg": 30, "min_active": 30, "min_inactive": 30, "n_held": 64}


def test_a_book_is_checked_with_the_protocol_it_was_extracted_with(
    planted_books: pytest.Pytester,
) -> None:
    """A book extracted on a small corpus with lowered exemplar settings records them, in
    order after the seed, and its checks run under them (with the defaults the corpus is
    too small and every item failed)."""
    import numpy as np

    from rulecheck.rulebook import load_rulebook
    from rulecheck.specs import locate

    corpus = planted_books.path / "small.npy"
    np.save(corpus, np.load(locate("planted:eval"))[:200])
    out = planted_books.path / "books"
    lowered = [a for k, v in LOWERED.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    argv = ["extract", "--model", "planted", "--layer", "0", "--heads", "0"]
    assert main([*argv, "--corpus", str(corpus), *lowered, "--out", str(out)]) == 0
    book = load_rulebook(out / "L0H0.yaml")
    assert book.features
    keys = list(book.extraction)
    assert keys[keys.index("seed") : keys.index("tolerance") + 1] == [
        "seed",
        *LOWERED,
        "tolerance",
    ]
    assert {k: book.extraction[k] for k in LOWERED} == LOWERED
    (planted_books.path / "L0H0.yaml").unlink()  # only the extracted book
    result = pytest_run(planted_books, "books")
    outcomes = result.parseoutcomes()
    assert result.ret == 0 and outcomes["passed"] >= 3 and "failed" not in outcomes


def test_a_recorded_protocol_out_of_range_fails_the_book_at_its_line(
    planted_books: pytest.Pytester,
) -> None:
    book = BOOK.replace("head: 0\n", "head: 0\nextraction:\n  seed: 0\n  n_pos: 0\n")
    planted_books.makefile(".yaml", L0H0=book)
    result = pytest_run(planted_books)
    assert result.ret == pytest.ExitCode.INTERRUPTED  # an error collecting the book
    result.stdout.fnmatch_lines(["*L0H0.yaml:7: extraction.n_pos: must be a whole number >= 1*"])


# ------------------------------------------------------------------------- relative paths


def test_relative_paths_in_a_book_are_read_from_its_directory(
    planted_books: pytest.Pytester, monkeypatch
) -> None:
    """The same book, naming its corpus (``./``) and output SAE (a name beside it) by
    relative paths, gives the same outcome from the rootdir and from another directory."""
    import json
    import shutil

    from rulecheck.specs import locate

    books = planted_books.path / "books"
    books.mkdir()
    shutil.copy(locate("planted:eval"), books / "eval.npy")
    shutil.copytree(locate("planted:sae_out/L0H0"), books / "saes" / "L0H0")
    header = "model: planted\nsae_in: planted:sae_in/L0\nsae_out: saes/L{layer}H{head}\n"
    (books / "L0H0.yaml").write_text(
        BOOK.replace("model: planted\n", header + "corpus: ./eval.npy\n")
    )
    (planted_books.path / "L0H0.yaml").unlink()
    elsewhere = planted_books.path / "elsewhere"
    elsewhere.mkdir()
    results = []
    for cwd, arg in ((planted_books.path, "books"), (elsewhere, "../books")):
        monkeypatch.chdir(cwd)
        report = planted_books.path / f"{cwd.name}.json"
        result = pytest_run(planted_books, arg, f"--rulecheck-report={report}")
        assert result.ret == 0, result.stdout.str()
        records = json.loads(report.read_text())
        results.append([(r["feature"], r["outcome"], r.get("measured")) for r in records])
    assert results[0] == results[1] and results[0]
    # regenerated from elsewhere, the book still names its files relative to itself
    pytest_run(planted_books, "../books", "--rulecheck-extract=all", "-k", "nothing")
    text = (books / "L0H0.yaml").read_text()
    assert "corpus: ./eval.npy\n" in text and "sae_out: saes/L0H0\n" in text
    assert "source: extracted" in text and str(planted_books.path) not in text
