"""The vectorised core against slow, obviously-correct loops (per pair, per position)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_model, random_sae
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import spearmanr

from rulecheck.core.exemplars import ExemplarCollector, ExemplarConfig
from rulecheck.core.extract import ExtractConfig, choose_n_terms, collect_layer
from rulecheck.core.heads import (
    encode_columns,
    encode_head,
    head_encoder,
    head_weights,
    input_directions,
    layer_hooks,
    run_to_layer,
    z_hook,
)
from rulecheck.core.metrics import binary_scores, spearman
from rulecheck.core.rules import predict, predictions_by_terms, prefix_stats, term_contributions
from rulecheck.core.scores import attn_scores, candidate_terms, rank_by_weight, value_scores

LAYER, HEAD = 1, 1


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def ref_direction(model, sae_in, j: int, ln_scale: float) -> list[float]:
    """Decoder row j as layer LAYER's attention reads it: centred, scaled, times LN weight."""
    row = [float(x) for x in sae_in.W_dec[j].detach()]
    mean = sum(row) / len(row)
    w = model.blocks[LAYER].ln1.w
    return [(x - mean) * ln_scale * float(w[i]) for i, x in enumerate(row)]


def ref_project(vec: list[float], W) -> list[float]:
    """vec @ W by loops, W [d_model, d_head]."""
    return [dot(vec, [float(W[m, n]) for m in range(W.shape[0])]) for n in range(W.shape[1])]


@pytest.fixture(scope="module")
def saes(model):
    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=2)
    sae_out = random_sae(8, 10, f"blocks.{LAYER}.attn.hook_z", head=HEAD, seed=3)
    return sae_in, sae_out


def test_ln_scale_matches_per_position_loop(model, tokens, saes):
    _, sae_out = saes
    cfg = ExtractConfig(batch_size=5, exemplars=ExemplarConfig(n_pos=3, n_neg=3))
    _, ln_scale = collect_layer(model, {HEAD: sae_out}, tokens, LAYER, cfg)
    resid = run_to_layer(model, tokens, LAYER, layer_hooks(model, LAYER))[
        f"blocks.{LAYER}.hook_resid_pre"
    ]
    eps = model.cfg.eps
    total, count = 0.0, 0
    for b in range(resid.shape[0]):
        for p in range(1, resid.shape[1]):
            x = [float(v) for v in resid[b, p]]
            mu = sum(x) / len(x)
            var = sum((v - mu) ** 2 for v in x) / len(x)
            total += 1 / math.sqrt(var + eps)
            count += 1
    assert ln_scale == pytest.approx(total / count, rel=1e-5)


def test_value_and_attn_scores_match_loops(model, saes):
    sae_in, sae_out = saes
    ln_scale = 0.7
    w = head_weights(model, LAYER, HEAD)
    d = input_directions(sae_in, w, ln_scale)
    u = head_encoder(sae_out, HEAD, model.cfg.d_head)
    vs = value_scores(d, w.W_V, u)
    att = attn_scores(d, d, w.W_Q, w.W_K, w.attn_scale)
    assert w.attn_scale == pytest.approx(math.sqrt(model.cfg.d_head))
    for j in range(sae_in.cfg.d_sae):
        dj = ref_direction(model, sae_in, j, ln_scale)
        vj = ref_project(dj, model.W_V[LAYER, HEAD])
        for g in range(sae_out.cfg.d_sae):
            ref = dot(vj, [float(sae_out.W_enc[n, g]) for n in range(8)])
            assert float(vs[j, g]) == pytest.approx(ref, abs=1e-5)
    for q in range(0, sae_in.cfg.d_sae, 5):
        qv = ref_project(ref_direction(model, sae_in, q, ln_scale), model.W_Q[LAYER, HEAD])
        for k in range(sae_in.cfg.d_sae):
            kv = ref_project(ref_direction(model, sae_in, k, ln_scale), model.W_K[LAYER, HEAD])
            ref = dot(qv, kv) / math.sqrt(model.cfg.d_head)
            assert float(att[q, k]) == pytest.approx(ref, abs=1e-5)


