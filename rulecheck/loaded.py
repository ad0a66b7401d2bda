"""What a session loaded, once each, keyed by the spec it came from: models, SAEs and corpora
(loaded from their specs, or given as objects) and their fingerprints, hashed once each; and
the check of a rulebook's recorded fingerprints against them."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from rulecheck.book import Rulebook
from rulecheck.config import FINGERPRINTED
from rulecheck.core.modelview import Model
from rulecheck.errors import FingerprintMismatch, InvalidRulebook, InvalidSpec, RulecheckError
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
)
from rulecheck.loading.corpora import tokens_of
from rulecheck.specs import Checkpoint, Head, Specs, head_spec, locate, parse_heads, processing_for

PART_NAMES = {
    "model": "the model",
    "sae_in": "the input SAE",
    "sae_out": "the output SAE",
    "corpus": "the corpus",
}


@dataclass(frozen=True)
class Layer:
    """One layer of a checkpoint as loaded for extraction: its heads, the model, the layer's
    input SAE, each head's output SAE and the corpus ``[n_seq, pos]``."""

    heads: list[Head]
    model: Model
    sae_in: SAE
    sae_outs: dict[int, SAE]
    tokens: Tensor


class Loaded:
    """Models, SAEs and corpora, each loaded (or given) once and checked, with their
    fingerprints; shared by every workbench derived from one (``Workbench.with_*``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._models: dict[str, Model] = {}
        self._saes: dict[tuple[str, int, int | None], SAE] = {}
        self._corpora: dict[tuple[str, str], Tensor] = {}
        self._fingerprints: dict[tuple, str] = {}
        self._given: dict[str, dict[str, Any]] = {"sae": {}, "corpus": {}}

    def give(
        self,
        models: Mapping[str, Model] | None = None,
        saes: Mapping[str, SAE] | None = None,
        corpora: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Hold these loaded objects, by spec (before they are first read)."""
        self._models.update(models or {})
        self._given["sae"].update(saes or {})
        self._given["corpus"].update(corpora or {})

    def model(self, spec: str, sae_in: SAE | None = None) -> Model:
        """The model of ``spec``, loaded the way ``sae_in`` asks on first use."""
        if spec not in self._models:
            flags = processing_for(sae_in) if sae_in is not None else {}
            model = load_model(locate(spec), device=self.device, **flags)
            model.eval()
            self._models[spec] = model
        return self._models[spec]

    def layer_count(self, spec: str) -> int:
        """The number of layers of a model that could not be loaded the way its SAEs ask (an
        input SAE is missing): a given or loaded model's, else read once and not kept, so it
        never stands in for the real load."""
        if spec in self._models:
            return self._models[spec].cfg.n_layers
        return load_model(locate(spec), device="cpu").cfg.n_layers

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

    def loads(self, head: Head) -> bool:
        """Whether the output SAE of ``head`` loads and fits (a retrained SAE may exist for
        one head only)."""
        try:
            self.sae_out(head)
        except RulecheckError:
            return False
        return True

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
        try:
            sae_in = self.sae_in(Head(specs, layer, 0))
        except RulecheckError:
            # a layer past the model has no SAE either: name the layer, not the missing file
            n_layers = self.layer_count(specs.model)
            check_index("layer", layer, n_layers, error=InvalidSpec, field="--layer")
            raise
        model = self.model(specs.model, sae_in)
        check_index("layer", layer, model.cfg.n_layers, error=InvalidSpec, field="--layer")
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
        check_index("layer", head.layer, model.cfg.n_layers)
        check_index("head", head.head, model.cfg.n_heads)
        return model, sae_in, self.sae_out(head), self.corpus(head)

    def fingerprints(self, head: Head, names: Sequence[str] = FINGERPRINTED) -> dict[str, str]:
        """Fingerprints of the head's model, SAEs and corpus (as rulebooks record them), only
        ``names`` (of ``FINGERPRINTED``), each hashed once: the heads of a layer share model,
        input SAE and corpus."""
        model, sae_in, sae_out, tokens = self.load(head)
        s = head.specs
        sae_in_key = ("sae", head_spec(s.sae_in, head.layer), head.layer, None)
        sae_out_key = ("sae", head_spec(s.sae_out, head.layer, head.head), head.layer, head.head)
        parts: dict[str, tuple[tuple, Callable[[Any], str], Any]] = {
            "model": (("model", s.model), fingerprint_model, model),
            "sae_in": (sae_in_key, fingerprint_sae, sae_in),
            "sae_out": (sae_out_key, fingerprint_sae, sae_out),
            "corpus": (("corpus", s.corpus, s.model), fingerprint_corpus, tokens),
        }
        return {name: self._hashed(*parts[name]) for name in names}

    def _hashed(self, key: tuple, fingerprint: Callable[[Any], str], obj: Any) -> str:
        """``fingerprint(obj)``, computed once per ``key`` (the key the object is loaded by)."""
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(obj)
        return self._fingerprints[key]

    def check_fingerprints(
        self,
        book: Rulebook,
        head: Head,
        file: str,
        overrides: Specs,
        accept: Collection[str] = (),
    ) -> None:
        """``FingerprintMismatch`` (one line, at the first changed part's line) unless every
        fingerprint the book records, but those of the parts in ``accept``, is the one of what
        ``head`` loads (``overrides`` say which option loaded a part). A book that records
        none (hand-written ones) is not compared."""
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
            raise mismatch(book, file, changed, recorded, now, overrides)


def mismatch(
    book: Rulebook,
    file: str,
    changed: list[str],
    recorded: dict[str, str],
    now: dict[str, str],
    overrides: Specs,
) -> FingerprintMismatch:
    """The one line about ``changed`` parts: which, the digests, the override that loaded
    each (if one did) and the two ways out."""

    def override(name: str) -> str:
        option = name if getattr(overrides, name) is not None else "model"
        spec = getattr(overrides, option)  # another model brings its SAEs and corpus
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


def _short(digest: str) -> str:
    """A fingerprint as an error shows it: ``sha256:`` and the first 8 hex digits."""
    return digest if len(digest) <= 16 else digest[:15] + "\u2026"


def check_index(
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
