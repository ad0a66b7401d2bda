"""A checking session: checkpoints loaded once, exemplars collected once, both shared by every
rule that is checked (the pytest plugin's session state, usable from plain Python too).

Exemplars are the expensive part (a pass over the corpus per layer); they are cached on disk
under ``.rulecheck_cache/``, keyed by the fingerprints of model, output SAE and corpus and by
the protocol's settings, so a second run with unchanged inputs skips the pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens import HookedTransformer

from rulecheck import __version__
from rulecheck.errors import RulecheckError
from rulecheck.evaluate import (
    Columns,
    Measured,
    columns_of,
    feature_refs,
    predict_examples,
    score_predictions,
    terms_of,
)
from rulecheck.exemplars import ExemplarCollector, ExemplarConfig, FeatureExamples
from rulecheck.extract import ExtractConfig, collect_layer, prefix_chunks
from rulecheck.heads import Probe
from rulecheck.loading import (
    check_sae,
    fingerprint_corpus,
    fingerprint_model,
    fingerprint_sae,
    load_corpus,
    load_model,
    load_sae,
    resolve_device,
)
from rulecheck.rulebook import FeatureRules, Rulebook
from rulecheck.specs import Specs, head_spec, locate, parse_heads, processing_for
from rulecheck.zoo import is_zoo_spec

COLLECTOR_STATE = ("active", "top_val", "top_seq", "top_pos", "neg_key", "neg_seq")


@dataclass(frozen=True)
class Head:
    """One head of one checkpoint, as a rulebook names it (after overrides)."""

    specs: Specs
    layer: int
    head: int


class Workbench:
    """Loads what rulebooks name, once, and measures their rules."""

    def __init__(
        self,
        overrides: Specs | None = None,
        device: str = "auto",
        cache_dir: Path | None = Path(".rulecheck_cache"),
        exemplars: ExemplarConfig | None = None,
        batch_size: int = 64,
    ) -> None:
        self.overrides = overrides or Specs(model=None)  # type: ignore[arg-type]
        self.device = resolve_device(device)
        self.cache_dir = cache_dir
        self.exemplar_cfg = exemplars or ExemplarConfig()
        self.batch_size = batch_size
        self._models: dict[str, HookedTransformer] = {}
        self._saes: dict[tuple[str, int, int | None], SAE] = {}
        self._corpora: dict[tuple[str, str], Tensor] = {}
        self._collectors: dict[Head, ExemplarCollector] = {}
        self._measured: dict[tuple[Head, int, str], Measured] = {}
        self._fingerprints: dict[tuple, str] = {}

    # ------------------------------------------------------------------------------ loading

    def head_of(self, book: Rulebook, file: str) -> Head:
        """The head a rulebook is about, with command-line overrides applied: the book's specs
        (a zoo model fills in its own SAEs and corpus), then each given override; another zoo
        model brings its own SAEs and corpus unless those are given too."""
        o = self.overrides
        if book.model is None and o.model is None:
            raise RulecheckError(
                "names no model",
                file=file,
                field="model",
                fix="add 'model: rulecheck-tiny' (or a path) or pass --rulecheck-model",
            )
        base = Specs(o.model or book.model, book.sae_in, book.sae_out, book.corpus)
        if book.model is not None and not (o.model and is_zoo_spec(o.model)):
            base = replace(Specs(book.model, book.sae_in, book.sae_out, book.corpus).completed(),
                           model=o.model or book.model)  # fmt: skip
        specs = Specs(
            model=base.model,
            sae_in=o.sae_in or base.sae_in,
            sae_out=o.sae_out or base.sae_out,
            corpus=o.corpus or base.corpus,
        )
        try:
            specs = specs.completed()
        except RulecheckError as e:
            raise RulecheckError(e.what, file=file, field=e.field, fix=e.fix) from None
        return Head(specs, book.layer, book.head)

    def model(self, spec: str, sae_in: SAE | None = None) -> HookedTransformer:
        if spec not in self._models:
            flags = processing_for(sae_in) if sae_in is not None else {}
            model = load_model(locate(spec), device=self.device, **flags)
            model.eval()
            self._models[spec] = model
        return self._models[spec]

    def sae_in(self, head: Head) -> SAE:
        spec = head_spec(head.specs.sae_in, head.layer)
        key = (spec, head.layer, None)
        if key not in self._saes:
            sae = load_sae(locate(spec), layer=head.layer, device=self.device)
            check_sae(sae, self.model(head.specs.model, sae), layer=head.layer, head=None,
                      kind="in", spec=spec)  # fmt: skip
            self._saes[key] = sae
        return self._saes[key]

    def sae_out(self, head: Head) -> SAE:
        spec = head_spec(head.specs.sae_out, head.layer, head.head)
        key = (spec, head.layer, head.head)
        if key not in self._saes:
            sae = load_sae(locate(spec), layer=head.layer, head=head.head, device=self.device)
            check_sae(sae, self.model(head.specs.model), layer=head.layer, head=head.head,
                      kind="out", spec=spec)  # fmt: skip
            self._saes[key] = sae
        return self._saes[key]

    def corpus(self, head: Head) -> Tensor:
        key = (head.specs.corpus, head.specs.model)
        if key not in self._corpora:
            model = self.model(head.specs.model)
            tok = model.tokenizer
            self._corpora[key] = load_corpus(
                locate(head.specs.corpus),
                tokenizer=tok,
                bos_token_id=None if tok is None else tok.bos_token_id,
                seq_len=min(64, model.cfg.n_ctx),
                d_vocab=model.cfg.d_vocab,
            )
        return self._corpora[key]

    def layer_heads(self, specs: Specs, layer: int, heads: str | Sequence[int]) -> list[Head]:
        """The heads ``heads`` (``"all"``, ``"0,3"`` or ints) of ``layer``, checked against
        the model (command-line fields in the errors)."""
        specs = specs.completed()

        def check_layer(n_layers: int) -> None:
            if not 0 <= layer < n_layers:
                raise RulecheckError(
                    f"layer {layer} is out of range: the model has {n_layers} layers",
                    field="--layer",
                    fix=f"use a layer in 0..{n_layers - 1}",
                )

        try:
            sae_in = self.sae_in(Head(specs, layer, 0))
        except RulecheckError:
            # a layer past the model has no SAE either: name the layer, not the missing file
            check_layer(self.model(specs.model).cfg.n_layers)
            raise
        model = self.model(specs.model, sae_in)
        check_layer(model.cfg.n_layers)
        return [Head(specs, layer, h) for h in parse_heads(heads, model.cfg.n_heads)]

    def load(self, head: Head) -> tuple[HookedTransformer, SAE, SAE, Tensor]:
        """Model, input SAE, output SAE and corpus of a head (loaded on first use)."""
        sae_in = self.sae_in(head)
        model = self.model(head.specs.model, sae_in)
        for field, value, n in (("layer", head.layer, model.cfg.n_layers),
                                ("head", head.head, model.cfg.n_heads)):  # fmt: skip
            if not 0 <= value < n:
                raise RulecheckError(
                    f"{field} {value} is out of range: the model has {n} {field}s",
                    field=field,
                    fix=f"use a {field} in 0..{n - 1}",
                )
        return model, sae_in, self.sae_out(head), self.corpus(head)

    def fingerprints(self, head: Head) -> dict[str, str]:
        """Fingerprints of the head's model, SAEs and corpus (as rulebooks record them),
        each hashed once per session: the heads of a layer share model, input SAE and corpus."""
        model, sae_in, sae_out, tokens = self.load(head)
        s = head.specs
        return {
            "model": self._hashed(("model", s.model), fingerprint_model, model),
            "sae_in": self._hashed(
                ("sae", head_spec(s.sae_in, head.layer), head.layer, None), fingerprint_sae, sae_in
            ),
            "sae_out": self._hashed(
                ("sae", head_spec(s.sae_out, head.layer, head.head), head.layer, head.head),
                fingerprint_sae,
                sae_out,
            ),
            "corpus": self._hashed(("corpus", s.corpus, s.model), fingerprint_corpus, tokens),
        }

    def _hashed(self, key: tuple, fingerprint, obj) -> str:
        """``fingerprint(obj)``, computed once per ``key`` (the key the object is loaded by)."""
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(obj)
        return self._fingerprints[key]

    def adopt_exemplars(self, head: Head, collector: ExemplarCollector) -> None:
        """Use exemplars already collected for ``head`` instead of a pass over the corpus."""
        self._collectors[head] = collector

    # ---------------------------------------------------------------------------- exemplars

    def _cache_key(self, head: Head) -> str:
        fp = self.fingerprints(head)
        parts = {
            **{k: fp[k] for k in ("model", "sae_out", "corpus")},
            "layer": head.layer,
            "head": head.head,
            "exemplars": asdict(self.exemplar_cfg),
            "rulecheck": __version__,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def collector(self, head: Head) -> ExemplarCollector:
        """The head's exemplar state: from memory, the disk cache, or a pass over the corpus.

        A pass serves every head of the layer whose output SAE the ``{head}`` template names
        and whose state is not cached yet: one pass per layer, however many heads are checked.
        """
        if head in self._collectors:
            return self._collectors[head]
        cached = self._load_cached(head)
        if cached is not None:
            self._collectors[head] = cached
            return cached
        model, _, _, tokens = self.load(head)
        group = [head]
        if "{head}" in head.specs.sae_out:
            group += [
                other
                for h in range(model.cfg.n_heads)
                if (other := replace(head, head=h)) != head
                and other not in self._collectors
                and self._load_cached(other) is None
            ]
        cfg = ExtractConfig(batch_size=self.batch_size, exemplars=self.exemplar_cfg)
        saes = {g.head: self.sae_out(g) for g in group}
        cols, _ = collect_layer(model, saes, tokens, head.layer, cfg)
        for g in group:
            col = cols[g.head]
            col.flush()
            self._collectors[g] = col
            if self.cache_dir is not None:
                state = {name: getattr(col, name).contiguous() for name in COLLECTOR_STATE}
                state["n_seen"] = torch.tensor(col.n_seen)
                _save_atomically(state, self._cache_path(g))
        return self._collectors[head]

    def _cache_path(self, head: Head) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"exemplars-{self._cache_key(head)}.safetensors"

    def _load_cached(self, head: Head) -> ExemplarCollector | None:
        """The head's exemplar state from the disk cache, if it is there."""
        if self.cache_dir is None or not self._cache_path(head).exists():
            return None
        _, _, sae_out, tokens = self.load(head)
        col = ExemplarCollector(sae_out.cfg.d_sae, tokens.shape[1], self.exemplar_cfg,
                                torch.device(self.device))  # fmt: skip
        state = load_file(str(self._cache_path(head)), device=str(self.device))
        for name in COLLECTOR_STATE:
            setattr(col, name, state[name])
        col.n_seen = int(state["n_seen"])
        return col

    def examples(self, head: Head, feature: int, file: str = "") -> FeatureExamples:
        """A feature's exemplars; an error if the feature is not eligible on this checkpoint."""
        col = self.collector(head)
        d_sae = col.active.shape[0]
        if not 0 <= feature < d_sae:
            raise RulecheckError(
                f"feature {feature} is out of range: the output SAE has {d_sae} features",
                file=file or None,
                field=f"feature[{feature}]",
                fix=f"use a feature id in 0..{d_sae - 1}",
            )
        if feature not in set(col.eligible().tolist()):
            active = int(col.active[feature])
            raise RuleNotEligible(
                f"feature {feature} of L{head.layer}H{head.head} is active in {active} of "
                f"{col.n_seen} sequences; the protocol needs >= {self.exemplar_cfg.min_active}"
                f" active and >= {self.exemplar_cfg.min_inactive} inactive",
                file=file or None,
                field=f"feature[{feature}]",
                fix="check that the checkpoint is the one the rulebook was written for",
            )
        return col.examples(feature)

    # ---------------------------------------------------------------------------- measuring

    def measure(self, head: Head, rules: FeatureRules, file: str = "") -> Measured:
        """The rules' precision, recall, F1 and Spearman on the feature's test split."""
        key = (head, rules.feature, json.dumps([t.to_dict() for t in rules.skipgrams]))
        if key in self._measured:
            return self._measured[key]
        model, sae_in, _, tokens = self.load(head)
        refs = feature_refs(rules, model.tokenizer, sae_in.cfg.d_sae, file)
        columns = columns_of(refs)
        ex = self.examples(head, rules.feature, file)
        # encode only the input features the rules read: they come first, numbered 0..n-1
        chunks = prefix_chunks(model, sae_in, tokens, head.layer, ex.seq, ex.t, self.batch_size,
                               columns.features)  # fmt: skip
        read = Columns(tuple(range(len(columns.features))), columns.token_sets)
        pred = predict_examples(chunks, read, terms_of(refs, columns), len(ex.seq),
                                torch.device(self.device))  # fmt: skip
        self._measured[key] = score_predictions(pred, ex)
        return self._measured[key]

    def probe(self, head: Head, feature: int) -> Probe:
        """The true activation of one output feature of the head, for counterfactuals."""
        model, _, sae_out, _ = self.load(head)
        return Probe(model, sae_out, head.layer, head.head, feature, self.batch_size)


class RuleNotEligible(RulecheckError):
    """The feature is not active often enough on this checkpoint to be checked."""


def _save_atomically(state: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
