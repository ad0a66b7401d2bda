"""Extraction end to end: planted ground truth, determinism, a GPT-2 HF directory, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLANTED_BOOK, at_once, permuted_copy, random_sae

from rulecheck import zoo
from rulecheck.cli import main
from rulecheck.rulebook import load_rulebook, parse_rulebook


@pytest.fixture(scope="module")
def planted_books(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    assert main(["extract", "--model", "planted", "--layer", "0", "--out", str(out)]) == 0
    return out


def test_planted_rules_are_recovered_with_their_tokens(planted_books):
    truth = json.loads((zoo.resolve("planted:ground_truth.json")).read_text())
    feature_of = truth["input_features"]  # word -> input-SAE feature id
    for entry in truth["features"]:
        book = load_rulebook(planted_books / f"L0H{entry['head']}.yaml", measurements=True)
        rules = book.feature(entry["feature"])
        found = [(s.key.feature, s.query.feature) for s in rules.skipgrams]
        for key, query in entry["skipgrams"]:
            assert (feature_of[key], feature_of[query]) in found
            term = rules.skipgrams[found.index((feature_of[key], feature_of[query]))]
            assert term.key.tokens[0] == key and term.query.tokens[0] == query
        # on the paper's protocol the skip-grams describe every planted feature; over the
        # corpus, a feature that also needs its key twice (a counting rule) is off at many
        # of the positions where its skip-gram fires, and its hard negatives say so
        assert rules.measured["protocol_f1"] >= 0.95
        if entry["counting"]:
            assert rules.measured["corpus_precision"] < 0.8 and rules.measured["n_hard"] > 0
            assert rules.measured["precision"] < rules.measured["protocol_precision"]
        else:
            assert rules.measured["f1"] >= 0.95 and rules.measured["corpus_precision"] >= 0.95
        assert all(s.max_distance is None for s in rules.skipgrams)  # none is local
        assert rules.expect["f1"] <= rules.measured["f1"]
        absence = [
            (a.key.tokens[0], a.query.tokens[0], a.distractor.tokens[0]) for a in rules.absence
        ]
        assert absence == [(a["key"], a["query"], a["distractor"]) for a in entry["absence"]]
        for a in rules.absence:
            assert a.drop[0] > 0.5 and a.drop[-1] < 0.99  # each copy steals more, none all
            assert all(y > x + 0.01 for x, y in itertools.pairwise(a.drop))
            assert a.value_score < 0 < a.attn_score
        counting = [(c.key.tokens[0], c.threshold_count, c.direction) for c in rules.counting]
        want = [(c["key"], c["threshold_count"], "increasing") for c in entry["counting"]]
        assert counting == want
    for dead in truth["dead"]:
        with pytest.raises(KeyError):
            load_rulebook(planted_books / f"L0H{dead['head']}.yaml").feature(dead["feature"])


def test_same_inputs_and_seed_give_byte_identical_rulebooks(planted_books, tmp_path):
    assert main(["extract", "--model", "planted", "--layer", "0", "--out", str(tmp_path)]) == 0
    for name in ("L0H0.yaml", "L0H1.yaml", "L0H2.yaml"):
        assert (tmp_path / name).read_bytes() == (planted_books / name).read_bytes()


def test_a_feature_counting_its_own_query_token_is_a_counting_rule(planted_books):
    """L0H2 fires at an ``again`` that occurred before: a count of 2, the query included."""
    (rules,) = load_rulebook(planted_books / "L0H2.yaml", measurements=True).features
    (rule,) = rules.counting
    assert rule.key.tokens == ["again"]
    assert (rule.direction, rule.threshold_count) == ("increasing", 2)
    assert rule.spearman > 0.8


def test_a_corpus_too_small_is_a_one_line_error(tmp_path, capsys):
    tokens = np.load(zoo.resolve("planted:eval"))[:120]
    np.save(tmp_path / "small.npy", tokens)
    code = main(
        [
            "extract",
            "--model",
            "planted",
            "--layer",
            "0",
            "--corpus",
            str(tmp_path / "small.npy"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "small.npy" in err and "120 sequences" in err and "300" in err and "fix" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "L0H0.yaml").exists()


def test_gpt2_huggingface_directory_goes_through_extraction(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64))
    hf.save_pretrained(tmp_path / "gpt2-tiny")
    random_sae(32, 48, "blocks.1.hook_resid_pre", seed=1).save_model(tmp_path / "sae_in" / "L1")
    for h in range(4):
        sae = random_sae(8, 16, "blocks.1.attn.hook_z", head=h, seed=10 + h)
        with torch.no_grad():
            sae.b_enc.fill_(-0.05)
        sae.save_model(tmp_path / "sae_out" / f"L1H{h}")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (80, 32), generator=g)
    tokens[:, 0] = 0
    np.save(tmp_path / "corpus.npy", tokens.numpy().astype(np.int64))
    out = tmp_path / "books"
    code = main(
        [
            "extract",
            "--model",
            str(tmp_path / "gpt2-tiny"),
            "--sae-in",
            str(tmp_path / "sae_in" / "L{layer}"),
            "--sae-out",
            str(tmp_path / "sae_out" / "L{layer}H{head}"),
            "--corpus",
            str(tmp_path / "corpus.npy"),
            "--layer",
            "1",
            "--heads",
            "0,2",
            "--min-active",
            "8",
            "--min-inactive",
            "8",
            "--n-pos",
            "9",
            "--n-neg",
            "9",
            "--features",
            "3",
            "--keys",
            "10",
            "--queries-per-key",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for head in (0, 2):
        book = load_rulebook(out / f"L1H{head}.yaml", measurements=True)
        assert book.layer == 1 and book.head == head
        assert 1 <= len(book.features) <= 3
        assert book.extraction["ln_scale"] > 0 and book.extraction["ln_scale"] != 1.0
        for f in book.features:
            assert 0.0 <= f.measured["f1"] <= 1.0 and f.measured["n_test"] == 6
            assert all(s.attn_score > 0 and s.value_score > 0 for s in f.skipgrams)
    assert not (out / "L1H1.yaml").exists()


def test_model_is_loaded_the_way_the_input_sae_says(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64)).save_pretrained(
        tmp_path / "m"
    )
    tokens = torch.randint(1, 64, (4, 8))
    tokens[:, 0] = 0
    np.save(tmp_path / "c.npy", tokens.numpy())
    ln_w = {}
    for folded in (True, False):
        sae = random_sae(32, 8, "blocks.0.hook_resid_pre")
        sae.cfg.metadata.model_from_pretrained_kwargs = {"fold_ln": folded}
        sae.save_model(tmp_path / f"in{folded}")
        random_sae(8, 4, "blocks.0.attn.hook_z", head=0).save_model(tmp_path / "out")
        specs = Specs(
            str(tmp_path / "m"),
            str(tmp_path / f"in{folded}"),
            str(tmp_path / "out"),
            str(tmp_path / "c.npy"),
        )
        art = Workbench(device="cpu", cache_dir=None).layer(specs.resolve(), 0, "0")
        ln_w[folded] = hasattr(art.model.blocks[0].ln1, "w")
    assert ln_w == {True: False, False: True}


def test_gradient_ranking_recovers_planted_rules(tmp_path):
    args = ["extract", "--model", "planted", "--layer", "0", "--method", "gradient"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    truth = json.loads(zoo.resolve("planted:ground_truth.json").read_text())
    feature_of = truth["input_features"]
    for entry in truth["features"]:
        book = load_rulebook(tmp_path / f"L0H{entry['head']}.yaml", measurements=True)
        assert book.extraction["method"] == "gradient"
        rules = book.feature(entry["feature"])
        assert rules.measured["protocol_f1"] >= 0.95
        importance = [s.importance for s in rules.skipgrams]
        assert all(i is not None for i in importance)
        assert importance == sorted(importance, reverse=True)
        found = [(s.key.feature, s.query.feature) for s in rules.skipgrams]
        for key, query in entry["skipgrams"]:
            assert (feature_of[key], feature_of[query]) in found


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--layer", "3"], "--layer: layer 3 is out of range: the model has 1 layers"),
        (["--heads", "5"], "--heads: head 5 is out of range: the model has 3 heads"),
        (["--heads", "x"], "--heads: cannot read heads 'x'"),
    ],
)
def test_out_of_range_layer_or_head_is_a_one_line_error(tmp_path, capsys, args, want):
    code = main(["extract", "--model", "planted", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert want in err and "fix:" in err
    assert not list(tmp_path.iterdir())


def test_shards_together_write_exactly_the_unsharded_books(tmp_path: Path) -> None:
    """Every head in exactly one shard, and the shards' files byte-identical to one run's."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    base = ["extract", "--model", "planted", "--features", "4"]
    assert main([*base, "--out", str(whole)]) == 0
    for i in (1, 2, 3):
        assert main([*base, "--shard", f"{i}/3", "--out", str(parts)]) == 0
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in parts.iterdir()) and len(names) >= 2
    for name in names:
        assert (whole / name).read_bytes() == (parts / name).read_bytes(), name


