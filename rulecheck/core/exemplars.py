"""Exemplars of output features, collected by streaming over a corpus.

Protocol (paper A.2): a feature is eligible when active in at least ``min_active`` sequences and
inactive in at least ``min_inactive``; its ``n_pos`` sequences with the highest maximum
activation are positives (position = argmax), ``n_neg`` random inactive sequences are negatives
(position uniform in ``[1, T-1]``); both are split into equal train/val/test parts with a seed.
Memory is independent of the number of sequences: per feature only a running top-k and a
running bottom-k of per-sequence random keys are kept. BOS (position 0) is never an example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rulecheck.config import ExemplarConfig
from rulecheck.errors import InvalidSpec

SPLITS = ("train", "val", "test")
_MASK32 = 0xFFFFFFFF
INACTIVE_ONLY = 1 << 40  # key of an active sequence: never a negative


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (murmur3 finaliser) of an int64 tensor, as int64 in [0, 2**32)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def seeded_keys(seed: int, seq: Tensor, feature: Tensor, salt: int = 0) -> Tensor:
    """Deterministic pseudo-random keys in [0, 2**32) for (sequence, feature) pairs."""
    base = mix32(torch.as_tensor(seed * 0x9E3779B1 + salt, dtype=torch.int64))
    return mix32(mix32(seq * 0x27D4EB2F + base) ^ (feature * 0x165667B1))


class ExemplarCollector:
    """Streams output-feature activations of one head and keeps what the protocol needs."""

    def __init__(
        self,
        d_sae: int,
        seq_len: int,
        cfg: ExemplarConfig,
        device: torch.device,
        sample_ids: Tensor | None = None,
    ):
        self.cfg = cfg
        self.seq_len = seq_len
        self.n_seen = 0
        # the id each feature's random draws (negatives, their positions, the split) are
        # keyed by: its own, or (for a retrained SAE) its old partner's, so that a feature
        # re-identified under a new id is checked on the same sequences
        f = torch.arange(d_sae, device=device) if sample_ids is None else sample_ids.to(device)
        self.features = f
        self.active = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.top_val = torch.full((d_sae, 0), 0.0, device=device)
        self.top_seq = torch.zeros((d_sae, 0), dtype=torch.int64, device=device)
        self.top_pos = torch.zeros((d_sae, 0), dtype=torch.int64, device=device)
        self.neg_key = torch.zeros((d_sae, 0), dtype=torch.int64, device=device)
        self.neg_seq = torch.zeros((d_sae, 0), dtype=torch.int64, device=device)
        # per-sequence maxima wait here and are merged in blocks: constant memory, and the
        # kept state is sorted once per block instead of once per batch
        self.flush_every = max(1024, cfg.n_pos, cfg.n_neg)
        self._buffer: list[tuple[Tensor, Tensor, Tensor]] = []
        self._buffered = 0

    @torch.no_grad()
    def update(self, acts: Tensor) -> None:
        """Fold in ``acts [batch, pos, d_sae]`` for the next ``batch`` sequences."""
        seq_max, arg = acts[:, 1:].max(dim=1)  # [batch, d_sae], BOS never counts
        batch = seq_max.shape[0]
        seq = torch.arange(self.n_seen, self.n_seen + batch, device=acts.device)
        self.n_seen += batch
        self.active += (seq_max > 0).sum(dim=0)
        self._buffer.append((seq, seq_max.T.float(), arg.T + 1))
        self._buffered += batch
        if self._buffered >= self.flush_every:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Merge the buffered sequences into the kept positives and negatives."""
        if not self._buffer:
            return
        seq = torch.cat([b[0] for b in self._buffer])
        seq_max = torch.cat([b[1] for b in self._buffer], dim=1)  # [d_sae, n]
        arg = torch.cat([b[2] for b in self._buffer], dim=1)
        self._buffer, self._buffered = [], 0
        seqs = seq.unsqueeze(0).expand_as(seq_max)

        vals = torch.cat([self.top_val, seq_max], dim=1)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.cfg.n_pos]
        self.top_val = vals.gather(1, order)
        self.top_seq = torch.cat([self.top_seq, seqs], dim=1).gather(1, order)
        self.top_pos = torch.cat([self.top_pos, arg], dim=1).gather(1, order)

        keys = seeded_keys(self.cfg.seed, seqs, self.features.unsqueeze(1))
        keys = torch.where(seq_max > 0, torch.full_like(keys, INACTIVE_ONLY), keys)
        all_keys = torch.cat([self.neg_key, keys], dim=1)
        order = torch.sort(all_keys, dim=1, stable=True).indices[:, : self.cfg.n_neg]
        self.neg_key = all_keys.gather(1, order)
        self.neg_seq = torch.cat([self.neg_seq, seqs], dim=1).gather(1, order)

    def eligible(self) -> Tensor:
        """Ids of features active in >= min_active and inactive in >= min_inactive sequences."""
        inactive = self.n_seen - self.active
        ok = (self.active >= self.cfg.min_active) & (inactive >= self.cfg.min_inactive)
        return torch.nonzero(ok).flatten()

    def examples(self, feature: int) -> FeatureExamples:
        """Positives, negatives and their split for one eligible feature."""
        self.flush()
        n_pos = min(self.cfg.n_pos, int(self.active[feature]))
        pos_seq = self.top_seq[feature, :n_pos]
        pos_t = self.top_pos[feature, :n_pos]
        pos_act = self.top_val[feature, :n_pos]
        neg_seq = self.neg_seq[feature][self.neg_key[feature] < INACTIVE_ONLY]
        key = int(self.features[feature])
        f = torch.full_like(neg_seq, key)
        neg_t = 1 + seeded_keys(self.cfg.seed, neg_seq, f, salt=1) % (self.seq_len - 1)
        seq = torch.cat([pos_seq, neg_seq])
        t = torch.cat([pos_t, neg_t])
        act = torch.cat([pos_act, torch.zeros(len(neg_seq), device=pos_act.device)])
        split = torch.cat(
            [
                split_labels(len(pos_seq), self.cfg.seed, key, salt=2),
                split_labels(len(neg_seq), self.cfg.seed, key, salt=3),
            ]
        ).to(seq.device)
        return FeatureExamples(feature=feature, seq=seq, t=t, act=act, split=split)


