"""The fields of a rulebook that are not claims: how they are read, and what editors are told.

The keys of a book's header and of a feature's minimums and measurements, their parsers
(each problem an ``InvalidRulebook`` at the field), and the JSON Schema of the parsers
written here, which say nothing of themselves (``rulecheck.schemas``): the recorded
extraction settings take their bounds from the extraction's own (``rulecheck.config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rulecheck import schema as sc
from rulecheck.config import METHODS, PROTOCOL, Bound, ExemplarConfig, ExtractConfig, bound_of

METRICS = ("f1", "precision", "recall", "spearman")
HEADER_KEYS = ("model", "sae_in", "sae_out", "corpus")
EXTRACTION_ORDER = (
    "method",
    "keys",
    "queries_per_key",
    "max_terms",
    "term_margin",
    "seed",
    *PROTOCOL[1:],
    "tolerance",
    "ln_scale",
    "n_eligible",
    "n_sequences",
    "rulecheck",
)
# precision and F1 as the paper's protocol scores them, and precision where the rules fire
HELD_OUT = ("protocol_precision", "protocol_f1", "corpus_precision")
MEASURED_ORDER = (
    *METRICS,
    "n_test",
    *HELD_OUT,
    "n_fire",
    "n_hard",
    "n_terms",
    "f1_by_terms",
    "f1_by_ranking",
)
CHECKED = ("f1", "precision", "recall")  # the minimums a format-2 book may give
SHA256 = "#/$defs/sha256"  # a fingerprint, in the editors' JSON Schema
FINGERPRINT_DOCS = {
    "model": "Fingerprint of the model's weights.",
    "sae_in": "Fingerprint of the input SAE.",
    "sae_out": "Fingerprint of the output SAE.",
    "corpus": "Fingerprint of the corpus.",
}
# what editors show of the recorded ``extraction:`` settings (others are kept as written)
EXTRACTION_DOCS = {
    "method": "How the candidate (query, key) terms were ranked (--method): weight, by "
    "attn-score x value-score; gradient (the default), by each term's gradient in a surrogate "
    "of the head.",
    "keys": "How many candidate keys were ranked (--keys).",
    "queries_per_key": "How many candidate queries per key were ranked (--queries-per-key).",
    "max_terms": "The most skip-gram terms one feature may get (--max-terms).",
    "term_margin": "The fewest terms whose validation F1 is within this much of the best were "
    "kept (0: the best).",
    "seed": "Seed of the exemplar sampling (--seed); checks use the book's value.",
    "n_pos": "Positive exemplars (the most active sequences) per feature (--n-pos); checks use "
    "the book's value.",
    "n_neg": "Random inactive exemplars per feature (--n-neg); checks use the book's value.",
    "min_active": "The fewest sequences a feature must be active in to be described "
    "(--min-active); checks use the book's value.",
    "min_inactive": "The fewest sequences a feature must be inactive in to be described "
    "(--min-inactive); checks use the book's value.",
    "n_held": "Held-out sequences kept at every position, for distance bounds and hard "
    "negatives (--n-held); checks use the book's value.",
    "tolerance": "How far below the measured metrics the `expect` minimums were set "
    "(--tolerance): below 1, which would set every minimum to 0.",
    "ln_scale": "The mean LayerNorm scale of the head's input, measured on the corpus: "
    "rulecheck reads the model's remaining LayerNorm as centring plus this scale.",
    "n_eligible": "How many output features were active often enough to be described.",
    "n_sequences": "How many corpus sequences were read.",
    "rulecheck": "The version of rulecheck that extracted the book.",
}


def _metric_bounds(metric: str) -> tuple[float, float]:
    return (-1.0, 1.0) if metric == "spearman" else (0.0, 1.0)


def parse_expect(where: sc.Where, value: Any, path: str) -> dict[str, float]:
    if not where.measured and isinstance(value, Mapping) and "spearman" in value:
        where.fail(
            sc.join(path, "spearman"),
            "Spearman is measured, not checked",
            "remove it; the checked minimums are f1, precision and recall",
            key=True,
        )
    data = sc.mapping(where, value, path, METRICS)
    return {
        m: sc.number(_metric_bounds(m))(where, data[m], sc.join(path, m))
        for m in METRICS
        if m in data
    }


def parse_measured(where: sc.Where, value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        where.fail(
            path, f"expected a mapping, got {sc.describe(value)}", "write `metric: value` lines"
        )
    out: dict[str, Any] = {}
    for key, item in value.items():
        sub = sc.join(path, key)
        if not isinstance(key, str):
            where.fail(
                sub, f"keys must be strings, got {sc.describe(key)}", "rename the key", key=True
            )
        if key in (*METRICS, *HELD_OUT) and item is not None:
            out[key] = sc.number(_metric_bounds(key), allow_nan=True)(where, item, sub)
        elif key in ("n_test", "n_terms", "n_fire", "n_hard") and item is not None:
            out[key] = sc.integer()(where, item, sub)
        elif key == "f1_by_terms" and item is not None:
            out[key] = _parse_f1_by_terms(where, item, sub)
        elif key == "f1_by_ranking" and item is not None:
            data = sc.mapping(where, item, sub, METHODS)
            out[key] = {m: _parse_f1_by_terms(where, c, sc.join(sub, m)) for m, c in data.items()}
        else:
            out[key] = item
    return out


def _parse_f1_by_terms(where: sc.Where, value: Any, path: str) -> dict[int, float]:
    if not isinstance(value, Mapping):
        where.fail(
            path, f"expected a mapping, got {sc.describe(value)}", "write `n_terms: f1` lines"
        )
    out = {}
    for key, item in value.items():
        sub = sc.join(path, key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            where.fail(
                sub, f"keys must be term counts, got {sc.describe(key)}", "use 4: 0.5", key=True
            )
        out[key] = sc.number((0.0, 1.0), allow_nan=True)(where, item, sub)
    return out


def parse_refs(where: sc.Where, value: Any, path: str) -> dict[int, list[str]]:
    if not isinstance(value, Mapping):
        where.fail(
            path,
            f"expected a mapping, got {sc.describe(value)}",
            "write `id: [tokens]` lines, e.g. `858: [' then']`",
        )
    out = {}
    for key, item in value.items():
        sub = sc.join(path, key)
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            where.fail(
                sub,
                f"keys are input feature ids, got {sc.describe(key)}",
                "use a whole number >= 0",
                key=True,
            )
        out[key] = sc.list_of(sc.text, "strings")(where, item, sub)
    where.refs = out  # references by id read after this take their tokens from it
    where.ref_cache.clear()
    return out


def parse_fingerprints(where: sc.Where, value: Any, path: str) -> dict[str, str]:
    data = sc.mapping(where, value, path, HEADER_KEYS)
    return {k: sc.text(where, data[k], sc.join(path, k)) for k in HEADER_KEYS if k in data}


def _bound_hint(bound: Bound | None) -> dict[str, Any]:
    """A config setting's bound as JSON Schema."""
    if bound is None:
        return {}
    out: dict[str, Any] = {"type": "integer" if bound.kind is int else "number"}
    high = "exclusiveMaximum" if bound.open_high else "maximum"
    for word, x in (("minimum", bound.low), (high, bound.high)):
        if x != float("inf"):
            out[word] = int(x) if float(x).is_integer() else x
    return out


