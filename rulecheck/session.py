"""A checking session: checkpoints loaded once, exemplars collected once, both shared by every
rule that is checked (the pytest plugin's session state, usable from plain Python too).

``Workbench`` composes the parts, each an object of its own: ``Targets`` (what a book is
checked on, ``rulecheck.targets``), ``Loaded`` (models, SAEs, corpora and their fingerprints,
``rulecheck.loaded``), ``ExemplarStore`` (exemplars in memory and in the disk cache,
``rulecheck.exemplar_store``) and ``Passes`` (passes over the corpus and what they computed,
``rulecheck.passes``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from sae_lens import SAE
from torch import Tensor

from rulecheck import heap
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.config import FINGERPRINTED
from rulecheck.core.exemplars import ExemplarCollector, ExemplarConfig, FeatureExamples
from rulecheck.core.extract import Progress, no_progress
from rulecheck.core.heads import Probe
from rulecheck.core.modelview import Model
from rulecheck.core.prefixes import SequenceChunk
from rulecheck.core.tokens import top_token
from rulecheck.errors import RulecheckError
from rulecheck.exemplar_store import CacheWarning, ExemplarStore, feature_examples
from rulecheck.loaded import PART_NAMES, Layer, Loaded
from rulecheck.loading import resolve_device
from rulecheck.passes import Memo, Passes
from rulecheck.paths import exemplar_cache
from rulecheck.refs import Resolver
from rulecheck.specs import Checkpoint, Head, Specs
from rulecheck.targets import Targets, book_specs

__all__ = [
    "DEFAULT_CACHE",
    "PART_NAMES",
    "CacheWarning",
    "Head",
    "Layer",
    "Workbench",
    "book_specs",
]

T = TypeVar("T")
DEFAULT_CACHE = Path("<exemplar_cache()>")  # the default of ``Workbench(cache_dir=...)``


class Workbench:
    """Loads what rulebooks name, once, and measures their rules."""

    def __init__(
        self,
        overrides: Specs | None = None,
        device: str = "auto",
        cache_dir: Path | None = DEFAULT_CACHE,
        exemplars: ExemplarConfig | None = None,
        batch_size: int = 64,
        models: Mapping[str, Model] | None = None,
        saes: Mapping[str, SAE] | None = None,
        corpora: Mapping[str, Tensor] | None = None,
    ) -> None:
        """``models``: model objects already loaded (a HookedTransformer, or a
        TransformerBridge in compatibility mode), by the model spec that names each in
        ``Specs`` and rulebooks; used as they are, loaded with whatever processing their
        caller chose. ``saes`` (sae_lens SAEs) and ``corpora`` (token ids ``[batch, pos]``)
        likewise, by the spec that names each for a head (``{layer}``/``{head}`` filled in);
        each is checked as a loaded one is. ``cache_dir``: the exemplar cache, by default
        ``rulecheck.paths.exemplar_cache()``; None keeps none. The process then exits
        without the collector's last pass over what it loaded (``rulecheck.heap``)."""
        heap.skip_final_collection()
        self.device = resolve_device(device)
        self.cache_dir = exemplar_cache() if cache_dir is DEFAULT_CACHE else cache_dir
        self.batch_size = batch_size
        loaded = Loaded(self.device)
        loaded.give(models, saes, corpora)
        store = ExemplarStore(loaded, exemplars or ExemplarConfig(), self.cache_dir)
        self._compose(Targets(overrides or Specs(model=None), loaded), store, Memo())

    def _compose(self, targets: Targets, store: ExemplarStore, memo: Memo) -> None:
        """Hold these parts (passes and announced books of its own); a workbench per
        protocol, itself under its own."""
        self.loaded = targets.loaded
        self.targets = targets
        self.store = store
        self._memo = memo
        self.passes = Passes(self.loaded, store, memo, self.batch_size)
        self._books: dict[str, tuple[Rulebook, frozenset[int] | None]] = {}
        # this workbench under each exemplar protocol a book asks for (``with_exemplars``)
        self._protocols: dict[ExemplarConfig, Workbench] = {self.exemplar_cfg: self}

    @property
    def overrides(self) -> Specs:
        return self.targets.overrides

    @property
    def exemplar_cfg(self) -> ExemplarConfig:
        return self.store.cfg

    # ------------------------------------------------------------------ derived workbenches

    def for_book(self, book: Rulebook) -> Workbench:
        """This workbench under the exemplar protocol ``book`` was measured with (what its
        ``extraction:`` block records, the defaults where it records nothing): a book
        extracted with lowered minimums on a small corpus is checked under them.
        ``InvalidRulebook`` at the line of a recorded value out of range."""
        return self.with_exemplars(book.protocol())

    def with_exemplars(self, exemplars: ExemplarConfig) -> Workbench:
        """This workbench under other protocol settings (the same one each time for the same
        settings): the loaded models, SAEs and corpora are shared, exemplars, measurements and
        the books announced are its own."""
        if exemplars not in self._protocols:
            ids = self.store.sample_ids
            store = ExemplarStore(self.loaded, exemplars, self.cache_dir, ids)
            other = self._derived(self.targets, store, Memo())
            other._protocols = self._protocols  # one workbench per protocol, shared
            self._protocols[exemplars] = other
        return self._protocols[exemplars]

    def with_overrides(self, overrides: Specs) -> Workbench:
        """This workbench with other overrides (another retrained SAE to compare, say):
        everything loaded, measured and memoised is shared, each keyed by what it came from;
        the books announced are its own."""
        return self._derived(Targets(overrides, self.loaded), self.store, self._memo)

    def _derived(self, targets: Targets, store: ExemplarStore, memo: Memo) -> Workbench:
        """A workbench of this one's device, cache and batch size holding these parts."""
        other = object.__new__(Workbench)
        other.device = self.device
        other.cache_dir = self.cache_dir
        other.batch_size = self.batch_size
        other._compose(targets, store, memo)
        return other

    # -------------------------------------------------------------------------- books

    def head_of(self, book: Rulebook, file: str, *, saes: bool = True) -> Head:
        """The head a rulebook is about, with the overrides applied, its header loaded and
        checked (``Targets.head_of``)."""
        return self.targets.head_of(book, file, saes=saes)

    def named_head(self, book: Rulebook, file: str) -> Head:
        """The head ``head_of`` gives, its specs resolved, without loading anything."""
        return self.targets.named_head(book, file)

    def announce(self, book: Rulebook, file: str, features: Iterable[int] | None = None) -> None:
        """Say that ``book`` will be checked this session (nothing is loaded): the corpus pass
        for its layer then collects its head's exemplars too, so the heads of a layer share
        one pass even when each book names its own output SAE; and the measurements of its
        ``features`` (all when None: those whose items run) share one prefix pass."""
        try:
            bench = self.for_book(book)
        except RulecheckError:  # reported when the book's items run
            bench = self
        bench._take(book, file, features)

    def _take(self, book: Rulebook, file: str, features: Iterable[int] | None) -> None:
        """``announce`` on this workbench, whatever the book's protocol."""
        self._books[file] = (book, None if features is None else frozenset(features))
        with contextlib.suppress(RulecheckError):
            self.passes.announce(self.targets.named_head(book, file))

    def announced_features(self, file: str) -> list[FeatureRules]:
        """The features of the book announced from ``file`` whose items run this session (all
        of them unless ``announce`` was told), in the book's order; none if not announced."""
        book, features = self._books.get(file, (None, None))
        if book is None:
            return []
        return [r for r in book.features if features is None or r.feature in features]

    def check_fingerprints(
        self, book: Rulebook, head: Head, file: str, accept: Collection[str] = ()
    ) -> None:
        """``FingerprintMismatch`` (one line) unless what ``head`` loads is what the book
        records, but the parts in ``accept`` (``Loaded.check_fingerprints``)."""
        self.loaded.check_fingerprints(book, head, file, self.overrides, accept)

    # -------------------------------------------------------------------------- loading

    def give(
        self,
        models: Mapping[str, Model] | None = None,
        saes: Mapping[str, SAE] | None = None,
        corpora: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Hold these loaded objects, by spec, as ``__init__`` takes them (before they are
        first read)."""
        self.loaded.give(models, saes, corpora)

    def model(self, spec: str, sae_in: SAE | None = None) -> Model:
        return self.loaded.model(spec, sae_in)

    def sae_in(self, head: Head) -> SAE:
        return self.loaded.sae_in(head)

    def sae_out(self, head: Head) -> SAE:
        return self.loaded.sae_out(head)

    def corpus(self, head: Head) -> Tensor:
        return self.loaded.corpus(head)

    def load(self, head: Head) -> tuple[Model, SAE, SAE, Tensor]:
        """Model, input SAE, output SAE and corpus of a head (loaded on first use)."""
        return self.loaded.load(head)

    def n_layers(self, specs: Checkpoint) -> int:
        """The model's number of layers (loaded the way its layer-0 input SAE asks)."""
        return self.loaded.n_layers(specs)

    def layer_heads(self, specs: Checkpoint, layer: int, heads: str | Sequence[int]) -> list[Head]:
        """The heads ``heads`` of ``layer``, checked against the model."""
        return self.loaded.layer_heads(specs, layer, heads)

    def layer(self, specs: Checkpoint, layer: int, heads: str | Sequence[int] = "all") -> Layer:
        """Everything one layer's extraction reads, loaded (once) and checked."""
        return self.loaded.layer(specs, layer, heads)

    def fingerprints(self, head: Head, names: Sequence[str] = FINGERPRINTED) -> dict[str, str]:
        """Fingerprints of the head's model, SAEs and corpus, each hashed once per session."""
        return self.loaded.fingerprints(head, names)

    # ------------------------------------------------------------------------ exemplars

    def sample_by(self, head: Head, ids: Tensor) -> None:
        """Key the random draws of ``head``'s features by ``ids [d_sae]`` from now on."""
        self.store.sample_by(head, ids)

    def has_exemplars(self, head: Head) -> bool:
        """Whether the head's exemplars are at hand (in memory or the disk cache), so that
        ``examples`` needs no pass over the corpus."""
        return self.store.has(head)

    def collector(self, head: Head) -> ExemplarCollector:
        """The head's exemplar state: from memory, the disk cache, or a pass over the corpus."""
        return self.passes.collector(head)

    def examples(self, head: Head, feature: int, file: str = "") -> FeatureExamples:
        """A feature's exemplars; an error if the feature is not eligible on this checkpoint."""
        return feature_examples(self.collector(head), head, feature, self.exemplar_cfg, file)

    def layer_group(self, head: Head, heads: Sequence[Head] | None = None) -> list[Head]:
        """The heads one corpus pass for ``head`` collects (``Passes.layer_group``)."""
        return self.passes.layer_group(head, heads)

    def layer_pass(
        self,
        head: Head,
        progress: Progress = no_progress,
        heads: Sequence[Head] | None = None,
        observe: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> tuple[dict[int, ExemplarCollector], float]:
        """One pass over the corpus for ``head``'s layer, once per session
        (``Passes.layer_pass``)."""
        return self.passes.layer_pass(head, progress, heads, observe)

    # ------------------------------------------------------------------------ measuring

    def memo(self, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()``, once per session for ``key``."""
        return self._memo(key, compute)

    def memoized(self, key: tuple) -> bool:
        return key in self._memo

    def sequence_chunks(
        self, head: Head, seq: Tensor, t: Tensor, columns: Sequence[int] | None = None
    ) -> Iterator[SequenceChunk]:
        """The input-SAE activations of the prefixes ``(seq, t)`` of the head's corpus
        (``Passes.sequence_chunks``)."""
        return self.passes.sequence_chunks(head, seq, t, columns)

    def held_out_chunks(self, head: Head) -> Iterator[SequenceChunk]:
        """The held-out sequences of the head's exemplars, whole, with every input feature
        (``Passes.held_out_chunks``)."""
        return self.passes.held_out_chunks(head)

    def resolver(self, head: Head, file: str) -> Resolver:
        """The resolver of a rulebook's references on the head's model and input SAE."""
        model, sae_in, _, _ = self.load(head)

        def top_tokens() -> Tensor:
            key = ("top_token", head.specs.sae_in, head.layer)
            return self.memo(key, lambda: top_token(model, sae_in, head.layer).cpu())

        return self.memo(
            ("resolver", head, file),
            lambda: Resolver(model.tokenizer, sae_in.cfg.d_sae, head.layer, file, top_tokens),
        )

    def probe(self, head: Head, feature: int) -> Probe:
        """The true activation of one output feature of the head, for counterfactuals."""
        model, _, sae_out, _ = self.load(head)
        return Probe(model, sae_out, head.layer, head.head, feature, self.batch_size)
