"""The public entry points the CLI and the pytest plugin share: extract rulebooks, write them.

Everything is loaded through one :class:`~rulecheck.session.Workbench`, so a model, its SAEs
and the corpus are read once per session however many heads and rulebooks use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rulecheck import __version__, kinds
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.core.extract import (
    ExtractConfig,
    FeatureResult,
    HeadResult,
    Progress,
    extract_head,
    layer_tokens,
    no_progress,
)
from rulecheck.errors import RuleFailed
from rulecheck.kinds.skipgram import label
from rulecheck.rulebook import write_rulebook
from rulecheck.session import Head, Workbench
from rulecheck.specs import Checkpoint, head_spec


def feature_rules(result: FeatureResult, tolerance: float) -> FeatureRules:
    """One feature's rulebook entry: the claims every kind keeps, measured quality and
    minimums."""
    claims = {
        kind.key: [c for c in result.claims.get(kind.key, []) if kind.keep(c)]
        for kind in kinds.kinds()
    }
    skipgrams = claims.get("skipgrams", [])
    measured = {
        **{m: round(result.test[m], 6) for m in ("f1", "precision", "recall", "spearman")},
        "n_test": result.test["n_test"],
        "n_terms": result.n_terms,
        "f1_by_terms": {n: round(f, 6) for n, f in result.f1_by_terms.items()},
    }
    expect = {
        m: round(max(0.0, result.test[m] - tolerance), 6) for m in ("f1", "precision", "recall")
    }
    return FeatureRules(
        feature=result.feature,
        source="extracted",
        label=label(skipgrams[0]) if skipgrams else "",
        claims=claims,
        expect=expect,
        measured=measured,
    )


def head_rulebook(
    result: HeadResult, head: Head, fingerprints: dict[str, str], cfg: ExtractConfig
) -> Rulebook:
    """The rulebook of one extracted head."""
    ckpt = head.specs
    return Rulebook(
        layer=result.layer,
        head=result.head,
        model=ckpt.model,
        sae_in=head_spec(ckpt.sae_in, result.layer),
        sae_out=head_spec(ckpt.sae_out, result.layer, result.head),
        corpus=ckpt.corpus,
        fingerprints=dict(fingerprints),
        extraction={
            "method": cfg.method,
            "keys": cfg.keys,
            "queries_per_key": cfg.queries_per_key,
            "max_terms": cfg.max_terms,
            "seed": cfg.seed,
            "tolerance": cfg.tolerance,
            "ln_scale": round(result.ln_scale, 6),
            "n_sequences": result.n_sequences,
            "n_eligible": result.n_eligible,
            "rulecheck": __version__,
        },
        features=[feature_rules(f, cfg.tolerance) for f in result.features],
    )


def extract_books(
    bench: Workbench,
    ckpt: Checkpoint,
    layer: int,
    heads: str | Sequence[int],
    cfg: ExtractConfig | None = None,
    progress: Progress = no_progress,
) -> list[Rulebook]:
    """Extract one layer's heads; one rulebook per head. The corpus pass is the session's
    (``Workbench.layer_pass``): extracting or checking other heads of the layer later in the
    session reuses it."""
    cfg = cfg or ExtractConfig()
    bench = bench.with_exemplars(cfg.exemplars)
    art = bench.layer(ckpt, layer, heads)
    collectors, ln_scale = bench.layer_pass(art.heads[0], progress)
    token_of, table = bench.memo(
        ("layer_tokens", ckpt.sae_in, layer, cfg.top_tokens, cfg.rules),
        lambda: layer_tokens(art.model, art.sae_in, layer, cfg),
    )
    books = []
    for head in art.heads:
        result = extract_head(
            art.model,
            art.sae_in,
            art.sae_outs[head.head],
            art.tokens,
            layer,
            head.head,
            collectors[head.head],
            ln_scale,
            cfg,
            progress,
            token_of,
            table,
        )
        book = head_rulebook(result, head, bench.fingerprints(head), cfg)
        books.append(keep_rules_that_hold(book, bench, head) if cfg.rules else book)
    return books


def keep_rules_that_hold(book: Rulebook, bench: Workbench, head: Head) -> Rulebook:
    """Drop the claims whose check fails, run derandomised as the pytest plugin runs it (for
    each kind that asks for it), so that a fresh rulebook passes its own tests."""
    from hypothesis import settings

    from rulecheck.profiles import CI_PROFILE

    ctx = kinds.CheckContext(bench, head, book.name)
    previous = settings.get_current_profile_name()
    settings.load_profile(CI_PROFILE)
    try:
        for rules in book.features:
            for kind in kinds.kinds():
                if not kind.validate:
                    continue
                rules.claims[kind.key] = [
                    claim
                    for i, claim in enumerate(list(rules.claims[kind.key]))
                    if _holds(kind, ctx, rules, i)
                ]
    finally:
        settings.load_profile(previous)
    return book


def _holds(kind: kinds.RuleKind, ctx: kinds.CheckContext, rules: FeatureRules, index: int) -> bool:
    try:
        kind.check(ctx, rules, index)
    except RuleFailed:
        return False
    return True


def extract_rulebooks(
    bench: Workbench,
    ckpt: Checkpoint,
    layer: int,
    heads: str | Sequence[int],
    out_dir: str | Path,
    cfg: ExtractConfig | None = None,
    progress: Progress = no_progress,
) -> list[Path]:
    """Extract one layer's heads and write ``out_dir/L{layer}H{head}.yaml`` (manual entries in
    existing files are kept). Returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    books = extract_books(bench, ckpt, layer, heads, cfg, progress)
    return [write_rulebook(book, out / f"{book.name}.yaml") for book in books]


def config_from_rulebook(book: Rulebook) -> ExtractConfig:
    """The settings a rulebook was extracted with (defaults where it records none); its
    extracted features are regenerated, or a fresh sample when it has none."""
    ex = book.extraction
    extracted = tuple(f.feature for f in book.features if f.source == "extracted")
    base = ExtractConfig()
    return ExtractConfig(
        method=ex.get("method", base.method),
        keys=ex.get("keys", base.keys),
        queries_per_key=ex.get("queries_per_key", base.queries_per_key),
        max_terms=ex.get("max_terms", base.max_terms),
        tolerance=ex.get("tolerance", base.tolerance),
        features=extracted or base.features,
        exemplars=replace(base.exemplars, seed=ex.get("seed", base.seed)),
    )


def regenerate(path: Path, bench: Workbench) -> Path:
    """Extract the rulebook's head again with the settings it records (overrides applied) and
    write it in place; manual entries survive."""
    from rulecheck.rulebook import load_rulebook

    book = load_rulebook(path)
    head = bench.head_of(book, str(path))
    [fresh] = extract_books(bench, head.specs, book.layer, [book.head], config_from_rulebook(book))
    return write_rulebook(fresh, path)