def test_candidates_and_weight_ranking_match_sorting_by_hand(model, saes):
    sae_in, sae_out = saes
    w = head_weights(model, LAYER, HEAD)
    d = input_directions(sae_in, w, 0.9)
    vs = value_scores(d, w.W_V, head_encoder(sae_out, HEAD, 8))[:, 4]
    att = attn_scores(d, d, w.W_Q, w.W_K, w.attn_scale)
    n_keys, per_key = 5, 7
    keys = sorted(range(len(vs)), key=lambda j: (-float(vs[j]), j))[:n_keys]
    pairs = []
    for k in keys:
        qs = sorted(range(len(vs)), key=lambda q: (-float(att[q, k]), q))[:per_key]
        pairs += [(q, k, float(att[q, k]) * float(vs[k])) for q in qs]
    pairs.sort(key=lambda p: -p[2])
    ranked = rank_by_weight(candidate_terms(d, w.W_Q, w.W_K, w.attn_scale, vs, n_keys, per_key))
    got = list(zip(ranked.query.tolist(), ranked.key.tolist(), strict=True))
    assert got == [(q, k) for q, k, _ in pairs]
    assert ranked.weight.tolist() == pytest.approx([p[2] for p in pairs], abs=1e-6)


def test_predictions_match_per_position_loop(model, tokens, saes):
    sae_in, sae_out = saes
    w = head_weights(model, LAYER, HEAD)
    d = input_directions(sae_in, w, 1.1)
    vs = value_scores(d, w.W_V, head_encoder(sae_out, HEAD, 8))[:, 2]
    # all pairs, so that terms with both scores negative (positive weight) are present
    terms = rank_by_weight(candidate_terms(d, w.W_Q, w.W_K, w.attn_scale, vs, 24, 24))
    assert bool(((terms.attn < 0) & (terms.value < 0)).any())
    resid = model(tokens, stop_at_layer=LAYER)
    feats = sae_in.encode(resid).detach()  # [batch, pos, d_sae_in]
    g = torch.Generator().manual_seed(5)
    t = torch.randint(1, tokens.shape[1], (tokens.shape[0],), generator=g)
    fast = predict(feats, t, terms)
    for b in range(tokens.shape[0]):
        best = 0.0
        per_pos = [sae_in.encode(resid[b, i]).tolist() for i in range(int(t[b]) + 1)]
        for q, k, a, v in zip(terms.query, terms.key, terms.attn, terms.value, strict=True):
            if a <= 0 or v <= 0:
                continue
            fq = per_pos[int(t[b])][q]
            fk = max(acts[k] for acts in per_pos)
            if fq > 0 and fk > 0:
                best = max(best, fq * fk * float(a) * fk * float(v))
        assert float(fast[b]) == pytest.approx(best, rel=1e-4, abs=1e-6)
    # the running maximum over term counts equals re-evaluating each prefix of the ranking
    q_act, k_max = prefix_stats(feats, t)
    by_n = predictions_by_terms(term_contributions(q_act, k_max, terms), [1, 4, 9, len(terms)])
    for col, n in enumerate([1, 4, 9, len(terms)]):
        sub = terms.take(torch.arange(n))
        assert torch.allclose(by_n[:, col], predict(feats, t, sub))


def test_binary_scores_match_counting(model):
    g = torch.Generator().manual_seed(0)
    true = torch.relu(torch.randn(50, generator=g))
    preds = torch.relu(torch.randn(50, 3, generator=g))
    preds[:, 2] = 0  # predicts nothing: precision 1 by convention
    got = binary_scores(true, preds)
    for c in range(3):
        tp = sum(1 for i in range(50) if true[i] > 0 and preds[i, c] > 0)
        fp = sum(1 for i in range(50) if true[i] <= 0 and preds[i, c] > 0)
        fn = sum(1 for i in range(50) if true[i] > 0 and preds[i, c] <= 0)
        p = tp / (tp + fp) if tp + fp else 1.0
        r = tp / (tp + fn) if tp + fn else 1.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        assert float(got["precision"][c]) == pytest.approx(p)
        assert float(got["recall"][c]) == pytest.approx(r)
        assert float(got["f1"][c]) == pytest.approx(f)
    assert float(got["precision"][2]) == 1.0


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).float()
    b = a + torch.randint(0, 3, (40,), generator=g).float()
    assert spearman(a, b) == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic)
    assert spearman(a, torch.ones(40)) == 0.0


