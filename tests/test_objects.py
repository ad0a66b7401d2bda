"""The Python API on objects in memory: ``rulecheck.extract``, ``check``, ``check_claim``,
the loaders' zoo names, the results' displays and records, and the one exemplar cache."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from rich.console import Console

import rulecheck
from rulecheck import zoo
from rulecheck.cli import main
from rulecheck.errors import InvalidSpec

pytest_plugins = ["pytester"]

# what the CLI records for planted's L0H1: given as the objects' names, the book is the same
NAMES = {
    "model": "planted",
    "sae_in": "planted:sae_in/L{layer}",
    "sae_out": "planted:sae_out/L{layer}H{head}",
    "tokens": "planted:eval",
}


@pytest.fixture(scope="module")
def objects():
    """planted's model, SAEs and corpus loaded as a researcher loads them: TransformerLens
    through rulecheck's zoo name, sae_lens from the zoo's folders, numpy tokens."""
    from sae_lens import SAE

    return {
        "model": rulecheck.load_model("planted"),
        "sae_in": SAE.load_from_disk(zoo.resolve("planted:sae_in/L0")),
        "sae_out": SAE.load_from_disk(zoo.resolve("planted:sae_out/L0H1")),
        "tokens": torch.from_numpy(np.load(zoo.resolve("planted:eval"))),
    }


@pytest.fixture(scope="module")
def extracted(objects, tmp_path_factory):
    o = objects
    result = rulecheck.extract(
        o["model"], o["sae_in"], o["sae_out"], o["tokens"], head="L0H1", names=NAMES, progress=False
    )
    return result, result.save(tmp_path_factory.mktemp("books") / "api")


def given(objects):
    return {k: objects[k] for k in ("model", "sae_in", "sae_out", "tokens")}


def test_extract_from_objects_writes_the_cli_s_bytes(extracted):
    result, path = extracted
    cli = path.parent.parent / "cli"  # beside it: the schema line is a relative path
    argv = ["extract", "--model", "planted", "--layer", "0", "--heads", "1", "--out", str(cli)]
    assert main([*argv, "--device", "cpu"]) == 0
    for name in ("L0H1.yaml", "L0H1.measured.json"):
        assert (path.parent / name).read_bytes() == (cli / name).read_bytes()
    assert result.book.name == "L0H1" and [f.feature for f in result.book.features] == [0, 1]


def test_check_on_objects_passes_true_claims_and_fails_an_edited_one(extracted, objects):
    _, path = extracted
    checked = rulecheck.check(path, **given(objects))
    assert checked.passed and checked.counts()["passed"] == len(checked.items) >= 6
    book = rulecheck.load_rulebook(path)
    book.feature(0).expect["f1"] = 0.99  # measured 0.775: the edited claim is false
    verdict = rulecheck.check_claim(book, 0, "f1", **given(objects))
    assert verdict.outcome == "failed"
    assert "feature 0 of L0H1 ([games] ... [score]): f1 is 0.775, expected >= 0.990" in (
        verdict.message or ""
    )
    assert verdict.record["f1"] == pytest.approx(0.775, abs=1e-3)


def test_check_refuses_objects_that_are_not_what_the_book_was_measured_on(extracted, objects):
    _, path = extracted
    other = objects["tokens"][1:]
    with pytest.raises(rulecheck.RulecheckError, match=r"fingerprints\.corpus"):
        rulecheck.check(path, **{**given(objects), "tokens": other})


def test_zoo_names_work_in_every_loader():
    model = rulecheck.load_model("rulecheck-tiny")
    assert type(model).__name__ == "HookedTransformer" and model.cfg.n_layers == 2
    sae_in = rulecheck.load_sae("rulecheck-tiny:sae_in/L0")
    assert sae_in.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    sae_out = rulecheck.load_sae("rulecheck-tiny:sae_out/L{layer}H{head}", layer=1, head=3)
    assert sae_out.cfg.metadata.hook_name == "blocks.1.attn.hook_z"
    assert sae_out.cfg.metadata.hook_head_index == 3
    tokens = rulecheck.load_corpus("rulecheck-tiny:eval")
    assert tokens.shape[1] == 64 and tokens.dtype == torch.int64


def test_results_display_as_a_table_and_as_the_report_s_cards(extracted, objects):
    result, path = extracted
    with open(os_devnull(), "w") as sink:
        console = Console(width=120, record=True, file=sink)
        console.print(result)
    text = console.export_text()
    assert "L0H1: 2 features" in text and "[games] ... [score]" in text
    html = result._repr_html_()
    assert '<details class="card not-run" id="L0H1-f0"' in html
    assert "[games] ... [score]" in html and ".rulecheck-cards .card" in html
    book = rulecheck.load_rulebook(path)
    book.feature(0).expect["f1"] = 0.99
    html = rulecheck.check(book, **given(objects))._repr_html_()
    assert '<details class="card failed" id="L0H1-f0"' in html
    assert "f1 is 0.775, expected &gt;= 0.990" in html
    assert '<details class="card passed" id="L0H1-f1"' in html
    assert '<span class="badge passed">passed</span> <code>recall</code>' in html


def os_devnull() -> str:
    import os

    return os.devnull


def test_records_round_trip(extracted, objects):
    result, path = extracted
    records = result.to_records()
    assert [(r["feature"], r["f1"], r["expect_f1"]) for r in records] == [
        (f.feature, f.measured["f1"], f.expect["f1"]) for f in result.book.features
    ]
    checked = rulecheck.check(path, **given(objects))
    plain = json.loads(json.dumps(checked.to_records()))
    assert [rulecheck.ItemResult.from_record(r) for r in plain] == [
        replace(i, record={k: v for k, v in i.record.items() if not isinstance(v, dict | list)})
        for i in checked.items
    ]
    assert len({tuple(r) for r in plain}) == 1  # the same columns: a DataFrame's rows
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(plain)
    assert list(frame.columns) == list(plain[0]) and len(frame) == len(checked.items)
    assert frame["outcome"].tolist() == [i.outcome for i in checked.items]


def test_one_exemplar_cache_for_python_cli_and_pytest(pytester, monkeypatch, tmp_path):
    from rulecheck.paths import exemplar_cache
    from rulecheck.plugin.settings import cache_dir
    from rulecheck.session import Workbench

    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "cache"))
    assert exemplar_cache() == tmp_path / "cache" / "exemplars"
    assert Workbench(device="cpu").cache_dir == exemplar_cache()
    assert cache_dir(pytester.parseconfig()) == exemplar_cache()
    # an explicit option is read as before: relative to the rootdir
    config = pytester.parseconfig("--rulecheck-cache=mine")
    assert cache_dir(config) == config.rootpath / "mine"


def test_bad_input_is_one_line_before_any_work(objects):
    o = objects
    cases = [
        ({"head": "layer0"}, "head: cannot read head 'layer0'"),
        ({"head": "L0H1", "max_terms": 0}, "max_terms"),
        ({"head": "L0H1", "keyz": 3}, "keyz: unknown setting 'keyz'"),
        ({"head": "L0H1", "names": {"sae": "x"}}, "names: unknown part 'sae'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace("[", r"\[")):
            rulecheck.extract(o["model"], o["sae_in"], o["sae_out"], o["tokens"], **kwargs)
    with pytest.raises(InvalidSpec, match="sae_in must be given"):
        rulecheck.extract(o["model"], None, o["sae_out"], o["tokens"], head="L0H1")
    with pytest.raises(InvalidSpec, match="<tokens>: expected integer token ids"):
        rulecheck.extract(o["model"], o["sae_in"], o["sae_out"], o["tokens"].float(), head="L0H1")


def test_import_rulecheck_stays_cheap():
    """The API's names are listed at once and imported when first read."""
    code = (
        "import sys, rulecheck; heavy = {'torch', 'sae_lens', 'transformer_lens'} & "
        "set(sys.modules); assert not heavy, heavy; "
        "print(all(n in dir(rulecheck) for n in ('extract', 'check', 'load_sae')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