def _streamed_heads(monkeypatch) -> list[list[int]]:
    """The heads each corpus pass from now on collects (``collect_layer``'s output SAEs)."""
    import rulecheck.passes

    streamed: list[list[int]] = []
    real = rulecheck.passes.collect_layer

    def counted(model, saes, *args, **kwargs):
        streamed.append(sorted(saes))
        return real(model, saes, *args, **kwargs)

    monkeypatch.setattr(rulecheck.passes, "collect_layer", counted)
    return streamed


def test_a_one_head_extraction_streams_the_corpus_for_that_head_only(tmp_path, monkeypatch):
    """The corpus pass encodes with the extracted heads' output SAEs only, and the book is the
    one a whole-layer extraction writes for that head."""
    from rulecheck.loading import load_model
    from rulecheck.specs import locate

    collected = _streamed_heads(monkeypatch)
    base = ["extract", "--model", "planted", "--features", "4"]
    assert main([*base, "--heads", "1", "--out", str(tmp_path / "one")]) == 0
    assert collected == [[1]]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    n_heads = load_model(locate("planted")).cfg.n_heads
    assert collected[1:] == [list(range(n_heads))]  # the whole layer, in one pass
    book = "L0H1.yaml"
    assert (tmp_path / "one" / book).read_bytes() == (tmp_path / "all" / book).read_bytes()


