"""What the report measures on the model for each feature: its top exemplars with the
feature's activation at every token and the head's attention from the query, and what each
claim's kind measures for it (``RuleKind.evidence``: the curves that the measurements beside
the book do not hold, such as distractor drops and counting curves).

One batched forward pass per chunk of exemplars (TransformerLens hooks ``hook_resid_pre``,
``attn.hook_z`` through the output SAE, and ``attn.hook_pattern``, up to the head's layer);
a claim's evidence through the same probes its check uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rulecheck import kinds
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.core.heads import encode_columns, encode_head, resid_pre_hook, run_to_layer, z_hook
from rulecheck.errors import RulecheckError
from rulecheck.kinds.base import CheckContext
from rulecheck.kinds.card import rounded
from rulecheck.kinds.skipgram import ranked, shown_term
from rulecheck.refs import Resolved
from rulecheck.session import Workbench

Progress = Callable[[str, int, int], None]  # (task, advance, total)
BEFORE = 20  # tokens shown before the query
AFTER = 3  # and after it (the head never reads them: context only)
CHUNK = 64


def pattern_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


@dataclass
class Exemplar:
    """One top-activating prefix: the tokens of a window around the query ``t`` (an index
    into ``tokens``), the feature's activation at each, the head's attention from ``t`` to
    each, and the positions where a key of a term that matches at ``t`` is present."""

    seq: int
    pos: int  # the query's position in the sequence
    act: float
    tokens: list[str]
    acts: list[float | None]
    attn: list[float | None]
    t: int
    keys: list[int]
    term: str | None  # the first matching term, as its label shows it

    def plain(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "pos": self.pos,
            "act": rounded(self.act),
            "tok": self.tokens,
            "a": self.acts,
            "w": self.attn,
            "t": self.t,
            "keys": self.keys,
            "term": self.term,
        }


@dataclass
class FeatureEvidence:
    """The exemplars of one feature and what its claims' kinds measured for them (by kind
    key and claim index), or why there are none."""

    exemplars: list[Exemplar] = field(default_factory=list)
    claims: dict[tuple[str, int], Any] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def of(self, key: str) -> dict[int, Any]:
        """What was measured for the claims of kind ``key``, by index."""
        return {i: value for (k, i), value in self.claims.items() if k == key}


class _Tokens:
    """Each token id decoded once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            tok = self.tokenizer
            self.cache[token] = tok.decode([token]) if tok is not None else str(token)
        return self.cache[token]


@dataclass
class _Term:
    key: Resolved
    query: Resolved
    label: str
    min_distance: int | None = None
    max_distance: int | None = None

    def reaches(self, i: int, t: int) -> bool:
        """Whether a key at ``i`` is at one of the term's distances from the query at ``t``."""
        lo, hi = self.min_distance or 0, self.max_distance
        return lo <= t - i and (hi is None or t - i <= hi)


def _terms(rules: FeatureRules, resolve: Callable[[Any, str], Resolved]) -> list[_Term]:
    """The feature's skip-grams, most important first, resolved."""
    out = []
    for i, term in ranked(rules, len(rules.skipgrams)):
        where = f"feature[{rules.feature}].skipgrams[{i}]"
        key = resolve(term.key, f"{where}.key")
        query = resolve(term.query, f"{where}.query")
        out.append(_Term(key, query, shown_term(term), term.min_distance, term.max_distance))
    return out


def _present(ref: Resolved, tokens: torch.Tensor, inputs: torch.Tensor, col: dict[int, int]):
    """``[pos]`` bool: where the reference holds in one row (its input feature active, or
    one of its tokens)."""
    if ref.feature is not None:
        return inputs[:, col[ref.feature]] > 0
    return torch.isin(tokens, torch.tensor(ref.token_ids, dtype=tokens.dtype))


