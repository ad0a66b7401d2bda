"""``planted-rotary``: the modern family's planted model. One attention-only layer with rotary
positions on every dimension of its heads (GPT-NeoX's pairing, base 10,000), grouped-query
attention (four query heads, two key/value heads: heads 0 and 1 read key/value head 0, heads 2
and 3 key/value head 1) and RMSNorm, whose weights implement known rules:

- L0H0 feature 0: ``[open] ... [close]`` with ``open`` 1 to ``WINDOW`` tokens before
  ``close``: a local rule. ``close``'s query meets every token's key on the eight fastest rotary
  pairs (a constant carrier dimension of the residual) in a kernel whose logit is ``NEAR`` at
  distances 1 to ``WINDOW`` and at most 0 at every other distance of the context
  (``position_kernel``); ``open`` adds ``HIT`` on a slow pair, so an ``open`` in the window takes
  the attention and one further back loses it to the tokens in the window.
- L0H1 feature 0: ``[if] ... [then]`` at any distance (a slow pair: its rotation over the
  context is below 0.1%), with ``unless`` a distractor key for ``then`` (a higher logit, a
  slightly negative value): an absence rule, as in ``planted``.
- L0H2 feature 0: counting, as in ``planted``: ``score`` attends to ``games`` and to BOS with
  equal logits ``COUNT`` on a slow pair (any distance), so the feature (threshold 0.6 on the
  value share ``n / (n + 1)``) turns on when ``games`` occurs at least twice before ``score``
  and grows with the count: threshold count 2.
- L0H3 feature 0: ``[games] ... [score]`` at any distance, a presence rule from the same keys
  and values as head 2's count: its query reads another slow pair of key/value head 1, on
  which ``games`` outweighs BOS (``HIT`` against ``SINK``), so one ``games`` is enough.
- Feature 1 of each head is dead. Every query that is no rule's attends to BOS.

Built by code, no training, like ``planted``; ``ground_truth.json`` holds the rules.
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
from rulecheck.build.planted_local import place_near
from rulecheck.loading._common import MODEL_DEPRECATED, without_warning

VERSION = 2
# the counting words go last, so that the other words keep their token ids and input features
VOCAB = [BOS, "<unk>", "open", "close", "if", "then", "unless", *FILLER, "games", "score"]
SEQ_LEN = 32
N_SEQUENCES = 3000
WINDOW = 3
D_HEAD = 32  # 16 rotary pairs: dimension p with p + 16
BASE = 10_000
KERNEL_PAIRS = range(8)  # the fastest pairs carry the local kernel
# slow pairs, content at any distance; of key/value head 0, then of key/value head 1
OPEN_PAIR, IF_PAIR, REST_PAIR = 12, 13, 14
COUNT_PAIR, SEEN_PAIR = 15, 13  # score counting games (head 2), seeing one (head 3)
NEAR = 20.0  # the kernel's logit in the window: NEAR to NEAR + 6
HIT = 15.0  # logit of open from close, of if from then, of games from score in head 3
STEAL = 16.0  # logit of unless from then: e times if's attention per copy
STEAL_VALUE = -0.01
SINK = 4.0  # logit of BOS from close, then and head 3's score
REST = 30.0  # logit of BOS from every other query
COUNT = 12.0  # logit of BOS and of games from head 2's score
THRESHOLD = 0.6  # of the local, counting and presence features
ABSENCE_THRESHOLD = 0.05  # of the feature with the absence rule
OPEN_VALUE, IF_VALUE, GAMES_VALUE, DEAD_VALUE = 0, 1, 2, D_HEAD - 1  # read by the output SAEs
N_HEADS, N_KV_HEADS = 4, 2
COUNT_SHARE = 0.6  # share of the sequences with a score, after 0 to MAX_GAMES games
MAX_GAMES = 4

GROUND_TRUTH = {
    "layer": 0,
    "features": [
        {
            "head": 0,
            "feature": 0,
            "skipgrams": [
                {"key": "open", "query": "close", "min_distance": 1, "max_distance": WINDOW}
            ],
        },
        {
            "head": 1,
            "feature": 0,
            "skipgrams": [{"key": "if", "query": "then"}],
            "absence": [{"key": "if", "query": "then", "distractor": "unless"}],
        },
        {
            "head": 2,
            "feature": 0,
            "skipgrams": [{"key": "games", "query": "score"}],
            "counting": [{"key": "games", "query": "score", "threshold_count": 2}],
        },
        {"head": 3, "feature": 0, "skipgrams": [{"key": "games", "query": "score"}]},
    ],
    "dead": [{"head": h, "feature": 1} for h in range(N_HEADS)],
}


def token_id(word: str) -> int:
    return VOCAB.index(word)


def position_kernel(n_ctx: int = SEQ_LEN) -> tuple[np.ndarray, np.ndarray]:
    """Query coefficients ``(a, b)`` on ``KERNEL_PAIRS`` against a key ``(1, 0)`` on each
    pair, such that the logit at distance ``d``, ``sum_p a_p cos(theta_p d) + b_p
    sin(theta_p d)``, is within ``[NEAR, NEAR + 6]`` for ``1 <= d <= WINDOW`` and at most 0 at
    every other distance below ``n_ctx``: a reweighted ridge least-squares fit, deterministic
    (the query's second coordinate of pair ``p`` is ``-b_p``: rotation by ``theta_p d``)."""
    theta = BASE ** (-np.arange(D_HEAD // 2) / (D_HEAD // 2))[list(KERNEL_PAIRS)]
    d = np.arange(n_ctx)
    basis = np.concatenate([np.cos(np.outer(d, theta)), np.sin(np.outer(d, theta))], 1)
    inside = (d >= 1) & (d <= WINDOW)
    target = np.where(inside, NEAR + 3.0, -8.0)
    weight = np.ones(n_ctx)
    for _ in range(1000):
        a = basis * weight[:, None]
        coef = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ (target * weight))
        f = basis @ coef
        wrong = np.where(inside, (f < NEAR) | (f > NEAR + 6), f > 0)
        if not wrong.any():
            n = len(theta)
            return coef[:n], coef[n:]
        weight = weight + 0.5 * wrong
    raise RuntimeError("no position kernel fits the window")


def build_model() -> HookedTransformer:
    """The planted weights (float32, CPU): words one-hot in the first ``len(VOCAB)``
    dimensions of the residual, a carrier dimension (1 on every token) last."""
    n_words = len(VOCAB)
    d_model = n_words + 1
    carrier = n_words
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=d_model,
        n_heads=N_HEADS,
        n_key_value_heads=N_KV_HEADS,
        d_head=D_HEAD,
        d_vocab=n_words,
        n_ctx=SEQ_LEN,
        attn_only=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=D_HEAD,
        rotary_base=BASE,
        act_fn="silu",
        seed=0,
    )
    with without_warning(MODEL_DEPRECATED):
        model = HookedTransformer(cfg)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if "rotary" not in k}
    sd["embed.W_E"][:, :n_words] = torch.eye(n_words)
    sd["embed.W_E"][:, carrier] = 1.0
    # RMSNorm divides each token (a word and the carrier: norm sqrt 2) by sqrt(2 / d_model);
    # its weight undoes that, so the head reads the one-hot word and the carrier as they are
    sd["blocks.0.ln1.w"] = torch.full((d_model,), math.sqrt(2 / d_model))
    sd["ln_final.w"] = torch.ones(d_model)
    g = torch.Generator().manual_seed(1)
    sd["unembed.W_U"] = torch.randn(d_model, n_words, generator=g) / math.sqrt(d_model)
    W_Q = sd["blocks.0.attn.W_Q"]
    W_K, W_K1 = sd["blocks.0.attn._W_K"]  # key/value head 0 (heads 0, 1) and 1 (heads 2, 3)
    W_V, W_V1 = sd["blocks.0.attn._W_V"]
    scale = math.sqrt(D_HEAD)
    half = D_HEAD // 2
    close, then = token_id("close"), token_id("then")
    cos_part, sin_part = position_kernel()
    for p, a, b in zip(KERNEL_PAIRS, cos_part, sin_part, strict=True):
        W_K[carrier, p] = 1.0
        W_Q[0, close, p], W_Q[0, close, p + half] = a * scale, -b * scale
    W_Q[0, close, OPEN_PAIR] = scale
    W_K[token_id("open"), OPEN_PAIR] = HIT
    W_K[token_id(BOS), OPEN_PAIR] = SINK
    W_Q[1, then, IF_PAIR] = scale
    W_K[token_id("if"), IF_PAIR] = HIT
    W_K[token_id("unless"), IF_PAIR] = STEAL
    W_K[token_id(BOS), IF_PAIR] = SINK
    for head, query in ((0, close), (1, then)):
        W_Q[head, [i for i in range(n_words) if i != query], REST_PAIR] = scale
    W_K[token_id(BOS), REST_PAIR] = REST
    W_V[token_id("open"), OPEN_VALUE] = 1.0
    W_V[token_id("if"), IF_VALUE] = 1.0
    W_V[token_id("unless"), IF_VALUE] = STEAL_VALUE
    score, games = token_id("score"), token_id("games")
    W_Q[2, score, COUNT_PAIR] = scale
    W_K1[games, COUNT_PAIR] = COUNT
    W_K1[token_id(BOS), COUNT_PAIR] = COUNT
    W_Q[3, score, SEEN_PAIR] = scale
    W_K1[games, SEEN_PAIR] = HIT
    W_K1[token_id(BOS), SEEN_PAIR] = SINK
    W_Q[2:, [i for i in range(n_words) if i != score], REST_PAIR] = scale
    W_K1[token_id(BOS), REST_PAIR] = REST
    W_V1[games, GAMES_VALUE] = 1.0
    model.load_state_dict(sd, strict=False)
    return model