def test_kept_inputs_give_the_books_that_prefix_passes_give(tmp_path, monkeypatch):
    """A whole-layer extraction reads its prefixes from the corpus pass's kept input-SAE
    activations, running no prefix pass; the books are those the prefix passes give."""
    import rulecheck.api
    import rulecheck.core.extract

    passes = []
    real = rulecheck.core.extract.sequence_chunks

    def spy(*args, **kwargs):
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rulecheck.core.extract, "sequence_chunks", spy)
    base = ["extract", "--model", "planted"]
    monkeypatch.setattr(rulecheck.api, "keeps_inputs", lambda art, cfg: True)
    assert main([*base, "--out", str(tmp_path / "kept")]) == 0
    assert not passes
    monkeypatch.setattr(rulecheck.api, "keeps_inputs", lambda art, cfg: False)
    assert main([*base, "--out", str(tmp_path / "run")]) == 0
    assert passes
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "kept").iterdir())
    for name in names:
        kept, run = (tmp_path / d / name for d in ("kept", "run"))
        assert kept.read_bytes() == run.read_bytes(), name


def test_inputs_are_kept_only_when_the_prefixes_outnumber_the_corpus():
    """Keeping the corpus's input activations pays when the extracted heads' prefixes come to
    more tokens than the corpus: a whole layer of tiny, not its 64-feature head alone (however
    high ``--features``), nor a few features a head."""
    from rulecheck.api import keeps_inputs
    from rulecheck.config import ExtractConfig
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    bench = Workbench(device="cpu", cache_dir=None)
    tiny = Specs("rulecheck-tiny").resolve()
    layer, one = bench.layer(tiny, 0), bench.layer(tiny, 0, [1])
    assert one.sae_outs[1].cfg.d_sae == 64
    assert keeps_inputs(layer, ExtractConfig())
    assert not keeps_inputs(one, ExtractConfig(features=1000))
    assert not keeps_inputs(layer, ExtractConfig(features=4))


@pytest.mark.parametrize(
    "case",
    ["same-sae", "same-sae-named-otherwise", "other-sae", "books-of-two-heads"],
    ids=lambda case: case,
)
def test_sessions_sharing_a_cache_stream_a_layer_once(tmp_path, monkeypatch, case):
    """Two sessions (pytest workers, say) asking at once for a layer's exemplars with a cold
    cache: one streams the corpus, the other waits for it and reads the cache, also when they
    ask for two heads whose books each name their own output SAE (both sessions check both
    books: the first pass collects both heads) and when one names the SAE by its template and
    the other by the head's own name (what a book holds); a session asking for another output
    SAE's (a retrain's) streams beside the first, without waiting for a pass that collects
    nothing it reads."""
    import threading

    import rulecheck.passes
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    together = threading.Barrier(2)  # met when both sessions stream at once
    met: list[bool] = []
    real = rulecheck.passes.collect_layer

    def meeting(*args, **kwargs):
        try:  # long enough for the other session to ask meanwhile
            together.wait(timeout=10 if other_sae else 0.5)
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(rulecheck.passes, "collect_layer", meeting)
    other_sae = case == "other-sae"
    specs = [Specs("planted").resolve()] * 2
    asked = [0, 0]
    if other_sae:
        permuted_copy("planted:sae_out/L0H0", tmp_path / "retrained" / "L0H0")
        specs[1] = Specs("planted", sae_out=f"{tmp_path}/retrained/L{{layer}}H{{head}}").resolve()
    if case == "same-sae-named-otherwise":
        specs[1] = Specs("planted", sae_out="planted:sae_out/L0H0").resolve()
    if case == "books-of-two-heads":
        specs = [Specs("planted", sae_out=f"planted:sae_out/L0H{h}").resolve() for h in (0, 1)]
        asked = [0, 1]
    benches = [Workbench(device="cpu", cache_dir=tmp_path / "cache") for _ in range(2)]
    heads = [b.layer_heads(s, 0, [h])[0] for b, s, h in zip(benches, specs, asked, strict=True)]
    if case == "books-of-two-heads":
        for bench in benches:  # each session checks both books
            for head in heads:
                bench.passes.announce(head)
    got = at_once(*(lambda b=b, h=h: b.collector(h) for b, h in zip(benches, heads, strict=True)))
    assert got[0] is not None and got[1] is not None
    if other_sae:
        assert met == [True, True]
    else:
        assert met == [False]
    if case.startswith("same-sae"):
        assert torch.equal(got[0].top_seq, got[1].top_seq)
    if case == "books-of-two-heads":  # as a session of its own collects them
        alone = Workbench(device="cpu", cache_dir=None)
        for head, col in zip(heads, got, strict=True):
            assert torch.equal(
                alone.collector(alone.layer_heads(head.specs, 0, [head.head])[0]).top_seq,
                col.top_seq,
            )


