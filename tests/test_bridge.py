"""TransformerBridge models (TransformerLens's successor to HookedTransformer): a tiny random
Hugging Face checkpoint of each family, booted as a bridge in compatibility mode and loaded
as a HookedTransformer from the same directory. rulecheck reads a bridge's heads as the
bridge computes them (its own ``hook_z`` and ``hook_attn_scores``), as it reads the
HookedTransformer of the same weights, and extracts the same book from both."""

from __future__ import annotations

import math
import string
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import random_sae

from rulecheck.core.heads import (
    head_weights,
    qk_form,
    query_rows_supported,
    run_to_heads,
    z_at,
    z_hook,
)
from rulecheck.core.scores import pair_scores_by_distance
from rulecheck.errors import InvalidSpec
from rulecheck.loading import load_model

SEQ = 16
VOCAB = 96
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
    "initializer_range": 0.3,
}
GQA = {"num_key_value_heads": 2}  # query heads 0, 1 read key/value head 0; 2, 3 head 1
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, GQA),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, GQA),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32},
    ),
    # a scale of its own, a soft cap, a sliding window on even layers, (1 + w) RMSNorm
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {
            **GQA,
            "head_dim": 8,
            "sliding_window": 4,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
        },
    ),
    # q/k norm: a form the bridge view does not read
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {**GQA, "head_dim": 8}),
}
# absolute on z and on scores: the two loaders round the same weights differently, and the
# bridge runs its own attention; both differences are a few float32 ulps of values near 1
TOLERANCE = 1e-4
TOKENS = torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
TOKENS[:, 0] = 0


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer whose ids are the model's: BOS ``<s>`` is 0, then one id per
    letter (so that a character-level reading of its vocabulary tokenizes too), then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<s>", *string.ascii_lowercase]
    words += [f"w{i}" for i in range(len(words), VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w27"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<s>", unk_token="w27", pad_token="<s>"
    ).save_pretrained(directory)


def save_checkpoint(family: str, directory: Path) -> Path:
    config_cls, model_cls, extra = FAMILIES[family]
    common = dict(COMMON)
    if family == "gpt2":  # GPT2Config names the sizes its own way
        common = {k: common[k] for k in ("vocab_size", "initializer_range")}
    torch.manual_seed(0)
    model_cls(config_cls(**common, **extra)).save_pretrained(directory)
    save_tokenizer(directory)
    return directory


def boot(directory: Path):
    """The bridge as its own API boots it, in compatibility mode."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(directory), device="cpu")
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: ``(directory, bridge, the HookedTransformer load_model reads)``."""
    root = tmp_path_factory.mktemp("bridge")
    built = {}

    def get(family: str):
        if family not in built:
            directory = save_checkpoint(family, root / family)
            hooked = None if family == "qwen3" else load_model(str(directory))
            built[family] = (directory, boot(directory), hooked)
        return built[family]

    return get


def caches(model):
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS)
    return cache