def test_layer_level_sae_gives_the_same_scores_as_per_head(model):
    sae_head = random_sae(8, 10, f"blocks.{LAYER}.attn.hook_z", head=HEAD, seed=4)
    sae_layer = random_sae(16, 10, f"blocks.{LAYER}.attn.hook_z", seed=5)
    with torch.no_grad():
        sae_layer.W_enc[HEAD * 8 : (HEAD + 1) * 8] = sae_head.W_enc
    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=2)
    w = head_weights(model, LAYER, HEAD)
    d = input_directions(sae_in, w, 1.0)
    a = value_scores(d, w.W_V, head_encoder(sae_head, HEAD, 8))
    b = value_scores(d, w.W_V, head_encoder(sae_layer, HEAD, 8))
    assert torch.equal(a, b)
    # and encoding a layer-level SAE reads all heads' z, flattened in head order
    z = torch.randn(2, 3, 2, 8)
    flat = z.flatten(-2)
    assert torch.allclose(encode_head(sae_layer, z, HEAD), sae_layer.encode(flat))
    assert torch.allclose(encode_head(sae_head, z, HEAD), sae_head.encode(z[:, :, HEAD]))


def brute_force_examples(acts: torch.Tensor, n_pos: int):
    """Top sequences by max activation (after BOS), ties to the earlier sequence."""
    seq_max, arg = acts[:, 1:].max(dim=1)
    out = {}
    for f in range(acts.shape[2]):
        order = sorted(range(acts.shape[0]), key=lambda s: (-float(seq_max[s, f]), s))[:n_pos]
        out[f] = (order, [int(arg[s, f]) + 1 for s in order], [float(seq_max[s, f]) for s in order])
    return out


def test_streaming_exemplars_match_brute_force_and_ignore_batch_size(model, tokens):
    sae_out = random_sae(8, 10, f"blocks.{LAYER}.attn.hook_z", head=HEAD, seed=3)
    z = run_to_layer(model, tokens, LAYER, layer_hooks(model, LAYER))[z_hook(LAYER)]
    acts = encode_head(sae_out, z, HEAD).detach()
    cfg = ExemplarConfig(n_pos=4, n_neg=5, min_active=3, min_inactive=3, seed=7)
    results = []
    for batch in (1, 5, 24):
        col = ExemplarCollector(10, tokens.shape[1], cfg, torch.device("cpu"))
        for s in range(0, tokens.shape[0], batch):
            col.update(acts[s : s + batch])
        results.append(col)
    ref = brute_force_examples(acts, 4)
    active = (acts[:, 1:].amax(1) > 0).sum(0)
    for col in results:
        assert col.active.tolist() == active.tolist()
        for f in col.eligible().tolist():
            ex = col.examples(f)
            n_pos = min(4, int(active[f]))
            assert ex.seq[:n_pos].tolist() == ref[f][0][:n_pos]
            assert ex.t[:n_pos].tolist() == ref[f][1][:n_pos]
            negs = ex.seq[n_pos:]
            assert all(float(acts[s, 1:, f].max()) <= 0 for s in negs.tolist())
            assert len(set(negs.tolist())) == len(negs)
            assert ((ex.t >= 1) & (ex.t < tokens.shape[1])).all()
            for part in (ex.split[:n_pos], ex.split[n_pos:]):
                sizes = torch.bincount(part, minlength=3)
                assert int(sizes.max() - sizes.min()) <= 1  # equal thirds
    for f in results[0].eligible().tolist():
        a, b = results[0].examples(f), results[2].examples(f)
        assert torch.equal(a.seq, b.seq) and torch.equal(a.t, b.t) and torch.equal(a.split, b.split)


