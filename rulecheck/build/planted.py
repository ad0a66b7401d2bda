"""``planted``: a one-layer attention-only model whose weights implement known rules.

Built by code, no training. Words are one-hot embeddings; the input SAE has one feature per
word, in a shuffled order. Each head has a per-head output SAE whose features read one
direction of ``hook_z``:

- L0H0 feature 1: ``[if] ... [then]`` or ``[when] ... [do]``; ``unless`` is a distractor key
  for ``then`` (higher attention score, slightly negative value score): an absence rule whose
  drop grows with the number of copies (about 0.78, 0.90, 0.95, 0.97 for 1 to 4), each copy
  taking attention from ``if``.
- L0H0 feature 0: ``[open] ... [close]``.
- L0H1 feature 0: counting: ``score`` attends to ``games`` and to BOS equally, so the feature
  (threshold 0.6 on ``n / (n + 1)``) turns on when ``games`` occurs at least twice and grows
  with the count.
- L0H1 feature 1: ``[from] ... [to]``.
- L0H2 feature 0: counting where the query is the key: ``again`` attends to every ``again``
  up to itself and to BOS equally, so the feature (threshold 0.6 on ``c / (c + 1)``, ``c`` the
  count of ``again`` in the prefix, itself included) fires at an ``again`` that occurred
  before: threshold count 2.
- Feature 2 of every head and feature 1 of head 2 are dead.

Tokens that are no rule's query attend to BOS (a sink), so a feature never fires on a query it
has no rule for.
The ground truth is written next to the weights as ``ground_truth.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rulecheck.atomic import atomic_directory
from rulecheck.errors import WriteFailed
from rulecheck.loading._common import MODEL_DEPRECATED, without_warning

VERSION = 4
BOS = "<bos>"
RULE_WORDS = ["if", "then", "when", "do", "unless", "open", "close", "games", "score", "from", "to"]
FILLER = [
    "the",
    "a",
    "of",
    "and",
    "in",
    "is",
    "it",
    "that",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "not",
    "by",
    "one",
    "had",
    "but",
    "what",
    "all",
    "were",
    "we",
    "can",
    "there",
    "an",
    "your",
    "which",
    "their",
    "said",
    "each",
    "she",
    "how",
    "will",
    "up",
    "other",
]
# rule words added later go last, with input features and corpus places of their own, so that
# the words above keep their token ids, input features and places in the corpus
ADDED_WORDS = ["again"]
VOCAB = [BOS, "<unk>", *RULE_WORDS, *FILLER, *ADDED_WORDS]
N_HEADS = 3
D_HEAD = 8
N_SEQUENCES = 4000
SEQ_LEN = 64
SINK = 4.0  # attention logit of BOS for the skip-gram queries
HIT = 10.0  # attention logit of a skip-gram key
STEAL = 11.0  # attention logit of the distractor: e (2.7) times the key's attention per copy
STEAL_VALUE = -0.01  # the distractor's value: its copies take attention, they add little
COUNT = 12.0  # attention logit of BOS and of the counted key for the counting queries
REST = 10.0  # attention logit of BOS for every token that is no rule's query
THRESHOLD = 0.6
ABSENCE_THRESHOLD = 0.05  # threshold of the feature with the absence rule
QUERY_WORDS = ("then", "do", "close", "score", "to")  # the queries of heads 0 and 1

# (head, output feature, hook_z dimension) and the rules it implements
GROUND_TRUTH = {
    "layer": 0,
    "features": [
        {
            "head": 0,
            "feature": 1,
            "skipgrams": [["if", "then"], ["when", "do"]],
            "absence": [{"key": "if", "query": "then", "distractor": "unless"}],
            "counting": [],
        },
        {"head": 0, "feature": 0, "skipgrams": [["open", "close"]], "absence": [], "counting": []},
        {
            "head": 1,
            "feature": 0,
            "skipgrams": [["games", "score"]],
            "absence": [],
            "counting": [{"key": "games", "query": "score", "threshold_count": 2}],
        },
        {"head": 1, "feature": 1, "skipgrams": [["from", "to"]], "absence": [], "counting": []},
        {
            "head": 2,
            "feature": 0,
            "skipgrams": [["again", "again"]],
            "absence": [],
            "counting": [{"key": "again", "query": "again", "threshold_count": 2}],
        },
    ],
    "dead": [
        {"head": 0, "feature": 2},
        {"head": 1, "feature": 2},
        {"head": 2, "feature": 1},
        {"head": 2, "feature": 2},
    ],
}

# how often each rule word is placed in a sequence, and how many copies (max); kept as a table
# (fmt: skip), one pair per line would take a screen
PLACEMENT = {
    "if": (0.4, 1), "then": (0.4, 1), "when": (0.4, 1), "do": (0.4, 1), "unless": (0.12, 1),
    "open": (0.4, 1), "close": (0.4, 1), "games": (0.5, 4), "score": (0.5, 1),
    "from": (0.4, 1), "to": (0.4, 1),
}  # fmt: skip
ADDED_PLACEMENT = {"again": (0.5, 3)}  # placed after PLACEMENT, from a random stream of its own


def token_id(word: str) -> int:
    return VOCAB.index(word)


def feature_order(seed: int = 0) -> list[int]:
    """Input-SAE feature j reads token ``order[j]`` (a fixed shuffle, not token order); the
    features of ``ADDED_WORDS`` come last, in a shuffle of their own."""
    first = len(VOCAB) - len(ADDED_WORDS)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(first, generator=g)
    added = first + torch.randperm(len(ADDED_WORDS), generator=g)
    return torch.cat([order, added]).tolist()


def build_tokenizer(vocab: list[str] = VOCAB):
    """A word-level ``tokenizers.Tokenizer`` over ``vocab``; ``<bos>`` is its BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([BOS, "<unk>"])
    return tok


