"""Everything the report shows, gathered into plain values: the overview, the paper's figures,
and one card per feature (its rules, measurements, items, exemplars and curves).

``report_data`` returns the template's context and the data the page's script draws from
(figures and exemplars by id). Nothing here reads a file or runs the model: the books, the
run's outcomes and the evidence measured on the model are given.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import rulecheck.html.figures as figures
from rulecheck import kinds
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.html.outcomes import Outcome, feature_status
from rulecheck.kinds.base import RuleKind, unique
from rulecheck.kinds.card import compact, rounded, visible

if TYPE_CHECKING:
    from rulecheck.html.evidence import FeatureEvidence

METRICS = ("f1", "precision", "recall", "spearman")
# precision as the paper's protocol measures it, over the corpus where the rules fire, and as
# the books check it (with hard negatives)
PRECISIONS = ("protocol_precision", "corpus_precision", "precision")
# the paper's figures (GPT-2 small) the layer table is read against
PAPER_FIGURES = {
    "absence": "a distractor key for over a quarter of layer-0 features, more at later layers "
    "(Fig. 9; weight analysis, not a checked claim)",
    "counting": "a few examples isolated (Sec. 4.3, Fig. 7)",
    "bounded": "none: its skip-grams carry no distance",
    "precision": "on random inactive negatives only (A.2)",
}


@dataclass
class BookInput:
    """One rulebook as the report gets it: the book (measurements filled in), how its path is
    shown, its run's outcomes, and its evidence (by feature) or why there is none."""

    book: Rulebook
    shown: str
    outcomes: list[Outcome] = field(default_factory=list)
    evidence: dict[int, FeatureEvidence] | None = None
    error: str | None = None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _median(values: Iterable[float | None]) -> float | None:
    numbers = [v for v in values if v is not None]
    return statistics.median(numbers) if numbers else None


class _Figures:
    """The figures of a report by id, as the page's data holds them."""

    def __init__(self) -> None:
        self.by_id: dict[str, figures.Figure] = {}

    def add(self, name: str, figure: figures.Figure) -> str:
        self.by_id[name] = figure
        return name


def _feature_f1(rules: FeatureRules, outcomes: list[Outcome]) -> float | None:
    """What extraction measured, else what the run measured."""
    measured = _number(rules.measured.get("f1"))
    if measured is not None:
        return measured
    return next((_number(o.record.get("f1")) for o in outcomes if "f1" in o.record), None)


def _curves(book: Rulebook, rules: FeatureRules) -> dict[str, dict[int, float]]:
    """The feature's F1 against terms, by ranking method: the book's own and any other."""
    out: dict[str, dict[int, float]] = {}
    own = rules.measured.get("f1_by_terms")
    if isinstance(own, Mapping) and own:
        out[str(book.extraction.get("method", "gradient"))] = {
            int(n): float(v) for n, v in own.items() if _number(v) is not None
        }
    for method, curve in (rules.measured.get("f1_by_ranking") or {}).items():
        out[str(method)] = {int(n): float(v) for n, v in curve.items() if _number(v) is not None}
    return out


def _outcomes(
    kind: RuleKind, rules: FeatureRules, by_item: Mapping[str, Outcome]
) -> dict[int, str]:
    """The outcome of each of ``kind``'s items that ran, by the index ``items`` gives it."""
    return {i: by_item[name].outcome for name, i in kind.items(rules) if name in by_item}


def _part(
    kind: RuleKind,
    rules: FeatureRules,
    by_item: Mapping[str, Outcome],
    ev: FeatureEvidence | None,
    key: str,
    figs: _Figures,
) -> dict[str, Any]:
    """A kind's part of card ``key`` as the template reads it (``RuleKind.card``), its
    figures added to the page's."""
    measured = {} if ev is None else ev.of(kind.key)
    part = kind.card(rules, _outcomes(kind, rules, by_item), measured)
    claims = []
    for c in part.claims:
        fig = None if c.figure is None else figs.add(f"{key}-{kind.figure_id(c.index)}", c.figure)
        claims.append({"text": compact(c.text), "ids": c.ids, "marks": c.marks, "fig": fig})
    return {
        "title": part.title,
        "note": part.note,
        "list": "ol" if part.ordered else "ul",
        "claims": claims,
        "more": part.more,
        "empty": part.empty,
        "shown": bool(claims) or part.empty is not None,
    }