def test_streaming_exemplars_keep_the_first_position_of_tied_maxima_across_blocks():
    """Past its first block, the collector finds a sequence's position only where its maximum
    can still enter the kept positives: with many ties (small integers), blocks of 1024
    sequences and batches of 7, every positive is the brute-force one, its position the first
    of its sequence's equal maxima, and the whole state is that of one batch of everything."""
    g = torch.Generator().manual_seed(0)
    n_seq, pos, d_sae = 2600, 6, 5
    acts = torch.randint(0, 4, (n_seq, pos, d_sae), generator=g).float()
    acts *= torch.rand(n_seq, 1, d_sae, generator=g) < torch.tensor([0.9, 0.5, 0.1, 0.02, 0.005])
    acts *= 1 + torch.arange(n_seq).view(-1, 1, 1) / 1000  # later maxima displace the kept
    cfg = ExemplarConfig(n_pos=20, n_neg=20, min_active=3, min_inactive=3, n_held=30, seed=1)
    streamed = ExemplarCollector(d_sae, pos, cfg, torch.device("cpu"), n_seq=n_seq)
    for s in range(0, n_seq, 7):
        streamed.update(acts[s : s + 7])
    whole = ExemplarCollector(d_sae, pos, cfg, torch.device("cpu"), n_seq=n_seq)
    whole.update(acts)
    streamed.flush()
    whole.flush()
    for name in ("top_val", "top_seq", "top_pos", "neg_key", "neg_seq", "held_feat", "held_val"):
        assert torch.equal(getattr(streamed, name), getattr(whole, name)), name
    for f in streamed.eligible().tolist():
        best = []
        for s in range(n_seq):
            row = acts[s, 1:, f].tolist()
            best.append((-max(row), s, row.index(max(row)) + 1))
        best.sort()
        n_pos = min(cfg.n_pos, int((acts[:, 1:, f].amax(1) > 0).sum()))
        ex = streamed.examples(f)
        assert ex.seq[:n_pos].tolist() == [s for _, s, _ in best[:n_pos]]
        assert ex.t[:n_pos].tolist() == [t for _, _, t in best[:n_pos]]


def test_input_columns_are_the_features_then_each_token_set_s_indicator():
    """Against one membership test per token set and position: sets sharing tokens, an empty
    set, tokens in no set, int32 tokens."""
    from rulecheck.core.evaluate import Columns, input_columns

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (3, 9), generator=g, dtype=torch.int32)
    feats = torch.rand(3, 9, 6, generator=g)
    columns = Columns((4, 1), ((3, 7), (7,), (), (39, 0, 12), (55,)))
    got = input_columns(feats, tokens, columns)
    assert got.shape == (3, 9, 2 + 5)
    assert torch.equal(got[..., 0], feats[..., 4]) and torch.equal(got[..., 1], feats[..., 1])
    for s, ids in enumerate(columns.token_sets):
        for b in range(3):
            for p in range(9):
                assert float(got[b, p, 2 + s]) == float(int(tokens[b, p]) in ids), (s, b, p)
    none = input_columns(feats, tokens, Columns((), ((), ())))
    assert none.shape == (3, 9, 2) and not none.any()


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_encode_columns_equals_encode_then_select(arch):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    d_in, d_sae = 16, 64
    base = random_sae(d_in, d_sae, "blocks.0.hook_resid_pre", seed=31)
    if arch == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=base.cfg.metadata))
    elif arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5, metadata=base.cfg.metadata))
    else:
        sae = base
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(getattr(base, name))
        if arch == "jumprelu":
            sae.threshold.copy_(
                0.3 * torch.rand(d_sae, generator=torch.Generator().manual_seed(32))
            )
    x = torch.randn(3, 7, d_in, generator=torch.Generator().manual_seed(33))
    columns = [40, 3, 17, 3, 63]
    want = sae.encode(x)[..., columns]
    assert (want > 0).any()  # the check compares live activations, not only zeros
    torch.testing.assert_close(encode_columns(sae, x, columns), want, rtol=1e-5, atol=1e-6)


@given(
    f1=st.lists(st.floats(0, 1), min_size=1, max_size=11),
    max_terms=st.integers(1, 5000),
    margin=st.sampled_from([0.0, 0.01, 0.02, 0.1, 1.0]),
)
def test_choose_n_terms_is_the_fewest_within_the_margin_of_the_best(f1, max_terms, margin):
    counts = [4 * 2**i for i in range(len(f1))]
    # by hand: the best F1 among the allowed counts, then the first count that comes close
    allowed = [i for i in range(len(counts)) if counts[i] <= max_terms] or [0]
    best = max(f1[i] for i in allowed)
    expected = min(i for i in allowed if f1[i] >= best - margin)
    got = choose_n_terms(torch.tensor(f1, dtype=torch.float64), counts, max_terms, margin)
    assert got == expected
    assert margin > 0 or f1[got] == best


def full_pass(model, tokens):
    """Every hook of the whole model, no early stop: the reference for cut-short passes."""
    with torch.no_grad():
        return model.run_with_cache(tokens)[1]


