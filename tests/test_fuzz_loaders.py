"""Loader fuzzing: random bytes, and mutations of valid files, through the real loaders. Whatever
the input, only a one-line RulecheckError may come out.

Each test runs ``RULECHECK_FUZZ_EXAMPLES`` examples (default 50); a long run is
``RULECHECK_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz_loaders.py``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import random_model, random_sae
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from rulecheck.errors import RulecheckError
from rulecheck.loading import check_sae, load_corpus, load_model, load_sae, save_model

EXAMPLES = int(os.environ.get("RULECHECK_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
BOS, D_VOCAB = 0, 40
WORDS = ["hello", "world", "the", "cat", "sat"]


class Valid:
    """The files of small valid models (GPT-2 style; rotary, RMSNorm, gated MLP, grouped
    query attention), SAE and corpus, the first model loaded, and a tokenizer."""

    def __init__(
        self,
        model: HookedTransformer,
        models: list[dict[str, bytes]],
        sae_files: dict[str, bytes],
        paper_files: dict[str, bytes],
        npy: bytes,
        tokenizer: PreTrainedTokenizerFast,
    ) -> None:
        self.model, self.models, self.sae_files = model, models, sae_files
        self.paper_files, self.npy, self.tokenizer = paper_files, npy, tokenizer

    def __repr__(self) -> str:  # Hypothesis prints it with every failing example
        return "Valid(...)"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Valid:
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = save_model(random_model(), root / "model")
    modern = HookedTransformerConfig(
        **dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=D_VOCAB, n_ctx=16),
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        n_key_value_heads=1,
    )
    modern_dir = save_model(HookedTransformer(modern), root / "modern")
    sae = random_sae(8, 32, "blocks.0.attn.hook_z", head=1)
    sae.save_model(root / "sae")
    paper = {"act_name": "blocks.0.attn.hook_z", "layer": 0, "head": 1, "per_head": True}
    paper |= {"act_size": 8, "dict_size": 32, "enc_dtype": "fp32", "model_name": "tiny"}
    (root / "L0H1_cfg.json").write_text(json.dumps(paper))
    torch.save({k: v.detach() for k, v in sae.state_dict().items()}, root / "L0H1.pt")
    tokens = np.random.default_rng(0).integers(1, D_VOCAB, size=(4, 16))
    tokens[:, 0] = BOS
    np.save(root / "tokens.npy", tokens)
    backend = Tokenizer(models.WordLevel({"<|endoftext|>": BOS, "[UNK]": 1}, unk_token="[UNK]"))
    backend.add_tokens(WORDS)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>")
    model = load_model(str(model_dir))
    load_model(str(modern_dir))
    for spec in (root / "sae", root / "L0H1"):  # the unmutated files load and fit the model
        check_sae(load_sae(str(spec)), model, layer=0, head=1, kind="out", spec=str(spec))
    load_corpus(str(root / "tokens.npy"), bos_token_id=BOS, d_vocab=D_VOCAB)
    return Valid(
        model=model,
        models=[{p.name: p.read_bytes() for p in d.iterdir()} for d in (model_dir, modern_dir)],
        sae_files={p.name: p.read_bytes() for p in (root / "sae").iterdir()},
        paper_files={p.name: p.read_bytes() for p in root.glob("L0H1*")},
        npy=(root / "tokens.npy").read_bytes(),
        tokenizer=tokenizer,
    )


def only_rulecheck_errors(load: Callable[[], object], *, where: Path) -> None:
    """Run ``load``: it may succeed or raise a RulecheckError, nothing else, its message one
    line that names ``where`` (the file, or the directory of the files) and a fix."""
    try:
        load()
    except RulecheckError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1, message
        assert message.startswith(str(where)) and "(fix: " in message, message


@contextlib.contextmanager
def written(files: Mapping[str, bytes]) -> Iterator[Path]:
    """A fresh directory holding ``files``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="rulecheck-fuzz-") as directory:
        for name, data in files.items():
            (Path(directory) / name).write_bytes(data)
        yield Path(directory)


# --------------------------------------------------------------------------------------------
# strategies

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, 1, -1, -2, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "LN", "RMS", "LNPre", "gelu", "float16", "int64", "rotary", "alibi"])
    | st.sampled_from(["global", "local", "6.0.0", "5.0.0", "topk", "jumprelu", "hook_z"])
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=6,
)


