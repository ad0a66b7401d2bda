"""The public entry points the CLI and the pytest plugin share: extract rulebooks, write them.

Everything is loaded through one :class:`~rulecheck.session.Workbench`, so a model, its SAEs
and the corpus are read once per session however many heads and rulebooks use them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from rulecheck import __version__, kinds
from rulecheck.book import HEADER_KEYS, FeatureRules, Rulebook
from rulecheck.book.fields import HELD_OUT
from rulecheck.config import METHODS
from rulecheck.core.extract import (
    ExtractConfig,
    FeatureResult,
    HeadResult,
    Progress,
    extract_head,
    layer_tokens,
    no_progress,
)
from rulecheck.core.prefixes import KeptInputs
from rulecheck.errors import RuleFailed
from rulecheck.kinds.skipgram import label
from rulecheck.schema import significant
from rulecheck.session import Head, Layer, Workbench
from rulecheck.specs import Checkpoint, from_book, head_spec

RECORDED = ("method", "keys", "queries_per_key", "max_terms", "term_margin", "tolerance")
# books written before the margin existed chose the best validation F1
UNRECORDED = {"term_margin": 0.0}


def feature_rules(result: FeatureResult, tolerance: float) -> FeatureRules:
    """One feature's rulebook entry: the claims every kind keeps, measured quality and
    minimums."""
    claims: dict[str, list[Any]] = {
        kind.key: [c for c in result.claims.get(kind.key, []) if kind.keep(c)]
        for kind in kinds.kinds()
    }
    skipgrams = claims.get("skipgrams", [])
    measured: dict[str, Any] = {
        **{m: significant(result.test[m], 4) for m in ("f1", "precision", "recall", "spearman")},
        "n_test": result.test["n_test"],
        **{m: significant(result.test[m], 4) for m in HELD_OUT if m in result.test},
        **{m: result.test[m] for m in ("n_fire", "n_hard") if m in result.test},
        "n_terms": result.n_terms,
        "f1_by_terms": {n: significant(f, 4) for n, f in result.f1_by_terms.items()},
    }
    if result.f1_by_ranking:  # the other ranking methods' curves (the paper's Fig. 4a/4b)
        measured["f1_by_ranking"] = {
            m: {n: significant(f, 4) for n, f in curve.items()}
            for m, curve in result.f1_by_ranking.items()
        }
    # minimums rounded down to 3 significant digits: a fresh book passes its own tests
    expect = {
        m: significant(max(0.0, result.test[m] - tolerance), 3, down=True)
        for m in ("f1", "precision", "recall")
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
            "term_margin": cfg.term_margin,
            **cfg.exemplars.recorded(),
            "tolerance": cfg.tolerance,
            "ln_scale": significant(result.ln_scale, 3),
            "n_sequences": result.n_sequences,
            "n_eligible": result.n_eligible,
            "rulecheck": __version__,
        },
        features=[feature_rules(f, cfg.tolerance) for f in result.features],
    )


def keeps_inputs(art: Layer, cfg: ExtractConfig) -> bool:
    """Whether the corpus pass should keep the input-SAE activations of the whole corpus
    (``prefixes.KeptInputs``): when the extracted heads' exemplar prefixes (at most as many
    features as each output SAE has, about half a sequence each) come to more tokens than the
    corpus; the model's lower layers then run once per sequence, not once per prefix pass."""
    cap = cfg.features if isinstance(cfg.features, int) else len(cfg.features)
    n_features = sum(min(cap, art.sae_outs[h.head].cfg.d_sae) for h in art.heads)
    per_feature = cfg.exemplars.n_pos + cfg.exemplars.n_neg
    n_seq, seq_len = art.tokens.shape
    return n_features * per_feature * seq_len / 2 > n_seq * seq_len


def extract_books(
    bench: Workbench,
    ckpt: Checkpoint,
    layer: int,
    heads: str | Sequence[int],
    cfg: ExtractConfig | None = None,
    progress: Progress = no_progress,
) -> list[Rulebook]:
    """Extract one layer's heads; one rulebook per head. The corpus pass is the session's
    (``Workbench.layer_pass``) and collects the extracted heads only: a sharded or one-head
    extraction does not encode the corpus with every other head's output SAE."""
    cfg = cfg or ExtractConfig()
    bench = bench.with_exemplars(cfg.exemplars)
    art = bench.layer(ckpt, layer, heads)
    kept = KeptInputs(art.sae_in, layer, art.tokens) if keeps_inputs(art, cfg) else None
    collectors, ln_scale = bench.layer_pass(
        art.heads[0], progress, heads=art.heads, observe=kept.observe if kept else None
    )
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
            kept if kept is not None and kept.complete else None,
        )
        book = head_rulebook(result, head, bench.fingerprints(head), cfg)
        books.append(keep_rules_that_hold(book, bench, head) if cfg.rules else book)
    return books