def test_run_to_layer_stops_after_its_last_hook_with_the_same_activations(model, tokens):
    ran_mlp = []
    handle = model.blocks[LAYER].mlp.register_forward_hook(lambda *_: ran_mlp.append(1))
    try:
        store = run_to_layer(model, tokens, LAYER, layer_hooks(model, LAYER))
    finally:
        handle.remove()
    assert not ran_mlp  # hook_z is the last one asked for: the layer's MLP is not run
    cache = full_pass(model, tokens)
    assert set(store) == set(layer_hooks(model, LAYER))
    for name, act in store.items():
        torch.testing.assert_close(act, cache[name])
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())  # its hooks are removed


@pytest.mark.parametrize("per_head", [True, False])
def test_probe_at_cuts_and_sorts_prompts_yet_reads_the_full_pass(model, tokens, per_head):
    from rulecheck.core.heads import Probe

    d_in = 8 if per_head else 16
    sae = random_sae(d_in, 10, z_hook(LAYER), head=HEAD if per_head else None, seed=5)
    g = torch.Generator().manual_seed(6)
    t = torch.randint(1, tokens.shape[1], (len(tokens),), generator=g)
    acts = encode_head(sae, full_pass(model, tokens)[z_hook(LAYER)], HEAD).detach()
    for feature in range(10):
        want = [float(acts[i, int(t[i]), feature]) for i in range(len(tokens))]
        if any(w > 0 for w in want):
            break
    got = Probe(model, sae, LAYER, HEAD, feature, batch_size=5).at(tokens, t)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    everywhere = Probe(model, sae, LAYER, HEAD, feature, batch_size=7).activations(tokens)
    torch.testing.assert_close(everywhere, acts[..., feature], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization_type", ["LN", None])
def test_z_at_is_the_full_pass_hook_z_at_t_for_every_head(tokens, normalization_type):
    from rulecheck.core.heads import query_rows_supported, z_at

    model = random_model(seed=4, normalization_type=normalization_type)
    cache = full_pass(model, tokens)
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, tokens.shape[1], (len(tokens),), generator=g)
    for layer in range(model.cfg.n_layers):
        assert query_rows_supported(model, layer)
        z = cache[z_hook(layer)]  # [batch, pos, n_heads, d_head]
        got = z_at(model, tokens, t, layer, [1, 0])
        for i in range(len(tokens)):
            for j, h in enumerate([1, 0]):
                torch.testing.assert_close(got[i, j], z[i, int(t[i]), h], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization_type", ["LN", "RMS", None])
def test_run_to_heads_is_the_full_pass_for_the_heads_it_reads(tokens, normalization_type):
    from rulecheck.core.heads import layer_hooks, run_to_heads

    model = random_model(seed=4, normalization_type=normalization_type)
    cache = full_pass(model, tokens)
    for layer in range(model.cfg.n_layers):
        names = layer_hooks(model, layer)
        for heads in ([0], [1], [1, 0]):
            got = run_to_heads(model, tokens, layer, heads)
            assert set(got) == set(names)
            for name in names:
                want = cache[name]
                if name == z_hook(layer):  # the heads read are the pass's; the others zero
                    others = [h for h in range(model.cfg.n_heads) if h not in heads]
                    assert not got[name][:, :, others].any()
                    got[name], want = got[name][:, :, heads], want[:, :, heads]
                torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6)
    # what the layer pass cannot read (ALiBi here) runs TransformerLens's attention, every head
    # (each family it reads: tests/test_families.py)
    alibi = random_model(seed=3, positional_embedding_type="alibi")
    z = run_to_heads(alibi, tokens, LAYER, [HEAD])[z_hook(LAYER)]
    torch.testing.assert_close(z, full_pass(alibi, tokens)[z_hook(LAYER)])


def test_heads_read_are_their_own_or_all_for_a_layer_level_sae():
    from rulecheck.core.heads import heads_read

    per_head = {h: random_sae(8, 6, z_hook(LAYER), head=h) for h in (3, 1)}
    assert heads_read(per_head, 4) == [1, 3]
    layer_level = {1: random_sae(16, 6, z_hook(LAYER))}
    assert heads_read({**per_head, **layer_level}, 4) == [0, 1, 2, 3]


