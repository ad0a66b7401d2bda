"""Loading: round trips through every on-disk format, and one test per user error."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rulecheck import zoo
from rulecheck.cli import main
from rulecheck.errors import RulecheckError
from rulecheck.loading import (
    check_sae,
    fingerprint_corpus,
    fingerprint_model,
    fingerprint_sae,
    fingerprint_tensors,
    load_corpus,
    load_model,
    load_sae,
    resolve_device,
    save_model,
)

WORDS = [
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "dog",
    "ran",
    "far",
    "away",
]
BOS = 0


def tiny_config(**overrides) -> HookedTransformerConfig:
    kwargs = dict(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        d_vocab=50,
        n_ctx=64,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
    )
    kwargs.update(overrides)
    return HookedTransformerConfig(**kwargs)


def word_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: id 0 is <|endoftext|> (BOS), id 1 is [UNK], then WORDS."""
    vocab = {"<|endoftext|>": BOS, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|endoftext|>", "[UNK]"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="[UNK]",
    )
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def tiny_model(tmp_path: Path, *, tokenizer: bool = True) -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(tiny_config())
    if tokenizer:
        model.set_tokenizer(word_tokenizer(tmp_path / "tokenizer-src"))
    return model.eval()


def tiny_sae(d_in: int, *, hook_name: str, head: int | None = None) -> StandardSAE:
    torch.manual_seed(1)
    cfg = StandardSAEConfig(
        d_in=d_in,
        d_sae=4 * d_in,
        reshape_activations="hook_z" if head is None and hook_name.endswith("hook_z") else "none",
        metadata=SAEMetadata(hook_name=hook_name, hook_head_index=head, model_name="tiny"),
    )
    sae = StandardSAE(cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    return sae


def write_paper_sae(directory: Path, *, head: int = 1, d_head: int = 8) -> Path:
    """Write ``NAME_cfg.json`` + ``NAME.pt`` as the attention-output-SAE code saves them."""
    name = directory / "tiny_L0_H1_z_v0"
    cfg = {
        "model_name": "tiny",
        "site": "z",
        "layer": 0,
        "head": head,
        "per_head": True,
        "concat_heads": False,
        "act_name": "blocks.0.attn.hook_z",
        "act_size": d_head,
        "dict_size": 4 * d_head,
        "enc_dtype": "fp32",
        "seed": 49,
    }
    Path(f"{name}_cfg.json").write_text(json.dumps(cfg))
    torch.manual_seed(2)
    state = {
        "W_enc": torch.randn(d_head, 4 * d_head),
        "W_dec": torch.randn(4 * d_head, d_head),
        "b_enc": torch.randn(4 * d_head),
        "b_dec": torch.randn(d_head),
    }
    torch.save(state, f"{name}.pt")
    return name


def assert_one_line(excinfo: pytest.ExceptionInfo[RulecheckError], *needles: str) -> str:
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1, message
    assert "(fix: " in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline mode; the hub libraries read the variable at import, so patch them too."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# --------------------------------------------------------------------------------------------
# devices


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RulecheckError) as excinfo:
        resolve_device("gpu-please")
    assert_one_line(excinfo, "gpu-please", "device")


# --------------------------------------------------------------------------------------------
# models


