"""Gemma Scope's and Llama Scope's SAEs, as the README loads them for Gemma-2 2B and
Llama-3.1-8B, from look-alikes written here in their repositories' formats: the registry ids
through sae_lens's own loaders from an offline Hugging Face cache, and the same folders
passed as local paths. Gemma Scope's look-alikes have the real sizes (sae_lens takes ``d_in``
from the repository name and ``d_sae`` from the folder name) with most weights zero; Llama
Scope's are 8x SAEs of a 64-wide model (sae_lens reads its sizes from ``hyperparams.json``)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model

from rulecheck.errors import InvalidSpec
from rulecheck.loading import check_sae, head_view, load_sae

COMMIT = "6f1e5d7c9b8a0f1e2d3c4b5a69788796a5b4c3d2"
GEMMA_RES = "gemma-scope-2b-pt-res-canonical:layer_11/width_16k/canonical"
GEMMA_ATT = "gemma-scope-2b-pt-att-canonical:layer_12/width_16k/canonical"
LLAMA_RES = "llama_scope_lxr_8x:l4r_8x"
LLAMA_ATT = "llama_scope_lxa_8x:l5a_8x"
# registry id: (Hugging Face repository, folder, d_in, d_sae, hook name), as sae_lens reads them
GEMMA = {
    GEMMA_RES: (
        "google/gemma-scope-2b-pt-res",
        "layer_11/width_16k/average_l0_80",
        2304,
        16384,
        "blocks.11.hook_resid_post",
    ),
    GEMMA_ATT: (
        "google/gemma-scope-2b-pt-att",
        "layer_12/width_16k/average_l0_85",
        2048,
        16384,
        "blocks.12.attn.hook_z",
    ),
}
LLAMA_D_MODEL = 64
LLAMA = {
    LLAMA_RES: (
        "fnlp/Llama3_1-8B-Base-LXR-8x",
        "Llama3_1-8B-Base-L4R-8x",
        LLAMA_D_MODEL,
        8 * LLAMA_D_MODEL,
        "blocks.4.hook_resid_post",
    ),
    LLAMA_ATT: (
        "fnlp/Llama3_1-8B-Base-LXA-8x",
        "Llama3_1-8B-Base-L5A-8x",
        LLAMA_D_MODEL,
        8 * LLAMA_D_MODEL,
        "blocks.5.hook_attn_out",
    ),
}
LIVE = 512  # Gemma Scope look-alikes: features with non-zero weights


def _put(cache: Path, repo: str, name: str, write: Callable[[Path], object]) -> Path:
    """Write a file into the Hugging Face cache as ``hf_hub_download`` leaves it: a blob, and a
    link to it in the snapshot of ``refs/main``'s commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    blob = root / "blobs" / hashlib.sha256(name.encode()).hexdigest()
    blob.parent.mkdir(exist_ok=True)
    write(blob)
    link = root / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(blob)
    return link


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed``'s format at the fastest deflate level: the look-alikes are
    mostly zeros, a few MB on disk instead of hundreds."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=True)


def _gemma_arrays(d_in: int, d_sae: int, seed: int) -> dict[str, np.ndarray]:
    """Gemma Scope's params.npz: only the first ``LIVE`` features read and write anything, the
    thresholds sit among the pre-activations."""
    rng = np.random.default_rng(seed)
    live = min(LIVE, d_sae)
    W_enc = np.zeros((d_in, d_sae), np.float32)
    W_enc[:, :live] = rng.standard_normal((d_in, live)) / math.sqrt(d_in)
    W_dec = np.zeros((d_sae, d_in), np.float32)
    W_dec[:live] = rng.standard_normal((live, d_in)) / math.sqrt(d_in)
    return {
        "W_enc": W_enc,
        "W_dec": W_dec,
        "b_enc": (0.3 * rng.standard_normal(d_sae)).astype(np.float32),
        "b_dec": (0.1 * rng.standard_normal(d_in)).astype(np.float32),
        "threshold": rng.uniform(0.1, 0.8, d_sae).astype(np.float32),
    }


