"""A checking session: checkpoints loaded once, exemplars collected once, both shared by every
rule that is checked (the pytest plugin's session state, usable from plain Python too).

Exemplars are the expensive part (a pass over the corpus per layer); they are cached on disk
(``rulecheck.paths.exemplar_cache()`` unless told otherwise), keyed by the fingerprints of model, output SAE and corpus and by
the protocol's settings, so a second run with unchanged inputs skips the pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows has no fcntl: there each process streams its own layers
    fcntl = None  # type: ignore[assignment]

import torch
from sae_lens import SAE
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from rulecheck import __version__
from rulecheck.atomic import atomic_write
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.config import FINGERPRINTED
from rulecheck.core.exemplars import (
    ExemplarCollector,
    ExemplarConfig,
    FeatureExamples,
    check_corpus_size,
)
from rulecheck.core.extract import (
    ExtractConfig,
    Progress,
    collect_layer,
    no_progress,
)
from rulecheck.core.heads import Probe
from rulecheck.core.modelview import Model
from rulecheck.core.prefixes import KeptInputs, SequenceChunk, sequence_chunks
from rulecheck.core.tokens import top_token
from rulecheck.errors import (
    FingerprintMismatch,
    InvalidRulebook,
    InvalidSpec,
    NotEligible,
    RulecheckError,
)
from rulecheck.loading import (
    attn_out_hook,
    check_sae,
    fingerprint_corpus,
    fingerprint_model,
    fingerprint_sae,
    head_view,
    load_corpus,
    load_model,
    load_sae,
    resolve_device,
)
from rulecheck.loading.corpora import tokens_of
from rulecheck.paths import exemplar_cache
from rulecheck.refs import Resolver
from rulecheck.specs import (
    Checkpoint,
    Specs,
    from_book,
    head_spec,
    locate,
    parse_heads,
    processing_for,
)
from rulecheck.zoo import is_zoo_spec

T = TypeVar("T")
COLLECTOR_STATE = ("active", "top_val", "top_seq", "top_pos", "neg_key", "neg_seq")
HELD_STATE = ("held_feat", "held_row", "held_pos", "held_val")  # ``core.heldout``


@dataclass(frozen=True)
class Head:
    """One head of one checkpoint, as a rulebook names it (after overrides)."""

    specs: Checkpoint
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"


@dataclass(frozen=True)
class Layer:
    """One layer of a checkpoint as loaded for extraction: its heads, the model, the layer's
    input SAE, each head's output SAE and the corpus ``[n_seq, pos]``."""

    heads: list[Head]
    model: Model
    sae_in: SAE
    sae_outs: dict[int, SAE]
    tokens: Tensor