def test_model_directory_round_trip(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    target = save_model(model, tmp_path / "model")
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    config = json.loads((target / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert "device" not in config and "tokenizer_name" not in config

    loaded = load_model(str(target))
    tokens = model.to_tokens("hello world the cat sat")
    assert torch.equal(loaded.to_tokens("hello world the cat sat"), tokens)
    assert tokens[0, 0].item() == BOS and loaded.tokenizer.bos_token_id == BOS
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert fingerprint_model(loaded) == fingerprint_model(model)


def test_save_model_replaces_directory_without_leftovers(tmp_path: Path) -> None:
    model = tiny_model(tmp_path, tokenizer=False)
    target = save_model(model, tmp_path / "out" / "model")
    with torch.no_grad():
        model.W_U.add_(1.0)
    save_model(model, target)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]
    loaded = load_model(str(target))
    assert loaded.tokenizer is None
    assert torch.equal(loaded.W_U, model.W_U)


def test_hf_gpt2_directory_converts_with_tl_processing(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_dir = tmp_path / "hf-gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60, n_positions=64)
    hf_model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    hf_model.save_pretrained(str(hf_dir))
    word_tokenizer(hf_dir)

    model = load_model(str(hf_dir))
    assert model.cfg.normalization_type == "LNPre"
    torch.testing.assert_close(model.W_U.mean(-1), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.W_E.mean(-1), torch.zeros(60), atol=1e-5, rtol=0)
    tokens = model.to_tokens("hello world the cat sat on a mat")
    assert tokens[0, 0].item() == BOS
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = hf_model(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    saved = load_model(str(save_model(model, tmp_path / "converted")))
    assert saved.cfg.normalization_type == "LNPre"
    with torch.no_grad():
        assert torch.equal(saved(tokens), model(tokens))

    raw = load_model(str(hf_dir), fold_ln=False, center_writing_weights=False, center_unembed=False)
    assert raw.cfg.normalization_type == "LN"
    assert raw.W_E.mean(-1).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(raw(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)


def test_hf_directory_unreadable_weights(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "hf-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60)).save_pretrained(
        str(hf_dir)
    )
    (hf_dir / "model.safetensors").write_bytes(b"\x00garbage" * 32)
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(hf_dir))
    assert_one_line(excinfo, str(hf_dir / "model.safetensors"))


def test_model_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(tmp_path / "no-such-model"))
    assert_one_line(excinfo, "no-such-model", "not a TransformerLens model name")


def test_model_unreadable_safetensors(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    (target / "model.safetensors").write_bytes(b"\x00garbage, not safetensors" * 8)
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(excinfo, str(target / "model.safetensors"), "safetensors")


def test_model_weights_that_do_not_match_config(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"n_layers": 2}))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(
        excinfo, "config.json: n_layers: 2, but the blocks in model.safetensors number 1 (fix: set"
    )
    (target / "config.json").write_text(json.dumps(config | {"d_mlp": 48}))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(excinfo, "model.safetensors: blocks.0.mlp.W_in: shape [16, 32], expected")


def rewrite_weights(path: Path, change) -> None:
    """Rewrite a safetensors file with ``change(state)`` applied to its tensors."""
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


@pytest.mark.parametrize("positions", ["standard", "rotary"])
def test_model_weights_without_derived_buffers(tmp_path: Path, positions: str) -> None:
    torch.manual_seed(0)
    model = HookedTransformer(tiny_config(positional_embedding_type=positions)).eval()
    target = save_model(model, tmp_path / "model")
    buffers = {name for name, _ in model.named_buffers()}
    expected = {"mask", "IGNORE"} | (
        {"rotary_sin", "rotary_cos"} if positions == "rotary" else set()
    )
    assert {name.rsplit(".", 1)[1] for name in buffers} == expected
    rewrite_weights(target / "model.safetensors", lambda state: [state.pop(b) for b in buffers])
    loaded = load_model(str(target))
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_model_weights_with_an_old_mask_shape(tmp_path: Path) -> None:
    """TransformerLens 2 saved the causal mask [n_ctx, n_ctx]; the config decides it now."""
    model = tiny_model(tmp_path, tokenizer=False)
    target = save_model(model, tmp_path / "model")
    old_mask = torch.tril(torch.ones(64, 64, dtype=torch.bool))
    rewrite_weights(
        target / "model.safetensors", lambda state: state.update({"blocks.0.attn.mask": old_mask})
    )
    loaded = load_model(str(target))
    assert loaded.blocks[0].attn.mask.shape == model.blocks[0].attn.mask.shape


def test_model_weights_missing_a_parameter(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    rewrite_weights(target / "model.safetensors", lambda state: state.pop("blocks.0.attn.W_Q"))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(
        excinfo, "model.safetensors: state_dict: ", "missing blocks.0.attn.W_Q", "save_model"
    )


def test_model_weights_key_that_would_break_the_line(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    odd = {"blocks.0.attn.W_Q\nX": torch.zeros(1)}
    rewrite_weights(target / "model.safetensors", lambda state: state.update(odd))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(excinfo, 'unexpected "blocks.0.attn.W_Q\\nX"')


BAD_MODEL_FIELDS = [
    ("n_layers", "one", 'expected an integer, found "one"'),
    ("n_heads", -2, "expected an integer >= 1, found -2"),
    ("d_model", 0, "expected an integer >= 1, found 0"),
    ("d_head", 8.0, "expected an integer, found 8.0"),
    ("n_ctx", True, "expected an integer, found true"),
    ("d_vocab", 2**70, "expected an integer < 2**63, found 1180591620717411303424"),
    ("d_mlp", "32", 'expected an integer or null, found "32"'),
    ("act_fn", "swish", 'unknown value "swish"'),
    ("normalization_type", "BatchNorm", 'unknown value "BatchNorm"'),
    ("positional_embedding_type", "sinusoidal", 'unknown value "sinusoidal"'),
    ("eps", "tiny", 'expected a number, found "tiny"'),
    ("default_prepend_bos", 1, "expected true or false, found 1"),
    ("dtype", "int64", '"int64" is not a dtype'),
]


@pytest.mark.parametrize(("field", "value", "what"), BAD_MODEL_FIELDS)
def test_model_config_bad_field(tmp_path: Path, field: str, value: object, what: str) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    message = assert_one_line(excinfo, f"config.json: {field}: {what}")
    assert "(fix: set" in message or "(fix: use" in message


def test_model_config_derives_n_heads(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"n_heads": -1}))
    assert load_model(str(target)).cfg.n_heads == 2
    with pytest.raises(RulecheckError) as excinfo:
        (target / "config.json").write_text(json.dumps(config | {"n_heads": -2}))
        load_model(str(target))
    assert_one_line(excinfo, "n_heads: ", ">= 1, or -1 to derive it from d_model / d_head")


def test_model_config_huge_count_fails_before_building(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    moe = {"num_experts": 10**15, "experts_per_token": 1}
    (target / "config.json").write_text(json.dumps(config | moe))
    start = time.monotonic()
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert time.monotonic() - start < 10
    assert_one_line(excinfo, "config.json: num_experts: 1000000000000000, but the experts in")


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"use_local_attn": True, "window_size": 4, "attn_types": []}, "list index out of range"),
        ({"positional_embedding_type": "rotary", "rotary_base": 10**400}, "int too big to convert"),
        ({"use_normalization_before_and_after": True}, "normalization_layer_after"),
    ],
)
def test_model_config_transformerlens_refuses(tmp_path: Path, change: dict, what: str) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(excinfo, "config.json: TransformerLens cannot build this model (", what)


