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
from rulecheck.core.heldout import HeldOut, held_out_sequences, test_half
from rulecheck.core.seeded import seeded_keys
from rulecheck.errors import InvalidSpec

SPLITS = ("train", "val", "test")
INACTIVE_ONLY = 1 << 40  # key of an active sequence: never a negative


class ExemplarCollector:
    """Streams output-feature activations of one head and keeps what the protocol needs."""

    def __init__(
        self,
        d_sae: int,
        seq_len: int,
        cfg: ExemplarConfig,
        device: torch.device,
        sample_ids: Tensor | None = None,
        n_seq: int = 0,
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
        # every position of the held-out sequences (``core.heldout``), kept sparse: the
        # nonzeros' feature, held-out row, position and value, by feature once flushed
        self.held_seq = held_out_sequences(n_seq, cfg.n_held, cfg.seed).to(device)
        self.held_feat = torch.zeros(0, dtype=torch.int64, device=device)
        self.held_row = torch.zeros(0, dtype=torch.int64, device=device)
        self.held_pos = torch.zeros(0, dtype=torch.int64, device=device)
        self.held_val = torch.zeros(0, device=device)
        self._held: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []

    @torch.no_grad()
    def update(self, acts: Tensor) -> None:
        """Fold in ``acts [batch, pos, d_sae]`` for the next ``batch`` sequences."""
        body = acts[:, 1:]  # BOS never counts
        seq_max, arg = self._maxima(body)  # [batch, d_sae]
        batch = seq_max.shape[0]
        seq = torch.arange(self.n_seen, self.n_seen + batch, device=acts.device)
        self.n_seen += batch
        self.active += (seq_max > 0).sum(dim=0)
        self._buffer.append((seq, seq_max.T.float(), arg.T + 1))
        self._buffered += batch
        held = torch.isin(seq, self.held_seq)
        if bool(held.any()):
            b, p, f = torch.nonzero(acts[held], as_tuple=True)
            rows = torch.searchsorted(self.held_seq, seq[held])
            keep = p > 0  # BOS never counts
            self._held.append((f[keep], rows[b[keep]], p[keep], acts[held][b, p, f][keep].float()))
        if self._buffered >= self.flush_every:
            self.flush(held=False)

    def _maxima(self, body: Tensor) -> tuple[Tensor, Tensor]:
        """Each sequence's maximum over ``body [batch, pos, d_sae]`` and its position, the
        position (the first of equal maxima) computed only where the maximum could still
        enter the kept positives: above the least of the ``n_pos`` kept (kept ones precede
        new ones of the same value), elsewhere 0, never read. A reduction with positions is
        many times slower than one without, and after the first block few maxima qualify."""
        if self.top_val.shape[1] < self.cfg.n_pos:
            values, positions = body.max(dim=1)
            return values, positions
        seq_max = body.amax(dim=1)  # [batch, d_sae]
        floor = self.top_val[:, -1]  # [d_sae], float32 as kept
        b, f = torch.nonzero(~(seq_max.float() <= floor), as_tuple=True)  # NaN qualifies
        arg = torch.zeros(seq_max.shape, dtype=torch.int64, device=body.device)
        arg[b, f] = body[b, :, f].argmax(dim=1)  # [n, pos] rows: first of equal maxima
        return seq_max, arg

    @torch.no_grad()
    def flush(self, held: bool = True) -> None:
        """Merge the buffered sequences into the kept positives and negatives (and, with
        ``held``, the held-out positions, ordered by feature: once, when they are read)."""
        if held and self._held:
            parts = [torch.cat(x) for x in zip(*self._held, strict=True)]
            self._held = []
            feat, row, pos, val = (
                torch.cat([old, new])
                for old, new in zip(
                    (self.held_feat, self.held_row, self.held_pos, self.held_val),
                    parts,
                    strict=True,
                )
            )
            order = torch.argsort(feat * (1 << 40) + row * self.seq_len + pos)
            self.held_feat, self.held_row = feat[order], row[order]
            self.held_pos, self.held_val = pos[order], val[order]
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

    def held_out(self, feature: int, ex: FeatureExamples) -> HeldOut:
        """The feature at every position of the held-out sequences; ``ex`` (its exemplars)
        names the train and val sequences it is not scored on."""
        self.flush()
        lo, hi = torch.searchsorted(
            self.held_feat, torch.tensor([feature, feature + 1], device=self.held_feat.device)
        ).tolist()
        act = torch.zeros(len(self.held_seq), self.seq_len, device=self.held_val.device)
        act[self.held_row[lo:hi], self.held_pos[lo:hi]] = self.held_val[lo:hi]
        seen = ex.seq[~ex.part("test")].to(self.held_seq.device)
        return HeldOut(
            seq=self.held_seq,
            act=act,
            test=test_half(self.held_seq, self.cfg.seed).to(self.held_seq.device),
            allowed=~torch.isin(self.held_seq, seen),
            key=int(self.features[feature]),
            seed=self.cfg.seed,
        )


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
