"""What a run is about: the model, SAE and corpus specs of a head (a ``Head``: a checkpoint's
layer and head), and how to read them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_lens import SAE

from rulecheck import zoo
from rulecheck.errors import InvalidSpec

DEFAULT_MODEL = "rulecheck-tiny"


@dataclass(frozen=True)
class Checkpoint:
    """What a run reads, every part named: the model, the input SAE (``{layer}`` template),
    the output SAE (``{layer}``/``{head}`` templates) and the corpus, as specs (zoo names stay
    names; :func:`locate` turns them into paths when they are loaded)."""

    model: str
    sae_in: str
    sae_out: str
    corpus: str


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
class Specs:
    """What to load, as given on a command line or in a rulebook header: any part may be
    missing until :meth:`resolve` fills it in."""

    model: str | None = DEFAULT_MODEL
    sae_in: str | None = None
    sae_out: str | None = None
    corpus: str | None = None

    def resolve(self) -> Checkpoint:
        """The checkpoint: a zoo model fills in its own SAEs and corpus; any other model must
        name them."""
        model = self.model or DEFAULT_MODEL
        if zoo.is_zoo_spec(model):
            name = model.split(":", 1)[0]
            return Checkpoint(
                model=model,
                sae_in=self.sae_in or f"{name}:sae_in/L{{layer}}",
                sae_out=self.sae_out or f"{name}:sae_out/L{{layer}}H{{head}}",
                corpus=self.corpus or f"{name}:eval",
            )
        _check_model_spec(model)
        missing = [o for o in ("sae_in", "sae_out", "corpus") if getattr(self, o) is None]
        if missing:
            option = f"--{missing[0].replace('_', '-')}"
            raise InvalidSpec(
                f"model {model!r} is not a zoo model, so {option} must be given",
                field=option,
                fix="name the SAE directory or registry id (templates {layer}, {head}) "
                "and the corpus file",
            )
        return Checkpoint(model, self.sae_in, self.sae_out, self.corpus)  # type: ignore[arg-type]


def _check_model_spec(model: str) -> None:
    """A model spec that is neither a zoo name nor a model directory, but reads like a typo of a
    zoo name or like a path to a directory without a model, is refused naming ``--model``
    (before the SAE options it would otherwise be blamed on)."""
    import difflib

    from rulecheck.loading._common import looks_like_path

    if model.startswith("bridge:"):
        return
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise InvalidSpec(
            "not a model directory: no config.json",
            file=model,
            field="--model",
            fix="pass a model directory (rulecheck or Hugging Face), a zoo name or a name like gpt2",
        )
    if looks_like_path(model) and not path.exists():
        raise InvalidSpec(
            "no such model directory",
            file=model,
            field="--model",
            fix="check the path, or pass a zoo name or a name like gpt2",
        )
    close = difflib.get_close_matches(model, zoo.ENTRIES, n=1, cutoff=0.75)
    if not path.exists() and close:
        raise InvalidSpec(
            f"not a zoo model, file or directory (did you mean {close[0]}?)",
            file=model,
            field="--model",
            fix=f"pass --model {close[0]}, or a model directory",
        )


def from_book(spec: str | None, book_file: str | Path, layer: int, head: int | None) -> str | None:
    """A spec written in the rulebook at ``book_file``, with a relative path read from the
    book's directory, so that a book names the same files from any working directory.

    A spec is a relative path when it starts with ``./`` or ``../`` (or ``bridge:`` and one),
    or when a file or directory of that name is beside the book (``{layer}`` and ``{head}``
    filled in); zoo specs, absolute and ``~`` paths, model names, registry ids and dataset
    names (nothing of their name beside the book) are left as written.
    """
    if spec is None or zoo.is_zoo_spec(spec):
        return spec
    prefix = "bridge:" if spec.startswith("bridge:") else ""
    target = spec.removeprefix(prefix)
    if not target or target.startswith("~") or Path(target).is_absolute():
        return spec
    base = Path(os.path.abspath(book_file)).parent
    beside = os.path.normpath(base / target)
    explicit = target.startswith(("./", "../", ".\\", "..\\")) or target in (".", "..")
    if explicit or Path(head_spec(beside, layer, head)).exists():
        return prefix + beside
    return spec


def locate(spec: str) -> str:
    """Where a spec's files are: a zoo spec (``rulecheck-tiny:sae_in/L0``) becomes the path
    inside its entry (a zoo entry built by code is built on first use); any other spec is
    returned as given (a path, a TransformerLens name, a registry id)."""
    path = zoo.resolve(spec)
    return spec if path is None else str(path)


def head_spec(template: str, layer: int, head: int | None = None) -> str:
    return template.replace("{layer}", str(layer)).replace("{head}", str(head))


def parse_heads(heads: str | Sequence[int], n_heads: int | None = None) -> str | list[int]:
    """``"all"``, ``"0,3"`` or a list of ints: ``"all"`` or the sorted head ids; checked
    against the model's ``n_heads`` when given (then ``"all"`` becomes every head)."""
    if isinstance(heads, str):
        text = heads.strip()
        if text == "all":
            return list(range(n_heads)) if n_heads is not None else "all"
        try:
            heads = [int(h, 10) for h in text.split(",") if h.strip()]
        except ValueError:
            raise InvalidSpec(
                f"cannot read heads {text!r}", field="--heads", fix="use e.g. --heads 0,3 or all"
            ) from None
    if not heads:
        raise InvalidSpec("names no head", field="--heads", fix="use e.g. --heads 0,3 or all")
    top = n_heads if n_heads is not None else None
    bad = [h for h in heads if h < 0 or (top is not None and h >= top)]
    if bad:
        where = f": the model has {n_heads} heads" if n_heads is not None else ""
        fix = f"use heads in 0..{n_heads - 1}" if n_heads is not None else "use heads >= 0"
        raise InvalidSpec(f"head {bad[0]} is out of range{where}", field="--heads", fix=fix)
    return sorted(set(heads))


PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def processing_for(sae: SAE) -> dict[str, bool]:
    """How to load the model so that it matches what the SAE was trained on: the
    TransformerLens processing flags recorded in ``model_from_pretrained_kwargs``. An SAE
    trained on ``from_pretrained_no_processing`` says so with all flags false."""
    kwargs = sae.cfg.metadata.get("model_from_pretrained_kwargs") or {}
    return {k: bool(v) for k, v in kwargs.items() if k in PROCESSING_FLAGS}