@torch.no_grad()
def head_evidence(
    bench: Workbench,
    book: Rulebook,
    file: str,
    n_exemplars: int = 5,
    progress: Progress | None = None,
    label: str | None = None,
) -> dict[int, FeatureEvidence]:
    """Every feature's evidence on the checkpoint the book names (``RulecheckError`` when the
    head does not load; a feature that cannot be measured carries its one-line error)."""
    label = label or book.name
    bench = bench.for_book(book)  # the exemplars of the protocol the book was measured with
    head = bench.head_of(book, file)
    bench.check_fingerprints(book, head, file)
    model, sae_in, sae_out, corpus = bench.load(head)
    if progress is not None and not bench.has_exemplars(head):
        bench.layer_pass(head, progress)  # the corpus pass, once per layer, with its bar
    resolver = bench.resolver(head, file)
    decode = _Tokens(model.tokenizer)
    out: dict[int, FeatureEvidence] = {}
    rows: list[tuple[int, int, int, float]] = []  # feature, sequence, t, activation
    terms: dict[int, list[_Term]] = {}
    for rules in book.features:
        ev = out[rules.feature] = FeatureEvidence()
        try:
            ex = bench.examples(head, rules.feature, file)
            terms[rules.feature] = _terms(rules, resolver.resolve)
        except RulecheckError as e:
            ev.error = str(e)
            continue
        pos = torch.nonzero(ex.act > 0).flatten()
        top = pos[torch.sort(ex.act[pos], descending=True, stable=True).indices][:n_exemplars]
        rows += [(rules.feature, int(ex.seq[i]), int(ex.t[i]), float(ex.act[i])) for i in top]
    columns = sorted(
        {
            r.feature
            for ts in terms.values()
            for t in ts
            for r in (t.key, t.query)
            if r.feature is not None
        }
    )
    col = {f: i for i, f in enumerate(columns)}
    names = (resid_pre_hook(head.layer), z_hook(head.layer), pattern_hook(head.layer))
    device = model.cfg.device
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        seqs = torch.tensor([r[1] for r in chunk])
        toks = corpus[seqs].to(device)
        store = run_to_layer(model, toks, head.layer, names)
        acts = encode_head(sae_out, store[z_hook(head.layer)], head.head).float()
        feats = torch.tensor([r[0] for r in chunk], device=acts.device)
        feature_acts = acts.gather(2, feats.view(-1, 1, 1).expand(-1, acts.shape[1], 1))[..., 0]
        pattern = store[pattern_hook(head.layer)][:, head.head].float()  # [b, q, k]
        resid = store[resid_pre_hook(head.layer)]
        inputs = (
            encode_columns(sae_in, resid, columns).float()
            if columns
            else resid.new_zeros(*resid.shape[:2], 0)
        )
        for b, (feature, seq, t, act) in enumerate(chunk):
            out[feature].exemplars.append(
                _exemplar(
                    seq,
                    act,
                    t,
                    toks[b].cpu(),
                    feature_acts[b].cpu(),
                    pattern[b, t].cpu(),
                    inputs[b].cpu(),
                    col,
                    terms[feature],
                    decode,
                )
            )
        if progress is not None:
            progress(f"{label} exemplars", len(chunk), len(rows))
    ctx = CheckContext(bench, head, file)
    for rules in book.features:
        ev = out[rules.feature]
        if ev.error is None:
            _claims(ctx, rules, ev)
        if progress is not None:
            progress(f"{label} curves", 1, len(book.features))
    return out


def _exemplar(
    seq: int,
    act: float,
    t: int,
    tokens: torch.Tensor,
    acts: torch.Tensor,
    attn: torch.Tensor,
    inputs: torch.Tensor,
    col: dict[int, int],
    terms: list[_Term],
    decode: _Tokens,
) -> Exemplar:
    lo, hi = max(1, t - BEFORE), min(len(tokens), t + AFTER + 1)
    keys: set[int] = set()
    first = None
    for term in terms:
        if not bool(_present(term.query, tokens, inputs, col)[t]):
            continue
        at = torch.nonzero(_present(term.key, tokens, inputs, col)[: t + 1]).flatten().tolist()
        at = [i for i in at if term.reaches(i, t)]
        if at:
            first = first or term.label
            keys.update(at)
    return Exemplar(
        seq=seq,
        pos=t,
        act=act,
        tokens=[decode(int(x)) for x in tokens[lo:hi]],
        acts=[rounded(float(x)) for x in acts[lo:hi]],
        attn=[rounded(float(x)) if i <= t else None for i, x in enumerate(attn[lo:hi], lo)],
        t=t - lo,
        keys=sorted(k - lo for k in keys if k >= lo),
        term=first,
    )


def _claims(ctx: CheckContext, rules: FeatureRules, ev: FeatureEvidence) -> None:
    """What each claim's kind measures for it on the model; a reference that does not resolve
    is noted on the card."""
    for kind in kinds.kinds():
        for i in range(len(rules.claims[kind.key])):
            try:
                value = kind.evidence(ctx, rules, i)
            except RulecheckError as e:
                ev.notes.append(str(e))
                continue
            if value is not None:
                ev.claims[(kind.key, i)] = value
