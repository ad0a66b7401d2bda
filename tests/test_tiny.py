"""The shipped real-text models, rulecheck-tiny (GPT-2 style) and rulecheck-tiny-llama (rotary,
grouped-query, RMSNorm, gated MLP): layout, loading, SAE quality bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rulecheck import zoo
from rulecheck.build.quality import clean_loss, output_saes_quality, sae_quality
from rulecheck.build.train_tiny import QUALITY_SEQUENCES
from rulecheck.loading import check_sae, load_model, load_sae
from rulecheck.specs import locate

SLICE = QUALITY_SEQUENCES  # the held-out sequences the model card measures on
ENTRIES = ("rulecheck-tiny", "rulecheck-tiny-llama")
# what sets each family apart, as the shipped config says
FAMILY = {
    "rulecheck-tiny": {
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "n_key_value_heads": None,
        "gated_mlp": False,
    },
    "rulecheck-tiny-llama": {
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "n_key_value_heads": 2,
        "gated_mlp": True,
    },
}
# the SAEs each entry ships: input, per-head output, and (llama) layer-level hook_z SAEs
OUTPUT_SAES = [(entry, layer, h) for entry in ENTRIES for layer in (0, 1) for h in range(4)]
LAYER_Z_SAES = [("rulecheck-tiny-llama", layer) for layer in (0, 1)]


@pytest.fixture(scope="module")
def models():
    return {}


def model_of(models: dict, entry: str):
    """The entry's model, loaded once per module."""
    if entry not in models:
        models[entry] = load_model(locate(entry))
    return models[entry]


@pytest.fixture(scope="module")
def tokens():
    """The card's sequences: both entries ship rulecheck-tiny's held-out tokens."""
    return torch.from_numpy(np.load(zoo.resolve("rulecheck-tiny:eval"))[:SLICE]).long()


@pytest.mark.parametrize("entry", ENTRIES)
def test_shipped_layout_fits_in_40_mb(entry):
    root = zoo.entry_dir(entry)
    files = [p for p in root.rglob("*") if p.is_file()]
    names = {str(p.relative_to(root)) for p in files}
    for required in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "eval_tokens.npy",
        "MODEL_CARD.md",
        "sae_in/L0/cfg.json",
        "sae_out/L1H3/sae_weights.safetensors",
        *(["sae_z/L1/cfg.json"] if entry == "rulecheck-tiny-llama" else []),
    ):
        assert required in names
    assert sum(p.stat().st_size for p in files) <= 40 * 2**20


@pytest.mark.parametrize("entry", ENTRIES)
def test_model_tokenizer_and_held_out_tokens(models, entry):
    model = model_of(models, entry)
    assert (model.cfg.n_layers, model.cfg.n_ctx) == (2, 64)
    assert not model.cfg.attn_only
    for field, want in FAMILY[entry].items():
        got = getattr(model.cfg, field)
        assert (got.removesuffix("Pre") if isinstance(got, str) else got) == want, field
    assert 4096 <= model.cfg.d_vocab <= 8192
    toks = model.to_tokens("If the value is None, then return")
    assert int(toks[0, 0]) == model.tokenizer.bos_token_id
    assert model.to_string(toks[0, 1:]) == "If the value is None, then return"
    held = np.load(zoo.resolve(f"{entry}:eval"))
    assert held.shape[0] >= 20_000 and held.shape[1] == 64
    assert np.issubdtype(held.dtype, np.integer)
    assert (held[:, 0] == model.tokenizer.bos_token_id).all()


def test_both_families_share_tokenizer_and_held_out_tokens():
    """rulecheck-tiny-llama reads rulecheck-tiny's tokens: the same tokenizer, and the same
    held-out split, so the two families' cards measure the same text."""
    tiny, llama = zoo.entry_dir("rulecheck-tiny"), zoo.entry_dir("rulecheck-tiny-llama")
    for name in ("model/tokenizer.json", "eval_tokens.npy"):
        assert (tiny / name).read_bytes() == (llama / name).read_bytes(), name


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_sae_loads_and_matches_its_hook(models, entry):
    model = model_of(models, entry)
    for layer in range(model.cfg.n_layers):
        check_sae(
            load_sae(locate(f"{entry}:sae_in/L{{layer}}"), layer=layer),
            model,
            layer=layer,
            head=None,
            kind="in",
            spec="sae_in",
        )
        for head in range(model.cfg.n_heads):
            spec = locate(f"{entry}:sae_out/L{{layer}}H{{head}}")
            sae = load_sae(spec, layer=layer, head=head)
            check_sae(sae, model, layer=layer, head=head, kind="out", spec="sae_out")
            assert sae.cfg.metadata.hook_head_index == head
            if (entry, layer) in LAYER_Z_SAES:  # read one head at a time
                z = load_sae(locate(f"{entry}:sae_z/L{layer}"), layer=layer, head=head)
                check_sae(z, model, layer=layer, head=head, kind="out", spec="sae_z")
                assert z.cfg.metadata.hook_head_index is None


@pytest.mark.parametrize("entry", ENTRIES)
def test_input_sae_quality_bars(models, tokens, entry):
    """Measured on the card's sequences: the bars, and the card's figures."""
    model = model_of(models, entry)
    for layer in range(model.cfg.n_layers):
        q = sae_quality(model, load_sae(locate(f"{entry}:sae_in/L{layer}")), tokens, layer)
        assert q["explained_variance"] >= 0.85, q
        assert q["dead_fraction"] < 0.10, q
        for stat, tol in CARD_TOLERANCE.items():
            want = card_quality(entry)[f"sae_in/L{layer}"][stat]
            assert q[stat] == pytest.approx(want, abs=tol), (layer, stat)


