"""What a rulebook is checked on: its header's specs with the overrides applied, resolved into
a ``Head`` of a ``Checkpoint``, and checked by loading it, so that a header that does not load
is an error at the book's line."""

from __future__ import annotations

from dataclasses import replace

from rulecheck.book import Rulebook
from rulecheck.errors import InvalidRulebook, InvalidSpec, RulecheckError
from rulecheck.loaded import Loaded, check_index
from rulecheck.specs import Checkpoint, Head, Specs, from_book
from rulecheck.zoo import is_zoo_spec


def book_specs(book: Rulebook, file: str) -> Specs:
    """The specs the header of ``book`` (read from ``file``) writes, relative paths read from
    the book's directory (``specs.from_book``)."""
    parts = {part: getattr(book, part) for part in ("model", "sae_in", "sae_out", "corpus")}
    return Specs(**{k: from_book(v, file, book.layer, book.head) for k, v in parts.items()})


class Targets:
    """The heads rulebooks name under one set of overrides (command-line options), each
    header checked once against what ``loaded`` loads."""

    def __init__(self, overrides: Specs, loaded: Loaded) -> None:
        self.overrides = overrides
        self.loaded = loaded
        self._checked: set[Head] = set()

    def head_of(self, book: Rulebook, file: str, *, saes: bool = True) -> Head:
        """The head a rulebook is about, with the overrides applied: the book's specs (a zoo
        model fills in its own SAEs and corpus), then each given override; another zoo model
        brings its own SAEs and corpus unless those are given too. With ``saes`` False, the
        SAEs are the book's own whatever the overrides say (the SAEs a book is remapped
        from). Loads what it names: a header that does not load is an error at its line."""
        head = self.named_head(book, file, saes=saes)
        self._check_header(head, book, file)
        return head

    def named_head(self, book: Rulebook, file: str, *, saes: bool = True) -> Head:
        """``head_of`` without loading anything."""
        o = self.overrides if saes else replace(self.overrides, sae_in=None, sae_out=None)
        if book.model is None and o.model is None:
            raise InvalidRulebook(
                "names no model",
                file=file,
                field="model",
                fix="add 'model: rulecheck-tiny' (or a path) or pass --rulecheck-model",
            )
        base = book_specs(book, file)
        if book.model is not None and not (o.model and is_zoo_spec(o.model)):
            # the book's own zoo model fills in its SAEs and corpus before overrides apply
            filled = _checkpoint(base, book, file)
            base = Specs(o.model or book.model, filled.sae_in, filled.sae_out, filled.corpus)
        specs = Specs(
            model=o.model or base.model,
            sae_in=o.sae_in or base.sae_in,
            sae_out=o.sae_out or base.sae_out,
            corpus=o.corpus or base.corpus,
        )
        return Head(_checkpoint(specs, book, file), book.layer, book.head)

    def _check_header(self, head: Head, book: Rulebook, file: str) -> None:
        """Load what the book names, so that a spec that does not load, or a layer or head
        past the model, is an error at the book's line, not about some file deep inside."""
        if head in self._checked:
            return

        def blame(part: str, exc: RulecheckError) -> RulecheckError:
            return self._blame(part, exc, book, file)

        def check_range(what: str, value: int, n: int) -> None:
            check_index(what, value, n, file=file, line=book.origin.line(what))

        loaded = self.loaded
        try:
            sae_in = loaded.sae_in(head)
        except RulecheckError as exc:
            # a layer past the model has no input SAE either: say so, not which file is missing
            try:
                n_layers = loaded.layer_count(head.specs.model)
            except RulecheckError:
                raise blame("model", exc) from None
            check_range("layer", head.layer, n_layers)
            raise blame("sae_in", exc) from None
        try:
            model = loaded.model(head.specs.model, sae_in)
        except RulecheckError as exc:
            raise blame("model", exc) from None
        check_range("layer", head.layer, model.cfg.n_layers)
        check_range("head", head.head, model.cfg.n_heads)
        for part, load in (("sae_out", loaded.sae_out), ("corpus", loaded.corpus)):
            try:
                load(head)
            except RulecheckError as exc:
                raise blame(part, exc) from None
        self._checked.add(head)

    def _blame(self, part: str, exc: RulecheckError, book: Rulebook, file: str) -> RulecheckError:
        """The error of a ``part`` that does not load: the option's own when an override
        named it, else one at the line of the book that did."""
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


def _checkpoint(specs: Specs, book: Rulebook, file: str) -> Checkpoint:
    """``specs.resolve()``, its error about the rulebook: which key it must name."""
    try:
        return specs.resolve()
    except InvalidSpec as e:
        key = (e.field or "--model").removeprefix("--").replace("-", "_")
        written = from_book(book.model, file, book.layer, book.head)
        if key == "model" and specs.model != written:  # --rulecheck-model's
            raise InvalidSpec(e.what, file=e.file, field="--rulecheck-model", fix=e.fix) from None
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