def build_model() -> HookedTransformer:
    """The planted weights (float32, CPU); the tokenizer is attached when loaded."""
    d = len(VOCAB)
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=d,
        n_heads=N_HEADS,
        d_head=D_HEAD,
        d_vocab=d,
        n_ctx=SEQ_LEN,
        attn_only=True,
        normalization_type=None,
        act_fn="relu",
        seed=0,
    )
    with without_warning(MODEL_DEPRECATED):
        model = HookedTransformer(cfg)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    sd["embed.W_E"] = torch.eye(d)
    g = torch.Generator().manual_seed(1)
    sd["unembed.W_U"] = torch.randn(d, d, generator=g) / math.sqrt(d)
    W_Q = sd["blocks.0.attn.W_Q"]  # [n_heads, d_model, d_head]
    W_K = sd["blocks.0.attn.W_K"]
    W_V = sd["blocks.0.attn.W_V"]
    scale = math.sqrt(D_HEAD)  # attention logits are divided by it
    t = token_id

    def attend(head: int, dim: int, query: str, keys: dict[str, float]) -> None:
        W_Q[head, t(query), dim] = scale
        for key, logit in keys.items():
            W_K[head, t(key), dim] = logit

    # head 0: [if]...[then] | [when]...[do] on value dim 0, unless steals then; [open]...[close]
    attend(0, 0, "then", {BOS: SINK, "if": HIT, "unless": STEAL})
    attend(0, 1, "do", {BOS: SINK, "when": HIT})
    attend(0, 2, "close", {BOS: SINK, "open": HIT})
    W_V[0, t("if"), 0] = 1.0
    W_V[0, t("when"), 0] = 1.0
    W_V[0, t("unless"), 0] = STEAL_VALUE
    W_V[0, t("open"), 1] = 1.0
    # head 1: score counts games against BOS; [from]...[to]
    attend(1, 0, "score", {BOS: COUNT, "games": COUNT})
    attend(1, 1, "to", {BOS: SINK, "from": HIT})
    W_V[1, t("games"), 0] = 1.0
    W_V[1, t("from"), 1] = 1.0
    # head 2: again counts the agains up to itself (causal attention reads t) against BOS
    attend(2, 0, "again", {BOS: COUNT, "again": COUNT})
    W_V[2, t("again"), 0] = 1.0
    # every other token attends to BOS on dim 3 (queries of no rule read nothing): in heads 0
    # and 1 every token but QUERY_WORDS, in head 2 every token but again
    rest = [i for i, word in enumerate(VOCAB) if word not in QUERY_WORDS]
    W_Q[:2, rest, 3] = scale
    W_Q[2, [i for i, word in enumerate(VOCAB) if word != "again"], 3] = scale
    W_K[:, t(BOS), 3] = REST
    model.load_state_dict(sd)
    return model


def word_sae(W_dec: torch.Tensor, model_name: str) -> StandardSAE:
    """An input SAE on ``blocks.0.hook_resid_pre`` whose features are the rows of ``W_dec``
    ``[d_sae, d_model]`` (one-hot word directions), read by its transpose, no biases."""
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=W_dec.shape[1],
            d_sae=W_dec.shape[0],
            metadata=SAEMetadata(hook_name="blocks.0.hook_resid_pre", model_name=model_name),
        )
    )
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
        sae.W_enc.copy_(W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def head_sae(
    W_enc: torch.Tensor, thresholds: torch.Tensor, head: int, model_name: str
) -> StandardSAE:
    """A per-head output SAE on ``blocks.0.attn.hook_z``: feature ``j`` reads column ``j`` of
    ``W_enc [d_head, d_sae]`` (decoded by its transpose) and fires above ``thresholds[j]``."""
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=W_enc.shape[0],
            d_sae=W_enc.shape[1],
            metadata=SAEMetadata(
                hook_name="blocks.0.attn.hook_z", hook_head_index=head, model_name=model_name
            ),
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_enc.T)
        sae.b_enc.copy_(-thresholds)
        sae.b_dec.zero_()
    return sae


