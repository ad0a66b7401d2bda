"""``planted-rotary``: the modern family's planted model (rotary positions, grouped-query
attention, RMSNorm). Its weights compute the planted rules exactly, rulecheck reads them as the
model does, and extraction recovers every rule (the local one with its distance, the content
ones without, the distractor, the count and the presence rule beside it) and invents nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rulecheck.build import planted_rotary
from rulecheck.loading import load_model, load_sae
from rulecheck.specs import locate


@pytest.fixture(scope="module")
def entry() -> Path:
    return Path(locate("planted-rotary")).parent


@pytest.fixture(scope="module")
def truth(entry: Path) -> dict:
    return json.loads((entry / "ground_truth.json").read_text())


def reference(tokens: np.ndarray, key: str, query: str, lo: int, hi: int) -> np.ndarray:
    """``[n, pos]`` bool: a ``query`` with a ``key`` ``lo`` to ``hi`` tokens before it."""
    k, q = planted_rotary.token_id(key), planted_rotary.token_id(query)
    out = np.zeros(tokens.shape, dtype=bool)
    for b, row in enumerate(tokens):
        for t in range(1, len(row)):
            out[b, t] = row[t] == q and k in [row[t - d] for d in range(lo, min(hi, t) + 1)]
    return out


def key_counts(tokens: np.ndarray, key: str, query: str) -> np.ndarray:
    """``[n, pos]`` int: at a ``query``, the count of ``key`` in ``[1, t]`` (the query
    position included, as counting rules count); -1 elsewhere."""
    k, q = planted_rotary.token_id(key), planted_rotary.token_id(query)
    out = np.full(tokens.shape, -1)
    for b, row in enumerate(tokens):
        for t in range(1, len(row)):
            if row[t] == q:
                out[b, t] = list(row[1 : t + 1]).count(k)
    return out


def test_the_entry_is_the_modern_family(entry: Path) -> None:
    """Rotary on every head dimension, RMSNorm, and four query heads on two key/value heads:
    heads 0 and 1 read key/value head 0, heads 2 and 3 key/value head 1."""
    from rulecheck.core.heads import head_weights, qk_form, query_rows_supported

    model = load_model(str(entry / "model"))
    cfg = model.cfg
    assert cfg.positional_embedding_type == "rotary" and cfg.rotary_dim == cfg.d_head
    assert cfg.n_key_value_heads == 2 and cfg.n_heads == 4
    assert cfg.normalization_type in ("RMS", "RMSPre")
    assert query_rows_supported(model, 0) and qk_form(model, 0).positional
    attn = model.blocks[0].attn
    for head, group in ((0, 0), (1, 0), (2, 1), (3, 1)):
        w = head_weights(model, 0, head)
        assert torch.equal(w.W_K, attn._W_K[group]) and torch.equal(w.W_V, attn._W_V[group])
    assert not torch.equal(attn._W_K[0], attn._W_K[1])


def test_the_weights_compute_the_planted_rules(entry: Path, truth: dict) -> None:
    """Over the corpus each head's feature is on exactly where its rule says: the local one
    within its distances, the content ones at any distance, the count from its threshold on
    (growing with the count); the dead features never fire."""
    model = load_model(str(entry / "model"))
    tokens = np.load(entry / "eval_tokens.npy")[:500]
    _, cache = model.run_with_cache(
        torch.from_numpy(tokens).long(), names_filter="blocks.0.attn.hook_z"
    )
    acts = {}
    for head in range(model.cfg.n_heads):
        sae = load_sae(str(entry / f"sae_out/L0H{head}"))
        acts[head] = sae.encode(cache["blocks.0.attn.hook_z"][:, :, head]).detach().numpy()
    for rule in truth["features"]:
        [term] = rule["skipgrams"]
        act = acts[rule["head"]][..., rule["feature"]]
        on = act > 0
        if rule.get("counting"):
            [count] = rule["counting"]
            n = key_counts(tokens, count["key"], count["query"])
            assert (on == (n >= count["threshold_count"])).all()
            top = planted_rotary.MAX_GAMES
            means = [act[n == c].mean() for c in range(count["threshold_count"], top + 1)]
            assert (np.diff(means) > 0).all()
            assert ((n >= 0) & ~on).sum() > 50  # the query without enough keys is common
        else:
            lo, hi = term.get("min_distance", 1), term.get("max_distance", tokens.shape[1])
            assert (on == reference(tokens, term["key"], term["query"], lo, hi)).all()
        assert on.sum() > 50
    for dead in truth["dead"]:
        assert not (acts[dead["head"]][..., dead["feature"]] > 0).any()


def test_rulecheck_reads_the_local_kernel_as_the_model_does(entry: Path) -> None:
    """The score of ``close`` against the carrier-only keys, read by ``QKForm`` from the
    weights, is the kernel the model was built with: high in the window, low outside."""
    from rulecheck.core.heads import head_weights

    model = load_model(str(entry / "model"))
    w = head_weights(model, 0, 0)
    n_words = len(planted_rotary.VOCAB)
    x = torch.zeros(2, model.cfg.d_model)
    x[0, planted_rotary.token_id("close")] = x[0, n_words] = 1.0  # close, with the carrier
    x[1, n_words] = 1.0  # the carrier of any filler word
    q, k = w.form.project(x[:1], w.W_Q, None), w.form.project(x[1:], w.W_K, None)
    near = [float(w.form.scores(q, k, d)) for d in range(planted_rotary.SEQ_LEN)]
    window = near[1 : planted_rotary.WINDOW + 1]
    assert min(window) >= planted_rotary.NEAR - 1e-3
    assert max(near[:1] + near[planted_rotary.WINDOW + 1 :]) <= 1e-3


def test_extraction_recovers_every_planted_rule_and_invents_nothing(truth: dict) -> None:
    """Every head's rule, with its distance bound, distractor and count where it has them;
    the count is a rule of head 2 only (head 3 sees one ``games`` through the same keys and
    values), and no dead feature has a rulebook entry."""
    from rulecheck.api import extract_books
    from rulecheck.config import ExemplarConfig, ExtractConfig
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    bench = Workbench(cache_dir=None)
    cfg = ExtractConfig(exemplars=ExemplarConfig(min_active=50, n_pos=100, n_neg=100))
    heads = list(range(planted_rotary.N_HEADS))
    books = extract_books(bench, Specs(model="planted-rotary").resolve(), 0, heads, cfg)
    by_head = {book.head: book for book in books}
    assert sorted(by_head) == heads
    for rule in truth["features"]:
        book = by_head[rule["head"]]
        assert [f.feature for f in book.features] == [rule["feature"]]  # feature 1 is dead
        found = book.features[0]
        [want] = rule["skipgrams"]
        top = found.skipgrams[0]
        assert (top.key.tokens[0], top.query.tokens[0]) == (want["key"], want["query"])
        assert top.max_distance == want.get("max_distance")  # the local rule's bound only
        assert found.measured["recall"] == 1.0 and found.measured["protocol_precision"] == 1.0
        distractors = [a.distractor.tokens[0] for a in found.absence]
        assert distractors == [a["distractor"] for a in rule.get("absence", [])]
        counts = [(c.key.tokens[0], c.direction, c.threshold_count) for c in found.counting]
        wanted = rule.get("counting", [])
        assert counts == [(c["key"], "increasing", c["threshold_count"]) for c in wanted]
        if wanted:
            # held per context (no strength needed), and off at the hard negatives: the
            # query with a single key, where the skip-gram alone would fire
            [count] = found.counting
            assert count.min_spearman is None and count.spearman > 0.9
            assert found.measured["corpus_precision"] < 0.8 and found.measured["n_hard"] > 0
        else:
            assert found.measured["precision"] == 1.0
            assert found.measured["corpus_precision"] == 1.0
    for dead in truth["dead"]:
        assert dead["feature"] not in [f.feature for f in by_head[dead["head"]].features]