def read_scores(model, cache, layer: int, head: int) -> torch.Tensor:
    """``[batch, pairs]``: rulecheck's score of every causal (query, key) pair of ``head``,
    ``pair_scores_by_distance`` of the projected query and key at their distance."""
    query, key = torch.tril_indices(SEQ, SEQ)
    form, w = qk_form(model, layer), head_weights(model, layer, head)
    with torch.no_grad():
        x = model.blocks[layer].ln1(cache[f"blocks.{layer}.hook_resid_pre"])
    q = form.normed(x @ w.W_Q + w.b_Q, form.q_norm)[:, query].flatten(0, 1)
    k = form.normed(x @ w.W_K + w.b_K, form.k_norm)[:, key].flatten(0, 1)
    table = pair_scores_by_distance(q, k, form, SEQ)  # [batch * pairs, SEQ]
    return table.gather(1, (query - key).repeat(len(TOKENS))[:, None])[:, 0].view(len(TOKENS), -1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2"])
def test_heads_are_read_as_the_bridge_computes_them(checkpoints, family):
    """Per layer and head: ``run_to_heads`` and ``z_at`` (rulecheck's own attention over the
    bridge's weights and form) give the bridge's ``hook_z``, and ``pair_scores_by_distance``
    at each pair's distance (0 .. 15) its ``hook_attn_scores``; each equals what rulecheck
    reads of the HookedTransformer of the same weights."""
    _, bridge, hooked = checkpoints(family)
    got, want = caches(bridge), caches(hooked) if hooked is not None else None
    rows, t = torch.arange(3), torch.tensor([0, 6, SEQ - 1])
    query, key = torch.tril_indices(SEQ, SEQ)
    assert len(set((query - key).tolist())) == SEQ  # every distance is read
    for layer in range(2):
        assert query_rows_supported(bridge, layer)
        z = got[z_hook(layer)]  # [batch, pos, n_heads, d_head]
        store = run_to_heads(bridge, TOKENS, layer, [1])
        assert sorted(store) == sorted(
            [z_hook(layer), f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.ln1.hook_scale"]
        )
        torch.testing.assert_close(store[z_hook(layer)][:, :, 1], z[:, :, 1], atol=1e-5, rtol=0)
        assert not store[z_hook(layer)][:, :, [0, 2, 3]].any()
        rows_z = z_at(bridge, TOKENS, t, layer, [3, 0])
        torch.testing.assert_close(rows_z, z[rows, t][:, [3, 0]], atol=1e-5, rtol=0)
        for head in range(4):
            scores = read_scores(bridge, got, layer, head)
            own = got[f"blocks.{layer}.attn.hook_attn_scores"][:, head, query, key]
            torch.testing.assert_close(scores, own, atol=1e-5, rtol=0)
            if want is not None:
                other = read_scores(hooked, want, layer, head)
                torch.testing.assert_close(scores, other, atol=TOLERANCE, rtol=0)
        if want is not None:
            hooked_z = z_at(hooked, TOKENS, t, layer, [3, 0])
            torch.testing.assert_close(rows_z, hooked_z, atol=TOLERANCE, rtol=0)
            ours, theirs = qk_form(bridge, layer), qk_form(hooked, layer)
            # the bridge's scale is 1 / its module's scaling, rounded apart from sqrt(...)
            assert ours.attn_scale == pytest.approx(theirs.attn_scale, rel=1e-12)
            assert (ours.window, ours.soft_cap) == (theirs.window, theirs.soft_cap)
            assert (ours.rotary is None) == (theirs.rotary is None)
            if ours.rotary is not None:
                n = len(ours.rotary.cos)
                torch.testing.assert_close(ours.rotary.cos, theirs.rotary.cos[:n])
                torch.testing.assert_close(ours.rotary.sin, theirs.rotary.sin[:n])


def test_a_grouped_query_head_reads_its_own_group(checkpoints):
    """The bridge keeps one ``W_K``/``W_V`` per key/value head: query head ``h`` reads group
    ``h // 2`` (not ``h % 2``), as the HookedTransformer of the same weights does."""
    _, bridge, hooked = checkpoints("llama")
    for layer in range(2):
        attn = bridge.blocks[layer].attn
        assert attn.W_K.shape[0] == 2 and attn.W_Q.shape[0] == 4
        for head in range(4):
            w = head_weights(bridge, layer, head)
            assert torch.equal(w.W_K, attn.W_K[head // 2].detach())
            assert torch.equal(w.W_V, attn.W_V[head // 2].detach())
            assert not torch.equal(w.W_K, attn.W_K[1 - head // 2].detach())
            assert not w.b_Q.any() and w.b_Q.shape == (8,)  # no biases: zeros
            theirs = head_weights(hooked, layer, head)
            torch.testing.assert_close(w.W_K, theirs.W_K, atol=1e-6, rtol=0)
            torch.testing.assert_close(w.W_Q, theirs.W_Q, atol=1e-6, rtol=0)


def test_a_form_the_view_cannot_read_is_refused_and_run_by_the_bridge(checkpoints):
    """Qwen3's q/k norm is not read from a bridge: its weights are refused by name, and its z
    is the bridge's own forward pass."""
    _, bridge, _ = checkpoints("qwen3")
    with pytest.raises(InvalidSpec, match="q/k norm"):
        head_weights(bridge, 1, 0)
    assert not query_rows_supported(bridge, 1)
    cache = caches(bridge)
    store = run_to_heads(bridge, TOKENS, 1, [2])  # by the names asked for, not their aliases
    names = [z_hook(1), "blocks.1.hook_resid_pre", "blocks.1.ln1.hook_scale"]
    assert sorted(store) == sorted(names)
    for name in names:
        torch.testing.assert_close(store[name], cache[name], atol=0, rtol=0)


def test_learned_positions_and_quality_measures_read_a_bridge(checkpoints):
    """GPT-2's token inputs at layer 0 (embedding plus mean position embedding), a per-head
    SAE's quality, losses included (a bridge cannot start at a layer: its splice runs from the
    tokens), and an input SAE's are the HookedTransformer's."""
    from rulecheck.build.quality import sae_quality
    from rulecheck.core.tokens import token_inputs

    _, bridge, hooked = checkpoints("gpt2")
    torch.testing.assert_close(
        token_inputs(bridge, 0, 0, VOCAB), token_inputs(hooked, 0, 0, VOCAB), atol=1e-6, rtol=0
    )
    sae = random_sae(8, 12, "blocks.1.attn.hook_z", head=2, seed=5)
    tokens = torch.cat([TOKENS, TOKENS.flip(1)])
    tokens[:, 0] = 0
    ours = sae_quality(bridge, sae, tokens, 1, head=2)
    theirs = sae_quality(hooked, sae, tokens, 1, head=2)
    assert ours.keys() == theirs.keys() and "ce_recovered" in ours
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-4), name
    assert ours["loss_zero_ablated"] != ours["loss_clean"]
    sae_in = random_sae(32, 24, "blocks.1.hook_resid_pre", seed=6)
    ours, theirs = (sae_quality(m, sae_in, tokens, 1) for m in (bridge, hooked))
    assert ours == pytest.approx(theirs, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# extraction


EXTRACT_ARGS = {
    "min_active": 8,
    "min_inactive": 8,
    "n_pos": 12,
    "n_neg": 12,
    "features": 3,
    "keys": 12,
    "queries_per_key": 12,
}
LAYER, HEAD = 1, 1


def save_saes(directory: Path, d_model: int, d_head: int) -> dict[str, str]:
    random_sae(d_model, 40, f"blocks.{LAYER}.hook_resid_pre", seed=1).save_model(
        str(directory / "sae_in")
    )
    sae = random_sae(d_head, 16, f"blocks.{LAYER}.attn.hook_z", head=HEAD, seed=2)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    sae.save_model(str(directory / "sae_out"))
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, VOCAB, (120, SEQ), generator=g)
    tokens[:, 0] = 0
    np.save(directory / "corpus.npy", tokens.numpy().astype(np.int64))
    return {
        "sae_in": str(directory / "sae_in"),
        "sae_out": str(directory / "sae_out"),
        "corpus": str(directory / "corpus.npy"),
    }


def extract_one(model_spec: str, parts: dict[str, str], models=None):
    from rulecheck.api import extract_books
    from rulecheck.config import ExemplarConfig, ExtractConfig
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    exemplar = {k: EXTRACT_ARGS[k] for k in ("min_active", "min_inactive", "n_pos", "n_neg")}
    cfg = ExtractConfig(
        features=EXTRACT_ARGS["features"],
        keys=EXTRACT_ARGS["keys"],
        queries_per_key=EXTRACT_ARGS["queries_per_key"],
        exemplars=ExemplarConfig(**exemplar),
    )
    bench = Workbench(cache_dir=None, device="cpu", models=models)
    specs = Specs(model=model_spec, **parts).resolve()
    [book] = extract_books(bench, specs, LAYER, [HEAD], cfg)
    return book


@pytest.fixture(scope="module")
def books(checkpoints, tmp_path_factory):
    """Per family: one head extracted from a bridge given to the workbench as an object, and
    from the HookedTransformer ``load_model`` reads from the same directory, with the
    directory and the SAE and corpus specs."""
    built = {}

    def get(family: str):
        if family not in built:
            directory, bridge, hooked = checkpoints(family)
            parts = save_saes(
                tmp_path_factory.mktemp("saes"), hooked.cfg.d_model, hooked.cfg.d_head
            )
            ours = extract_one("tiny-bridge", parts, {"tiny-bridge": bridge})
            theirs = extract_one(str(directory), parts)
            built[family] = (directory, parts, ours, theirs)
        return built[family]

    return get


NUMBERS_TOLERANCE = 1e-3  # measured F1s, precisions, scores: 4 significant digits


def assert_same_book(ours, theirs) -> None:
    """Same features and claims; every measured number and score within the tolerance."""
    assert [f.feature for f in ours.features] == [f.feature for f in theirs.features]
    assert ours.features, "no feature was extracted"
    for a, b in zip(ours.features, theirs.features, strict=True):
        assert a.label == b.label
        assert a.claims.keys() == b.claims.keys()
        for kind in a.claims:
            assert len(a.claims[kind]) == len(b.claims[kind]), kind
            for x, y in zip(a.claims[kind], b.claims[kind], strict=True):
                assert _claim(x) == _claim(y)
                assert _numbers(x) == pytest.approx(_numbers(y), abs=NUMBERS_TOLERANCE)
        for name, value in a.measured.items():
            if isinstance(value, float):
                assert value == pytest.approx(b.measured[name], abs=NUMBERS_TOLERANCE), name
            else:
                assert value == b.measured[name], name
        assert a.expect == pytest.approx(b.expect, abs=NUMBERS_TOLERANCE)
    assert ours.extraction["ln_scale"] == pytest.approx(theirs.extraction["ln_scale"], rel=1e-3)


def _fields(claim) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(claim) if is_dataclass(claim) else dict(vars(claim))


def _claim(claim) -> dict:
    """What a claim says: everything but its floats."""
    return {k: v for k, v in _fields(claim).items() if not isinstance(v, float)}


def _numbers(claim) -> list[float]:
    return [v for v in _fields(claim).values() if isinstance(v, float) and math.isfinite(v)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_extraction_of_a_bridge_is_the_hooked_transformer_s(books, family):
    _, _, ours, theirs = books(family)
    assert ours.model == "tiny-bridge" and ours.fingerprints["model"].startswith("sha256:")
    assert ours.fingerprints["model"] != theirs.fingerprints["model"]
    assert_same_book(ours, theirs)
    assert any(f.claims.get("skipgrams") for f in ours.features), family


def test_the_cli_extracts_a_bridge_spec(books, tmp_path):
    """``--model bridge:DIR`` boots the directory as a bridge: the book records the spec and
    is the one extracted from a bridge object through the Python API."""
    from rulecheck.cli import main
    from rulecheck.rulebook import load_rulebook

    directory, parts, ours, _ = books("llama")
    options = [f"--{k.replace('_', '-')}={v}" for k, v in EXTRACT_ARGS.items()]
    args = [
        "extract",
        f"--model=bridge:{directory}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in parts.items()),
    ]
    out = tmp_path / "books"
    code = main(
        [*args, *options, f"--layer={LAYER}", f"--heads={HEAD}", "--device=cpu", f"--out={out}"]
    )
    assert code == 0
    book = load_rulebook(out / f"L{LAYER}H{HEAD}.yaml", measurements=True)
    assert book.model == f"bridge:{directory}"
    assert book.fingerprints["model"] == ours.fingerprints["model"]
    assert_same_book(book, ours)


def test_a_bridge_spec_that_does_not_boot_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidSpec, match=r"no config\.json"):
        load_model(f"bridge:{tmp_path / 'empty'}")
    with pytest.raises(InvalidSpec, match="names no model"):
        load_model("bridge:")