@pytest.mark.parametrize("field", ["n_layers", "d_model", "d_head", "n_ctx", "d_vocab"])
def test_model_config_missing_field(tmp_path: Path, field: str) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    del config[field]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(excinfo, f"config.json: {field}: missing (fix: add {field}")


def test_model_config_with_unknown_field(tmp_path: Path) -> None:
    target = save_model(tiny_model(tmp_path, tokenizer=False), tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config | {"n_layerz": 2}))
    with pytest.raises(RulecheckError) as excinfo:
        load_model(str(target))
    assert_one_line(excinfo, "config.json", "n_layerz")


def test_hub_model_name_offline_fails_fast(offline: None) -> None:
    start = time.monotonic()
    with pytest.raises(RulecheckError) as excinfo:
        load_model("gpt2")
    assert time.monotonic() - start < 10
    assert_one_line(excinfo, "gpt2", "local model directory")


# --------------------------------------------------------------------------------------------
# SAEs


def test_sae_directory_round_trip(tmp_path: Path) -> None:
    sae = tiny_sae(8, hook_name="blocks.0.attn.hook_z", head=1)
    sae.save_model(tmp_path / "saes" / "L0H1")
    loaded = load_sae(str(tmp_path / "saes" / "L{layer}H{head}"), layer=0, head=1)
    assert isinstance(loaded, StandardSAE)
    assert loaded.cfg.metadata.hook_head_index == 1
    assert loaded.cfg.metadata.hook_name == "blocks.0.attn.hook_z"
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert fingerprint_sae(loaded) == fingerprint_sae(sae)
    check_sae(loaded, tiny_model(tmp_path), layer=0, head=1, kind="out", spec="L0H1")


def test_sae_template_needs_its_value(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "L{layer}H{head}"), layer=0)
    assert_one_line(excinfo, "{head}", "head: ")


@pytest.mark.parametrize("form", ["stem", "pt", "cfg"])
def test_paper_per_head_sae(tmp_path: Path, form: str) -> None:
    name = write_paper_sae(tmp_path)
    spec = {"stem": str(name), "pt": f"{name}.pt", "cfg": f"{name}_cfg.json"}[form]
    sae = load_sae(spec)
    state = torch.load(f"{name}.pt", weights_only=True)
    assert isinstance(sae, StandardSAE)
    assert sae.cfg.metadata.hook_name == "blocks.0.attn.hook_z"
    assert sae.cfg.metadata.hook_head_index == 1
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (8, 32)
    z = torch.randn(5, 8)
    expected = torch.relu((z - state["b_dec"]) @ state["W_enc"] + state["b_enc"])
    torch.testing.assert_close(sae.encode(z), expected)
    check_sae(sae, tiny_model(tmp_path), layer=0, head=1, kind="out", spec=spec)