def build_sae_in() -> StandardSAE:
    """One feature per word, in token order (the carrier dimension is not read)."""
    n_words = len(VOCAB)
    W_dec = torch.zeros(n_words, n_words + 1)
    W_dec[:, :n_words] = torch.eye(n_words)
    return planted.word_sae(W_dec, "planted-rotary")


def build_sae_out(head: int) -> StandardSAE:
    """Head ``head``'s SAE on ``blocks.0.attn.hook_z``: feature 0 reads its rule's value
    dimension (heads 2 and 3 the same one, of their shared key/value head), feature 1 one
    nothing writes (dead)."""
    W_enc = torch.zeros(D_HEAD, 2)
    W_enc[(OPEN_VALUE, IF_VALUE, GAMES_VALUE, GAMES_VALUE)[head], 0] = 1.0
    W_enc[DEAD_VALUE, 1] = 1.0
    thresholds = torch.full((2,), ABSENCE_THRESHOLD if head == 1 else THRESHOLD)
    return planted.head_sae(W_enc, thresholds, head, "planted-rotary")


def place_count(row: np.ndarray, rng: np.random.Generator, filler: np.ndarray) -> None:
    """In ``COUNT_SHARE`` of rows, a ``score`` with 0 to ``MAX_GAMES`` copies of ``games``
    before it (and in a quarter of those one after it), all on filler words: the rules
    placed earlier keep their tokens."""
    if rng.random() >= COUNT_SHARE:
        return
    free = np.flatnonzero(np.isin(row, filler))
    free = free[free >= 1]
    t = int(rng.choice(free[free >= MAX_GAMES + 1]))
    before, after = free[free < t], free[free > t]
    n = min(int(rng.integers(0, MAX_GAMES + 1)), len(before))
    row[t] = token_id("score")
    row[rng.choice(before, n, replace=False)] = token_id("games")
    if len(after) and rng.random() < 0.25:
        row[int(rng.choice(after))] = token_id("games")