def test_probe_at_takes_the_full_pass_where_query_rows_do_not_apply(tokens):
    from rulecheck.core.heads import Probe, query_rows_supported

    alibi = random_model(seed=3, positional_embedding_type="alibi")
    assert not query_rows_supported(alibi, LAYER)
    sae = random_sae(8, 10, z_hook(LAYER), head=HEAD, seed=5)
    t = torch.randint(
        1, tokens.shape[1], (len(tokens),), generator=torch.Generator().manual_seed(2)
    )
    acts = encode_head(sae, full_pass(alibi, tokens)[z_hook(LAYER)], HEAD).detach()
    want = acts[torch.arange(len(tokens)), t]  # [batch, d_sae]
    for f in range(10):
        got = Probe(alibi, sae, LAYER, HEAD, f, batch_size=5).at(tokens, t)
        torch.testing.assert_close(got, want[:, f], rtol=1e-5, atol=1e-6)
    # a hook on the layer (an ablation, say) must be seen: the full pass runs it
    model = random_model(seed=4)
    hook = model.blocks[LAYER].attn.hook_v
    hook.add_hook(lambda v, hook: v * 0)
    try:
        assert not query_rows_supported(model, LAYER)
        assert Probe(model, sae, LAYER, HEAD, 0).at(tokens, t).abs().max() == pytest.approx(
            float(encode_head(sae, torch.zeros(1, 1, 2, 8), HEAD).detach()[0, 0, 0])
        )
    finally:
        model.reset_hooks()
    assert query_rows_supported(model, LAYER)


def shared_prefixes(n_seq: int, sizes: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefixes of several features drawn from few sequences (so that they share some)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, n_seq, (sum(sizes),), generator=g)
    t = torch.randint(1, 16, (sum(sizes),), generator=g)
    return seq, t


def test_prefix_features_run_each_sequence_once_and_match_per_prefix_loops(model, tokens):
    from rulecheck.core.gradient import term_importance
    from rulecheck.core.prefixes import prefix_features, sequence_chunks
    from rulecheck.core.scores import Terms

    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=2)
    sizes = [12, 10, 8]
    seq, t = shared_prefixes(9, sizes, seed=8)
    train = torch.arange(len(seq)) % 3 == 0
    g = torch.Generator().manual_seed(11)
    terms = [
        Terms(
            query=torch.randint(0, 24, (20,), generator=g),
            key=torch.randint(0, 24, (20,), generator=g),
            attn=torch.rand(20, generator=g),
            value=torch.rand(20, generator=g),
        )
        for _ in sizes
    ]
    rows_run = []
    handle = model.embed.register_forward_hook(lambda m, i, out: rows_run.append(out.shape[0]))
    try:
        chunks = sequence_chunks(model, sae_in, tokens, LAYER, seq, t, batch_size=4)
        got = prefix_features(chunks, sizes, terms, train, batch_size=3)
    finally:
        handle.remove()
    assert sum(rows_run) == len(seq.unique())  # one run per distinct sequence
    feats = sae_in.encode(full_pass(model, tokens)[f"blocks.{LAYER}.hook_resid_pre"]).detach()
    start = 0
    for size, pf, feature_terms in zip(sizes, got, terms, strict=True):
        mine = range(start, start + size)
        for j, i in enumerate(mine):
            s, end = int(seq[i]), int(t[i])
            torch.testing.assert_close(pf.q_act[j], feats[s, end], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                pf.k_max[j], feats[s, : end + 1].amax(0), rtol=1e-5, atol=1e-6
            )
        picked = [i for i in mine if train[i]]
        want = term_importance(feats[seq[picked]], t[picked], feature_terms)
        torch.testing.assert_close(pf.importance, want, rtol=1e-4, atol=1e-7)
        start += size


