"""The retraining gate: rulebooks checked against retrained SAEs, their claims translated into
the new SAEs' feature ids first (``pytest --rulecheck-remap auto|PATH``, ``rulecheck remap``).

For each rulebook the SAEs it records (the *old* ones: its own header, whatever the command
line overrides) are compared with the SAEs the run loads (the *new* ones, from
``--rulecheck-sae-in``/``--rulecheck-sae-out``). An SAE that did not change needs no
translation; one that did is matched to the old one, either on the fly (``auto``: decoder
cosine and activation correlation over the head's corpus, ``rulecheck.match.match_saes``)
or from mapping files written by ``rulecheck match`` (a file, or a directory of them, each
found by the hook and head it maps and checked against both SAEs' fingerprints). The book is
then translated (``rulecheck.remap``).

The verdict (``gate_verdict``) is the book's as a whole (``rulecheck.core.verdict``): each
feature's skip-grams measured on the book's SAEs and, translated, on its partner, and rules
extracted afresh for what the new SAE has in its place. In a gate run a claim that no longer
holds is evidence; a book written by ``rulecheck remap`` and run as any book fails on a lost
feature with one line (``lost_verdict``), unless ``--rulecheck-allow-lost`` allows it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import NoReturn

from rulecheck.book import FeatureRules, Rulebook
from rulecheck.config import Budget, GateConfig, MatchConfig
from rulecheck.core.pairs import Matching
from rulecheck.core.verdict import FeatureChange, Verdict, gate_statistics, judge
from rulecheck.errors import InvalidMapping, RemapLost, RulecheckError
from rulecheck.gate_store import gate_key, stored
from rulecheck.mapping import AUTO, MappingHeader, mapping_for
from rulecheck.match import match_saes
from rulecheck.remap import FeatureMap, Remapped, referenced_inputs, remap_book
from rulecheck.session import PART_NAMES, Head, Workbench
from rulecheck.specs import head_spec

PARTS = ("sae_in", "sae_out")


@dataclass
class Gated:
    """A rulebook remapped for a run: the head as the book records it (``old``) and as the
    run loads it (``new``), the translation, each SAE's map (None: unchanged) and spec."""

    old: Head
    new: Head
    remapped: Remapped
    maps: dict[str, FeatureMap | None]
    specs: dict[str, str]
    threshold: float


def sae_spec(head: Head, part: str) -> str:
    """The spec of the head's input (``sae_in``) or output (``sae_out``) SAE."""
    if part == "sae_in":
        return head_spec(head.specs.sae_in, head.layer)
    return head_spec(head.specs.sae_out, head.layer, head.head)


def _load(bench: Workbench, head: Head, part: str):
    return bench.sae_in(head) if part == "sae_in" else bench.sae_out(head)


def gated(
    bench: Workbench,
    book: Rulebook,
    file: str,
    source: str,
    cfg: MatchConfig | None = None,
    option: str = "--rulecheck-remap",
) -> Gated:
    """``book`` translated for the SAEs this run loads (once per session and book);
    ``source`` is ``auto`` or mapping files, given by ``option`` (named in errors)."""
    cfg = cfg or MatchConfig()

    def compute() -> Gated:
        old, new = bench.head_of(book, file, saes=False), bench.head_of(book, file)
        maps = {part: feature_map(bench, old, new, part, source, cfg, option) for part in PARTS}
        if maps["sae_out"] is not None:
            n_old, n_new = bench.sae_out(old).cfg.d_sae, bench.sae_out(new).cfg.d_sae
            bench.sample_by(new, maps["sae_out"].sample_ids(n_old, n_new))
        header = {part: getattr(new.specs, part) for part in PARTS}
        fingerprints = dict(book.fingerprints)
        for part in PARTS:
            if part in fingerprints:
                fingerprints[part] = bench.fingerprints(new, (part,))[part]
        remapped = remap_book(
            book, maps["sae_out"], maps["sae_in"], fingerprints=fingerprints, **header
        )
        specs = {part: sae_spec(new, part) for part in PARTS}
        return Gated(old, new, remapped, maps, specs, cfg.threshold)

    def once() -> Gated | RulecheckError:
        try:
            return compute()
        except RulecheckError as exc:
            return exc  # every item of the book fails with it, computed once

    result = bench.memo(("gated", file, source, cfg, bench.overrides), once)
    if isinstance(result, RulecheckError):
        raise result
    return result