def split_labels(n: int, seed: int, feature: int, salt: int) -> Tensor:
    """``[n]`` labels 0/1/2 (train/val/test): a seeded shuffle cut into equal thirds."""
    g = torch.Generator().manual_seed(
        int(seeded_keys(seed, torch.tensor(feature), torch.tensor(salt)))
    )
    perm = torch.randperm(n, generator=g)
    labels = torch.empty(n, dtype=torch.int64)
    labels[perm] = torch.arange(n) * 3 // max(n, 1)
    return labels


@dataclass(frozen=True)
class FeatureExamples:
    """Prefixes ``(seq, t)`` of one feature with their true activation and split label."""

    feature: int
    seq: Tensor  # [n] corpus row
    t: Tensor  # [n] last position of the prefix
    act: Tensor  # [n] true activation at t
    split: Tensor  # [n] 0 train, 1 val, 2 test

    def part(self, name: str) -> Tensor:
        """Boolean mask of one split."""
        return self.split == SPLITS.index(name)


def check_corpus_size(n_sequences: int, cfg: ExemplarConfig, corpus: str) -> None:
    """A corpus smaller than the protocol needs is an error, never a silent downscale."""
    if n_sequences < cfg.min_sequences:
        raise InvalidSpec(
            f"has {n_sequences} sequences; the evaluation protocol needs at least "
            f"{cfg.min_sequences} (min_active {cfg.min_active} + min_inactive "
            f"{cfg.min_inactive})",
            file=corpus,
            field="corpus",
            fix=f"pass a corpus with >= {cfg.min_sequences} sequences, or lower "
            "--min-active/--min-inactive",
        )


def sample_features(eligible: Tensor, max_features: int, seed: int) -> list[int]:
    """Up to ``max_features`` eligible feature ids, sampled with ``seed``, in id order."""
    if len(eligible) <= max_features:
        return eligible.tolist()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(eligible), generator=g)[:max_features]
    return sorted(eligible.cpu()[pick].tolist())
