"""The Python API, for a notebook or a script: objects in, results out.

    import rulecheck
    model = rulecheck.load_model("rulecheck-tiny")          # or a HookedTransformer of yours
    sae_in = SAE.load_from_disk(...)                        # sae_lens SAEs, or specs
    result = rulecheck.extract(model, sae_in, sae_out, tokens, head="L0H1", features=[3, 17])
    result.save("books/")                                   # books/L0H1.yaml, as the CLI writes
    checked = rulecheck.check("books/L0H1.yaml", model=model, sae_in=sae_in, sae_out=sae_out,
                              tokens=tokens)

Every part may be an object (a HookedTransformer or TransformerBridge, a sae_lens ``SAE``, token
ids ``[batch, pos]``) or a spec string (a zoo name such as ``rulecheck-tiny``, a path, a
registry id). Objects are handed to the same ``Workbench`` the command line and the pytest
plugin use, under the names a book records for them (``names=``, else ``<model>``,
``<sae_in>``, ``<sae_out>``, ``<tokens>``), so extraction and checks run the one code path of
``rulecheck.api`` and the kinds' checks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rulecheck.api import extract_books, validation_profile
from rulecheck.book import Rulebook
from rulecheck.config import ExemplarConfig, ExtractConfig, parse_accept_changed, parse_features
from rulecheck.errors import InvalidSpec, RulecheckError, RuleFailed
from rulecheck.kinds import CheckContext, kinds
from rulecheck.results import CheckResult, ExtractResult, ItemResult
from rulecheck.session import DEFAULT_CACHE, Head, Workbench
from rulecheck.specs import Checkpoint, Specs, head_spec
from rulecheck.zoo import is_zoo_spec

PARTS = ("model", "sae_in", "sae_out", "corpus")
HEAD = re.compile(r"^L(\d+)H(\d+)$")


def parse_head(head: str | Sequence[int]) -> tuple[int, int]:
    """``"L0H1"`` or ``(0, 1)`` as ``(layer, head)``; ``InvalidSpec`` naming ``head`` else."""
    fix = 'give head="L0H1" or head=(0, 1)'
    if isinstance(head, str):
        match = HEAD.match(head.strip())
        if match is None:
            raise InvalidSpec(f"cannot read head {head!r}", field="head", fix=fix)
        return int(match[1]), int(match[2])
    parts = tuple(head)
    if len(parts) != 2 or not all(isinstance(p, int) and p >= 0 for p in parts):
        raise InvalidSpec(f"cannot read head {head!r}", field="head", fix=fix)
    return parts[0], parts[1]


def _is_spec(value: Any) -> bool:
    return isinstance(value, str | Path)


def _parts(model: Any, sae_in: Any, sae_out: Any, tokens: Any) -> dict[str, Any]:
    return {"model": model, "sae_in": sae_in, "sae_out": sae_out, "corpus": tokens}


def _names(names: Mapping[str, str] | None) -> dict[str, str]:
    """The names a book records for objects: ``names`` (``tokens`` for the corpus too), else
    ``<part>``."""
    given = dict(names or {})
    if "tokens" in given:
        given["corpus"] = given.pop("tokens")
    unknown = sorted(set(given) - set(PARTS))
    if unknown:
        raise InvalidSpec(
            f"unknown part {unknown[0]!r}",
            field="names",
            fix="name model, sae_in, sae_out or tokens",
        )
    return {part: given.get(part, f"<{'tokens' if part == 'corpus' else part}>") for part in PARTS}


def give(bench: Workbench, head: Head, parts: Mapping[str, Any]) -> None:
    """Hand the objects among ``parts`` to ``bench``, each under the spec ``head`` reads its
    part by (``{layer}``/``{head}`` filled in)."""
    s = head.specs
    specs = {
        "model": s.model,
        "sae_in": head_spec(s.sae_in, head.layer),
        "sae_out": head_spec(s.sae_out, head.layer, head.head),
        "corpus": s.corpus,
    }
    objects = {p: v for p, v in parts.items() if v is not None and not _is_spec(v)}
    bench.give(
        models={specs["model"]: objects["model"]} if "model" in objects else None,
        saes={specs[p]: objects[p] for p in ("sae_in", "sae_out") if p in objects},
        corpora={specs["corpus"]: objects["corpus"]} if "corpus" in objects else None,
    )


def checkpoint(parts: Mapping[str, Any], names: Mapping[str, str]) -> Checkpoint:
    """The checkpoint an extraction records: a spec as given, an object by its name; a zoo
    model fills in the parts not given."""
    specs = {p: (str(v) if _is_spec(v) else names[p]) for p, v in parts.items() if v is not None}
    model = specs.get("model")
    if model is None:
        raise InvalidSpec("no model", field="model", fix="pass a HookedTransformer or a zoo name")
    if not is_zoo_spec(model):
        for part in ("sae_in", "sae_out", "corpus"):
            if part not in specs:
                shown = "tokens" if part == "corpus" else part
                raise InvalidSpec(
                    f"model {model!r} is not a zoo model, so {shown} must be given",
                    field=shown,
                    fix=f"pass {shown}= (an object or a spec)",
                )
    return Specs(**specs).resolve()


def extract_config(
    features: int | Iterable[int] | None, method: str, settings: Mapping[str, Any]
) -> ExtractConfig:
    """The extraction settings: ``ExtractConfig`` and ``ExemplarConfig`` fields by name, each
    checked against its bound as the command line checks it."""
    own = {f.name for f in dataclasses.fields(ExtractConfig)} - {"features", "exemplars"}
    exemplar = {f.name for f in dataclasses.fields(ExemplarConfig)}
    unknown = sorted(set(settings) - own - exemplar)
    if unknown:
        raise InvalidSpec(
            f"unknown setting {unknown[0]!r}",
            field=unknown[0],
            fix=f"use one of {', '.join(sorted(own | exemplar))}",
        )
    chosen = ExtractConfig.features if features is None else features
    if not isinstance(chosen, int):
        chosen = list(chosen)
    return ExtractConfig(
        method=method,
        features=parse_features(chosen, "features"),
        exemplars=ExemplarConfig(**{k: v for k, v in settings.items() if k in exemplar}),
        **{k: v for k, v in settings.items() if k in own},
    )


def extract(
    model: Any,
    sae_in: Any = None,
    sae_out: Any = None,
    tokens: Any = None,
    *,
    head: str | Sequence[int] = "L0H0",
    features: int | Iterable[int] | None = None,
    method: str = "gradient",
    names: Mapping[str, str] | None = None,
    device: str = "auto",
    progress: bool = True,
    cache_dir: Path | None = DEFAULT_CACHE,
    **settings: Any,
) -> ExtractResult:
    """Extract one head's rules: a result holding its ``Rulebook`` (``result.book``) that
    ``result.save(path)`` writes as ``rulecheck extract`` does (the same bytes for the same
    inputs). ``features``: ids, or a sample size (default 100). ``settings``: the other
    options of ``rulecheck extract`` (``max_terms``, ``term_margin``, ``n_pos``, ``seed``...).
    ``progress``: rich progress bars (a widget in a notebook). The exemplars go to the
    exemplar cache (``cache_dir``), where ``check`` finds them."""
    layer, index = parse_head(head)
    cfg = extract_config(features, method, settings)
    parts = _parts(model, sae_in, sae_out, tokens)
    shown = _names(names)
    ckpt = checkpoint(parts, shown)
    bench = Workbench(device=device, cache_dir=cache_dir, batch_size=cfg.batch_size)
    give(bench, Head(ckpt, layer, index), parts)
    if progress:
        from rulecheck.progress import rich_progress

        with rich_progress() as update:
            [book] = extract_books(bench, ckpt, layer, [index], cfg, update)
    else:
        [book] = extract_books(bench, ckpt, layer, [index], cfg)
    return ExtractResult(book)


def load_rulebook(path: str | Path) -> Rulebook:
    """The rulebook at ``path``, with what extraction measured beside it."""
    from rulecheck.rulebook import load_rulebook as load

    return load(path, measurements=True)


def _book(book_or_path: Rulebook | str | Path) -> tuple[Rulebook, str]:
    if isinstance(book_or_path, Rulebook):
        return book_or_path, f"<{book_or_path.name}>"
    return load_rulebook(book_or_path), str(book_or_path)


def _overrides(book: Rulebook, parts: Mapping[str, Any], names: Mapping[str, str]) -> Specs:
    """Specs given as strings override the book's; an object takes the book's name for its
    part, or its own name where the book names none."""
    zoo_book = book.model is not None and is_zoo_spec(book.model)
    out: dict[str, str | None] = {}
    for part, value in parts.items():
        if value is None:
            out[part] = None
        elif _is_spec(value):
            out[part] = str(value)
        elif getattr(book, part) is None and (part == "model" or not zoo_book):
            out[part] = names[part]
        else:
            out[part] = None
    return Specs(**out)


def check(
    book: Rulebook | str | Path,
    *,
    model: Any = None,
    sae_in: Any = None,
    sae_out: Any = None,
    tokens: Any = None,
    features: Iterable[int] | None = None,
    items: Iterable[str] | None = None,
    tolerance: float = 0.0,
    examples: int = 25,
    accept_changed: str | Iterable[str] = (),
    device: str = "auto",
    cache_dir: Path | None = DEFAULT_CACHE,
) -> CheckResult:
    """Run every claim of a rulebook (or of ``features``, only the items named ``items``:
    ``f1``, ``absence[unless]``...) against the objects given (each part the book names and
    no object is given for is loaded from its spec), as the pytest plugin's items run them:
    each claim's kind checks it, Hypothesis derandomised. A book whose recorded fingerprints
    differ from what is given is refused (``FingerprintMismatch``) unless ``accept_changed``
    names the parts."""
    rulebook, file = _book(book)
    accept = parse_accept_changed(accept_changed, "accept_changed")
    parts = _parts(model, sae_in, sae_out, tokens)
    overrides = _overrides(rulebook, parts, _names(None))
    bench = Workbench(overrides, device=device, cache_dir=cache_dir)
    give(bench, bench.named_head(rulebook, file), parts)
    head = bench.head_of(rulebook, file)
    bench.check_fingerprints(rulebook, head, file, accept)
    chosen = _chosen(rulebook, features)
    bench.announce(rulebook, file, [r.feature for r in chosen])
    ctx = CheckContext(bench, head, file, tolerance=tolerance, examples=examples)
    wanted = None if items is None else set(items)
    with validation_profile():
        results = [
            run_item(ctx, rules, kind, name, index)
            for rules in chosen
            for kind in kinds()
            for name, index in kind.items(rules)
            if wanted is None or name in wanted
        ]
    return CheckResult(rulebook, results, file)


def _chosen(book: Rulebook, features: Iterable[int] | None) -> list[Any]:
    if features is None:
        return list(book.features)
    ids = list(features)
    known = {r.feature for r in book.features}
    missing = [f for f in ids if f not in known]
    if missing:
        raise InvalidSpec(
            f"feature {missing[0]} is not in the rulebook",
            field="features",
            fix=f"use ids of {book.name}'s features: {sorted(known)[:10]}",
        )
    return [r for r in book.features if r.feature in ids]


def run_item(ctx: CheckContext, rules: Any, kind: Any, name: str, index: int) -> ItemResult:
    """One claim checked as the plugin's item checks it: passed, failed (the claim does not
    hold: its message), error (bad input, a feature not eligible) or, for a feature marked
    ``xfail``, xfailed, and failed when it holds after all."""
    try:
        record = kind.check(ctx, rules, index)
    except RuleFailed as failed:
        outcome = "xfailed" if rules.xfail else "failed"
        return ItemResult(rules.feature, name, outcome, str(failed), dict(failed.record))
    except RulecheckError as error:
        return ItemResult(rules.feature, name, "error", str(error), {})
    if rules.xfail:
        message = f"expected to fail ({rules.xfail}) but the claim holds"
        return ItemResult(rules.feature, name, "failed", message, dict(record))
    return ItemResult(rules.feature, name, "passed", None, dict(record))


def check_claim(
    book: Rulebook | str | Path, feature: int, item: str = "f1", **given: Any
) -> ItemResult:
    """One claim of a rulebook (``feature``'s item ``item``: ``f1``, ``precision``,
    ``absence[unless]``...), checked as ``check`` checks it; ``given`` as ``check`` takes."""
    result = check(book, features=[feature], items=[item], **given)
    if not result.items:
        rulebook = result.book
        names = [n for k in kinds() for n, _ in k.items(rulebook.feature(feature))]
        raise InvalidSpec(
            f"feature {feature} has no item {item!r}",
            field="item",
            fix=f"use one of {', '.join(names)}",
        )
    return result.items[0]