def test_paper_layer_level_sae(tmp_path: Path) -> None:
    name = tmp_path / "tiny_L0_Hcat_z_v0"
    cfg = {"act_name": "blocks.0.attn.hook_z", "layer": 0, "head": "cat", "concat_heads": True}
    Path(f"{name}_cfg.json").write_text(json.dumps(cfg | {"act_size": 16, "dict_mult": 2}))
    state = {"W_enc": torch.randn(16, 32), "W_dec": torch.randn(32, 16)}
    torch.save(state | {"b_enc": torch.zeros(32), "b_dec": torch.zeros(16)}, f"{name}.pt")
    sae = load_sae(str(name))
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (16, 32)
    assert sae.cfg.metadata.hook_head_index is None
    assert sae.cfg.reshape_activations == "hook_z"
    check_sae(sae, tiny_model(tmp_path), layer=0, head=None, kind="out", spec=str(name))


def test_paper_sae_weights_that_do_not_match(tmp_path: Path) -> None:
    name = write_paper_sae(tmp_path)
    state = torch.load(f"{name}.pt", weights_only=True)
    torch.save(state | {"W_enc": torch.randn(8, 7)}, f"{name}.pt")
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(name))
    assert_one_line(excinfo, f"{name}.pt", "W_enc: shape [8, 7], expected [8, 32]")


def test_paper_sae_size_beyond_memory(tmp_path: Path) -> None:
    name = write_paper_sae(tmp_path)
    config = json.loads(Path(f"{name}_cfg.json").read_text())
    Path(f"{name}_cfg.json").write_text(json.dumps(config | {"act_size": 2**56}))
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(name))
    assert_one_line(excinfo, f"{name}.pt: W_enc: shape [8, 32], expected [72057594037927936, 32]")


def test_paper_sae_odd_weight_keys(tmp_path: Path) -> None:
    name = write_paper_sae(tmp_path)
    state = torch.load(f"{name}.pt", weights_only=True)
    state["b\rdec"], state[7] = state.pop("b_dec"), torch.zeros(1)
    torch.save(state, f"{name}.pt")
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(name))
    assert_one_line(excinfo, f"{name}.pt: state_dict: ", 'found "b\\rdec", 7, W_dec')
    assert "\r" not in str(excinfo.value)


def test_paper_sae_with_half_the_files(tmp_path: Path) -> None:
    name = write_paper_sae(tmp_path)
    Path(f"{name}.pt").unlink()
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(name))
    assert_one_line(excinfo, f"{name}.pt", "file not found")


def test_sae_missing_path(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "missing-sae"))
    assert_one_line(excinfo, "missing-sae", "no such file")


def test_sae_unreadable_safetensors(tmp_path: Path) -> None:
    tiny_sae(16, hook_name="blocks.0.hook_resid_pre").save_model(tmp_path / "sae")
    (tmp_path / "sae" / "sae_weights.safetensors").write_bytes(b"\xffnot safetensors" * 16)
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    assert_one_line(excinfo, "sae_weights.safetensors", "safetensors")


def write_sae_dir(directory: Path, head: int | None = 1) -> dict:
    """Save a per-head output SAE; return its cfg.json as a dict."""
    tiny_sae(8, hook_name="blocks.0.attn.hook_z", head=head).save_model(directory)
    return json.loads((directory / "cfg.json").read_text())


BAD_SAE_FIELDS = [
    ({"d_sae": "many"}, 'd_sae: expected an integer, found "many"', "set d_sae to an integer"),
    ({"d_in": -1}, "d_in: expected an integer >= 1, found -1", "set d_in to an integer >= 1"),
    ({"architecture": "sparse"}, 'architecture: unknown value "sparse"', '"standard", "gated"'),
    ({"dtype": "int8"}, 'dtype: unknown value "int8"', '"float32"'),
    ({"apply_b_dec_to_input": "yes"}, "apply_b_dec_to_input: expected true or false", "true"),
    ({"metadata": ["x"]}, 'metadata: expected an object, found ["x"]', "sae.save_model"),
]