def test_kept_inputs_read_the_prefixes_a_sequence_pass_computes(model, tokens, monkeypatch):
    """The corpus pass's kept input-SAE activations give every prefix what running its
    sequence again gives; past its memory bound it gives up and says so."""
    import rulecheck.core.prefixes as prefixes
    from rulecheck.core.prefixes import KeptInputs, prefix_features, sequence_chunks

    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=2)
    sae_out = random_sae(8, 10, z_hook(LAYER), head=HEAD, seed=3)
    cfg = ExtractConfig(batch_size=5, exemplars=ExemplarConfig(n_pos=3, n_neg=3))
    kept = KeptInputs(sae_in, LAYER, tokens)
    collect_layer(model, {HEAD: sae_out}, tokens, LAYER, cfg, observe=kept.observe)
    assert kept.complete and kept.nbytes > 0
    sizes = [12, 10]
    seq, t = shared_prefixes(len(tokens), sizes, seed=14)
    read = prefix_features(kept.chunks(seq, t, 4), sizes)
    run = prefix_features(sequence_chunks(model, sae_in, tokens, LAYER, seq, t, 4), sizes)
    for a, b in zip(read, run, strict=True):
        torch.testing.assert_close(a.q_act, b.q_act, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.k_max, b.k_max, rtol=1e-5, atol=1e-6)
    assert any(bool((pf.k_max > 0).any()) for pf in read)
    monkeypatch.setattr(prefixes, "KEPT_BYTES", kept.nbytes // 2)
    over = KeptInputs(sae_in, LAYER, tokens)
    collect_layer(model, {HEAD: sae_out}, tokens, LAYER, cfg, observe=over.observe)
    assert not over.complete


def test_predict_prefixes_reads_each_features_terms_through_the_union_of_columns(model, tokens):
    from rulecheck.core.evaluate import Columns, input_columns, predict_prefixes, union_columns
    from rulecheck.core.prefixes import sequence_chunks
    from rulecheck.core.scores import Terms

    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=2)
    feats = sae_in.encode(full_pass(model, tokens)[f"blocks.{LAYER}.hook_resid_pre"]).detach()
    own = [
        Columns((3, 7, 1), ((5, 6),)),
        Columns((7, 2), ()),
        Columns((1,), ((5, 6), tuple(range(10, 30)))),
    ]
    g = torch.Generator().manual_seed(12)
    terms = []
    for c in own:
        n_cols = len(c.features) + len(c.token_sets)
        terms.append(
            Terms(
                query=torch.randint(0, n_cols, (6,), generator=g),
                key=torch.randint(0, n_cols, (6,), generator=g),
                attn=torch.rand(6, generator=g),
                value=torch.rand(6, generator=g),
            )
        )
    sizes = [9, 7, 8]
    seq, t = shared_prefixes(6, sizes, seed=13)
    union, index = union_columns(own)
    read = [Terms(i[x.query], i[x.key], x.attn, x.value) for i, x in zip(index, terms, strict=True)]
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    chunks = sequence_chunks(model, sae_in, tokens, LAYER, seq, t, 4, union.features)
    got = predict_prefixes(chunks, owner, union, read)
    assert all((got[owner == i] > 0).any() for i in range(3))  # every feature's terms match
    for i in range(len(seq)):
        c, x = own[int(owner[i])], terms[int(owner[i])]
        cols = input_columns(feats[seq[i] : seq[i] + 1], tokens[seq[i] : seq[i] + 1], c)[0]
        best = 0.0
        for q, k, a, v in zip(x.query, x.key, x.attn, x.value, strict=True):
            fq, fk = float(cols[int(t[i]), q]), float(cols[: int(t[i]) + 1, k].max())
            if fq > 0 and fk > 0:
                best = max(best, fq * fk * float(a) * fk * float(v))
        assert float(got[i]) == pytest.approx(best, rel=1e-5, abs=1e-7)


