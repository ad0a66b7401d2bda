"""rulecheck-tiny as shipped: layout, loading, SAE quality bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rulecheck import zoo
from rulecheck.build.quality import clean_loss, sae_quality
from rulecheck.build.train_tiny import QUALITY_SEQUENCES
from rulecheck.loading import check_sae, load_model, load_sae
from rulecheck.specs import locate

ROOT = zoo.entry_dir("rulecheck-tiny")
SLICE = QUALITY_SEQUENCES  # the held-out sequences the model card measures on


@pytest.fixture(scope="module")
def model():
    return load_model(locate("rulecheck-tiny"))


@pytest.fixture(scope="module")
def tokens():
    return torch.from_numpy(np.load(zoo.resolve("rulecheck-tiny:eval"))[:SLICE]).long()


def test_shipped_layout_fits_in_40_mb():
    files = [p for p in ROOT.rglob("*") if p.is_file()]
    names = {str(p.relative_to(ROOT)) for p in files}
    for required in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "eval_tokens.npy",
        "MODEL_CARD.md",
        "sae_in/L0/cfg.json",
        "sae_out/L1H3/sae_weights.safetensors",
    ):
        assert required in names
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20


def test_model_tokenizer_and_held_out_tokens(model):
    assert (model.cfg.n_layers, model.cfg.n_ctx) == (2, 64)
    assert model.cfg.normalization_type == "LN" and not model.cfg.attn_only
    assert 4096 <= model.cfg.d_vocab <= 8192
    toks = model.to_tokens("If the value is None, then return")
    assert int(toks[0, 0]) == model.tokenizer.bos_token_id
    assert model.to_string(toks[0, 1:]) == "If the value is None, then return"
    held = np.load(zoo.resolve("rulecheck-tiny:eval"))
    assert held.shape[0] >= 20_000 and held.shape[1] == 64
    assert np.issubdtype(held.dtype, np.integer)
    assert (held[:, 0] == model.tokenizer.bos_token_id).all()


def test_every_sae_loads_and_matches_its_hook(model):
    for layer in range(model.cfg.n_layers):
        check_sae(
            load_sae(locate("rulecheck-tiny:sae_in/L{layer}"), layer=layer),
            model,
            layer=layer,
            head=None,
            kind="in",
            spec="sae_in",
        )
        for head in range(model.cfg.n_heads):
            spec = locate("rulecheck-tiny:sae_out/L{layer}H{head}")
            sae = load_sae(spec, layer=layer, head=head)
            check_sae(sae, model, layer=layer, head=head, kind="out", spec="sae_out")
            assert sae.cfg.metadata.hook_head_index == head


def test_input_sae_quality_bars(model, tokens):
    """Measured on the card's sequences: the bars, and the card's figures."""
    for layer in range(model.cfg.n_layers):
        q = sae_quality(model, load_sae(locate(f"rulecheck-tiny:sae_in/L{layer}")), tokens, layer)
        assert q["explained_variance"] >= 0.85, q
        assert q["dead_fraction"] < 0.10, q
        for stat, tol in CARD_TOLERANCE.items():
            want = card_quality()[f"sae_in/L{layer}"][stat]
            assert q[stat] == pytest.approx(want, abs=tol), (layer, stat)


def card_quality() -> dict[str, dict[str, float]]:
    """The model card's quality table (measured on the first ``SLICE`` held-out sequences):
    per SAE, L0, dead fraction, explained variance and (output SAEs) CE recovered."""
    rows = {}
    for line in (ROOT / "MODEL_CARD.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith(("sae_in/", "sae_out/")):
            l0, dead, ev, ce = cells[4:]
            rows[cells[0]] = {
                "l0": float(l0),
                "dead_fraction": float(dead.rstrip("%")) / 100,
                "explained_variance": float(ev),
            } | ({"ce_recovered": float(ce.rstrip("%")) / 100} if ce else {})
    return rows


# what the card's rounding leaves, and what other machines' sums may add
CARD_TOLERANCE = {"l0": 0.06, "dead_fraction": 0.0006, "explained_variance": 0.0015}
OUTPUT_SAES = [(layer, h) for layer in (0, 1) for h in range(4)]


def test_the_card_s_quality_table_meets_the_bars():
    """The bars of the attention-output SAE paper, for every output SAE (L1 and TopK alike),
    as the card records them; that the card's figures are the shipped SAEs' is checked live
    below."""
    card = card_quality()
    assert set(card) == {f"sae_out/L{layer}H{h}" for layer, h in OUTPUT_SAES} | {
        "sae_in/L0",
        "sae_in/L1",
    }
    for name, q in card.items():
        assert q["dead_fraction"] < 0.10, name
        if name.startswith("sae_out/"):
            assert q["l0"] <= 20 and q["ce_recovered"] >= 0.80, name
        else:
            assert q["explained_variance"] >= 0.85, name


@pytest.mark.parametrize(("layer", "head"), OUTPUT_SAES)
def test_each_output_sae_is_the_one_the_card_measured(model, tokens, layer, head):
    """L0, dead fraction and explained variance measured here on the card's sequences are the
    card's (a retrained or altered SAE shipped without its card fails here), and meet the
    bars. The CE recovered figures are the card's: measuring them takes two passes through the
    unembedding per SAE, and the measure itself is checked against whole-model runs below."""
    name = f"sae_out/L{layer}H{head}"
    q = sae_quality(
        model, load_sae(locate(f"rulecheck-tiny:{name}")), tokens, layer, head, losses=False
    )
    for stat, tol in CARD_TOLERANCE.items():
        assert q[stat] == pytest.approx(card_quality()[name][stat], abs=tol), (name, stat)
    assert q["l0"] <= 20 and q["dead_fraction"] < 0.10, q


def test_quality_measures_detect_a_broken_sae(model, tokens):
    sae = load_sae(locate("rulecheck-tiny:sae_out/L0H0"))
    with torch.no_grad():
        sae.W_dec.mul_(-1)
    q = sae_quality(model, sae, tokens[:200], 0, 0)
    assert q["ce_recovered"] < 0.8 and q["explained_variance"] < 0


@pytest.mark.parametrize("layer", [0, 1])
def test_spliced_and_ablated_losses_equal_separate_full_runs(layer):
    """The quality measure's one run from the layer on equals two whole-model runs, one with
    the head's output replaced by the SAE's reconstruction, one with it zeroed."""
    from conftest import random_model, random_sae

    model = random_model(seed=3)
    sae = random_sae(8, 12, f"blocks.{layer}.attn.hook_z", head=1, seed=4)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 40, (10, 16), generator=g)
    tokens[:, 0] = 0
    got = sae_quality(model, sae, tokens, layer, 1, batch_size=4)

    def patched(fn):
        def hook(z, hook):
            z = z.clone()
            z[:, :, 1] = fn(z[:, :, 1])
            return z

        with torch.no_grad():
            per_tok = model.run_with_hooks(
                tokens,
                return_type="loss",
                loss_per_token=True,
                fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)],
            )
        return float(per_tok.mean())

    spliced = patched(lambda z: sae.decode(sae.encode(z)))
    zero = patched(torch.zeros_like)
    assert got["loss_spliced"] == pytest.approx(spliced, rel=1e-5)
    assert got["loss_zero_ablated"] == pytest.approx(zero, rel=1e-5)
    assert got["loss_clean"] == pytest.approx(clean_loss(model, tokens), rel=1e-6)
    assert spliced != pytest.approx(zero, rel=1e-3)  # the two runs are told apart