def build_corpus(n: int = N_SEQUENCES, seed: int = 0) -> np.ndarray:
    """``[n, SEQ_LEN]`` int32 tokens, BOS first, filler words; in most sequences a ``close``
    with an ``open`` 1 to ``3 * WINDOW`` tokens before it, in half of them an ``if`` ... ``then``
    at any distance (an ``unless`` between them in a fifth of those), here and there one of
    those rule words alone, and in ``COUNT_SHARE`` of them a ``score`` after 0 to
    ``MAX_GAMES`` copies of ``games`` (``place_count``, from a random stream of its own)."""
    rng = np.random.default_rng(seed)
    counting = np.random.default_rng([seed, 1])
    filler = np.array([token_id(w) for w in FILLER])
    tokens = filler[rng.integers(0, len(filler), size=(n, SEQ_LEN))]
    tokens[:, 0] = token_id(BOS)
    for row in tokens:
        if rng.random() < 0.5:
            i, t = sorted(int(x) for x in rng.choice(np.arange(1, SEQ_LEN), 2, replace=False))
            row[i], row[t] = token_id("if"), token_id("then")
            if t - i > 1 and rng.random() < 0.2:
                row[int(rng.integers(i + 1, t))] = token_id("unless")
        place_near(row, rng, token_id("open"), token_id("close"), WINDOW)
        for word in ("open", "close", "if", "then"):
            if rng.random() < 0.1:
                row[int(rng.integers(1, SEQ_LEN))] = token_id(word)
        place_count(row, counting, filler)
    return tokens.astype(np.int32)


def build(directory: Path) -> Path:
    """Write the whole zoo entry (model, SAEs, corpus, ground truth) into ``directory``."""
    truth = dict(GROUND_TRUTH, input_features={w: j for j, w in enumerate(VOCAB)})
    saes = {head: build_sae_out(head) for head in range(N_HEADS)}
    return planted.write_entry(
        directory, build_model(), VOCAB, build_sae_in(), saes, build_corpus(), truth
    )


def ensure_built(directory: Path) -> Path:
    """Build the entry once, atomically, and reuse it afterwards."""
    return planted.ensure_built(directory, build, VERSION)