def _llama_files(
    d_model: int, d_sae: int, hook: str, scale: float, seed: int
) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Llama Scope's hyperparams.json and checkpoints/final.safetensors (bfloat16), for a
    release whose norm_scaling_factor is ``scale``: the average input norm is
    ``sqrt(d_model) / scale``."""
    g = torch.Generator().manual_seed(seed)
    hyperparams = {
        "d_model": d_model,
        "expansion_factor": d_sae // d_model,
        "d_sae": d_sae,
        "hook_point_in": hook,
        "hook_point_out": hook,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.5 / scale,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {
            "in": math.sqrt(d_model) / scale,
            "out": math.sqrt(d_model) / scale,
        },
        "sparsity_include_decoder_norm": True,
        "top_k": 50,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
    }
    weights = {
        "encoder.weight": torch.randn(d_sae, d_model, generator=g) / math.sqrt(d_model),
        "encoder.bias": 0.3 * torch.randn(d_sae, generator=g),
        "decoder.weight": torch.randn(d_model, d_sae, generator=g) / math.sqrt(d_model),
        "decoder.bias": 0.1 * torch.randn(d_model, generator=g),
    }
    return hyperparams, {k: v.to(torch.bfloat16) for k, v in weights.items()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """An offline Hugging Face cache holding the README's four SAEs, set for the module."""
    import huggingface_hub.constants as hf
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
    from safetensors.torch import save_file

    home = tmp_path_factory.mktemp("hf_home")
    cache = home / "hub"
    files: dict[str, Path] = {}
    for i, (spec, (repo, folder, d_in, d_sae, _)) in enumerate(GEMMA.items()):
        arrays = _gemma_arrays(d_in, d_sae, seed=i)
        files[spec] = _put(cache, repo, f"{folder}/params.npz", lambda p, a=arrays: _save_npz(p, a))
    for i, (spec, (repo, folder, d_in, d_sae, hook)) in enumerate(LLAMA.items()):
        scale = get_norm_scaling_factor(*spec.split(":"))
        hyperparams, weights = _llama_files(d_in, d_sae, hook, scale, seed=10 + i)
        _put(
            cache,
            repo,
            f"{folder}/checkpoints/final.safetensors",
            lambda p, w=weights: save_file(w, str(p)),
        )
        files[spec] = _put(
            cache,
            repo,
            f"{folder}/hyperparams.json",
            lambda p, h=hyperparams: p.write_text(json.dumps(h)),
        )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variables once, when it is first imported
        mp.setattr(hf, "HF_HUB_CACHE", str(cache))
        mp.setattr(hf, "HF_HUB_OFFLINE", True)
        yield cache, files
    shutil.rmtree(home)  # the look-alikes: a few MB on disk


@pytest.fixture(scope="module")
def registry(hub):
    """The README's four registry ids, loaded through sae_lens from the offline cache."""
    return {spec: load_sae(spec) for spec in (*GEMMA, *LLAMA)}


