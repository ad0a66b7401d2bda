"""Model families read as they compute: rotary positions (GPT-NeoX's and GPT-J's pairings,
partial rotary), grouped-query attention, RMSNorm, q/k norm, soft-capped scores, local
attention and parallel blocks. Each family's scores and z are compared with TransformerLens's
own forward pass on a random model of that family, at every distance."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import random_model

from rulecheck.core.gradient import surrogate_activation, term_importance
from rulecheck.core.heads import (
    head_weights,
    qk_form,
    query_rows_supported,
    run_to_heads,
    z_at,
    z_hook,
)
from rulecheck.core.scores import (
    Terms,
    attn_scores,
    candidate_terms,
    distance_grid,
    pair_scores_by_distance,
)

ROTARY = {"positional_embedding_type": "rotary", "rotary_dim": 8}
FAMILIES = {
    "rotary": dict(ROTARY),
    "gptj-partial": {**ROTARY, "rotary_dim": 4, "rotary_adjacent_pairs": True},
    "llama": {
        **ROTARY,
        "normalization_type": "RMS",
        "n_key_value_heads": 1,
        "gated_mlp": True,
        "act_fn": "silu",
    },
    "gemma2": {
        **ROTARY,
        "normalization_type": "RMS",
        "n_key_value_heads": 1,
        "attn_scores_soft_cap": 1.5,
        "attn_types": ["global", "local"],
        "window_size": 3,
    },
    "qwen3": {**ROTARY, "normalization_type": "RMS", "n_key_value_heads": 1, "use_qk_norm": True},
    "neox-parallel": {**ROTARY, "rotary_dim": 4, "parallel_attn_mlp": True},
}
N_CTX = 16


def family_model(name: str, biases: bool = True):
    config = dict(FAMILIES[name])
    norm = config.pop("normalization_type", "LN")
    model = random_model(seed=11, normalization_type=norm, **config)
    if not biases:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(("b_Q", "b_K")):
                    p.zero_()
    return model


def random_tokens(seed: int = 3, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 40, (batch, N_CTX), generator=g)
    tokens[:, 0] = 0
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])
def test_pair_scores_are_the_model_s_at_every_distance(family, layer):
    """``QKForm.scores`` of a query and a key (the layer's normalised inputs through the
    head's ``W_Q``/``W_K``) at distance ``t - i`` is ``hook_attn_scores[t, i]``, for every
    ``t`` and ``i`` (masked pairs -inf in both)."""
    model = family_model(family, biases=False)
    tokens = random_tokens()
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        x = model.blocks[layer].ln1(cache[f"blocks.{layer}.hook_resid_pre"])  # [b, pos, d]
    form = qk_form(model, layer)
    assert form.positional
    want = cache[f"blocks.{layer}.attn.hook_attn_scores"]  # [b, n_heads, q, k]
    for head in range(model.cfg.n_heads):
        w = head_weights(model, layer, head)
        for b in range(tokens.shape[0]):
            q = form.project(x[b], w.W_Q, form.q_norm)
            k = form.project(x[b], w.W_K, form.k_norm)
            for t in range(N_CTX):
                for i in range(t + 1):
                    got = form.scores(q[t : t + 1], k[i : i + 1], t - i)[0, 0]
                    expected = want[b, head, t, i]
                    if math.isinf(expected):
                        assert math.isinf(got) and got < 0, (family, head, t, i)
                    else:
                        assert float(got) == pytest.approx(float(expected), abs=1e-4), (t, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_grouped_query_head_reads_its_group_s_keys(family):
    model = family_model(family)
    n_kv = model.cfg.n_key_value_heads
    for head in range(model.cfg.n_heads):
        w = head_weights(model, 1, head)
        attn = model.blocks[1].attn
        W_K = attn._W_K[head // (model.cfg.n_heads // n_kv)] if n_kv else attn.W_K[head]
        assert torch.equal(w.W_K, W_K)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])
def test_query_rows_and_head_passes_are_the_model_s_z(family, layer):
    """``z_at`` at several positions and ``run_to_heads`` for one head reproduce
    ``hook_z`` of TransformerLens's full pass (biases, q/k norm, rotary, cap, window)."""
    model = family_model(family)
    assert query_rows_supported(model, layer)
    tokens = random_tokens(batch=4)
    _, cache = model.run_with_cache(tokens)
    z = cache[z_hook(layer)]  # [b, pos, n_heads, d_head]
    t = torch.tensor([0, 3, 9, N_CTX - 1])
    got = z_at(model, tokens, t, layer, [1, 0])
    rows = torch.arange(4)
    torch.testing.assert_close(got[:, 0], z[rows, t, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[:, 1], z[rows, t, 0], atol=1e-5, rtol=1e-4)
    store = run_to_heads(model, tokens, layer, [1])
    torch.testing.assert_close(store[z_hook(layer)][:, :, 1], z[:, :, 1], atol=1e-5, rtol=1e-4)
    assert not store[z_hook(layer)][:, :, 0].any()


def test_what_the_query_rows_cannot_read_takes_the_full_pass():
    model = random_model(seed=2, positional_embedding_type="alibi")
    assert not query_rows_supported(model, 0)
    assert query_rows_supported(random_model(seed=2), 0)


@pytest.mark.parametrize("family", ["rotary", "gemma2", "qwen3"])
def test_a_summary_is_the_largest_score_over_the_distances(family):
    """``attn_scores`` of a positional head: the largest over ``distance_grid`` (within a
    local window) of the scores at each distance; ``pair_scores_by_distance`` gives each
    pair's score at every distance."""
    model = family_model(family, biases=False)
    layer = 1
    w = head_weights(model, layer, 0)
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, model.cfg.d_model, generator=g)
    form = w.form
    q, k = form.project(d, w.W_Q, form.q_norm), form.project(d, w.W_K, form.k_norm)
    grid = [x for x in distance_grid(N_CTX - 1) if form.window is None or x < form.window]
    by_distance = torch.stack([form.scores(q, k, x) for x in grid])
    torch.testing.assert_close(
        attn_scores(d, d, w.W_Q, w.W_K, form, N_CTX - 1), by_distance.amax(0)
    )
    table = pair_scores_by_distance(q, k.flip(0), form, N_CTX)
    for x in range(N_CTX):
        want = torch.diagonal(form.scores(q, k.flip(0), x))
        torch.testing.assert_close(table[:, x], want, atol=1e-5, rtol=1e-5)
    # the scores at distances change under rotary positions: a summary is needed
    assert not torch.allclose(by_distance[0], by_distance[1])


def test_distance_grid_is_dense_then_geometric():
    assert distance_grid(5) == [0, 1, 2, 3, 4, 5]
    grid = distance_grid(1023)
    assert grid[:33] == list(range(33)) and grid[-1] <= 1023 and len(grid) < 60
    assert all(b > a for a, b in itertools.pairwise(grid))


def test_an_absolute_position_head_scores_as_the_paper():
    """GPT-2's form: no positions, nothing but the scaled dot product, to the bit."""
    model = random_model(seed=4)
    w = head_weights(model, 0, 1)
    assert w.form.plain and not w.form.positional
    g = torch.Generator().manual_seed(1)
    d = torch.randn(9, model.cfg.d_model, generator=g)
    want = (d @ w.W_Q) @ (d @ w.W_K).T / w.attn_scale
    assert torch.equal(attn_scores(d, d, w.W_Q, w.W_K, w.form, 15), want)
    vs = torch.randn(9, generator=g)
    terms = candidate_terms(d, w.W_Q, w.W_K, w.form, vs, 3, 4, n_distances=16)
    assert terms.attn_at is None


def slow_surrogate(feats, t, terms, mask):
    """The surrogate with each term's score at the distance where its query and key meet,
    written out position by position."""
    out = []
    keys = sorted(set(terms.key.tolist()))
    value = {int(k): float(v) for k, v in zip(terms.key, terms.value, strict=True)}
    for b in range(feats.shape[0]):
        tb = int(t[b])
        s = []
        for i in range(tb + 1):
            total = 0.0
            for j in range(len(terms)):
                a = float(terms.attn_at[j, tb - i])
                if math.isinf(a):
                    continue
                fq = float(feats[b, tb, terms.query[j]])
                fk = float(feats[b, i, terms.key[j]])
                total += float(mask[j]) * fq * fk * a
            seen = any(not math.isinf(float(terms.attn_at[j, tb - i])) for j in range(len(terms)))
            s.append(total if seen else -math.inf)
        a = torch.softmax(torch.tensor(s, dtype=torch.float64), 0)
        v = [sum(float(feats[b, i, k]) * value[k] for k in keys) for i in range(tb + 1)]
        out.append(float((a * torch.tensor(v, dtype=torch.float64)).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("window", [None, 3])
def test_the_surrogate_reads_each_score_at_its_distance(window):
    g = torch.Generator().manual_seed(5)
    n_terms, d_in, pos = 7, 6, 9
    attn_at = torch.randn(n_terms, pos, generator=g, dtype=torch.float64)
    if window is not None:
        attn_at[:, window:] = -math.inf
    terms = Terms(
        query=torch.randint(0, d_in, (n_terms,), generator=g),
        key=torch.tensor([0, 0, 1, 2, 2, 2, 4]),
        attn=attn_at[:, 0].clone(),
        value=torch.tensor([0.5, 0.5, -1.0, 2.0, 2.0, 2.0, 0.3], dtype=torch.float64),
        attn_at=attn_at,
    )
    feats = torch.rand(4, pos, d_in, generator=g, dtype=torch.float64)
    t = torch.tensor([8, 0, 5, 2])
    mask = torch.rand(n_terms, generator=g, dtype=torch.float64)
    got = surrogate_activation(feats, t, terms, mask)
    torch.testing.assert_close(got, slow_surrogate(feats, t, terms, mask))


@pytest.mark.parametrize("order", ["key by key", "best key first", "shuffled"])
@pytest.mark.parametrize("window", [None, 3])
def test_importance_at_distances_is_the_slow_surrogate_s_derivative(order, window):
    """The written-out derivative of positional terms (one batched product per key when the
    terms come key by key, a gather otherwise) against central differences of the slow
    surrogate, chunked and not."""
    g = torch.Generator().manual_seed(6)
    per, d_in, pos = 4, 8, 9
    key = torch.tensor([1, 4, 6]).repeat_interleave(per)
    if order == "best key first":  # as candidate_terms orders them: by value, not by id
        key = torch.tensor([6, 1, 4]).repeat_interleave(per)
    if order == "shuffled":
        key = key[torch.randperm(len(key), generator=g)]
    n_terms = len(key)
    attn_at = torch.randn(n_terms, pos, generator=g, dtype=torch.float64)
    if window is not None:
        attn_at[:, window:] = -math.inf
    value = {1: 0.7, 4: -1.2, 6: 1.5}
    terms = Terms(
        query=torch.randint(0, d_in, (n_terms,), generator=g),
        key=key,
        attn=attn_at[:, 0].clone(),
        value=torch.tensor([value[int(k)] for k in key], dtype=torch.float64),
        attn_at=attn_at,
    )
    feats = torch.rand(5, pos, d_in, generator=g, dtype=torch.float64)
    t = torch.tensor([8, 0, 5, 2, 7])
    eps, want = 1e-6, torch.zeros(n_terms, dtype=torch.float64)
    for j in range(n_terms):
        up, down = (
            torch.ones(n_terms, dtype=torch.float64),
            torch.ones(n_terms, dtype=torch.float64),
        )
        up[j], down[j] = 1 + eps, 1 - eps
        diff = slow_surrogate(feats, t, terms, up) - slow_surrogate(feats, t, terms, down)
        want[j] = diff.mean() / (2 * eps)
    for batch_size in (64, 2):
        got = term_importance(feats, t, terms, batch_size=batch_size)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_input_saes_on_a_hook_holding_the_same_tensor_are_accepted():
    """Gemma Scope's residual SAEs read ``blocks.{l-1}.hook_resid_post``, the tensor of
    ``blocks.{l}.hook_resid_pre``; at layer 0 of a rotary model ``hook_embed`` is it too. Other
    hooks are refused, the message naming those it accepts."""
    from conftest import random_sae

    from rulecheck.errors import InvalidSpec
    from rulecheck.loading import check_sae

    rotary, learned = family_model("llama"), random_model(seed=1)
    _, cache = rotary.run_with_cache(random_tokens())
    assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    for model, layer, hook in [
        (rotary, 1, "blocks.0.hook_resid_post"),
        (rotary, 0, "hook_embed"),
        (learned, 1, "blocks.0.hook_resid_post"),
    ]:
        sae = random_sae(model.cfg.d_model, 8, hook)
        check_sae(sae, model, layer=layer, head=None, kind="in", spec="in.safetensors")
    for model, layer, hook in [(learned, 0, "hook_embed"), (rotary, 1, "blocks.1.hook_resid_post")]:
        with pytest.raises(InvalidSpec) as err:
            check_sae(random_sae(16, 8, hook), model, layer=layer, head=None, kind="in", spec="in")
        assert f"found {hook!r}" in str(err.value)
        assert f"expected 'blocks.{layer}.hook_resid_pre'" in str(err.value)


def test_an_attn_out_sae_is_read_per_head_through_W_O():
    """Llama Scope's and Pythia's attention SAEs sit on ``hook_attn_out``: each head reads one
    as a per-head ``hook_z`` SAE whose features are the original's on the head's own write
    plus the output bias, exactly."""
    from conftest import random_sae

    from rulecheck.core.heads import is_per_head
    from rulecheck.errors import InvalidSpec
    from rulecheck.loading import check_sae, head_view

    model = family_model("llama")
    sae = random_sae(model.cfg.d_model, 12, "blocks.1.hook_attn_out", seed=3)
    check_sae(sae, model, layer=1, head=0, kind="out", spec="attn_out")
    _, cache = model.run_with_cache(random_tokens())
    z = cache[z_hook(1)]
    attn = model.blocks[1].attn
    for head in range(model.cfg.n_heads):
        view = head_view(sae, model, 1, head, "attn_out")
        assert is_per_head(view) and view.cfg.d_in == model.cfg.d_head
        assert view.cfg.metadata.hook_name == z_hook(1)
        with torch.no_grad():
            want = sae.encode(z[:, :, head] @ attn.W_O[head] + attn.b_O)
            torch.testing.assert_close(view.encode(z[:, :, head]), want, atol=1e-5, rtol=1e-4)
    assert sae.cfg.d_in == model.cfg.d_model  # the loaded SAE is left as it was
    with pytest.raises(InvalidSpec, match="d_model, the attention output"):
        check_sae(
            random_sae(8, 4, "blocks.1.hook_attn_out"),
            model,
            layer=1,
            head=0,
            kind="out",
            spec="attn_out",
        )
    normalised = random_sae(model.cfg.d_model, 4, "blocks.1.hook_attn_out")
    normalised.cfg.normalize_activations = "layer_norm"
    with pytest.raises(InvalidSpec, match="linear encoder without input normalisation"):
        head_view(normalised, model, 1, 0, "attn_out")


def test_extraction_reads_an_attn_out_sae_per_head(tmp_path):
    """A rotary model with an input SAE on the previous block's ``hook_resid_post`` and an
    output SAE on ``hook_attn_out``: the workbench loads both, hands every head its view and
    extracts its books."""
    from conftest import random_sae

    from rulecheck.api import extract_books
    from rulecheck.config import ExemplarConfig, ExtractConfig
    from rulecheck.loading import save_model
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    model = family_model("llama")
    save_model(model, tmp_path / "model")
    random_sae(16, 24, "blocks.0.hook_resid_post", seed=1).save_model(str(tmp_path / "in"))
    random_sae(16, 20, "blocks.1.hook_attn_out", seed=2).save_model(str(tmp_path / "out"))
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 40, (400, N_CTX), generator=g)
    tokens[:, 0] = 0
    import numpy as np

    np.save(tmp_path / "corpus.npy", tokens.numpy().astype(np.int32))
    specs = Specs(
        model=str(tmp_path / "model"),
        sae_in=str(tmp_path / "in"),
        sae_out=str(tmp_path / "out"),
        corpus=str(tmp_path / "corpus.npy"),
    )
    bench = Workbench(cache_dir=None)
    cfg = ExtractConfig(exemplars=ExemplarConfig(min_active=5, n_pos=20, n_neg=20), rules=False)
    books = extract_books(bench, specs.resolve(), 1, [0, 1], cfg)
    assert [b.head for b in books] == [0, 1]
    assert sum(len(b.features) for b in books) > 0
    for book in books:
        view = bench.sae_out(bench.head_of(book, f"L1H{book.head}.yaml"))
        assert view.cfg.metadata.hook_head_index == book.head