def card_quality(entry: str) -> dict[str, dict[str, float]]:
    """The model card's quality table (measured on the first ``SLICE`` held-out sequences):
    per SAE, L0, dead fraction, explained variance and (output SAEs) CE recovered."""
    rows = {}
    for line in (zoo.entry_dir(entry) / "MODEL_CARD.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith(("sae_in/", "sae_out/", "sae_z/")):
            l0, dead, ev, ce = cells[4:]
            rows[cells[0]] = {
                "l0": float(l0),
                "dead_fraction": float(dead.rstrip("%")) / 100,
                "explained_variance": float(ev),
            } | ({"ce_recovered": float(ce.rstrip("%")) / 100} if ce else {})
    return rows


# what the card's rounding leaves, and what other machines' sums may add
CARD_TOLERANCE = {"l0": 0.06, "dead_fraction": 0.0006, "explained_variance": 0.0015}
LAYER_Z_L0 = 64  # a layer-level SAE reads four heads: up to four heads' worth of features


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_card_s_quality_table_meets_the_bars(entry):
    """The bars of the attention-output SAE paper, for every output SAE (L1 and TopK alike),
    as the card records them; that the card's figures are the shipped SAEs' is checked live
    below."""
    card = card_quality(entry)
    assert set(card) == {f"sae_out/L{layer}H{h}" for e, layer, h in OUTPUT_SAES if e == entry} | {
        f"sae_z/L{layer}" for e, layer in LAYER_Z_SAES if e == entry
    } | {"sae_in/L0", "sae_in/L1"}
    for name, q in card.items():
        assert q["dead_fraction"] < 0.10, name
        if name.startswith("sae_out/"):
            assert q["l0"] <= 20 and q["ce_recovered"] >= 0.80, name
        elif name.startswith("sae_z/"):
            assert q["l0"] <= LAYER_Z_L0 and q["ce_recovered"] >= 0.80, name
        else:
            assert q["explained_variance"] >= 0.85, name


@pytest.mark.parametrize(("entry", "layer"), [(e, layer) for e in ENTRIES for layer in (0, 1)])
def test_each_output_sae_is_the_one_the_card_measured(models, tokens, entry, layer):
    """L0, dead fraction and explained variance measured here on the card's sequences are the
    card's (a retrained or altered SAE shipped without its card fails here), and meet the
    bars. The CE recovered figures are the card's: measuring them takes two passes through the
    unembedding per SAE, and the measure itself is checked against whole-model runs below."""
    model = model_of(models, entry)
    saes = {
        f"sae_out/L{layer}H{h}": (load_sae(locate(f"{entry}:sae_out/L{layer}H{h}")), h)
        for e, lay, h in OUTPUT_SAES
        if (e, lay) == (entry, layer)
    }
    if (entry, layer) in LAYER_Z_SAES:
        saes[f"sae_z/L{layer}"] = (load_sae(locate(f"{entry}:sae_z/L{layer}")), None)
    for name, q in output_saes_quality(model, saes, tokens, layer).items():
        for stat, tol in CARD_TOLERANCE.items():
            want = card_quality(entry)[name][stat]
            assert q[stat] == pytest.approx(want, abs=tol), (name, stat)
        bar = LAYER_Z_L0 if name.startswith("sae_z/") else 20
        assert q["l0"] <= bar and q["dead_fraction"] < 0.10, (name, q)


def test_one_pass_measures_each_sae_as_alone(models, tokens):
    """``output_saes_quality``'s shared pass gives each SAE ``sae_quality``'s figures."""
    model = model_of(models, "rulecheck-tiny")
    sae = load_sae(locate("rulecheck-tiny:sae_out/L1H2"))
    alone = sae_quality(model, sae, tokens[:300], 1, 2, losses=False)
    shared = output_saes_quality(model, {"x": (sae, 2)}, tokens[:300], 1)["x"]
    assert shared == pytest.approx(alone, rel=1e-5)


def test_quality_measures_detect_a_broken_sae(models, tokens):
    model = model_of(models, "rulecheck-tiny")
    sae = load_sae(locate("rulecheck-tiny:sae_out/L0H0"))
    with torch.no_grad():
        sae.W_dec.mul_(-1)
    q = sae_quality(model, sae, tokens[:200], 0, 0)
    assert q["ce_recovered"] < 0.8 and q["explained_variance"] < 0


@pytest.mark.parametrize(
    ("layer", "head", "reshape"), [(0, 1, False), (1, 1, False), (1, None, False), (1, None, True)]
)
def test_spliced_and_ablated_losses_equal_separate_full_runs(layer, head, reshape):
    """The quality measure's one run from the layer on equals two whole-model runs, one with
    the head's output (every head's, for a layer-level SAE, which may read ``hook_z`` per head
    as Gemma Scope's do) replaced by the SAE's reconstruction, one with it zeroed."""
    import copy

    from conftest import random_model, random_sae

    model = random_model(seed=3)
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    d_in = d_head if head is not None else n_heads * d_head
    sae = random_sae(d_in, 12, f"blocks.{layer}.attn.hook_z", head=head, seed=4)
    measured = copy.deepcopy(sae)
    if reshape:
        measured.cfg.reshape_activations = "hook_z"
        measured.turn_on_forward_pass_hook_z_reshaping()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1, 40, (10, 16), generator=g)
    tokens[:, 0] = 0
    got = sae_quality(model, measured, tokens, layer, head, batch_size=4, all_heads=head is None)
    heads = slice(None) if head is None else head

    def patched(fn):
        def hook(z, hook):
            z = z.clone()
            x = z[:, :, heads]
            z[:, :, heads] = fn(x.flatten(2) if head is None else x).view_as(x)
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