def test_a_later_session_extracts_from_the_cached_exemplars(tmp_path, monkeypatch):
    """A session whose heads' exemplars an earlier one cached (a gate's fresh extraction, a
    regeneration) extracts from them without streaming the corpus, and writes the book a
    session without a cache writes; an entry written before entries kept the pass's LayerNorm
    scale is read for checks, and extraction streams again."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from rulecheck.api import extract_books
    from rulecheck.config import ExtractConfig
    from rulecheck.rulebook import dump_rulebook
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    planted = Specs("planted").resolve()
    cfg = ExtractConfig(features=(1,))

    def extracted(bench: Workbench) -> str:
        [book] = extract_books(bench, planted, 0, [0], cfg)
        return dump_rulebook(book)

    alone = extracted(Workbench(device="cpu", cache_dir=None))
    first = Workbench(device="cpu", cache_dir=tmp_path / "cache")
    first.collector(first.layer_heads(planted, 0, [0])[0])
    streamed = _streamed_heads(monkeypatch)
    assert extracted(Workbench(device="cpu", cache_dir=tmp_path / "cache")) == alone
    assert streamed == []
    [entry] = (tmp_path / "cache").glob("exemplars-*.safetensors")
    with safe_open(str(entry), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(entry)
    del state["ln_scale"]
    save_file(state, entry, metadata=metadata)
    later = Workbench(device="cpu", cache_dir=tmp_path / "cache")
    assert later.has_exemplars(later.layer_heads(planted, 0, [0])[0])
    assert extracted(later) == alone
    assert streamed == [[0]]


def test_a_pass_does_not_stream_again_the_announced_heads_already_cached(tmp_path, monkeypatch):
    """A layer's pass collects the heads the session will read, except those whose exemplars
    an earlier pass cached: they are read from the cache."""
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    planted = Specs("planted").resolve()
    first = Workbench(device="cpu", cache_dir=tmp_path / "cache")
    head0, _ = first.layer_heads(planted, 0, [0, 1])
    cached = first.collector(head0)
    streamed = _streamed_heads(monkeypatch)
    later = Workbench(device="cpu", cache_dir=tmp_path / "cache")
    head0, head1 = later.layer_heads(planted, 0, [0, 1])
    for text in (PLANTED_BOOK, PLANTED_BOOK.replace("head: 0", "head: 1")):
        later.announce(parse_rulebook(text), "book.yaml")
    later.collector(head1)
    assert streamed == [[1]]
    assert torch.equal(later.collector(head0).top_seq, cached.top_seq) and streamed == [[1]]


@pytest.mark.parametrize(
    ("shard", "message"),
    [("0/3", "must be a whole number in [1, 3]"), ("4/3", "in [1, 3]"), ("2", "expected i/n")],
)
def test_a_bad_shard_is_one_line(tmp_path: Path, capsys, shard: str, message: str) -> None:
    argv = ["extract", "--model", "planted", "--shard", shard, "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--shard" in err and message in err


def test_shard_slices_are_contiguous_balanced_and_cover_everything() -> None:
    from rulecheck.config import shard_of

    items = list(range(11))
    for n in range(1, 14):
        parts = [shard_of(items, (i, n)) for i in range(1, n + 1)]
        assert [x for p in parts for x in p] == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