def _key_paths(data: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    if isinstance(data, dict):
        for key, value in data.items():
            paths.append((*prefix, key))
            paths += _key_paths(value, (*prefix, key))
    return paths


@st.composite
def mutated_json(draw: st.DrawFn, valid: Mapping[str, Any]) -> bytes:
    """``valid`` with one to three keys (nested ones too) deleted or set to another value."""
    data = copy.deepcopy(dict(valid))
    for _ in range(draw(st.integers(1, 3))):
        paths = _key_paths(data)
        if not paths:
            break
        *parents, key = draw(st.sampled_from(paths))
        parent = data
        for name in parents:
            parent = parent[name]
        if draw(st.booleans()):
            del parent[key]
        else:
            parent[key] = draw(JSON_VALUES)
    return json.dumps(data, allow_nan=True).encode()


@st.composite
def corrupted(draw: st.DrawFn, data: bytes, header: int) -> bytes:
    """``data`` with up to four bytes flipped (most in the first ``header`` bytes), maybe cut."""
    out = bytearray(data)
    positions = st.integers(0, min(header, len(out)) - 1) | st.integers(0, len(out) - 1)
    for _ in range(draw(st.integers(0, 4))):
        out[draw(positions)] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        out = out[: draw(st.integers(0, len(out)))]
    return bytes(out)


def safetensors_header(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def bytes_of(data: bytes, header: int) -> st.SearchStrategy[bytes]:
    """Random bytes, or ``data`` corrupted."""
    return st.binary(max_size=2 * len(data) if len(data) < 512 else 512) | corrupted(data, header)


# --------------------------------------------------------------------------------------------
# models


def _load_model_with(files: dict[str, bytes], name: str, data: bytes) -> None:
    with written(files | {name: data}) as directory:
        only_rulecheck_errors(lambda: load_model(str(directory)), where=directory)


@FUZZ
@given(data=st.data())
def test_model_config_mutations(valid: Valid, data: st.DataObject) -> None:
    files = data.draw(st.sampled_from(valid.models))
    config = json.loads(files["config.json"])
    _load_model_with(files, "config.json", data.draw(mutated_json(config)))


@FUZZ
@given(data=st.data())
def test_model_config_bytes(valid: Valid, data: st.DataObject) -> None:
    files = data.draw(st.sampled_from(valid.models))
    raw = files["config.json"]
    _load_model_with(files, "config.json", data.draw(bytes_of(raw, len(raw))))


@FUZZ
@given(data=st.data())
def test_model_weights_bytes(valid: Valid, data: st.DataObject) -> None:
    files = data.draw(st.sampled_from(valid.models))
    raw = files["model.safetensors"]
    _load_model_with(files, "model.safetensors", data.draw(bytes_of(raw, safetensors_header(raw))))


# --------------------------------------------------------------------------------------------
# SAEs


def _load_sae_with(valid: Valid, name: str, data: bytes, *, paper: bool = False) -> None:
    files = valid.paper_files if paper else valid.sae_files
    with written(files | {name: data}) as directory:

        def load() -> None:
            sae = load_sae(str(directory / "L0H1" if paper else directory))
            check_sae(sae, valid.model, layer=0, head=1, kind="out", spec=str(directory))

        only_rulecheck_errors(load, where=directory)


@FUZZ
@given(data=st.data())
def test_sae_config_mutations(valid: Valid, data: st.DataObject) -> None:
    config = json.loads(valid.sae_files["cfg.json"])
    _load_sae_with(valid, "cfg.json", data.draw(mutated_json(config)))


@FUZZ
@given(data=st.data())
def test_sae_config_bytes(valid: Valid, data: st.DataObject) -> None:
    raw = valid.sae_files["cfg.json"]
    _load_sae_with(valid, "cfg.json", data.draw(bytes_of(raw, len(raw))))


@FUZZ
@given(data=st.data())
def test_sae_weights_bytes(valid: Valid, data: st.DataObject) -> None:
    raw = valid.sae_files["sae_weights.safetensors"]
    name = "sae_weights.safetensors"
    _load_sae_with(valid, name, data.draw(bytes_of(raw, safetensors_header(raw))))


@FUZZ
@given(data=st.data())
def test_paper_sae_config_mutations(valid: Valid, data: st.DataObject) -> None:
    config = json.loads(valid.paper_files["L0H1_cfg.json"])
    _load_sae_with(valid, "L0H1_cfg.json", data.draw(mutated_json(config)), paper=True)


@FUZZ
@given(data=st.data())
def test_paper_sae_weights_bytes(valid: Valid, data: st.DataObject) -> None:
    raw = valid.paper_files["L0H1.pt"]
    _load_sae_with(valid, "L0H1.pt", data.draw(bytes_of(raw, 512)), paper=True)


# --------------------------------------------------------------------------------------------
# corpora

TOKEN_DTYPES = ("i1", "i2", "i4", ">i8", "<i8", "u1", "u2", "u4", "u8")
OTHER_DTYPES = ("f2", "f4", "f8", "?", "c8", "m8[s]", "M8[D]", "U3", "S2", "O")
NPY_DTYPES = st.sampled_from(TOKEN_DTYPES) | st.sampled_from(OTHER_DTYPES)


def _load_npy(valid: Valid, data: bytes) -> None:
    with written({"tokens.npy": data}) as directory:
        path = directory / "tokens.npy"
        load = functools.partial(load_corpus, str(path), bos_token_id=BOS, d_vocab=D_VOCAB)
        only_rulecheck_errors(load, where=path)


@FUZZ
@given(data=st.data())
def test_npy_corpus_bytes(valid: Valid, data: st.DataObject) -> None:
    _load_npy(valid, data.draw(bytes_of(valid.npy, 128)))


def npy_arrays(dtype: str) -> st.SearchStrategy[np.ndarray]:
    shapes = npst.array_shapes(min_dims=0, max_dims=3, min_side=0)
    if dtype == "O":  # objects numpy.save can pickle
        return npst.arrays(dtype, shapes, elements=st.none() | st.integers() | st.text())
    return npst.arrays(dtype, shapes)


@FUZZ
@given(array=NPY_DTYPES.flatmap(npy_arrays))
def test_npy_corpus_arrays(valid: Valid, array: np.ndarray) -> None:
    with written({}) as directory:
        np.save(directory / "tokens.npy", array, allow_pickle=True)
        _load_npy(valid, (directory / "tokens.npy").read_bytes())


@FUZZ
@given(
    suffix=st.sampled_from([".txt", ".jsonl"]),
    body=st.binary(max_size=200)
    | st.lists(JSON_VALUES.map(lambda v: json.dumps({"text": v}))).map(
        lambda lines: "\n".join(lines).encode()
    )
    | st.sampled_from([b'{"text": "\\ud800 hello world"}', b"hello \xed\xa0\x80 world\n"]),
)
def test_text_corpus_bytes(valid: Valid, suffix: str, body: bytes) -> None:
    with written({f"docs{suffix}": body}) as directory:
        path = directory / f"docs{suffix}"
        load = functools.partial(load_corpus, str(path), tokenizer=valid.tokenizer, seq_len=3)
        only_rulecheck_errors(load, where=path)


# --------------------------------------------------------------------------------------------
# the measurements beside a rulebook

MEASURED_BOOK = b"""\
rulecheck: 2
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    skipgrams:
      - "[if] ... [then]"
    absence:
      - "[if] ... [then] unless [unless]"
"""


def _measured() -> dict[str, Any]:
    """The first feature of a shipped book's measurements, as feature 1 of ``MEASURED_BOOK``."""
    root = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny" / "L0H0.measured.json"
    data = json.loads(root.read_text())
    feature = {**data["features"][0], "feature": 1, "absence": [{"drop": 0.5}]}
    return {**data, "features": [feature]}


@FUZZ
@given(data=st.data())
def test_measured_json_mutations(data: st.DataObject) -> None:
    from rulecheck.rulebook import load_rulebook

    body = data.draw(
        mutated_json(_measured())
        | st.binary(max_size=64)
        | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    )
    with written({"L0H0.yaml": MEASURED_BOOK, "L0H0.measured.json": body}) as directory:
        load = functools.partial(load_rulebook, directory / "L0H0.yaml", measurements=True)
        only_rulecheck_errors(load, where=directory)