def test_predict_prefixes_is_each_feature_s_own_prediction_bit_for_bit(model, tokens):
    """All features' rows predicted at once equal, exactly, each feature's rows predicted
    with its own terms (``predict_from``): features with no term, with a bound, with terms
    whose scores are not positive, rows of several owners in each chunk."""
    from rulecheck.core.evaluate import Columns, input_columns, predict_prefixes
    from rulecheck.core.prefixes import sequence_chunks
    from rulecheck.core.rules import predict_from, window_key_act
    from rulecheck.core.scores import Terms

    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=4)
    columns = Columns(tuple(range(0, 24, 2)), ((5, 6), (7,)))
    n_cols = len(columns.features) + len(columns.token_sets)
    g = torch.Generator().manual_seed(3)

    def terms(n: int, bound: bool = False) -> Terms:
        rand = torch.rand(n, generator=g) - 0.2  # some scores not positive
        cols = [torch.randint(0, n_cols, (n,), generator=g) for _ in range(2)]
        far = torch.randint(-1, 4, (n,), generator=g) if bound else None
        value = torch.rand(n, generator=g) - 0.2  # both negative: a product > 0, not a match
        return Terms(cols[0], cols[1], rand, value, max_distance=far)

    own = [terms(5), terms(0), terms(7, bound=True), terms(1), terms(9)]
    sizes = [8, 5, 7, 6, 9]
    seq, t = shared_prefixes(6, sizes, seed=5)
    owner = torch.repeat_interleave(torch.arange(len(own)), torch.tensor(sizes))
    read = Columns(tuple(range(len(columns.features))), columns.token_sets)
    chunks = sequence_chunks(model, sae_in, tokens, LAYER, seq, t, 3, columns.features)
    got = predict_prefixes(chunks, owner, columns, own)
    want = torch.zeros(len(owner))
    for chunk in sequence_chunks(model, sae_in, tokens, LAYER, seq, t, 3, columns.features):
        cols = input_columns(chunk.feats, chunk.tokens, read)
        q, k = chunk.stats(cols)
        for i, x in enumerate(own):
            mine = owner[chunk.rows] == i
            k_act = window_key_act(cols, chunk.t[mine], chunk.where[mine], x) if x.bounded else None
            want[chunk.rows[mine]] = predict_from(q[mine], k[mine], x, k_act)
    assert (want > 0).any() and (want[owner == 1] == 0).all()
    assert torch.equal(got, want)


def test_bounded_terms_read_their_keys_only_at_their_distances(model, tokens):
    """Terms with ``min_distance``/``max_distance`` (some unbounded, -1), through ``predict``
    and through ``predict_prefixes``'s chunks, against a loop over key positions."""
    from rulecheck.core.evaluate import Columns, predict_prefixes
    from rulecheck.core.prefixes import sequence_chunks
    from rulecheck.core.scores import Terms

    sae_in = random_sae(16, 24, f"blocks.{LAYER}.hook_resid_pre", seed=4)
    feats = sae_in.encode(full_pass(model, tokens)[f"blocks.{LAYER}.hook_resid_pre"]).detach()
    g = torch.Generator().manual_seed(21)
    n = 12
    terms = Terms(
        query=torch.randint(0, 24, (n,), generator=g),
        key=torch.randint(0, 24, (n,), generator=g),
        attn=torch.rand(n, generator=g),
        value=torch.rand(n, generator=g),
        max_distance=torch.tensor([-1, 0, 1, 2, 3, 5, 8, -1, 2, 4, 1, 6]),
        min_distance=torch.tensor([-1, 0, 1, -1, 2, 5, 3, 4, -1, 1, 0, -1]),
    )
    assert terms.bounded and not Terms(terms.query, terms.key, terms.attn, terms.value).bounded

    def reference(b: int, end: int) -> float:
        best = 0.0
        for j in range(n):
            lo, hi = int(terms.min_distance[j]), int(terms.max_distance[j])
            lo, hi = max(lo, 0), hi if hi >= 0 else end
            keys = [float(feats[b, i, terms.key[j]]) for i in range(end + 1) if lo <= end - i <= hi]
            fq, fk = float(feats[b, end, terms.query[j]]), max([0.0, *keys])
            if fq > 0 and fk > 0:
                best = max(best, fq * fk * float(terms.attn[j]) * fk * float(terms.value[j]))
        return best

    t = torch.randint(0, tokens.shape[1], (tokens.shape[0],), generator=g)
    got = predict(feats, t, terms)
    for b in range(tokens.shape[0]):
        assert float(got[b]) == pytest.approx(reference(b, int(t[b])), rel=1e-5, abs=1e-7)
    assert (got > 0).any()
    seq, ends = shared_prefixes(tokens.shape[0], [10], seed=22)
    columns = Columns(tuple(range(24)), ())
    chunks = sequence_chunks(model, sae_in, tokens, LAYER, seq, ends, 3, columns.features)
    through = predict_prefixes(chunks, torch.zeros(len(seq), dtype=torch.long), columns, [terms])
    for i in range(len(seq)):
        want = reference(int(seq[i]), int(ends[i]))
        assert float(through[i]) == pytest.approx(want, rel=1e-5, abs=1e-7)