@pytest.mark.parametrize(("change", "what", "fix"), BAD_SAE_FIELDS)
def test_sae_config_bad_field(tmp_path: Path, change: dict, what: str, fix: str) -> None:
    config = write_sae_dir(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config | change))
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    message = assert_one_line(excinfo, f"cfg.json: {what}")
    assert fix in message.split("(fix: ", 1)[1], message


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        (
            "hook_head_index",
            "1",
            'metadata.hook_head_index: expected an integer or null, found "1"',
        ),
        ("hook_head_index", -1, "metadata.hook_head_index: expected an integer >= 0, found -1"),
        ("hook_name", 0, "metadata.hook_name: expected a string or null, found 0"),
        ("sae_lens_version", "six", 'metadata.sae_lens_version: expected a version such as "6'),
    ],
)
def test_sae_config_bad_metadata(tmp_path: Path, field: str, value: object, what: str) -> None:
    config = write_sae_dir(tmp_path / "sae")
    config["metadata"][field] = value
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    assert_one_line(excinfo, f"cfg.json: {what}")


def test_sae_config_missing_d_in(tmp_path: Path) -> None:
    config = write_sae_dir(tmp_path / "sae")
    del config["d_in"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    assert_one_line(excinfo, "cfg.json: d_in: missing (fix: add d_in (an integer >= 1))")


def test_sae_config_metadata_without_version(tmp_path: Path) -> None:
    config = write_sae_dir(tmp_path / "sae", head=1)
    del config["metadata"]["sae_lens_version"]
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    # what sae_lens itself makes of the file: a pre-6.0 config, its metadata block dropped
    read_by_sae_lens = SAE.load_from_disk(str(tmp_path / "sae"))
    assert read_by_sae_lens.cfg.metadata.hook_head_index is None
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    assert_one_line(
        excinfo,
        "cfg.json: metadata.sae_lens_version: missing beside a metadata block",
        "pre-6.0 config and drops metadata.hook_name and metadata.hook_head_index",
        '(fix: add "sae_lens_version": "6.x" to metadata',
    )


def test_sae_config_metadata_with_an_old_version(tmp_path: Path) -> None:
    config = write_sae_dir(tmp_path / "sae")
    config["metadata"]["sae_lens_version"] = "5.9.1"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    assert_one_line(excinfo, "metadata.sae_lens_version: 5.9.1, before 6.0, beside a metadata")


def test_sae_config_pre_6_without_metadata_still_loads(tmp_path: Path) -> None:
    """A real pre-6.0 config: flat, hook_point and hook_point_head_index, no version."""
    sae = tiny_sae(8, hook_name="blocks.0.attn.hook_z", head=1)
    sae.save_model(tmp_path / "sae")
    old = {
        "d_in": 8,
        "d_sae": 32,
        "dtype": "float32",
        "hook_point": "blocks.0.attn.hook_z",
        "hook_point_head_index": 1,
        "apply_b_dec_to_input": True,
    }
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(old))
    loaded = load_sae(str(tmp_path / "sae"))
    assert loaded.cfg.metadata.hook_head_index == 1
    assert torch.equal(loaded.W_enc, sae.W_enc)


def test_sae_weights_missing_a_key(tmp_path: Path) -> None:
    write_sae_dir(tmp_path / "sae")
    rewrite_weights(tmp_path / "sae" / "sae_weights.safetensors", lambda state: state.pop("b_enc"))
    with pytest.raises(RulecheckError) as excinfo:
        load_sae(str(tmp_path / "sae"))
    assert_one_line(excinfo, "sae_weights.safetensors: state_dict: ", '"b_enc"', "sae.save_model")


def test_registry_sae_offline(offline: None) -> None:
    start = time.monotonic()
    with pytest.raises(RulecheckError) as excinfo:
        load_sae("gpt2-small-res-jb:blocks.0.hook_resid_pre")
    assert time.monotonic() - start < 15
    assert_one_line(
        excinfo, "gpt2-small-res-jb:blocks.0.hook_resid_pre", "HF_HUB_OFFLINE", "downloaded folder"
    )


def test_check_sae_accepts_each_kind(tmp_path: Path) -> None:
    model = tiny_model(tmp_path, tokenizer=False)
    sae_in = tiny_sae(16, hook_name="blocks.0.hook_resid_pre")
    check_sae(sae_in, model, layer=0, head=None, kind="in", spec="in")
    layer_level = tiny_sae(16, hook_name="blocks.0.attn.hook_z")
    check_sae(layer_level, model, layer=0, head=1, kind="out", spec="out")


