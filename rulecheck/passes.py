"""Passes over a head's corpus, each run once a session: a layer's pass collecting the
exemplars of the heads the session will read (one pass per layer, however many of its heads are
checked), and passes over prefixes of the corpus's sequences (each distinct sequence run once;
the held-out sequences' inputs kept); ``Memo`` holds what they and the checks computed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from rulecheck.core.exemplars import ExemplarCollector, check_corpus_size
from rulecheck.core.extract import ExtractConfig, Progress, collect_layer, no_progress
from rulecheck.core.prefixes import KeptInputs, SequenceChunk, sequence_chunks
from rulecheck.exemplar_store import ExemplarStore
from rulecheck.loaded import Loaded
from rulecheck.specs import Head

T = TypeVar("T")


class Memo:
    """Values computed once each, by key."""

    def __init__(self) -> None:
        self._values: dict[tuple, Any] = {}

    def __call__(self, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()``, once for ``key``."""
        if key not in self._values:
            self._values[key] = compute()
        return self._values[key]

    def __contains__(self, key: tuple) -> bool:
        return key in self._values


class Passes:
    """The passes over the corpora of ``loaded``, their exemplars kept in ``store`` and their
    results in ``memo``; ``announce`` names the heads a layer's pass collects besides the one
    asked for."""

    def __init__(self, loaded: Loaded, store: ExemplarStore, memo: Memo, batch_size: int) -> None:
        self.loaded = loaded
        self.store = store
        self.memo = memo
        self.batch_size = batch_size
        self._announced: set[Head] = set()

    def announce(self, head: Head) -> None:
        """``head`` will be read this session: a pass over its layer collects it too."""
        self._announced.add(head)

    def collector(self, head: Head) -> ExemplarCollector:
        """The head's exemplar state: from memory, the disk cache, or a pass over the corpus
        (``layer_pass``: one per layer, however many of its heads are checked)."""
        held = self.store.held(head)
        if held is not None:
            return held
        # another process may be streaming the same layer for the same heads
        with self.store.layer_lock(self.layer_group(head)):
            cached = self.store.read(head)
            if cached is not None:
                return cached
            self.layer_pass(head)
        held = self.store.held(head)
        assert held is not None
        return held

    def layer_group(self, head: Head, heads: Sequence[Head] | None = None) -> list[Head]:
        """The heads one corpus pass for ``head`` collects: ``head``, ``heads`` when given
        (extraction collects the heads it extracts), and the heads announced that read the
        same model and corpus at that layer (one head per index; only SAEs that load; none
        whose draws are keyed by other ids; none whose exemplars are at hand already): what
        the session will read, not every head the SAE's ``{head}`` template could name. A head whose draws are keyed by other ids
        (``ExemplarStore.sample_by``) has a pass of its own."""
        keyed = self.store.sample_ids
        if head in keyed:
            return [head]
        others = list(heads or [])
        same = (head.specs.model, head.specs.corpus, head.layer)
        others += sorted(
            (h for h in self._announced if (h.specs.model, h.specs.corpus, h.layer) == same),
            key=lambda h: (h.head, repr(h.specs)),
        )
        group, taken = [head], {head.head}
        for other in others:
            if other.head in taken or other in keyed or not self.loaded.loads(other):
                continue
            if other not in (heads or ()) and self.store.has(other):
                continue  # announced, and collected by an earlier pass: not streamed again
            group.append(other)
            taken.add(other.head)
        return sorted(group, key=lambda h: h.head)

    def layer_pass(
        self,
        head: Head,
        progress: Progress = no_progress,
        heads: Sequence[Head] | None = None,
        observe: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> tuple[dict[int, ExemplarCollector], float]:
        """One pass over the corpus for ``head``'s layer, once per session: the exemplars of
        the heads of ``layer_group(head)`` (or of ``heads``, ``head`` among them: extraction
        collects only the heads it extracts), by head index, and the layer's mean LayerNorm
        scale. ``observe`` sees each batch's activations if the pass runs now. The exemplars
        are kept in the store, each head's draws keyed by its sample ids where it has them."""
        model, _, _, tokens = self.loaded.load(head)
        group = self.layer_group(head, heads)
        cfg = self.store.cfg

        def compute() -> tuple[dict[int, ExemplarCollector], float]:
            check_corpus_size(tokens.shape[0], cfg, head.specs.corpus)
            extract = ExtractConfig(batch_size=self.batch_size, exemplars=cfg)
            saes = {g.head: self.loaded.sae_out(g) for g in group}
            keyed = self.store.sample_ids
            ids = {g.head: keyed[g] for g in group if g in keyed}
            return collect_layer(model, saes, tokens, head.layer, extract, progress, ids, observe)

        def at_hand() -> tuple[dict[int, ExemplarCollector], float]:
            """What an earlier pass collected for every head of the group, if it did: a pass
            that keeps nothing else (no ``observe``) is then not run again."""
            found = None if observe is not None else self._collected(group)
            return found or compute()

        digests = tuple(self.store.ids_digest(g) for g in group)
        collectors, ln_scale = self.memo(("layer_pass", tuple(group), digests, cfg), at_hand)
        self.store.keep(group, collectors, ln_scale)
        return collectors, ln_scale

    def _collected(
        self, group: Sequence[Head]
    ) -> tuple[dict[int, ExemplarCollector], float] | None:
        """The exemplars of every head of ``group`` and their pass's LayerNorm scale, from
        memory or the disk cache; None unless all are there, from passes of one scale."""
        collectors, scales = {}, set()
        for g in group:
            col = self.store.held(g) or self.store.read(g)
            scale = self.store.ln_scale(g)
            if col is None or scale is None:
                return None
            collectors[g.head] = col
            scales.add(scale)
        return (collectors, scales.pop()) if len(scales) == 1 else None

    def sequence_chunks(
        self, head: Head, seq: Tensor, t: Tensor, columns: Sequence[int] | None = None
    ) -> Iterator[SequenceChunk]:
        """The input-SAE activations of the prefixes ``(seq, t)`` of the head's corpus, each
        distinct sequence run once (``rulecheck.core.prefixes.sequence_chunks``), only
        ``columns`` when given."""
        model, sae_in, _, tokens = self.loaded.load(head)
        return sequence_chunks(model, sae_in, tokens, head.layer, seq, t, self.batch_size, columns)

    def held_out_chunks(self, head: Head) -> Iterator[SequenceChunk]:
        """The held-out sequences of the head's exemplars (``core.heldout``), whole, with every
        input feature: run once per session and kept sparse (``KeptInputs``), as every
        feature's precision where its rules fire reads them."""
        model, sae_in, _, tokens = self.loaded.load(head)
        seq = self.collector(head).held_seq.cpu()
        ends = torch.full_like(seq, tokens.shape[1] - 1)

        def keep() -> KeptInputs:
            held = tokens[seq.to(tokens.device)]
            kept = KeptInputs(sae_in, head.layer, held)
            with torch.no_grad():
                for start in range(0, len(held), self.batch_size):
                    batch = held[start : start + self.batch_size].to(model.cfg.device)
                    kept.observe({kept.hook: model(batch, stop_at_layer=head.layer)})
            return kept

        s = head.specs
        key = ("held_inputs", s.model, s.sae_in, s.corpus, head.layer, tuple(seq.tolist()))
        kept = self.memo(key, keep)
        if kept.complete:
            return kept.chunks(torch.arange(len(seq)), ends, self.batch_size)
        return sequence_chunks(model, sae_in, tokens, head.layer, seq, ends, self.batch_size)
