"""Hugging Face checkpoints of the families users bring offline (Llama, Gemma-2, Qwen2,
GPT-NeoX), written with ``save_pretrained`` and read by ``load_model``: the loaded model's
log-probs are the transformers model's, and rulecheck reads each head (its z, its scores at
every distance) as the loaded model computes it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from rulecheck.core.heads import head_weights, qk_form, query_rows_supported, run_to_heads, z_at
from rulecheck.core.scores import pair_scores_by_distance
from rulecheck.errors import InvalidSpec
from rulecheck.loading import load_model
from rulecheck.loading.hf import hf_family_config, pretrained_config

TOLERANCE = 1e-4  # absolute, on log-softmax
SEQ = 16
WINDOW = 4  # Gemma-2's sliding window, shorter than SEQ
VOCAB = 96
# initializer_range 0.3: scores large enough that positions, windows and caps move the log-probs
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 32,
    "initializer_range": 0.3,
}
GEMMA2 = {
    "num_key_value_heads": 2,
    "head_dim": 16,
    "sliding_window": WINDOW,
    "query_pre_attn_scalar": 24,
    "attn_logit_softcapping": 5.0,
    "final_logit_softcapping": 3.0,
}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"num_key_value_heads": 2}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, GEMMA2),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    "gpt-neox": (
        transformers.GPTNeoXConfig,
        transformers.GPTNeoXForCausalLM,
        {"rotary_pct": 0.5, "use_parallel_residual": True},
    ),
}
TOKENS = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))


def hf_model(family: str, **changes: object) -> transformers.PreTrainedModel:
    """A random transformers model of ``family`` (seeded: same changes, same weights)."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **{**extra, **changes})).eval()


def log_probs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(TOKENS)
    return getattr(out, "logits", out).log_softmax(-1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def loaded(request, tmp_path_factory):
    """``(transformers model, the model load_model reads from its saved directory)``."""
    hf = hf_model(request.param)
    directory = tmp_path_factory.mktemp("hf") / f"{request.param}-tiny"
    hf.save_pretrained(directory)
    return hf, load_model(str(directory))


def test_log_probs_are_the_transformers_model_s(loaded):
    hf, model = loaded
    assert model.cfg.original_architecture == type(hf).__name__
    torch.testing.assert_close(log_probs(model), log_probs(hf), atol=TOLERANCE, rtol=0)


def test_heads_are_read_as_the_loaded_model_computes_them(loaded):
    """Per layer: ``run_to_heads`` and ``z_at`` give ``hook_z`` of TransformerLens's full pass,
    and ``pair_scores_by_distance`` of each query and key at their distance gives
    ``hook_attn_scores`` (rotary positions, grouped keys, biases, caps, windows)."""
    _, model = loaded
    _, cache = model.run_with_cache(TOKENS)
    rows, t = torch.arange(3), torch.tensor([0, WINDOW + 1, SEQ - 1])
    query, key = torch.tril_indices(SEQ, SEQ)  # every causal pair, query >= key
    for layer in range(model.cfg.n_layers):
        assert query_rows_supported(model, layer)
        z = cache[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, n_heads, d_head]
        store = run_to_heads(model, TOKENS, layer, [1])
        torch.testing.assert_close(store[f"blocks.{layer}.attn.hook_z"][:, :, 1], z[:, :, 1])
        got = z_at(model, TOKENS, t, layer, [2, 0])
        torch.testing.assert_close(got, z[rows, t][:, [2, 0]])

        form, w = qk_form(model, layer), head_weights(model, layer, 1)
        with torch.no_grad():
            x = model.blocks[layer].ln1(cache[f"blocks.{layer}.hook_resid_pre"])
        q = form.normed(x @ w.W_Q + w.b_Q, form.q_norm)[:, query].flatten(0, 1)
        k = form.normed(x @ w.W_K + w.b_K, form.k_norm)[:, key].flatten(0, 1)
        table = pair_scores_by_distance(q, k, form, SEQ)  # [batch * pairs, SEQ]
        scores = table.gather(1, (query - key).repeat(3)[:, None])[:, 0]
        want = cache[f"blocks.{layer}.attn.hook_attn_scores"][:, 1, query, key].flatten()
        torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-4)


def test_gemma2_window_scale_and_caps_are_the_checkpoint_s(tmp_path):
    """The loaded Gemma-2's heads have the checkpoint's window (even layers), scale and cap;
    and each of these moves transformers' log-probs by far more than the tolerance, so a
    loader that dropped one would fail the log-prob comparison."""
    hf = hf_model("gemma2")
    hf.save_pretrained(tmp_path / "gemma2")
    model = load_model(str(tmp_path / "gemma2"))
    forms = [qk_form(model, layer) for layer in range(2)]
    assert [f.window for f in forms] == [WINDOW, None]
    assert [f.soft_cap for f in forms] == [5.0, 5.0]
    assert forms[0].attn_scale == pytest.approx(math.sqrt(24))
    want = log_probs(hf)
    for change in (
        {"sliding_window": SEQ},
        {"query_pre_attn_scalar": 16},
        {"attn_logit_softcapping": None},
        {"final_logit_softcapping": None},
    ):
        other = hf_model("gemma2", **change)
        other.load_state_dict(hf.state_dict())
        assert (log_probs(other) - want).abs().max() > 100 * TOLERANCE, change


# the released sizes, as their config.json files give them (the rest: Gemma2Config's defaults)
GEMMA2_RELEASES = {
    "google/gemma-2-2b": {},
    "google/gemma-2-9b": {
        "hidden_size": 3584,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "num_hidden_layers": 42,
    },
    "google/gemma-2-27b": {
        "hidden_size": 4608,
        "head_dim": 128,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "intermediate_size": 36864,
        "num_hidden_layers": 46,
        "query_pre_attn_scalar": 144,
    },
}


@pytest.mark.parametrize("name", GEMMA2_RELEASES)
def test_gemma2_config_is_transformerlens_s_own_for_the_released_sizes(name):
    """The config read from a Gemma-2 config.json is the one TransformerLens builds from the
    hub name, field for field (the names aside)."""
    import transformer_lens.loading_from_pretrained as tl_loading

    hf = transformers.Gemma2Config(**GEMMA2_RELEASES[name])
    want = tl_loading.get_pretrained_model_config(name, hf_cfg=hf.to_dict(), fold_ln=True)
    family = hf_family_config(hf, file=Path("config.json"))
    got = pretrained_config(family, hf.to_dict(), fold_ln=True, device=torch.device("cpu"))
    names = {"model_name", "tokenizer_name", "device"}
    assert {k: v for k, v in got.to_dict().items() if k not in names} == {
        k: v for k, v in want.to_dict().items() if k not in names
    }


REFUSED = {
    "attention_bias": True,
    "rope_parameters": {"rope_type": "linear", "factor": 2.0},
    "hidden_activation": "tanh",
}


@pytest.mark.parametrize("field", REFUSED)
def test_a_gemma2_checkpoint_transformerlens_cannot_run_is_refused(tmp_path, field):
    """A one-line error naming config.json and the field, not a model that computes
    something else."""
    hf_model("gemma2", **{field: REFUSED[field]}).save_pretrained(tmp_path / "gemma2")
    with pytest.raises(InvalidSpec) as err:
        load_model(str(tmp_path / "gemma2"))
    assert err.value.field == field
    assert err.value.file == str(tmp_path / "gemma2" / "config.json")