def write_entry(
    directory: Path,
    model: HookedTransformer,
    vocab: list[str],
    sae_in: StandardSAE,
    sae_outs: dict[int, StandardSAE],
    corpus: np.ndarray,
    truth: dict,
) -> Path:
    """Write a planted zoo entry into ``directory``: the model and its word tokenizer, the
    input SAE of layer 0, each head's output SAE, the corpus and the ground truth."""
    from rulecheck.loading.models import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory / "model")
    build_tokenizer(vocab).save(str(directory / "model" / "tokenizer.json"))
    sae_in.save_model(directory / "sae_in" / "L0")
    for head, sae in sae_outs.items():
        sae.save_model(directory / "sae_out" / f"L0H{head}")
    np.save(directory / "eval_tokens.npy", corpus)
    (directory / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    return directory


def build_sae_in(seed: int = 0) -> StandardSAE:
    """One feature per word, shuffled: feature j fires 1.0 on token ``feature_order()[j]``."""
    d = len(VOCAB)
    W_dec = torch.zeros(d, d)
    for j, tok in enumerate(feature_order(seed)):
        W_dec[j, tok] = 1.0
    return word_sae(W_dec, "planted")


def build_sae_out(head: int) -> StandardSAE:
    """Per-head SAE on ``blocks.0.attn.hook_z``: feature 0 reads dim 1 for head 0 (dim 0 for
    heads 1 and 2), feature 1 the other (dead for head 2, which writes dim 0 only), feature 2
    is dead."""
    dims = {0: (1, 0), 1: (0, 1), 2: (0, 1)}[head]  # dims read by features 0 and 1
    W_enc = torch.zeros(D_HEAD, 3)
    W_enc[dims[0], 0] = 1.0
    W_enc[dims[1], 1] = 1.0
    W_enc[D_HEAD - 1, 2] = 1.0  # nothing writes the last dim
    thresholds = torch.full((3,), THRESHOLD)
    if head == 0:
        thresholds[1] = ABSENCE_THRESHOLD
    return head_sae(W_enc, thresholds, head, "planted")


def build_corpus(n: int = N_SEQUENCES, seq_len: int = SEQ_LEN, seed: int = 0) -> np.ndarray:
    """``[n, seq_len]`` int32 tokens, BOS first: filler words with rule words placed at random
    positions, each word independently with its probability and copy count (``PLACEMENT``, then
    ``ADDED_PLACEMENT`` from a stream of its own)."""
    rng = np.random.default_rng(seed)
    later = np.random.default_rng([seed, 1])
    filler = np.array([token_id(w) for w in FILLER])
    tokens = filler[rng.integers(0, len(filler), size=(n, seq_len))]
    tokens[:, 0] = token_id(BOS)
    for row in tokens:
        free = rng.permutation(np.arange(1, seq_len))
        used = 0
        for word, (p, most) in PLACEMENT.items():
            if rng.random() < p:
                copies = int(rng.integers(1, most + 1))
                row[free[used : used + copies]] = token_id(word)
                used += copies
        for word, (p, most) in ADDED_PLACEMENT.items():
            if later.random() < p:
                copies = int(later.integers(1, most + 1))
                row[free[used : used + copies]] = token_id(word)
                used += copies
    return tokens.astype(np.int32)


def build(directory: Path) -> Path:
    """Write the whole zoo entry (model, SAEs, corpus, ground truth) into ``directory``."""
    order = feature_order()
    truth = dict(GROUND_TRUTH, input_features={VOCAB[tok]: j for j, tok in enumerate(order)})
    saes = {head: build_sae_out(head) for head in range(N_HEADS)}
    return write_entry(directory, build_model(), VOCAB, build_sae_in(), saes, build_corpus(), truth)


def ensure_built(
    directory: Path, builder: Callable[[Path], Path] = build, version: int = VERSION
) -> Path:
    """Build the entry (``builder`` at ``version``) once, atomically (temp dir + rename), and
    reuse it afterwards."""
    directory = Path(directory)
    marker = directory / f"BUILT-v{version}"
    if marker.exists():
        return directory
    # an entry an older version left is replaced; one another process built meanwhile is kept
    try:
        with atomic_directory(directory, replace=directory.exists()) as staging:
            builder(staging)
            (staging / marker.name).write_text("ok\n")
    except WriteFailed:
        raise
    except OSError as e:  # a full disk: one line, the half-built entry removed
        raise WriteFailed(
            e,
            file=directory,
            fix="free some space, or set RULECHECK_CACHE to a directory with room",
        ) from None
    return directory