def feature_map(
    bench: Workbench,
    old: Head,
    new: Head,
    part: str,
    source: str,
    cfg: MatchConfig,
    option: str = "--rulecheck-remap",
) -> FeatureMap | None:
    """How the features of the old head's SAE ``part`` map to the new head's (None when it
    is the same SAE)."""
    old_spec, new_spec = sae_spec(old, part), sae_spec(new, part)
    if old_spec == new_spec:
        return None
    digests = bench.fingerprints(old, (part,))[part], bench.fingerprints(new, (part,))[part]
    if digests[0] == digests[1]:
        return None
    old_sae, new_sae = _load(bench, old, part), _load(bench, new, part)
    if source == AUTO:

        def compute() -> Matching:
            model, _, _, tokens = bench.load(new)
            return match_saes(old_sae, new_sae, cfg, model, tokens)[0]

        matching = bench.memo(("matching", old_spec, new_spec, cfg), compute)
    else:
        head = old_sae.cfg.metadata.hook_head_index
        hook = str(old_sae.cfg.metadata.hook_name)
        header, matching = mapping_for(
            source, hook, (head,), field=option, or_else=f", or give {option} auto"
        )
        _check_mapping(header, digests, part, old_spec, new_spec)
    return FeatureMap.of(matching)


def _check_mapping(
    header: MappingHeader, digests: tuple[str, str], part: str, old: str, new: str
) -> None:
    """A mapping file is about exactly the two SAEs being compared (when it records them)."""
    for side, digest, spec in (("old", digests[0], old), ("new", digests[1], new)):
        recorded = header.fingerprints.get(side)
        if recorded is not None and recorded != digest:
            raise InvalidMapping(
                f"its {side} SAE ({header.old if side == 'old' else header.new}) is not "
                f"{PART_NAMES[part]} {spec} that this run compares (fingerprint {recorded[:15]}"
                f"\u2026, loaded {digest[:15]}\u2026)",
                field=f"fingerprints.{side}",
                fix=f"match these SAEs again: rulecheck match --old {old} --new {new} --out FILE",
            )


# ------------------------------------------------------------------------------ lost claims


def lost_reason(
    book: Rulebook,
    entry: FeatureRules,
    new_spec: str | None = None,
    threshold: float | None = None,
) -> str:
    """Why a feature has no partner: its best candidate and score, and how many of the book's
    features are lost. ``book`` is the book as translated (its ``lost:`` holds every lost
    feature); ``new_spec`` the SAE it was lost in; ``threshold`` the least score of a pair."""
    lost, total = len(book.lost), len(book.features) + len(book.lost)
    best = entry.best_candidate
    evidence = "no candidate"
    if best is not None and best.feature is not None:
        score = "" if best.confidence is None else f", confidence {best.confidence:.3f}"
        if best.confidence is not None and threshold is not None:
            taken = best.confidence > threshold  # it went to a better-scoring old feature
            score += ", paired with another feature" if taken else f" < {threshold:g}"
        evidence = f"best candidate {best.feature}{score}"
    where = f"the new output SAE {new_spec}" if new_spec else "this book's output SAE"
    return (
        f"feature {entry.feature} (an id of the SAE the book was remapped from) has no "
        f"confident partner in {where} ({evidence}); {lost} of {total} features of "
        f"{book.name} lost"
    )


def lost_verdict(book: Rulebook, entry: FeatureRules, budget: Budget, file: str) -> str:
    """The one line about a claim on a lost feature of a remapped book (its ``lost:``):
    returned (to skip it) when the budget allows the book's lost features, else raised as
    ``RemapLost``."""
    lost, total = len(book.lost), len(book.features) + len(book.lost)
    allowed = budget.allows(total)
    what = lost_reason(book, entry)
    if lost <= allowed:
        return f"{what}, within --rulecheck-allow-lost {budget}"
    if total and lost * 2 > total:
        what += (
            ": most features have no partner, so this is likely another head's or an untrained SAE"
        )
    raise RemapLost(
        f"{what}, --rulecheck-allow-lost allows {allowed}",
        file=file,
        field=f"lost[{entry.feature}]",
        fix="re-home the claims by hand (rulecheck remap writes them under `lost:`), or allow "
        "lost features with --rulecheck-allow-lost 5%",
    )


def note_remapped(error: RulecheckError, old: int, new: int) -> None:
    """Say in a failed claim's first line which old feature it is about."""
    if old != new:
        error.what = f"(feature {old} of the rulebook is {new} in the new SAE) {error.what}"
        error.args = (error.message,)


def untranslatable(gate: Gated, feature: int, key: str, index: int, file: str) -> NoReturn:
    """A claim naming an input feature that has no partner and no tokens to fall back on."""
    raise RemapLost(
        f"this claim names an input feature that has no partner in the new input SAE "
        f"{gate.specs['sae_in']} and no tokens to check it by",
        file=file,
        field=f"feature[{feature}].{key}[{index}]",
        fix="give the reference its tokens (`[#id]` with an entry in `refs:`), or remove it",
    )