def test_check_sae_d_in_mismatch(tmp_path: Path) -> None:
    sae = tiny_sae(12, hook_name="blocks.0.attn.hook_z", head=0)
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(sae, tiny_model(tmp_path), layer=0, head=0, kind="out", spec="sae/L0H0")
    assert_one_line(excinfo, "sae/L0H0", "d_in: ", "expected 8", "found 12")

    sae_in = tiny_sae(8, hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(sae_in, tiny_model(tmp_path), layer=0, head=None, kind="in", spec="sae/in")
    assert_one_line(excinfo, "sae/in", "d_in: ", "expected 16", "found 8")


def test_check_sae_head_out_of_range(tmp_path: Path) -> None:
    model = tiny_model(tmp_path, tokenizer=False)
    per_head = tiny_sae(8, hook_name="blocks.0.attn.hook_z", head=5)
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(per_head, model, layer=0, head=None, kind="out", spec="sae/L0H5")
    assert_one_line(excinfo, "sae/L0H5", "hook_head_index: ", "head 5", "0..1")

    layer_level = tiny_sae(16, hook_name="blocks.0.attn.hook_z")
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(layer_level, model, layer=0, head=2, kind="out", spec="sae/L0")
    assert_one_line(excinfo, "sae/L0", "head: ", "head 2", "n_heads=2")


def test_check_sae_layer_and_hook_mismatch(tmp_path: Path) -> None:
    model = tiny_model(tmp_path, tokenizer=False)
    sae = tiny_sae(8, hook_name="blocks.1.attn.hook_z", head=0)
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(sae, model, layer=0, head=0, kind="out", spec="s")
    assert_one_line(excinfo, "hook_name: ", "blocks.0.attn.hook_z", "blocks.1.attn.hook_z")
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(sae, model, layer=1, head=0, kind="out", spec="s")
    assert_one_line(excinfo, "layer: ", "n_layers=1")


def test_check_sae_one_head_without_head_index(tmp_path: Path) -> None:
    sae = tiny_sae(8, hook_name="blocks.0.attn.hook_z")
    with pytest.raises(RulecheckError) as excinfo:
        check_sae(sae, tiny_model(tmp_path), layer=0, head=0, kind="out", spec="s")
    assert_one_line(excinfo, "hook_head_index: ")


# --------------------------------------------------------------------------------------------
# corpora


def test_npy_corpus_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(1, 50, size=(6, 10), dtype=np.int32)
    array[:, 0] = BOS
    np.save(tmp_path / "tokens.npy", array)
    tokens = load_corpus(str(tmp_path / "tokens.npy"), bos_token_id=BOS, d_vocab=50)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, torch.from_numpy(array).long())
    assert load_corpus(str(tmp_path / "tokens.npy"), max_sequences=4).shape == (4, 10)
    cut = load_corpus(str(tmp_path / "tokens.npy"), seq_len=4, bos_token_id=BOS)
    assert torch.equal(cut, tokens[:, :4])
    assert fingerprint_corpus(tokens) == fingerprint_corpus(tokens.clone())


def test_text_and_jsonl_corpora_chunk_per_document(tmp_path: Path) -> None:
    tokenizer = word_tokenizer(tmp_path / "tok")
    documents = ["hello world the cat sat on a mat", "", "dog ran far away", "a cat"]
    (tmp_path / "docs.txt").write_text("\n".join(documents) + "\n")
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(json.dumps({"text": d}) for d in documents if d) + "\n"
    )
    ids = {w: i + 2 for i, w in enumerate(WORDS)}
    expected = torch.tensor(
        [
            [BOS, ids["hello"], ids["world"], ids["the"]],
            [BOS, ids["cat"], ids["sat"], ids["on"]],
            [BOS, ids["dog"], ids["ran"], ids["far"]],
        ]
    )
    for name in ("docs.txt", "docs.jsonl"):
        tokens = load_corpus(str(tmp_path / name), tokenizer=tokenizer, seq_len=4, d_vocab=50)
        assert torch.equal(tokens, expected), name
    capped = load_corpus(
        str(tmp_path / "docs.txt"), tokenizer=tokenizer, seq_len=4, max_sequences=1
    )
    assert torch.equal(capped, expected[:1])


def test_text_corpus_needs_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "docs.txt").write_text("hello world\n")
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "docs.txt"))
    assert_one_line(excinfo, "docs.txt", "tokenizer")


def test_jsonl_corpus_bad_line(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "hello world"}\n{"body": "x"}\n')
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "docs.jsonl"), tokenizer=word_tokenizer(tmp_path / "tok"))
    assert_one_line(excinfo, "docs.jsonl:2: text: ")


def test_corpus_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "absent.npy"))
    assert_one_line(excinfo, "absent.npy", "file not found")