def _gemma_reference(npz: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """JumpReLU from the arrays of params.npz: ``relu(pre)`` where ``pre > threshold``; and the
    pre-activations."""
    with np.load(npz) as p:
        W_enc, b_enc, thr = (p[k] for k in ("W_enc", "b_enc", "threshold"))
    pre = (x.astype(np.float32) @ W_enc).astype(np.float64) + b_enc
    return np.where(pre > thr, np.maximum(pre, 0), 0.0), pre


def test_gemma_scope_registry_ids_load_offline_as_jumprelu_saes(hub, registry):
    """The README's Gemma Scope ids load from the offline cache as sae_lens's JumpReLU SAEs of
    the sizes and hooks sae_lens gives them; ``encode`` is JumpReLU on the npz arrays, the
    per-feature thresholds zeroing some positive pre-activations."""
    _, files = hub
    rng = np.random.default_rng(5)
    for spec, (_, _, d_in, d_sae, hook) in GEMMA.items():
        sae = registry[spec]
        assert sae.cfg.architecture() == "jumprelu"
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (d_in, d_sae)
        assert sae.cfg.metadata.hook_name == hook
        assert sae.cfg.metadata.hook_head_index is None
        assert not sae.cfg.apply_b_dec_to_input
        x = rng.standard_normal((4, d_in))
        want, pre = _gemma_reference(files[spec], x)
        sae_in = torch.from_numpy(x).float()
        if hook.endswith("hook_z"):  # sae_lens flattens hook_z's heads itself
            assert sae.cfg.reshape_activations == "hook_z"
            sae_in = sae_in.unflatten(-1, (8, 256))
        with torch.no_grad():
            got = sae.encode(sae_in).double().numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        assert (want[:, :LIVE] > 0).sum() > 50
        assert ((pre > 0) & (want == 0)).sum() > 50  # cut by the thresholds, not by the relu


def test_llama_scope_registry_ids_load_offline_with_the_normalisation_folded(hub, registry):
    """The README's Llama Scope ids load as JumpReLU SAEs that read raw activations: the
    input is scaled by the release's norm_scaling_factor, the threshold by ``sqrt(d_model) /
    dataset_average_activation_norm.in`` (sae_lens's handling), and ``decode`` undoes the
    scaling."""
    from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor
    from safetensors.torch import load_file

    _, files = hub
    g = torch.Generator().manual_seed(6)
    for spec, (_, _, d_in, d_sae, hook) in LLAMA.items():
        sae = registry[spec]
        assert sae.cfg.architecture() == "jumprelu"
        assert (sae.cfg.d_in, sae.cfg.d_sae) == (d_in, d_sae)
        assert sae.cfg.metadata.hook_name == hook
        assert sae.cfg.normalize_activations == "none"
        assert sae.W_enc.dtype == torch.float32
        hp = json.loads(files[spec].read_text())
        raw = {
            k: v.double()
            for k, v in load_file(files[spec].parent / "checkpoints/final.safetensors").items()
        }
        scale = get_norm_scaling_factor(*spec.split(":"))
        threshold = (
            hp["jump_relu_threshold"]
            * math.sqrt(d_in)
            / hp["dataset_average_activation_norm"]["in"]
        )
        x = torch.randn(4, d_in, generator=g, dtype=torch.float64) / scale
        pre = (x * scale) @ raw["encoder.weight"].T + raw["encoder.bias"]
        want = torch.where(pre > threshold, pre.clamp(min=0), 0.0)
        with torch.no_grad():
            got = sae.encode(x.float()).double()
            recon = sae.decode(want.float()).double()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (want > 0).sum() > 50
        assert ((pre > hp["jump_relu_threshold"]) & (want == 0)).sum() > 50  # the scaled threshold
        want_recon = (want @ raw["decoder.weight"].T + raw["decoder.bias"]) / scale
        torch.testing.assert_close(recon, want_recon, atol=1e-4, rtol=1e-4)


def _gemma_2_2b_on_meta():
    """Gemma-2 2B's TransformerLens config, its weights on the meta device (never allocated)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    cfg = get_pretrained_model_config("gemma-2-2b", device="meta").to_dict()
    return HookedTransformer(HookedTransformerConfig.from_dict(cfg | {"tokenizer_name": None}))


def _tiny_llama(n_layers: int = 6):
    return random_model(
        seed=3,
        normalization_type="RMS",
        n_layers=n_layers,
        d_model=LLAMA_D_MODEL,
        n_heads=4,
        d_head=16,
        n_key_value_heads=2,
        d_mlp=128,
        positional_embedding_type="rotary",
        rotary_dim=16,
        gated_mlp=True,
        act_fn="silu",
    )


def test_check_sae_accepts_the_readme_saes_at_the_readme_layers(registry):
    """``--layer 12`` of Gemma-2 2B takes Gemma Scope's residual SAE of layer 11 as input and
    its attention SAE of layer 12 (all heads) as output; ``--layer 5`` of a Llama-shaped model
    takes Llama Scope's L4R as input and L5A, on ``hook_attn_out``, as output, each head
    reading it through W_O exactly. Other layers are refused."""
    gemma = _gemma_2_2b_on_meta()
    assert (gemma.cfg.d_model, gemma.cfg.n_heads * gemma.cfg.d_head) == (2304, 2048)
    res, att = registry[GEMMA_RES], registry[GEMMA_ATT]
    check_sae(res, gemma, layer=12, head=None, kind="in", spec=GEMMA_RES)
    for head in (None, 0, 7):
        check_sae(att, gemma, layer=12, head=head, kind="out", spec=GEMMA_ATT)
    with pytest.raises(InvalidSpec, match=re.escape("found 'blocks.11.hook_resid_post'")):
        check_sae(res, gemma, layer=11, head=None, kind="in", spec=GEMMA_RES)
    with pytest.raises(InvalidSpec, match=re.escape("found 'blocks.12.attn.hook_z'")):
        check_sae(att, gemma, layer=13, head=None, kind="out", spec=GEMMA_ATT)

    llama = _tiny_llama()
    lxr, lxa = registry[LLAMA_RES], registry[LLAMA_ATT]
    check_sae(lxr, llama, layer=5, head=None, kind="in", spec=LLAMA_RES)
    check_sae(lxa, llama, layer=5, head=2, kind="out", spec=LLAMA_ATT)
    with pytest.raises(InvalidSpec, match=re.escape("found 'blocks.5.hook_attn_out'")):
        check_sae(lxa, llama, layer=4, head=2, kind="out", spec=LLAMA_ATT)
    tokens = torch.randint(1, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    _, cache = llama.run_with_cache(tokens, names_filter="blocks.5.attn.hook_z")
    attn = llama.blocks[5].attn
    z = cache["blocks.5.attn.hook_z"]
    for head in range(llama.cfg.n_heads):
        view = head_view(lxa, llama, 5, head, LLAMA_ATT)
        with torch.no_grad():
            want = lxa.encode(z[:, :, head] @ attn.W_O[head] + attn.b_O)
            torch.testing.assert_close(view.encode(z[:, :, head]), want, atol=1e-4, rtol=1e-4)


def _same_sae(a, b) -> None:
    """Same class, sizes, hook, input handling and weights (bit for bit where the weights are
    Gemma Scope's, read as they are; Llama Scope's normalisation factor may round differently)."""
    assert type(a) is type(b)
    for cfg in (a.cfg, b.cfg):
        assert cfg.normalize_activations in ("none", None)
    fields = ("d_in", "d_sae", "apply_b_dec_to_input", "reshape_activations")
    assert [getattr(a.cfg, f) for f in fields] == [getattr(b.cfg, f) for f in fields]
    assert a.cfg.metadata.hook_name == b.cfg.metadata.hook_name
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if a.cfg.d_sae > 10_000:
            assert torch.equal(state_a[key], state_b[key]), key
        else:
            torch.testing.assert_close(state_a[key], state_b[key], atol=0, rtol=1e-6)


def test_downloaded_folders_load_as_the_registry_ids_do(hub, registry):
    """The folders of the cache, passed as paths (the folder, or the Llama Scope folder's
    hyperparams.json), load to the SAEs sae_lens builds from the registry ids."""
    _, files = hub
    for spec, file in files.items():
        _same_sae(load_sae(str(file.parent)), registry[spec])
    _same_sae(load_sae(str(files[LLAMA_ATT])), registry[LLAMA_ATT])


def test_a_registry_id_missing_from_the_offline_cache_names_the_cache(hub):
    """An id whose files are not in the cache: the error names the cache and the way out."""
    cache, _ = hub
    with pytest.raises(InvalidSpec, match="not in the Hugging Face cache") as err:
        load_sae("gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonical")
    assert str(cache) in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)


def _gemma_folder(root: Path, repo: str, folder: str, arrays: dict[str, np.ndarray]) -> Path:
    directory = root / repo / folder
    directory.mkdir(parents=True)
    np.savez(directory / "params.npz", **arrays)
    return directory


def test_a_gemma_scope_folder_of_a_small_model(tmp_path):
    """A Gemma Scope folder of a 64-wide model: sizes from the arrays, the hook from the
    repository and layer folders (``res`` after the block, ``att`` on hook_z, ``embedding``
    on hook_embed with sae_lens's sqrt(d_model) rescaling), as a tiny Gemma-2 model uses
    them."""
    model = random_model(
        seed=2,
        normalization_type="RMS",
        d_model=64,
        n_heads=4,
        d_head=8,
        n_key_value_heads=2,
        positional_embedding_type="rotary",
        rotary_dim=8,
        attn_scores_soft_cap=50.0,
    )
    res = _gemma_folder(
        tmp_path,
        "gemma-scope-2b-pt-res",
        "layer_0/width_16k/average_l0_9",
        _gemma_arrays(64, 96, 1),
    )
    att = _gemma_folder(
        tmp_path,
        "gemma-scope-2b-pt-att",
        "layer_1/width_16k/average_l0_9",
        _gemma_arrays(32, 80, 2),
    )
    emb_arrays = _gemma_arrays(64, 48, 3)
    emb = _gemma_folder(
        tmp_path, "gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6", emb_arrays
    )
    sae_res, sae_att, sae_emb = (load_sae(str(d)) for d in (res / "params.npz", att, emb))
    assert (sae_res.cfg.d_in, sae_res.cfg.d_sae) == (64, 96)
    assert sae_res.cfg.metadata.hook_name == "blocks.0.hook_resid_post"
    assert sae_res.cfg.metadata.model_name == "gemma-2-2b"
    assert (sae_att.cfg.d_in, sae_att.cfg.metadata.hook_name) == (32, "blocks.1.attn.hook_z")
    assert sae_emb.cfg.metadata.hook_name == "hook_embed"
    torch.testing.assert_close(
        sae_emb.W_enc, torch.from_numpy(emb_arrays["W_enc"]) / 8, atol=0, rtol=1e-6
    )
    check_sae(sae_res, model, layer=1, head=None, kind="in", spec=str(res))
    check_sae(sae_emb, model, layer=0, head=None, kind="in", spec=str(emb))
    check_sae(sae_att, model, layer=1, head=None, kind="out", spec=str(att))
    _, cache = model.run_with_cache(torch.tensor([[0, 5, 9, 3]]))
    x = cache["blocks.0.hook_resid_post"][0].double().numpy()
    want, _ = _gemma_reference(res / "params.npz", x)
    z = cache["blocks.1.attn.hook_z"][0]  # [pos, n_heads, d_head], as the SAE takes it
    want_z, _ = _gemma_reference(att / "params.npz", z.flatten(-2).double().numpy())
    with torch.no_grad():
        got = sae_res.encode(cache["blocks.1.hook_resid_pre"][0]).double().numpy()
        got_z = sae_att.encode(z).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_z, want_z, atol=1e-5, rtol=1e-5)
    assert (want > 0).any() and (want_z > 0).any()


def test_broken_scope_folders_are_refused_with_the_file_and_field(tmp_path):
    """A params.npz that needs pickle, lacks an array or has a misshapen one; a folder whose
    path does not say the hook; a hyperparams.json without a field; weights of another
    size: each refused as an InvalidSpec naming the file and the field."""
    good = _gemma_arrays(16, 24, 0)
    cases = {
        "pickled": good | {"b_dec": np.array([None] * 16, dtype=object)},
        "missing": {k: v for k, v in good.items() if k != "threshold"},
        "misshapen": good | {"b_enc": good["b_enc"][:5]},
    }
    for name, arrays in cases.items():
        directory = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / name
        directory.mkdir(parents=True)
        _save_npz(directory / "params.npz", arrays)
        with pytest.raises(InvalidSpec) as err:
            load_sae(str(directory))
        assert str(directory / "params.npz") in str(err.value)
        if name == "pickled":
            assert "allow_pickle=False" in str(err.value)
        else:
            assert err.value.field == ("threshold" if name == "missing" else "b_enc")
    anonymous = _gemma_folder(tmp_path, "downloads", "layer_3", good)
    with pytest.raises(InvalidSpec, match="cannot tell which hook"):
        load_sae(str(anonymous))
    no_layer = _gemma_folder(tmp_path, "gemma-scope-2b-pt-att", "width_16k", good)
    with pytest.raises(InvalidSpec, match="no layer_N folder"):
        load_sae(str(no_layer))

    from safetensors.torch import save_file

    hyperparams, weights = _llama_files(16, 32, "blocks.2.hook_attn_out", 4.0, seed=0)
    directory = tmp_path / "Llama3_1-8B-Base-L2A-8x"
    (directory / "checkpoints").mkdir(parents=True)
    save_file(weights, str(directory / "checkpoints" / "final.safetensors"))
    for field, value in [("hook_point_in", None), ("d_sae", 48)]:
        broken = {k: v for k, v in hyperparams.items() if k != field}
        if value is not None:
            broken[field] = value
        (directory / "hyperparams.json").write_text(json.dumps(broken))
        with pytest.raises(InvalidSpec) as err:
            load_sae(str(directory))
        assert err.value.field == field if value is None else err.value.field.endswith("weight")
    (directory / "hyperparams.json").write_text(json.dumps(hyperparams))
    assert load_sae(str(directory)).cfg.metadata.hook_name == "blocks.2.hook_attn_out"