def keep_rules_that_hold(book: Rulebook, bench: Workbench, head: Head) -> Rulebook:
    """Drop the claims whose check fails, run derandomised as the pytest plugin runs it (for
    each kind that asks for it), so that a fresh rulebook passes its own tests. Of the
    candidates of one slot (``RuleKind.slot``: one claim stated strictly, then with a measured
    strength), the first that holds is kept and the rest are not checked."""
    ctx = kinds.CheckContext(bench, head, book.name)
    with validation_profile():
        for rules in book.features:
            for kind in kinds.kinds():
                if not kind.validate:
                    continue
                kept, filled = [], set()
                for i, claim in enumerate(rules.claims[kind.key]):
                    slot = kind.slot(claim)
                    if slot not in filled and _holds(kind, ctx, rules, i):
                        kept.append(claim)
                        filled.add(slot)
                rules.claims[kind.key] = kept
    return book


@contextmanager
def validation_profile() -> Iterator[None]:
    """Hypothesis under the derandomised ``rulecheck-ci`` profile for the block, the profile
    before it restored after: a claim holds or fails the same way on every run."""
    from hypothesis import settings

    from rulecheck.profiles import CI_PROFILE

    previous = settings.get_current_profile_name()
    settings.load_profile(CI_PROFILE)
    try:
        yield
    finally:
        settings.load_profile(previous)


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
    books = extract_books(bench, ckpt, layer, heads, cfg, progress)
    return write_rulebooks([(book, out / f"{book.name}.yaml") for book in books])


def write_rulebooks(books: list[tuple[Rulebook, Path]]) -> list[Path]:
    """Write each rulebook to its path as one set (``atomic.atomic_write_many``), keeping the
    manual entries of the files already there. Every existing file is read and checked
    before anything is written, so a bad one stops the run with all files as they were."""
    from rulecheck.atomic import atomic_write_many
    from rulecheck.rulebook import regenerated_files

    files = [file for book, path in books for file in regenerated_files(book, Path(path))]
    atomic_write_many([(path, data) for path, data in files if not _holds_bytes(path, data)])
    return [Path(path) for _, path in books]


def save_rulebook(book: Rulebook, path: str | Path) -> Path:
    """Write ``book`` to ``path`` (a ``.yaml`` file, or a directory: ``L{l}H{h}.yaml`` in it)
    as ``rulecheck extract`` writes it: atomically, its measurements beside it, the manual
    entries of a file already there kept."""
    target = Path(path)
    if target.suffix not in (".yaml", ".yml"):
        target.mkdir(parents=True, exist_ok=True)
        target = target / f"{book.name}.yaml"
    [written] = write_rulebooks([(book, target)])
    return written


def _holds_bytes(path: Path, data: bytes) -> bool:
    """Whether ``path`` already holds exactly ``data`` (then it is not rewritten): a regular
    file of that size only, so that a FIFO or device there is never read."""
    try:
        if not path.is_file() or path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False


def config_from_rulebook(book: Rulebook) -> ExtractConfig:
    """The settings a rulebook was extracted with (defaults where it records none), each
    checked as the command line checks it; its extracted features are regenerated, or a
    fresh sample when it has none. A bad recorded value is ``InvalidRulebook`` at its line."""
    values = {**UNRECORDED, **book.recorded(ExtractConfig, RECORDED)}
    method = values.get("method", ExtractConfig.method)
    if method not in METHODS:
        book.fail("extraction.method", f"unknown ranking method {method!r}", f"use {METHODS}")
    extracted = tuple(f.feature for f in book.features if f.source == "extracted")
    return ExtractConfig(
        features=extracted or ExtractConfig.features, exemplars=book.protocol(), **values
    )


def regenerated(book: Rulebook, path: Path, bench: Workbench) -> Rulebook:
    """``book`` (read from ``path``) extracted again with the settings it records (overrides
    applied); write it with ``write_rulebooks``, which keeps its manual entries."""
    head = bench.head_of(book, str(path))
    cfg = config_from_rulebook(book)
    if isinstance(cfg.features, tuple):
        # a feature no longer eligible (a retrained SAE, another corpus) is dropped, not an
        # error: the regeneration then reports it removed
        collectors, _ = bench.with_exemplars(cfg.exemplars).layer_pass(head)
        eligible = set(collectors[book.head].eligible().tolist())
        kept = tuple(f for f in cfg.features if f in eligible)
        if not kept:
            return replace(book, features=[], fingerprints=bench.fingerprints(head))
        cfg = replace(cfg, features=kept)
    [fresh] = extract_books(bench, head.specs, book.layer, [book.head], cfg)
    return as_written(fresh, book, path)


def as_written(fresh: Rulebook, book: Rulebook, path: Path) -> Rulebook:
    """``fresh`` naming what ``book`` names as the book writes it: a relative path stays
    relative (``specs.from_book`` read it from the book's directory)."""
    kept = {}
    for part in HEADER_KEYS:
        written, now = getattr(book, part), getattr(fresh, part)
        if written is None or written == now:
            continue
        resolved = from_book(written, path, book.layer, book.head) or written
        if resolved == now:
            kept[part] = written
        elif head_spec(resolved, book.layer, book.head) == now:  # a template, filled
            kept[part] = head_spec(written, book.layer, book.head)
    return replace(fresh, **kept)