def test_corpus_wrong_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "floats.npy", np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "floats.npy"))
    assert_one_line(excinfo, "floats.npy", "dtype: ", "float32")


def test_corpus_wrong_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "flat.npy", np.zeros(8, dtype=np.int64))
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "flat.npy"))
    assert_one_line(excinfo, "flat.npy", "shape: ", "[8]")


def test_corpus_without_bos_or_outside_vocab(tmp_path: Path) -> None:
    array = np.full((3, 8), 7, dtype=np.int64)
    array[:2, 0] = BOS
    np.save(tmp_path / "tokens.npy", array)
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "tokens.npy"), bos_token_id=BOS)
    assert_one_line(excinfo, "tokens.npy", "column 0: ", "row 2")
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "tokens.npy"), d_vocab=5)
    assert_one_line(excinfo, "tokens.npy", "token ids: ", "found token id 7")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_text_corpus_not_utf8(tmp_path: Path, suffix: str) -> None:
    lines = [b"hello world the cat", "the cat sat on a m\u00e4t".encode("latin-1")]
    if suffix == ".jsonl":
        lines = [b'{"text": "' + line + b'"}' for line in lines]
    path = tmp_path / f"docs{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    offset = len(lines[0]) + 1 + lines[1].index(b"\xe4")
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(path), tokenizer=word_tokenizer(tmp_path / "tok"))
    assert_one_line(
        excinfo, f"docs{suffix}:2: not UTF-8: byte 0xe4 at byte offset {offset}", "UTF-8"
    )


def test_jsonl_corpus_half_a_surrogate_pair(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text('{"text": "hello"}\n{"text": "a \\ud83d cat"}\n')
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "docs.jsonl"), tokenizer=word_tokenizer(tmp_path / "tok"))
    assert_one_line(excinfo, 'docs.jsonl:2: text: holds "\\ud83d", half a surrogate pair')


def test_corpus_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "corpus"), bos_token_id=BOS)
    assert_one_line(excinfo, "corpus: is a directory, not a corpus file", "inside it")


@pytest.mark.parametrize("dtype", ["i1", "i2", "i4", "i8", ">i8", "u1", "u2", "u4", "u8"])
def test_npy_corpus_integer_dtypes(tmp_path: Path, dtype: str) -> None:
    array = np.arange(1, 25).reshape(3, 8).astype(dtype)
    array[:, 0] = BOS
    np.save(tmp_path / "tokens.npy", array)
    tokens = load_corpus(str(tmp_path / "tokens.npy"), bos_token_id=BOS, d_vocab=50)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == array.astype(np.int64).tolist()


def test_npy_corpus_uint64_beyond_int64(tmp_path: Path) -> None:
    array = np.full((3, 8), 7, dtype=np.uint64)
    array[:, 0] = BOS
    array[1, 5] = 2**64 - 2
    np.save(tmp_path / "tokens.npy", array)
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "tokens.npy"), bos_token_id=BOS, d_vocab=50)
    message = assert_one_line(
        excinfo, "token ids: found token id 18446744073709551614 (row 1, column 5)"
    )
    assert "-2" not in message.replace(str(tmp_path), "")  # the path may hold "-2"


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.zeros((3, 8), dtype=np.float64), "float64"),
        (np.zeros((3, 8), dtype=bool), "bool"),
        (np.full((3, 8), 7, dtype=object), "object"),
        (np.zeros((3, 8), dtype="m8[s]"), "timedelta64[s]"),
        (np.full((3, 8), "7"), "<U1"),
    ],
)
def test_npy_corpus_not_integers(tmp_path: Path, array: np.ndarray, dtype: str) -> None:
    np.save(tmp_path / "tokens.npy", array, allow_pickle=True)
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "tokens.npy"))
    assert_one_line(excinfo, f"tokens.npy: dtype: expected integer token ids, found dtype {dtype}")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"'<i8'", b"',i8'"),  # numpy's dtype parser raises SyntaxError
        (b", 'fortran_order'", b",b'fortran_order'"),  # a bytes key: TypeError
        (b"}", b"|"),  # numpy's Python 2 header parser: tokenize.TokenError
    ],
)
def test_npy_corpus_header_numpy_cannot_parse(tmp_path: Path, old: bytes, new: bytes) -> None:
    np.save(tmp_path / "tokens.npy", np.zeros((3, 8), dtype=np.int64))
    data = (tmp_path / "tokens.npy").read_bytes()
    (tmp_path / "tokens.npy").write_bytes(data.replace(old, new, 1))
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "tokens.npy"))
    assert_one_line(excinfo, "tokens.npy: not a readable .npy file (")