def _item_view(o: Outcome) -> dict[str, Any]:
    cx = o.record.get("counterexample")
    view: dict[str, Any] = {
        "name": o.item,
        "outcome": o.outcome,
        "message": o.message,
        "counterexample": None,
    }
    if isinstance(cx, Mapping) and isinstance(cx.get("tokens"), list):
        inserted = set(cx.get("inserted", []))
        view["counterexample"] = {
            "tokens": [
                {"text": visible(str(t)), "inserted": i in inserted, "query": i == cx.get("t")}
                for i, t in enumerate(cx["tokens"])
            ],
            "n_inserted": len(inserted),
            "before": _number(cx.get("before")),
            "after": _number(cx.get("after")),
            "by_count": [
                (cx.get("first_count", 0) + n, a) for n, a in enumerate(cx.get("by_count", []))
            ],
        }
    return view


def _card(
    entry: BookInput,
    anchor: str,
    rules: FeatureRules,
    outcomes: list[Outcome],
    figs: _Figures,
    data: dict[str, Any],
) -> dict[str, Any]:
    book = entry.book
    key = f"{anchor}-f{rules.feature}"
    ev = (entry.evidence or {}).get(rules.feature)
    by_item = {o.item: o for o in outcomes}
    curves = _curves(book, rules)
    f1_fig = None
    if curves:
        chosen = rules.measured.get("n_terms")
        f1_fig = figs.add(f"{key}-f1", figures.feature_f1(curves, chosen))
    parts = [_part(kind, rules, by_item, ev, key, figs) for kind in kinds.kinds()]
    texts = [c["text"] for p in parts for c in p["claims"]]
    if ev is not None and ev.exemplars:
        data["ex"][key] = [x.plain() for x in ev.exemplars]
    items = [_item_view(o) for o in outcomes]
    remapped = next((o.record["remapped_to"] for o in outcomes if "remapped_to" in o.record), None)
    label = visible(rules.label) or (texts[0] if texts else "")
    return {
        "key": key,
        "feature": rules.feature,
        "label": label,
        "source": rules.source,
        "status": feature_status(outcomes),
        "xfail": rules.xfail,
        "f1": _feature_f1(rules, outcomes),
        "run_f1": next((_number(o.record.get("f1")) for o in outcomes if "f1" in o.record), None),
        "measured": {m: _number(rules.measured.get(m)) for m in METRICS},
        "n_terms": rules.measured.get("n_terms"),
        "expect": {m: rules.expect[m] for m in ("f1", "precision", "recall") if m in rules.expect},
        "parts": parts,
        "items": items,
        "failed_items": [i for i in items if i["outcome"] in ("failed", "error", "xfailed")],
        "f1_fig": f1_fig,
        "n_exemplars": 0 if ev is None else len(ev.exemplars),
        "evidence_error": None if ev is None else ev.error,
        "notes": [] if ev is None else ev.notes,
        "remapped_to": remapped,
        "search": " ".join([str(rules.feature), label, *texts]).lower(),
    }


