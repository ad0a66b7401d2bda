"""``planted-local``: a head whose feature fires at ``close`` only when ``open`` is 1 to 3
tokens before it. Its ground truth checks distance-bounded skip-grams end to end: evaluated over
the whole corpus they agree with the model exactly, the unbounded term does not, a hand-written
bounded claim passes as a test, and extraction finds the term and invents nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rulecheck.build import planted_local
from rulecheck.core.evaluate import Columns, predict_prefixes
from rulecheck.core.prefixes import sequence_chunks
from rulecheck.core.scores import Terms
from rulecheck.loading import load_model, load_sae
from rulecheck.specs import locate

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def entry() -> Path:
    return Path(locate("planted-local")).parent


def reference(tokens: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``[n, pos]`` bool: a ``close`` with an ``open`` ``lo`` to ``hi`` tokens before it."""
    close, opened = planted_local.token_id("close"), planted_local.token_id("open")
    out = np.zeros(tokens.shape, dtype=bool)
    for b, row in enumerate(tokens):
        for t in range(1, len(row)):
            before = [row[t - d] for d in range(lo, min(hi, t) + 1)]
            out[b, t] = row[t] == close and opened in before
    return out


def test_the_bounded_term_is_the_feature_over_the_whole_corpus(entry: Path) -> None:
    truth = json.loads((entry / "ground_truth.json").read_text())
    [rule] = truth["features"][0]["skipgrams"]
    lo, hi = rule["min_distance"], rule["max_distance"]
    model = load_model(str(entry / "model"))
    sae_in, sae_out = load_sae(str(entry / "sae_in/L0")), load_sae(str(entry / "sae_out/L0H0"))
    tokens = np.load(entry / "eval_tokens.npy")[:600]
    _, cache = model.run_with_cache(
        torch.from_numpy(tokens).long(), names_filter="blocks.0.attn.hook_z"
    )
    on = (sae_out.encode(cache["blocks.0.attn.hook_z"][:, :, 0])[..., 0] > 0).numpy()
    assert (on == reference(tokens, lo, hi)).all() and on.sum() > 50
    # every prefix of those sequences, through the check's own evaluation
    seq, t = (torch.from_numpy(x).long() for x in np.nonzero(np.ones(tokens.shape[:2])))
    keep = t > 0
    seq, t = seq[keep], t[keep]
    features = (truth["input_features"]["open"], truth["input_features"]["close"])
    columns = Columns(features, ())

    def predicted(**bounds) -> np.ndarray:
        terms = Terms(
            torch.tensor([1]),
            torch.tensor([0]),
            torch.ones(1),
            torch.ones(1),
            **{k: torch.tensor([v]) for k, v in bounds.items()},
        )
        chunks = sequence_chunks(
            model, sae_in, torch.from_numpy(tokens).long(), 0, seq, t, 64, features
        )
        pred = predict_prefixes(chunks, torch.zeros(len(seq), dtype=torch.long), columns, [terms])
        return (pred > 0).numpy()

    want = on[seq.numpy(), t.numpy()]
    bounded = predicted(min_distance=lo, max_distance=hi)
    assert (bounded == want).all()
    free = predicted()
    assert free[want].all()  # the unbounded term fires wherever the feature does
    assert want[free].mean() < 0.5  # and is right at fewer than half the places it fires


def test_a_hand_written_bounded_claim_passes_as_a_test(pytester: pytest.Pytester) -> None:
    book = """rulecheck: 2
model: planted-local
layer: 0
head: 0
features:
  - feature: 0
    source: manual
    skipgrams:
      - {key: open, query: close, min_distance: 1, max_distance: 3}
    expect: {f1: 0.99, precision: 0.99, recall: 0.99}
"""
    (pytester.path / "L0H0.yaml").write_text(book)
    result = pytester.runpytest("-p", "no:cacheprovider", "-q", "--rulecheck-cache=cache")
    result.assert_outcomes(passed=3)