def test_npy_corpus_header_promises_more_than_the_file(tmp_path: Path) -> None:
    np.save(tmp_path / "tokens.npy", np.zeros((3, 8), dtype=np.int64))
    data = (tmp_path / "tokens.npy").read_bytes()
    (tmp_path / "tokens.npy").write_bytes(data.replace(b"(3, 8)", b"(3, 9999999999999)", 1))
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus(str(tmp_path / "tokens.npy"))
    assert_one_line(excinfo, "tokens.npy: not a readable .npy file", "numpy.save")


def test_dataset_name_offline(offline: None) -> None:
    with pytest.raises(RulecheckError) as excinfo:
        load_corpus("NeelNanda/pile-10k", tokenizer=object(), bos_token_id=BOS)
    assert_one_line(excinfo, "NeelNanda/pile-10k", "local .npy")


# --------------------------------------------------------------------------------------------
# the same errors through the command line


def extract_error(capsys: pytest.CaptureFixture[str], out: Path, *specs: str) -> str:
    """Run ``rulecheck extract`` on layer 0, head 0; return its one-line error."""
    argv = ["extract", *specs, "--layer", "0", "--heads", "0", "--features", "1"]
    assert main([*argv, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_corpus_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "corpus").mkdir()
    specs = ("--model", "rulecheck-tiny", "--corpus", str(tmp_path / "corpus"))
    err = extract_error(capsys, tmp_path / "out", *specs)
    assert f"{tmp_path / 'corpus'}: is a directory, not a corpus file (fix: " in err


def test_cli_model_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = shutil.copytree(zoo.entry_dir("rulecheck-tiny") / "model", tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"n_heads": -2}))
    specs = [
        *("--model", str(model_dir)),
        *("--sae-in", "rulecheck-tiny:sae_in/L{layer}"),
        *("--sae-out", "rulecheck-tiny:sae_out/L{layer}H{head}"),
        *("--corpus", "rulecheck-tiny:eval"),
    ]
    err = extract_error(capsys, tmp_path / "out", *specs)
    assert f"{model_dir / 'config.json'}: n_heads: expected an integer >= 1, found -2" in err
    assert "(fix: set n_heads to an integer >= 1" in err


def test_cli_sae_metadata_without_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae_dir = shutil.copytree(zoo.entry_dir("rulecheck-tiny") / "sae_in" / "L0", tmp_path / "L0")
    config = json.loads((sae_dir / "cfg.json").read_text())
    del config["metadata"]["sae_lens_version"]
    (sae_dir / "cfg.json").write_text(json.dumps(config))
    specs = ("--model", "rulecheck-tiny", "--sae-in", str(tmp_path / "L{layer}"))
    err = extract_error(capsys, tmp_path / "out", *specs)
    assert f"{sae_dir / 'cfg.json'}: metadata.sae_lens_version: missing beside a metadata" in err
    assert '(fix: add "sae_lens_version": "6.x" to metadata' in err


# --------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprint_tensors_content_not_layout() -> None:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    base = fingerprint_tensors({"w": weight, "b": torch.ones(3)}, {"k": 1})
    assert base.startswith("sha256:")
    assert (
        fingerprint_tensors({"b": torch.ones(3), "w": weight.t().contiguous().t()}, {"k": 1})
        == base
    )
    assert fingerprint_tensors({"w": weight, "b": torch.ones(3)}, {"k": 2}) != base
    assert fingerprint_tensors({"w": weight.double(), "b": torch.ones(3)}, {"k": 1}) != base
    assert fingerprint_tensors({"w": weight.reshape(4, 3), "b": torch.ones(3)}, {"k": 1}) != base
    assert fingerprint_tensors({"v": weight, "b": torch.ones(3)}, {"k": 1}) != base
    if torch.cuda.is_available():
        on_gpu = {"w": weight.cuda(), "b": torch.ones(3, device="cuda")}
        assert fingerprint_tensors(on_gpu, {"k": 1}) == base


def test_fingerprint_sae_ignores_device_but_not_weights() -> None:
    sae = tiny_sae(16, hook_name="blocks.0.hook_resid_pre")
    before = fingerprint_sae(sae)
    sae.cfg.device = "cuda"
    assert fingerprint_sae(sae) == before
    with torch.no_grad():
        sae.b_dec.add_(1.0)
    assert fingerprint_sae(sae) != before