def _figure4(
    model: str, books: list[BookInput], figs: _Figures
) -> tuple[dict[str, str | None], list[str]]:
    sums: dict[str, dict[int, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for entry in books:
        for rules in entry.book.features:
            for method, curve in _curves(entry.book, rules).items():
                for n, f1 in curve.items():
                    sums[method][entry.book.layer][n].append(f1)
    out: dict[str, str | None] = {}
    notes = []
    for method in ("weight", "gradient"):
        if method not in sums:
            out[method] = None
            notes.append(
                f"{method} ranking: no F1-against-terms curve in these books' measurements "
                f"(extraction records it for books extracted with this version of rulecheck; "
                f"run rulecheck extract again to record it)"
            )
            continue
        curves = {
            layer: {n: (rounded(statistics.fmean(v), 4), len(v)) for n, v in by_n.items()}
            for layer, by_n in sums[method].items()
        }
        out[method] = figs.add(
            f"{model}-fig4-{method}", figures.f1_by_terms_layers(model, method, curves)
        )
    return out, notes


def _gate(books: list[tuple[BookInput, str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per head of a run with ``--rulecheck-remap``: its gate verdict (``Verdict.record``,
    None when its gate item did not run), then its features kept (re-identified, every claim
    holds), changed (re-identified, a claim no longer holds) and lost (no partner)."""
    from rulecheck.report import gate_rows

    heads = []
    for entry, anchor, cards in books:
        remapped = [o for o in entry.outcomes if "remapped_to" in o.record or "lost" in o.record]
        verdict = next(
            (o.record for o in entry.outcomes if o.item == "gate" and "statistics" in o.record),
            None,
        )
        if not remapped and verdict is None:
            continue
        rows: dict[str, list[dict[str, Any]]] = {"kept": [], "changed": [], "lost": []}
        for card in cards:
            mine = [o for o in entry.outcomes if o.feature == card["feature"]]
            if any(o.record.get("lost") or o.item == "lost" for o in mine):
                group = "lost"
            elif card["remapped_to"] is None:
                continue
            else:
                group = "changed" if card["status"] in ("failed", "xfailed") else "kept"
            rows[group].append(card)
        header, values = gate_rows([verdict]) if verdict else ([], [[]])
        heads.append(
            {
                "name": entry.book.name,
                "anchor": anchor,
                "shown": entry.shown,
                "verdict": verdict,
                "statistics": list(zip(header[2:], values[0][2:], strict=True)),
                **rows,
            }
        )
    return heads


def report_data(entries: list[BookInput], run: list[Outcome] | None) -> tuple[dict, dict]:
    """The template's context and the page's data (figures and exemplars by id)."""
    figs = _Figures()
    data: dict[str, Any] = {"ex": {}}
    order = sorted(
        range(len(entries)),
        key=lambda i: (
            entries[i].book.model or "",
            entries[i].book.layer,
            entries[i].book.head,
            entries[i].shown,
        ),
    )
    entries = [entries[i] for i in order]
    anchors = unique([e.book.name for e in entries], sep="-")
    books: list[dict[str, Any]] = []
    failed = []
    for entry, anchor in zip(entries, anchors, strict=True):
        by_feature: dict[int, list[Outcome]] = defaultdict(list)
        for o in entry.outcomes:
            if o.feature is not None:
                by_feature[o.feature].append(o)
        cards = [
            _card(entry, anchor, rules, by_feature.get(rules.feature, []), figs, data)
            for rules in entry.book.features
        ]
        for card in cards:
            for item in card["failed_items"]:
                failed.append({"card": card, "book": entry.book.name, "item": item})
        statuses = [c["status"] for c in cards]
        books.append(
            {
                "entry": entry,
                "anchor": anchor,
                "name": entry.book.name,
                "model": entry.book.model or "(model from the command line)",
                "shown": entry.shown,
                "error": entry.error,
                "cards": cards,
                "n_features": len(cards),
                "passed": statuses.count("passed"),
                "failed": statuses.count("failed"),
                "xfailed": statuses.count("xfailed"),
                "skipped": statuses.count("skipped"),
                "median_f1": _median(c["f1"] for c in cards),
                "method": entry.book.extraction.get("method"),
                "lost": len(entry.book.lost),
            }
        )
    models = []
    for model in sorted({b["model"] for b in books}):
        mine = [b for b in books if b["model"] == model]
        cells: dict[tuple[int, int], list[float]] = defaultdict(list)
        shares: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        precisions: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for b in mine:
            book = b["entry"].book
            cells[(book.layer, book.head)] += [c["f1"] for c in b["cards"] if c["f1"] is not None]
            for rules in book.features:
                row = shares[book.layer]
                row[0] += bool(rules.absence)
                row[1] += bool(rules.counting)
                row[2] += 1
                row[3] += any(
                    t.max_distance is not None or t.min_distance is not None
                    for t in rules.skipgrams
                )
                for key in PRECISIONS:
                    value = rules.measured.get(key)
                    if isinstance(value, (int, float)) and not math.isnan(value):
                        precisions[book.layer][key].append(float(value))
        layers = [
            {
                "layer": layer,
                "features": n,
                "absence": a,
                "counting": c,
                "bounded": d,
                **{k: _median(precisions[layer][k]) for k in PRECISIONS},
            }
            for layer, (a, c, n, d) in sorted(shares.items())
        ]
        heat = figs.add(
            f"{model}-heatmap",
            figures.f1_heatmap(model, {k: _median(v) for k, v in cells.items()}),
        )
        fig9 = figs.add(
            f"{model}-fig9",
            figures.rule_shares(
                model,
                {
                    layer: (a / max(n, 1), c / max(n, 1), n, d / max(n, 1))
                    for layer, (a, c, n, d) in shares.items()
                },
            ),
        )
        fig4, notes = _figure4(model, [b["entry"] for b in mine], figs)
        models.append(
            {
                "name": model,
                "books": mine,
                "heatmap": heat,
                "fig9": fig9,
                "layers": layers,
                "fig4": fig4,
                "fig4_notes": notes,
            }
        )
    run_counts = None
    if run is not None:
        run_counts = {
            s: sum(o.outcome == s for o in run)
            for s in ("passed", "failed", "xfailed", "skipped", "error")
        }
        run_counts["items"] = len(run)
    context = {
        "books": books,
        "models": models,
        "failed": failed,
        "gate": _gate([(b["entry"], b["anchor"], b["cards"]) for b in books]),
        "run": run_counts,
        "n_features": sum(b["n_features"] for b in books),
        "paper": PAPER_FIGURES,
    }
    data["figs"] = figs.by_id
    return context, data