def test_extraction_finds_the_term_and_invents_nothing() -> None:
    from rulecheck.api import extract_books
    from rulecheck.config import ExemplarConfig, ExtractConfig
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    bench = Workbench(cache_dir=None)
    cfg = ExtractConfig(exemplars=ExemplarConfig(min_active=50, n_pos=100, n_neg=100))
    [book] = extract_books(bench, Specs(model="planted-local").resolve(), 0, [0], cfg)
    assert [f.feature for f in book.features] == [0]  # feature 1 is dead
    rules = book.features[0]
    top = rules.skipgrams[0]
    assert (top.key.tokens[0], top.query.tokens[0]) == ("open", "close")
    # the bound, recovered exactly (distance 0 cannot happen: open and close are two tokens,
    # so the truth's min_distance 1 is no bound on this term)
    truth = json.loads((Path(locate("planted-local")).parent / "ground_truth.json").read_text())
    [want] = truth["features"][0]["skipgrams"]
    assert top.max_distance == want["max_distance"] and top.min_distance is None
    assert rules.label == "[open] ... [close] (distance <= 3)"
    # bounded, the rule is right wherever it fires, on the protocol and over the corpus
    assert rules.measured["corpus_precision"] == 1.0 and rules.measured["n_hard"] == 0
    assert rules.measured["precision"] == rules.measured["protocol_precision"] == 1.0
    assert rules.measured["n_fire"] > 20


def test_a_hand_written_claim_without_its_bound_fails_precision(pytester: pytest.Pytester) -> None:
    """Read as written ("open anywhere before close"), the claim is right at about a third of
    the places it fires: its hard negatives take its precision below the claim, and the
    failure says where it fires and what the protocol alone would have said."""
    book = """rulecheck: 2
model: planted-local
layer: 0
head: 0
features:
  - feature: 0
    source: manual
    skipgrams: ["[open] ... [close]"]
    expect: {precision: 0.9, recall: 0.99}
"""
    (pytester.path / "L0H0.yaml").write_text(book)
    result = pytester.runpytest("-p", "no:cacheprovider", "-q", "--rulecheck-cache=cache")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*feature 0 of L0H0 ([[]open] ... [[]close]): precision is 0.*, expected >= 0.900",
            "*where the rule fires (* held-out positions) the feature is on at *%; on the "
            "protocol's random negatives alone precision is 0.9*",
        ]
    )


def test_moving_the_key_in_and_out_of_the_window_is_read_as_the_model_computes(
    entry: Path,
) -> None:
    """Hypothesis moves ``open`` away from ``close`` (``strategies.filler_insertions``): while
    it stays within the bound the bounded term and the model both keep the feature on, past it
    both turn it off; the unbounded term stays on throughout."""
    from hypothesis import given, settings

    from rulecheck.core.rules import predict
    from rulecheck.strategies import contexts, filler_insertions

    model = load_model(str(entry / "model"))
    sae_in, sae_out = load_sae(str(entry / "sae_in/L0")), load_sae(str(entry / "sae_out/L0H0"))
    tokens = torch.from_numpy(np.load(entry / "eval_tokens.npy")[:300]).long()
    on = reference(tokens.numpy(), 1, planted_local.WINDOW)
    rows, t = (torch.from_numpy(x) for x in np.nonzero(on))
    opened, close = planted_local.token_id("open"), planted_local.token_id("close")
    fillers = [planted_local.token_id(w) for w in planted_local.FILLER[:5]]
    truth = json.loads((entry / "ground_truth.json").read_text())
    columns = [truth["input_features"]["open"], truth["input_features"]["close"]]
    one = dict(query=torch.tensor([1]), key=torch.tensor([0]), attn=torch.ones(1))
    bounded = Terms(**one, value=torch.ones(1), max_distance=torch.tensor([planted_local.WINDOW]))
    free = Terms(**one, value=torch.ones(1))
    seen: set[bool] = set()

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(edit=filler_insertions(contexts(tokens[rows], t), fillers, max_len=6, key_id=opened))
    def moved(edit) -> None:
        x = edit.tokens.unsqueeze(0)
        assert int(x[0, edit.t]) == close
        with torch.no_grad():
            _, cache = model.run_with_cache(
                x, names_filter=["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z"]
            )
            feature = float(sae_out.encode(cache["blocks.0.attn.hook_z"][:, :, 0])[0, edit.t, 0])
            feats = sae_in.encode(cache["blocks.0.hook_resid_pre"])[..., columns]
        at = torch.tensor([edit.t])
        inside = opened in edit.tokens[max(edit.t - planted_local.WINDOW, 0) : edit.t].tolist()
        assert (feature > 0) == inside == bool(predict(feats, at, bounded) > 0)
        assert bool(predict(feats, at, free) > 0)
        seen.add(inside)

    moved()
    assert seen == {True, False}  # the key was moved both within and past the bound
