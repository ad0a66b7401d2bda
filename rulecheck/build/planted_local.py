"""``planted-local``: a one-layer attention-only model whose one head fires a feature at
``close`` only when ``open`` is 1 to ``WINDOW`` tokens before it: a rule bounded in distance.

Built by code, no training, like ``planted``. The residual stream holds a one-hot word and a
one-hot position. The head's attention logit from a ``close`` at ``t`` to a token at ``i`` is
``NEAR`` when ``1 <= t - i <= WINDOW`` (read from the positions), plus ``HIT`` when that token
is ``open`` (read from the words), plus ``SINK`` for BOS: an ``open`` in the window takes all
the attention, one further back loses it to the tokens in the window. Every other query
attends to BOS (``REST`` above any positional logit), so the feature fires at ``close`` only.
``open`` alone writes the value the output SAE's feature 0 reads (threshold ``THRESHOLD``).

The input SAE has one feature per word (it reads the word dimensions only). The corpus places
``open`` before ``close`` at distances drawn from 1 to ``3 * WINDOW``, so that about half the
``close`` tokens after an ``open`` are too far: read without its bound, ``[open] ... [close]``
is right at only part of the ``close`` positions where it fires. ``ground_truth.json`` holds
the rule and its distances.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from sae_lens import StandardSAE
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rulecheck.build import planted
from rulecheck.build.planted import BOS, FILLER
from rulecheck.loading._common import MODEL_DEPRECATED, without_warning

VERSION = 1
VOCAB = [BOS, "<unk>", "open", "close", *FILLER]
SEQ_LEN = 32
N_SEQUENCES = 3000
WINDOW = 3  # the feature fires at close when open is 1..WINDOW tokens before it
D_HEAD = SEQ_LEN + 2  # the positional band, then the value dimension and the rest dimension
NEAR = 20.0  # attention logit of a token in the window, from close
HIT = 10.0  # attention logit of open, from close
SINK = 4.0  # attention logit of BOS, from close
REST = 40.0  # attention logit of BOS from every other query: above any positional logit
THRESHOLD = 0.6
VALUE_DIM, REST_DIM = SEQ_LEN, SEQ_LEN + 1

GROUND_TRUTH = {
    "layer": 0,
    "features": [
        {
            "head": 0,
            "feature": 0,
            "skipgrams": [
                {"key": "open", "query": "close", "min_distance": 1, "max_distance": WINDOW}
            ],
        }
    ],
    "dead": [{"head": 0, "feature": 1}],
}


def token_id(word: str) -> int:
    return VOCAB.index(word)


def build_model() -> HookedTransformer:
    """The planted weights (float32, CPU): words in the first ``len(VOCAB)`` dimensions of
    the residual stream, positions in the next ``SEQ_LEN``."""
    n_words = len(VOCAB)
    d = n_words + SEQ_LEN
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=d,
        n_heads=1,
        d_head=D_HEAD,
        d_vocab=n_words,
        n_ctx=SEQ_LEN,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        positional_embedding_type="standard",
        seed=0,
    )
    with without_warning(MODEL_DEPRECATED):
        model = HookedTransformer(cfg)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    sd["embed.W_E"][:, :n_words] = torch.eye(n_words)
    sd["pos_embed.W_pos"][:, n_words:] = torch.eye(SEQ_LEN)
    g = torch.Generator().manual_seed(1)
    sd["unembed.W_U"] = torch.randn(d, n_words, generator=g) / math.sqrt(d)
    W_Q, W_K, W_V = (sd[f"blocks.0.attn.{w}"][0] for w in ("W_Q", "W_K", "W_V"))
    scale = math.sqrt(D_HEAD)  # attention logits are divided by it
    close, opened, bos = token_id("close"), token_id("open"), token_id(BOS)
    # close at t: position t reads band dimension t; a key at i writes NEAR on dimensions
    # i + 1 .. i + WINDOW, so the product is NEAR exactly in the window. Only close's query
    # has a word part; the positional part is every query's, and REST outweighs it elsewhere.
    for t in range(SEQ_LEN):
        W_Q[n_words + t, t] = scale
        for dist in range(1, WINDOW + 1):
            if t + dist < SEQ_LEN:
                W_K[n_words + t, t + dist] = NEAR
    W_Q[close, VALUE_DIM] = scale
    W_K[opened, VALUE_DIM] = HIT
    W_K[bos, VALUE_DIM] = SINK
    W_Q[[i for i in range(n_words) if i != close], REST_DIM] = scale
    W_K[bos, REST_DIM] = REST
    W_V[opened, VALUE_DIM] = 1.0
    model.load_state_dict(sd)
    return model


def build_sae_in() -> StandardSAE:
    """One feature per word, in token order: feature j fires 1.0 on token j (the position
    dimensions are not read)."""
    n_words = len(VOCAB)
    W_dec = torch.zeros(n_words, n_words + SEQ_LEN)
    W_dec[:, :n_words] = torch.eye(n_words)
    return planted.word_sae(W_dec, "planted-local")


def build_sae_out() -> StandardSAE:
    """The head's SAE on ``blocks.0.attn.hook_z``: feature 0 reads the value dimension (open
    attended to), feature 1 a dimension nothing writes (dead)."""
    W_enc = torch.zeros(D_HEAD, 2)
    W_enc[VALUE_DIM, 0] = 1.0
    W_enc[REST_DIM, 1] = 1.0  # the values never write it
    return planted.head_sae(W_enc, torch.full((2,), THRESHOLD), 0, "planted-local")


def place_near(
    row: np.ndarray, rng: np.random.Generator, key: int, query: int, window: int
) -> None:
    """In 80% of rows, ``query`` with ``key`` 1 to ``3 * window`` tokens before it (so that
    about two thirds of the pairs lie beyond the window)."""
    if rng.random() < 0.8:
        dist = int(rng.integers(1, 3 * window + 1))
        t = int(rng.integers(1 + dist, len(row)))
        row[t - dist], row[t] = key, query


def build_corpus(n: int = N_SEQUENCES, seed: int = 0) -> np.ndarray:
    """``[n, SEQ_LEN]`` int32 tokens, BOS first, filler words; in most sequences a ``close``
    with an ``open`` 1 to ``3 * WINDOW`` tokens before it, and in some an extra ``open`` or
    ``close`` alone at a random place."""
    rng = np.random.default_rng(seed)
    filler = np.array([token_id(w) for w in FILLER])
    tokens = filler[rng.integers(0, len(filler), size=(n, SEQ_LEN))]
    tokens[:, 0] = token_id(BOS)
    for row in tokens:
        place_near(row, rng, token_id("open"), token_id("close"), WINDOW)
        for word in ("open", "close"):
            if rng.random() < 0.2:
                row[int(rng.integers(1, SEQ_LEN))] = token_id(word)
    return tokens.astype(np.int32)


def build(directory: Path) -> Path:
    """Write the whole zoo entry (model, SAEs, corpus, ground truth) into ``directory``."""
    truth = dict(GROUND_TRUTH, input_features={w: j for j, w in enumerate(VOCAB)})
    return planted.write_entry(
        directory,
        build_model(),
        VOCAB,
        build_sae_in(),
        {0: build_sae_out()},
        build_corpus(),
        truth,
    )


def ensure_built(directory: Path) -> Path:
    """Build the entry once, atomically, and reuse it afterwards."""
    return planted.ensure_built(directory, build, VERSION)