# what a workbench loaded, each keyed by what it came from: shared by derived workbenches
LOADED = ("_models", "_saes", "_corpora", "_fingerprints", "_sample_ids", "_given")
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
        ``rulecheck.paths.exemplar_cache()``; None keeps none."""
        self.overrides = overrides or Specs(model=None)
        self.device = resolve_device(device)
        self.cache_dir = exemplar_cache() if cache_dir is DEFAULT_CACHE else cache_dir
        self.exemplar_cfg = exemplars or ExemplarConfig()
        self.batch_size = batch_size
        self._models: dict[str, Model] = dict(models or {})
        self._saes: dict[tuple[str, int, int | None], SAE] = {}
        self._corpora: dict[tuple[str, str], Tensor] = {}
        self._collectors: dict[tuple[Head, str | None], ExemplarCollector] = {}
        self._sample_ids: dict[Head, Tensor] = {}
        self._announced: set[Head] = set()
        self._books: dict[str, tuple[Rulebook, frozenset[int] | None]] = {}
        self._memo: dict[tuple, Any] = {}
        self._fingerprints: dict[tuple, str] = {}
        self._given: dict[str, dict[str, Any]] = {"sae": {}, "corpus": {}}
        self.give(saes=saes, corpora=corpora)
        # this workbench under each exemplar protocol a book asks for (``with_exemplars``)
        self._protocols: dict[ExemplarConfig, Workbench] = {self.exemplar_cfg: self}

    # ------------------------------------------------------------------------------ loading

    def head_of(self, book: Rulebook, file: str, *, saes: bool = True) -> Head:
        """The head a rulebook is about, with command-line overrides applied: the book's specs
        (a zoo model fills in its own SAEs and corpus), then each given override; another zoo
        model brings its own SAEs and corpus unless those are given too. With ``saes``
        False, the SAEs are the book's own whatever the overrides say (the SAEs a book is
        remapped from)."""
        head = self._head(book, file, saes)
        self._check_header(head, book, file)
        return head

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
            self._announced.add(self._head(book, file, True))

    def give(
        self,
        models: Mapping[str, Model] | None = None,
        saes: Mapping[str, SAE] | None = None,
        corpora: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Hold these loaded objects, by spec, as ``__init__`` takes them (before they are
        first read)."""
        self._models.update(models or {})
        self._given["sae"].update(saes or {})
        self._given["corpus"].update(corpora or {})

    def named_head(self, book: Rulebook, file: str) -> Head:
        """The head ``head_of`` gives, its specs resolved, without loading anything."""
        return self._head(book, file, True)

    def for_book(self, book: Rulebook) -> Workbench:
        """This workbench under the exemplar protocol ``book`` was measured with (what its
        ``extraction:`` block records, the defaults where it records nothing): a book
        extracted with lowered minimums on a small corpus is checked under them.
        ``InvalidRulebook`` at the line of a recorded value out of range."""
        return self.with_exemplars(book.protocol())

    def _head(self, book: Rulebook, file: str, saes: bool) -> Head:
        """``head_of`` without loading anything."""
        o = self.overrides if saes else replace(self.overrides, sae_in=None, sae_out=None)
        if book.model is None and o.model is None:
            raise InvalidRulebook(
                "names no model",
                file=file,
                field="model",
                fix="add 'model: rulecheck-tiny' (or a path) or pass --rulecheck-model",
            )
        written = book_specs(book, file)
        base = written
        if book.model is not None and not (o.model and is_zoo_spec(o.model)):
            # the book's own zoo model fills in its SAEs and corpus before overrides apply
            filled = self._resolve(written, book, file)
            base = Specs(o.model or book.model, filled.sae_in, filled.sae_out, filled.corpus)
        specs = Specs(
            model=o.model or base.model,
            sae_in=o.sae_in or base.sae_in,
            sae_out=o.sae_out or base.sae_out,
            corpus=o.corpus or base.corpus,
        )
        checkpoint = self._resolve(specs, book, file)
        return Head(checkpoint, book.layer, book.head)

    @staticmethod
    def _resolve(specs: Specs, book: Rulebook, file: str) -> Checkpoint:
        """``specs.resolve()``, its error about the rulebook: which key it must name."""
        try:
            return specs.resolve()
        except InvalidSpec as e:
            key = (e.field or "--model").removeprefix("--").replace("-", "_")
            written = from_book(book.model, file, book.layer, book.head)
            if key == "model" and specs.model != written:  # --rulecheck-model's
                raise InvalidSpec(
                    e.what, file=e.file, field="--rulecheck-model", fix=e.fix
                ) from None
            if key == "model":  # the book's model spec itself names nothing
                raise InvalidRulebook(
                    f"{book.model!r}: {e.what}",
                    file=file,
                    line=book.origin.line("model"),
                    field="model",
                    fix=e.fix,
                ) from None
            raise InvalidRulebook(
                f"model {specs.model!r} is not a zoo model, so `{key}` must be named",
                file=file,
                line=book.origin.line("model"),
                field=key,
                fix=f"add `{key}: ...` to the rulebook or pass --rulecheck-{key.replace('_', '-')}",
            ) from None

    def _check_header(self, head: Head, book: Rulebook, file: str) -> None:
        """Load what the book names, so that a spec that does not load, or a layer or head
        past the model, is an error at the book's line, not about some file deep inside."""
        if self._memo.get(("header ok", head)):
            return

        def blame(part: str, exc: RulecheckError) -> InvalidRulebook:
            if getattr(self.overrides, part) is not None:
                return exc  # the command line's option, named by the loader's message
            field = part if getattr(book, part) is not None else "model"
            spec = getattr(book, field)
            where = f"{exc.file}: " if exc.file else ""
            return InvalidRulebook(
                f"{spec!r} does not load: {where}{exc.what}",
                file=file,
                line=book.origin.line(field),
                field=field,
                fix=exc.fix or "correct the spec",
            )

        def check_range(what: str, value: int, n: int) -> None:
            _check_index(what, value, n, file=file, line=book.origin.line(what))

        try:
            sae_in = self.sae_in(head)
        except RulecheckError as exc:
            # a layer past the model has no input SAE either: say so, not which file is missing
            try:
                n_layers = self._n_layers(head.specs.model)
            except RulecheckError:
                raise blame("model", exc) from None
            check_range("layer", head.layer, n_layers)
            raise blame("sae_in", exc) from None
        try:
            model = self.model(head.specs.model, sae_in)
        except RulecheckError as exc:
            raise blame("model", exc) from None
        check_range("layer", head.layer, model.cfg.n_layers)
        check_range("head", head.head, model.cfg.n_heads)
        for part, load in (("sae_out", self.sae_out), ("corpus", self.corpus)):
            try:
                load(head)
            except RulecheckError as exc:
                raise blame(part, exc) from None
        self._memo[("header ok", head)] = True

    def model(self, spec: str, sae_in: SAE | None = None) -> Model:
        if spec not in self._models:
            flags = processing_for(sae_in) if sae_in is not None else {}
            model = load_model(locate(spec), device=self.device, **flags)
            model.eval()
            self._models[spec] = model
        return self._models[spec]

    def _n_layers(self, spec: str) -> int:
        """The number of layers of a model that could not be loaded the way its SAEs ask (an
        input SAE is missing): a given or loaded model's, else read once and not kept, so it
        never stands in for the real load."""
        if spec in self._models:
            return self._models[spec].cfg.n_layers
        return _n_layers(spec)

    def sae_in(self, head: Head) -> SAE:
        spec = head_spec(head.specs.sae_in, head.layer)
        key = (spec, head.layer, None)
        if key not in self._saes:
            sae = self._given["sae"].get(spec)
            if sae is None:
                sae = load_sae(locate(spec), layer=head.layer, device=self.device)
            check_sae(
                sae,
                self.model(head.specs.model, sae),
                layer=head.layer,
                head=None,
                kind="in",
                spec=spec,
            )
            self._saes[key] = sae
        return self._saes[key]

    def sae_out(self, head: Head) -> SAE:
        spec = head_spec(head.specs.sae_out, head.layer, head.head)
        key = (spec, head.layer, head.head)
        if key not in self._saes:
            sae = self._given["sae"].get(spec)
            if sae is None:
                sae = load_sae(locate(spec), layer=head.layer, head=head.head, device=self.device)
            model = self.model(head.specs.model)
            check_sae(sae, model, layer=head.layer, head=head.head, kind="out", spec=spec)
            if sae.cfg.metadata.hook_name == attn_out_hook(head.layer):
                sae = head_view(sae, model, head.layer, head.head, spec)
            self._saes[key] = sae
        return self._saes[key]

    def corpus(self, head: Head) -> Tensor:
        key = (head.specs.corpus, head.specs.model)
        if key not in self._corpora:
            model = self.model(head.specs.model)
            tok = model.tokenizer
            reading = {
                "bos_token_id": None if tok is None else tok.bos_token_id,
                "seq_len": min(64, model.cfg.n_ctx),
                "d_vocab": model.cfg.d_vocab,
            }
            given = self._given["corpus"].get(head.specs.corpus)
            if given is not None:
                self._corpora[key] = tokens_of(given, where=head.specs.corpus, **reading)
            else:
                spec = locate(head.specs.corpus)
                self._corpora[key] = load_corpus(spec, tokenizer=tok, **reading)
        return self._corpora[key]

    def n_layers(self, specs: Checkpoint) -> int:
        """The model's number of layers (loaded the way its layer-0 input SAE asks)."""
        return self.model(specs.model, self.sae_in(Head(specs, 0, 0))).cfg.n_layers

    def layer_heads(self, specs: Checkpoint, layer: int, heads: str | Sequence[int]) -> list[Head]:
        """The heads ``heads`` (``"all"``, ``"0,3"`` or ints) of ``layer``, checked against
        the model (command-line fields in the errors)."""

        where = {"error": InvalidSpec, "field": "--layer"}
        try:
            sae_in = self.sae_in(Head(specs, layer, 0))
        except RulecheckError:
            # a layer past the model has no SAE either: name the layer, not the missing file
            _check_index("layer", layer, self._n_layers(specs.model), **where)
            raise
        model = self.model(specs.model, sae_in)
        _check_index("layer", layer, model.cfg.n_layers, **where)
        ids = parse_heads(heads, model.cfg.n_heads)
        assert isinstance(ids, list)
        return [Head(specs, layer, h) for h in ids]

    def layer(self, specs: Checkpoint, layer: int, heads: str | Sequence[int] = "all") -> Layer:
        """Everything one layer's extraction reads, loaded (once) and checked."""
        group = self.layer_heads(specs, layer, heads)
        model, sae_in, _, tokens = self.load(group[0])
        return Layer(group, model, sae_in, {h.head: self.sae_out(h) for h in group}, tokens)

    def load(self, head: Head) -> tuple[Model, SAE, SAE, Tensor]:
        """Model, input SAE, output SAE and corpus of a head (loaded on first use)."""
        sae_in = self.sae_in(head)
        model = self.model(head.specs.model, sae_in)
        _check_index("layer", head.layer, model.cfg.n_layers)
        _check_index("head", head.head, model.cfg.n_heads)
        return model, sae_in, self.sae_out(head), self.corpus(head)

    def fingerprints(self, head: Head, names: Sequence[str] = FINGERPRINTED) -> dict[str, str]:
        """Fingerprints of the head's model, SAEs and corpus (as rulebooks record them), only
        ``names`` (of ``FINGERPRINTED``), each hashed once per session: the heads of a layer
        share model, input SAE and corpus."""
        model, sae_in, sae_out, tokens = self.load(head)
        s = head.specs
        sae_in_key = ("sae", head_spec(s.sae_in, head.layer), head.layer, None)
        sae_out_key = ("sae", head_spec(s.sae_out, head.layer, head.head), head.layer, head.head)
        parts = {
            "model": (("model", s.model), fingerprint_model, model),
            "sae_in": (sae_in_key, fingerprint_sae, sae_in),
            "sae_out": (sae_out_key, fingerprint_sae, sae_out),
            "corpus": (("corpus", s.corpus, s.model), fingerprint_corpus, tokens),
        }
        return {name: self._hashed(*parts[name]) for name in names}

    def check_fingerprints(
        self, book: Rulebook, head: Head, file: str, accept: Collection[str] = ()
    ) -> None:
        """``FingerprintMismatch`` (one line, at the first changed part's line) unless every
        fingerprint the book records, but those of the parts in ``accept``, is the one of what
        ``head`` loads: a book's feature ids and minimums were measured on what it records. A
        book that records none (hand-written ones) is not compared."""
        recorded = {
            name: book.fingerprints[name]
            for name in FINGERPRINTED
            if name in book.fingerprints and name not in accept
        }
        if not recorded:
            return
        now = self.fingerprints(head, tuple(recorded))
        changed = [name for name, digest in recorded.items() if now[name] != digest]
        if changed:
            raise self._mismatch(book, file, changed, recorded, now)

    def _mismatch(
        self,
        book: Rulebook,
        file: str,
        changed: list[str],
        recorded: dict[str, str],
        now: dict[str, str],
    ) -> FingerprintMismatch:
        """The one line about ``changed`` parts: which, the digests, the override that loaded
        each (if one did) and the two ways out."""

        def override(name: str) -> str:
            option = name if getattr(self.overrides, name) is not None else "model"
            spec = getattr(self.overrides, option)  # another model brings its SAEs and corpus
            return "" if spec is None else f", from --rulecheck-{option.replace('_', '-')}={spec}"

        digests = {
            name: f"recorded {_short(recorded[name])}, now {_short(now[name])}{override(name)}"
            for name in changed
        }
        if len(changed) == 1:
            what = f"{PART_NAMES[changed[0]]} differs from the one this rulebook was extracted with"
            what += f" ({digests[changed[0]]})"
        else:
            parts = [PART_NAMES[name] for name in changed]
            listed = ", ".join(parts[:-1]) + f" and {parts[-1]}"
            what = f"{listed} differ from the ones this rulebook was extracted with"
            what += " (" + "; ".join(f"{n}: {d}" for n, d in digests.items()) + ")"
        if any(override(name) for name in changed):
            what += (
                "; an override does not accept a change: the rulebook's feature ids and"
                " minimums are those of what it was extracted with"
            )
        return FingerprintMismatch(
            what,
            file=file,
            line=book.origin.line(f"fingerprints.{changed[0]}"),
            field=", ".join(f"fingerprints.{name}" for name in changed),
            fix="regenerate it with --rulecheck-extract, or accept the change with"
            f" --rulecheck-accept-changed={','.join(changed)}",
            changed=tuple(changed),
        )

    def _hashed(self, key: tuple, fingerprint, obj) -> str:
        """``fingerprint(obj)``, computed once per ``key`` (the key the object is loaded by)."""
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(obj)
        return self._fingerprints[key]

    # ---------------------------------------------------------------------------- exemplars

    def _cache_key(self, head: Head) -> str:
        """The name of the head's exemplar cache entry: a digest of ``_cache_parts``."""
        return hashlib.sha256(self._cache_parts(head).encode()).hexdigest()[:32]

    def _cache_parts(self, head: Head) -> str:
        """What a head's exemplars depend on, as JSON: also kept inside its cache entry, so
        that an entry copied under another name is told apart on reading."""
        fp = self.fingerprints(head)
        parts = {
            **{k: fp[k] for k in ("model", "sae_out", "corpus")},
            "layer": head.layer,
            "head": head.head,
            "exemplars": asdict(self.exemplar_cfg),
            "rulecheck": __version__,
        }
        if head in self._sample_ids:
            parts["sample_ids"] = self._ids_digest(head)
        return json.dumps(parts, sort_keys=True)

    def sample_by(self, head: Head, ids: Tensor) -> None:
        """Key the random draws of ``head``'s features by ``ids [d_sae]`` (a retrained
        SAE's features by their old partners' ids; ``rulecheck.gate``) from now on."""
        self._sample_ids[head] = ids.to(torch.int64).cpu()

    def _ids_digest(self, head: Head) -> str | None:
        ids = self._sample_ids.get(head)
        if ids is None:
            return None
        return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]

    def layer_group(self, head: Head, heads: Sequence[Head] | None = None) -> list[Head]:
        """The heads one corpus pass for ``head`` collects: ``head``, ``heads`` when given
        (extraction collects the heads it extracts), and the heads of books announced for the
        session that read the same model and corpus at that layer (one head per index; only
        SAEs that load; none whose draws are keyed by other ids): what the session will read,
        not every head the SAE's ``{head}`` template could name. A head whose draws are keyed
        by other ids (``sample_by``) has a pass of its own."""
        if head in self._sample_ids:
            return [head]
        others = list(heads or [])
        same = (head.specs.model, head.specs.corpus, head.layer)
        others += sorted(
            (h for h in self._announced if (h.specs.model, h.specs.corpus, h.layer) == same),
            key=lambda h: (h.head, repr(h.specs)),
        )
        group, taken = [head], {head.head}
        for other in others:
            if other.head in taken or other in self._sample_ids or not self._loads(other):
                continue
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
        scale. ``observe`` sees each batch's activations if the pass runs now."""
        _, collectors, ln_scale = self._pass(head, progress, heads, observe)
        return collectors, ln_scale

    def _pass(
        self,
        head: Head,
        progress: Progress = no_progress,
        heads: Sequence[Head] | None = None,
        observe: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> tuple[list[Head], dict[int, ExemplarCollector], float]:
        """``layer_pass`` with the heads it collected; each head's draws keyed by its sample
        ids where it has them."""
        model, _, _, tokens = self.load(head)
        group = self.layer_group(head, heads)

        def compute() -> tuple[dict[int, ExemplarCollector], float]:
            check_corpus_size(tokens.shape[0], self.exemplar_cfg, head.specs.corpus)
            cfg = ExtractConfig(batch_size=self.batch_size, exemplars=self.exemplar_cfg)
            saes = {g.head: self.sae_out(g) for g in group}
            ids = {g.head: self._sample_ids[g] for g in group if g in self._sample_ids}
            return collect_layer(model, saes, tokens, head.layer, cfg, progress, ids, observe)

        digests = tuple(self._ids_digest(g) for g in group)
        key = ("layer_pass", tuple(group), digests, self.exemplar_cfg)
        collectors, ln_scale = self.memo(key, compute)
        self._keep(group, collectors)
        return group, collectors, ln_scale

    def _loads(self, head: Head) -> bool:
        """Whether the output SAE of ``head`` loads and fits (a retrained SAE may exist for
        one head only): a layer's pass collects only those heads."""
        try:
            self.sae_out(head)
        except RulecheckError:
            return False
        return True

    def collector(self, head: Head) -> ExemplarCollector:
        """The head's exemplar state: from memory, the disk cache, or a pass over the corpus
        (``layer_pass``: one per layer, however many of its heads are checked)."""
        key = (head, self._ids_digest(head))
        if key in self._collectors:
            return self._collectors[key]
        with self._layer_lock(head):  # another process may be streaming the same layer
            cached = self._load_cached(head)
            if cached is not None:
                self._collectors[key] = cached
                return cached
            self._pass(head)
        return self._collectors[key]

    @contextlib.contextmanager
    def _layer_lock(self, head: Head) -> Iterator[None]:
        """Hold the disk cache's lock of the head's layer: processes sharing the cache (pytest
        workers) wait for one pass over a layer instead of each streaming it."""
        if self.cache_dir is None or fcntl is None:
            yield
            return
        name = repr((head.specs.model, head.specs.corpus, head.layer)).encode()
        path = self.cache_dir / f"layer-{hashlib.sha256(name).hexdigest()[:16]}.lock"
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            lock = path.open("a")
        except OSError as exc:
            _cache_warning(f"{path}: exemplar cache unusable ({exc.strerror or exc}); unlocked")
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _keep(self, group: Sequence[Head], collectors: dict[int, ExemplarCollector]) -> None:
        """Hold a pass's exemplars for ``collector`` (and the disk cache), so that a head a
        pass collected is never streamed again in the session, whichever pass it was."""
        for other in group:
            other_key = (other, self._ids_digest(other))
            if other_key in self._collectors:
                continue
            col = collectors[other.head]
            col.flush()
            self._collectors[other_key] = col
            if self.cache_dir is not None:
                self._store(other, col)

    def _store(self, head: Head, col: ExemplarCollector) -> None:
        """Write the head's exemplar state to the disk cache, its key inside; a cache that
        cannot be written (a full disk) is a warning: the run goes on without it."""
        names = (*COLLECTOR_STATE, *HELD_STATE)
        state = {name: getattr(col, name).contiguous().cpu() for name in names}
        state["n_seen"] = torch.tensor(col.n_seen)
        path = self._cache_path(head)
        try:
            atomic_write(path, save(state, metadata={"key": self._cache_parts(head)}))
        except OSError as exc:
            why = exc.strerror or exc
            _cache_warning(f"{path}: exemplar cache entry not written ({why}); going on uncached")

    def with_exemplars(self, exemplars: ExemplarConfig) -> Workbench:
        """This workbench under other protocol settings (the same one each time for the same
        settings): the loaded models, SAEs and corpora are shared, exemplars, measurements and
        the books announced are its own."""
        if exemplars not in self._protocols:
            other = self._sharing(self.overrides, exemplars, LOADED)
            other._protocols = self._protocols  # one workbench per protocol, shared
            self._protocols[exemplars] = other
        return self._protocols[exemplars]

    def with_overrides(self, overrides: Specs) -> Workbench:
        """This workbench with other overrides (another retrained SAE to compare, say):
        everything loaded, measured and memoised is shared, each keyed by what it came from;
        the books announced are its own."""
        return self._sharing(overrides, self.exemplar_cfg, (*LOADED, "_collectors", "_memo"))

    def _sharing(
        self, overrides: Specs, exemplars: ExemplarConfig, shared: Sequence[str]
    ) -> Workbench:
        """A workbench of these settings holding this one's ``shared`` attributes."""
        other = Workbench(overrides, str(self.device), self.cache_dir, exemplars, self.batch_size)
        for name in shared:
            setattr(other, name, getattr(self, name))
        return other

    def has_exemplars(self, head: Head) -> bool:
        """Whether the head's exemplars are at hand (in memory or the disk cache), so that
        ``examples`` needs no pass over the corpus."""
        if (head, self._ids_digest(head)) in self._collectors:
            return True
        return self.cache_dir is not None and self._cache_path(head).exists()

    def _cache_path(self, head: Head) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"exemplars-{self._cache_key(head)}.safetensors"

    def _load_cached(self, head: Head) -> ExemplarCollector | None:
        """The head's exemplar state from the disk cache, if it is there."""
        if self.cache_dir is None or not self._cache_path(head).exists():
            return None
        _, _, sae_out, tokens = self.load(head)
        col = ExemplarCollector(
            sae_out.cfg.d_sae,
            tokens.shape[1],
            self.exemplar_cfg,
            torch.device(self.device),
            self._sample_ids.get(head),
            tokens.shape[0],
        )
        path = self._cache_path(head)
        try:
            state = _read_entry(path, self._cache_parts(head), str(self.device))
            _check_state(state, col)
        except Exception as exc:  # any unreadable entry: a cache is never worth a failure
            _cache_warning(f"{path}: unreadable exemplar cache entry ({_why(exc)}), rebuilt")
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        for name in (*COLLECTOR_STATE, *HELD_STATE):
            setattr(col, name, state[name])
        col.n_seen = int(state["n_seen"])
        return col

    def examples(self, head: Head, feature: int, file: str = "") -> FeatureExamples:
        """A feature's exemplars; an error if the feature is not eligible on this checkpoint."""
        col = self.collector(head)
        d_sae = col.active.shape[0]
        if not 0 <= feature < d_sae:
            raise InvalidRulebook(
                f"feature {feature} is out of range: the output SAE has {d_sae} features",
                file=file or None,
                field=f"feature[{feature}]",
                fix=f"use a feature id in 0..{d_sae - 1}",
            )
        if feature not in set(col.eligible().tolist()):
            active = int(col.active[feature])
            raise NotEligible(
                f"feature {feature} of L{head.layer}H{head.head} is active in {active} of "
                f"{col.n_seen} sequences; the protocol needs >= {self.exemplar_cfg.min_active}"
                f" active and >= {self.exemplar_cfg.min_inactive} inactive",
                file=file or None,
                field=f"feature[{feature}]",
                fix="check that the checkpoint is the one the rulebook was written for",
            )
        return col.examples(feature)

    # ---------------------------------------------------------------------------- measuring

    def memo(self, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()``, once per session for ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def memoized(self, key: tuple) -> bool:
        return key in self._memo

    def sequence_chunks(
        self, head: Head, seq: Tensor, t: Tensor, columns: Sequence[int] | None = None
    ) -> Iterator[SequenceChunk]:
        """The input-SAE activations of the prefixes ``(seq, t)`` of the head's corpus, each
        distinct sequence run once (``rulecheck.core.prefixes.sequence_chunks``), only
        ``columns`` when given."""
        model, sae_in, _, tokens = self.load(head)
        return sequence_chunks(model, sae_in, tokens, head.layer, seq, t, self.batch_size, columns)

    def held_out_chunks(self, head: Head) -> Iterator[SequenceChunk]:
        """The held-out sequences of the head's exemplars (``core.heldout``), whole, with every
        input feature: run once per session and kept sparse (``KeptInputs``), as every
        feature's precision where its rules fire reads them."""
        model, sae_in, _, tokens = self.load(head)
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

        kept = self.memo(
            (
                "held_inputs",
                head.specs.model,
                head.specs.sae_in,
                head.specs.corpus,
                head.layer,
                tuple(seq.tolist()),
            ),
            keep,
        )
        if kept.complete:
            return kept.chunks(torch.arange(len(seq)), ends, self.batch_size)
        return sequence_chunks(model, sae_in, tokens, head.layer, seq, ends, self.batch_size)

    def announced_features(self, file: str) -> list[FeatureRules]:
        """The features of the book announced from ``file`` whose items run this session (all
        of them unless ``announce`` was told), in the book's order; none if not announced."""
        book, features = self._books.get(file, (None, None))
        if book is None:
            return []
        return [r for r in book.features if features is None or r.feature in features]

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


PART_NAMES = {
    "model": "the model",
    "sae_in": "the input SAE",
    "sae_out": "the output SAE",
    "corpus": "the corpus",
}


def book_specs(book: Rulebook, file: str) -> Specs:
    """The specs the header of ``book`` (read from ``file``) writes, relative paths read from
    the book's directory (``specs.from_book``)."""
    parts = {part: getattr(book, part) for part in ("model", "sae_in", "sae_out", "corpus")}
    return Specs(**{k: from_book(v, file, book.layer, book.head) for k, v in parts.items()})


def _short(digest: str) -> str:
    """A fingerprint as an error shows it: ``sha256:`` and the first 8 hex digits."""
    return digest if len(digest) <= 16 else digest[:15] + "\u2026"


class CacheWarning(UserWarning):
    """A cache entry could not be read and was rebuilt, or could not be written."""


class ForeignEntry(ValueError):
    """A cache entry whose key is not the one it is read for: copied under another name."""


def _cache_warning(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


def _why(exc: Exception) -> str:
    """Why an entry was not used, in the warning: a foreign key says so, else the error's type."""
    return str(exc) if isinstance(exc, ForeignEntry) else type(exc).__name__


def _read_entry(path: Path, key: str, device: str) -> dict[str, Tensor]:
    """The tensors of the cache entry at ``path``; ``ForeignEntry`` unless it holds ``key``."""
    with safe_open(str(path), framework="pt", device=device) as entry:
        if (entry.metadata() or {}).get("key") != key:
            raise ForeignEntry("its key is another head's or setting's")
        return {name: entry.get_tensor(name) for name in entry.keys()}  # noqa: SIM118


def _check_state(state: dict[str, Tensor], col: ExemplarCollector) -> None:
    """Raise ``ValueError`` unless ``state`` is a whole exemplar state shaped for ``col``."""
    missing = [n for n in (*COLLECTOR_STATE, "n_seen") if n not in state]
    if missing:
        raise ValueError(f"missing {missing}")
    d_sae = col.active.shape[0]
    if state["active"].shape != (d_sae,) or state["n_seen"].numel() != 1:
        raise ValueError("shape")
    widths = {state[n].shape[1] if state[n].dim() == 2 else -1 for n in COLLECTOR_STATE[1:]}
    rows = {state[n].shape[0] for n in COLLECTOR_STATE}
    if rows != {d_sae} or -1 in widths:
        raise ValueError("shape")
    missing = [n for n in HELD_STATE if n not in state]
    if missing:
        raise ValueError(f"missing {missing}")
    held = [state[n] for n in HELD_STATE]
    if {x.dim() for x in held} != {1} or len({len(x) for x in held}) != 1:
        raise ValueError("shape")
    feat, row, pos = held[:3]
    if len(feat) and not (
        0 <= int(feat.min()) <= int(feat.max()) < d_sae
        and 0 <= int(row.min()) <= int(row.max()) < len(col.held_seq)
        and 1 <= int(pos.min()) <= int(pos.max()) < col.seq_len
        and bool((feat[1:] >= feat[:-1]).all())
    ):
        raise ValueError("held-out positions out of range")


def _check_index(
    what: str, value: int, n: int, *, error: type[RulecheckError] = InvalidRulebook, **where: Any
) -> None:
    """``value`` is a valid ``what`` (layer or head) of a model that has ``n``; else ``error``
    about ``where["field"]`` (default: ``what``) and the rest of ``where`` (file, line)."""
    if not 0 <= value < n:
        raise error(
            f"{what} {value} is out of range: the model has {n} {what}s",
            **{"field": what, **where},
            fix=f"use a {what} in 0..{n - 1}",
        )


def _n_layers(model_spec: str) -> int:
    """The number of layers of a model that could not be loaded the way its SAEs ask (an
    input SAE is missing): read once, not kept, so it never stands in for the real load."""
    return load_model(locate(model_spec), device="cpu").cfg.n_layers