# ------------------------------------------------------------------------------- the verdict


def _f1(bench: Workbench, head: Head, rules: FeatureRules, file: str) -> float | None:
    """The skip-grams' test F1 on ``head``, as the paper's protocol scores it (the gate compares
    before with after on the same exemplars; hard negatives belong to the claims); 0 when the
    feature is not eligible there (too rare or too common to be measured: its claims cannot
    hold); None without skip-grams."""
    from rulecheck.errors import NotEligible
    from rulecheck.kinds.skipgram import measure

    if not rules.skipgrams:
        return None
    try:
        return measure(bench, head, rules, file).protocol_f1
    except NotEligible:
        return 0.0


def _fresh_f1(bench: Workbench, gate: Gated, book: Rulebook, wanted: set[int]) -> dict[int, float]:
    """The test F1 of skip-grams extracted afresh, with the book's settings, for the new
    output SAE's features ``wanted`` (those eligible there)."""
    from rulecheck.api import config_from_rulebook, extract_books

    eligible = set(bench.collector(gate.new).eligible().tolist())
    features = tuple(sorted(wanted & eligible))
    if not features:
        return {}
    # the protocol's F1 of the skip-grams alone, as the thresholds were calibrated on
    cfg = replace(
        config_from_rulebook(book),
        features=features,
        rules=False,
        held_out=False,
        compare_rankings=False,
    )
    [fresh] = extract_books(bench, gate.new.specs, book.layer, [book.head], cfg)
    return {r.feature: float(r.measured.get("protocol_f1", 0.0)) for r in fresh.features}


def feature_changes(
    bench: Workbench, gate: Gated, book: Rulebook, file: str
) -> list[FeatureChange]:
    """Every feature of ``book`` before and after the retrain, with the fresh extraction for
    what the new output SAE has in its place. A feature merged away (it shares a confident
    partner with another: a narrower SAE) is re-identified as that partner, its claims
    checked there."""
    from rulecheck.kinds.skipgram import measure_all

    remapped, out_map = gate.remapped, gate.maps["sae_out"]
    merged = out_map.merged_into if out_map else {}
    place: dict[int, int | None] = {}
    translated: dict[int, FeatureRules | None] = {}
    for rules in book.features:
        old = rules.feature
        best = out_map.best.get(old) if out_map else None
        place[old] = remapped.new_id.get(old, merged.get(old, best and best[0]))
        translated[old] = remapped.rules(old)
        if translated[old] is None and old in merged:
            translated[old] = replace(remapped.lost[old], feature=merged[old])
    fresh = _fresh_f1(bench, gate, book, {f for f in place.values() if f is not None})
    # the translated claims in one pass: they are not the announced book's own
    measure_all(bench, gate.new, [r for r in translated.values() if r is not None], file)
    changes = []
    for rules in book.features:
        new, after = place[rules.feature], translated[rules.feature]
        changes.append(
            FeatureChange(
                old=rules.feature,
                new=new,
                reidentified=after is not None,
                before=_f1(bench, gate.old, rules, file),
                after=None if after is None else _f1(bench, gate.new, after, file),
                fresh=None if new is None else fresh.get(new, 0.0),
            )
        )
    return changes


def gate_verdict(
    bench: Workbench,
    book: Rulebook,
    file: str,
    source: str,
    thresholds: GateConfig | None = None,
    cfg: MatchConfig | None = None,
    accept_changed: Collection[str] = (),
) -> Verdict:
    """The gate verdict of ``book`` under the SAEs this run loads (once per session), after
    checking that the book's own SAEs are the ones it records (but ``accept_changed``)."""
    thresholds = thresholds or GateConfig()
    gate = gated(bench, book, file, source, cfg)
    bench.check_fingerprints(book, gate.old, file, accept_changed)

    def compute() -> tuple[list[FeatureChange], tuple[int, int] | None]:
        in_map, named = gate.maps["sae_in"], referenced_inputs(book)
        inputs = None if in_map is None else (sum(f in in_map.new_of for f in named), len(named))
        return feature_changes(bench, gate, book, file), inputs

    def once() -> tuple[list[FeatureChange], tuple[int, int] | None]:
        """Measured once among the processes sharing the cache (``gate_store``)."""
        key = gate_key(bench, gate, book, cfg or MatchConfig())
        return stored(bench.cache_dir, key, [r.feature for r in book.features], compute)

    changes, inputs = bench.memo(("gate", file, source, cfg, bench.overrides), once)
    return judge(gate_statistics(changes, inputs), thresholds)