def extraction_hint() -> dict[str, Any]:
    """The recorded settings editors describe: the extraction's own bounds, and what it
    measured."""
    derived = {
        "method": sc.json_hint(sc.choice(*METHODS)),
        **{key: _bound_hint(bound_of(ExemplarConfig, key)) for key in PROTOCOL},
        "ln_scale": sc.json_hint(sc.number()),
        "n_eligible": sc.json_hint(sc.integer()),
        "n_sequences": sc.json_hint(sc.integer()),
        "rulecheck": sc.json_hint(sc.text),
    }
    properties = {
        key: {"description": doc, **(derived.get(key) or _bound_hint(bound_of(ExtractConfig, key)))}
        for key, doc in EXTRACTION_DOCS.items()
    }
    return {"properties": properties}


def fingerprints_hint() -> dict[str, Any]:
    properties = {k: {"description": FINGERPRINT_DOCS[k], "$ref": SHA256} for k in HEADER_KEYS}
    return {"type": "object", "additionalProperties": False, "properties": properties}


def expect_hint() -> dict[str, Any]:
    names = {"f1": "F1"}
    properties = {
        m: {"description": f"Minimum {names.get(m, m)}.", "$ref": "#/$defs/fraction"}
        for m in CHECKED
    }
    return {"type": "object", "additionalProperties": False, "properties": properties}


REFS_HINT = {
    "type": "object",
    "propertyNames": {
        "description": "An input feature id: a whole number >= 0.",
        "pattern": "^(?:0|[1-9][0-9]*)(?![\\s\\S])",
    },
    "additionalProperties": {
        "description": "The tokens that fire the input feature most, as decoded text.",
        **sc.json_hint(sc.list_of(sc.text, "strings")),
    },
}
