"""Extraction: from a model, its SAEs and a corpus to the rules of each head's features.

One streaming pass per layer collects every requested head's exemplars and the mean LayerNorm
scale; then, per head and feature, skip-gram candidates are ranked, evaluated on the
exemplars' prefixes, the number of terms is chosen on the validation split, and every
registered rule kind proposes its candidate claims from the kept terms (``rulecheck.kinds``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from rulecheck import kinds
from rulecheck.config import ExtractConfig
from rulecheck.core.evaluate import score_predictions
from rulecheck.core.exemplars import (
    ExemplarCollector,
    FeatureExamples,
    check_corpus_size,
    sample_features,
)
from rulecheck.core.gradient import with_importance
from rulecheck.core.heads import (
    Probe,
    encode_head,
    head_encoder,
    head_weights,
    heads_read,
    input_directions,
    ln_inverse_scale,
    run_to_heads,
    z_hook,
)
from rulecheck.core.heldout import (
    any_of,
    candidate_bounds,
    choose_bounds,
    fire_counts,
    joined,
    nearest_key_distance,
    nearest_key_distances,
    term_matches,
)
from rulecheck.core.metrics import binary_scores, spearman
from rulecheck.core.modelview import Model
from rulecheck.core.prefixes import KeptInputs, SequenceChunk, prefix_features, sequence_chunks
from rulecheck.core.rules import (
    predict_from,
    predictions_by_terms,
    term_contributions,
    term_counts,
    window_key_act,
)
from rulecheck.core.scores import (
    Terms,
    candidate_terms,
    rank_by_importance,
    rank_by_weight,
    value_scores,
)
from rulecheck.core.tokens import layer_token_table, top_token
from rulecheck.errors import InvalidSpec
from rulecheck.refs import TokenRef

Progress = Callable[[str, int, int], None]  # (task, advance, total)


@dataclass
class FeatureResult:
    """One output feature's ranked terms and their measured quality."""

    feature: int
    terms: Terms  # the kept terms, ranked, all live (attn > 0, value > 0)
    n_terms: int  # terms chosen on the validation split
    test: dict[str, float]  # f1, precision, recall, spearman, n_test
    f1_by_terms: dict[int, float]  # test F1 against number of terms
    claims: dict[str, list[Any]] = field(default_factory=dict)  # candidates, by rule kind
    # the same curve for each other ranking method (the same candidates in its order)
    f1_by_ranking: dict[str, dict[int, float]] = field(default_factory=dict)
    test_pred: Tensor | None = field(default=None, repr=False)  # [n] on the test split


@dataclass
class HeadResult:
    layer: int
    head: int
    ln_scale: float
    features: list[FeatureResult]
    n_sequences: int
    n_eligible: int
    collector: ExemplarCollector | None = field(default=None, repr=False)


def no_progress(task: str, advance: int, total: int) -> None:
    return None


@torch.no_grad()
def collect_layer(
    model: Model,
    sae_outs: dict[int, SAE],
    tokens: Tensor,
    layer: int,
    cfg: ExtractConfig,
    progress: Progress = no_progress,
    sample_ids: dict[int, Tensor] | None = None,
    observe: Callable[[dict[str, Tensor]], None] | None = None,
) -> tuple[dict[int, ExemplarCollector], float]:
    """Stream ``tokens [n_seq, pos]`` once: exemplars for every head in ``sae_outs`` and the
    mean inverse LayerNorm scale of ``blocks.{layer}`` (positions after BOS). ``sample_ids``
    gives a head's features the ids their random draws are keyed by (``ExemplarCollector``);
    ``observe`` sees each batch's activations by hook name (``prefixes.KeptInputs``)."""
    device = model.cfg.device
    n_seq, seq_len = tokens.shape
    ids = sample_ids or {}
    collectors = {
        h: ExemplarCollector(
            sae.cfg.d_sae, seq_len, cfg.exemplars, torch.device(device), ids.get(h), n_seq
        )
        for h, sae in sae_outs.items()
    }
    heads = heads_read(sae_outs, model.cfg.n_heads)
    inv_sum, inv_count = 0.0, 0
    for start in range(0, n_seq, cfg.batch_size):
        batch = tokens[start : start + cfg.batch_size].to(device)
        store = run_to_heads(model, batch, layer, heads)
        if observe is not None:
            observe(store)
        inv = ln_inverse_scale(model, store, layer)[:, 1:]
        inv_sum += float(inv.double().sum())
        inv_count += inv.numel()
        z = store[z_hook(layer)]
        for h, sae in sae_outs.items():
            collectors[h].update(encode_head(sae, z, h))
        progress(f"L{layer} exemplars", len(batch), n_seq)
    return collectors, inv_sum / max(inv_count, 1)


def choose_n_terms(val_f1: Tensor, counts: list[int], max_terms: int, margin: float = 0.0) -> int:
    """Index into ``counts`` (ascending) of the fewest terms, at most ``max_terms``, whose
    validation F1 is within ``margin`` of the best validation F1 among those counts."""
    allowed = [i for i, n in enumerate(counts) if n <= max_terms] or [0]
    best = max(float(val_f1[i]) for i in allowed)
    return next(i for i in allowed if float(val_f1[i]) >= best - margin)


def evaluate_feature(
    terms: Terms,
    ex: FeatureExamples,
    q_act: Tensor,
    k_max: Tensor,
    max_terms: int,
    margin: float = 0.0,
) -> FeatureResult:
    """Score the ranked ``terms`` on one feature's examples; choose ``n`` on validation
    (``choose_n_terms``)."""
    counts = term_counts(len(terms))
    if not counts:
        counts = [0]
    device = q_act.device
    val, test = ex.part("val").to(device), ex.part("test").to(device)
    act = ex.act.to(device)
    # only the validation and test prefixes are scored: the train ones are not predicted
    pred_val, pred_test = (
        predictions_by_terms(term_contributions(q_act[rows], k_max[rows], terms), counts)
        for rows in (val, test)
    )
    best = choose_n_terms(binary_scores(act[val], pred_val)["f1"], counts, max_terms, margin)
    test_scores = binary_scores(act[test], pred_test)
    n = counts[best]
    top = terms.take(torch.arange(min(n, len(terms)), device=terms.query.device))
    live = (top.attn > 0) & (top.value > 0)
    test_pred = torch.zeros(len(ex.seq))
    test_pred[test.cpu()] = pred_test[:, best].float().cpu()
    return FeatureResult(
        feature=ex.feature,
        terms=top.take(torch.nonzero(live).flatten()),
        n_terms=n,
        test_pred=test_pred,
        test={
            "f1": float(test_scores["f1"][best]),
            "precision": float(test_scores["precision"][best]),
            "recall": float(test_scores["recall"][best]),
            "spearman": spearman(pred_test[:, best].cpu(), act[test].cpu()),
            "n_test": int(test.sum()),
        },
        f1_by_terms={c: float(f) for c, f in zip(counts, test_scores["f1"], strict=True)},
    )


def f1_curve(terms: Terms, ex: FeatureExamples, q_act: Tensor, k_max: Tensor) -> dict[int, float]:
    """Test F1 of the first ``n`` of the ranked ``terms`` for every ``n`` of the grid."""
    counts = term_counts(len(terms)) or [0]
    test = ex.part("test").to(q_act.device)
    preds = predictions_by_terms(term_contributions(q_act[test], k_max[test], terms), counts)
    f1 = binary_scores(ex.act.to(preds.device)[test], preds)["f1"]
    return {c: float(v) for c, v in zip(counts, f1, strict=True)}


def pick_features(
    collector: ExemplarCollector, cfg: ExtractConfig, layer: int, head: int
) -> list[int]:
    eligible = collector.eligible()
    if isinstance(cfg.features, int):
        if len(eligible) == 0:
            raise InvalidSpec(
                f"no feature of L{layer}H{head} is active in >= "
                f"{cfg.exemplars.min_active} and inactive in >= {cfg.exemplars.min_inactive} "
                f"of {collector.n_seen} sequences",
                field="corpus",
                fix="pass a larger corpus or lower --min-active/--min-inactive",
            )
        return sample_features(eligible, cfg.features, cfg.seed)
    ok = set(eligible.tolist())
    missing = [f for f in cfg.features if f not in ok]
    if missing:
        raise InvalidSpec(
            f"features {missing} of L{layer}H{head} are not eligible (active in >= "
            f"{cfg.exemplars.min_active} and inactive in >= {cfg.exemplars.min_inactive} "
            f"of {collector.n_seen} sequences)",
            field="--features",
            fix="choose eligible features, or lower --min-active/--min-inactive",
        )
    return sorted(cfg.features)


PREFIX_PASS_BYTES = 1 << 30  # what one shared prefix pass may hold for its features


def feature_groups(
    features: Sequence[int], d_sae_in: int, seq_len: int, cfg: ExtractConfig
) -> list[list[tuple[int, int]]]:
    """``(index, feature)`` pairs in groups whose prefixes share one pass
    (``prefixes.sequence_chunks``), each group's prefix activations within
    ``PREFIX_PASS_BYTES``: per feature ``q_act`` and ``k_max`` (``[n, d_sae_in]``) and its train
    prefixes' key activations (``[n / 3, pos, keys]``), in float32."""
    n = cfg.exemplars.n_pos + cfg.exemplars.n_neg
    per_feature = 4 * (2 * n * d_sae_in + n // 3 * seq_len * cfg.keys)
    size = max(1, PREFIX_PASS_BYTES // per_feature)
    pairs = list(enumerate(features))
    return [pairs[i : i + size] for i in range(0, len(pairs), size)]


ReadChunks = Callable[[Tensor, Tensor], Iterable[SequenceChunk]]  # prefixes (seq, t), all columns


def _owned(
    read: ReadChunks, prefixes: list[tuple[Tensor, Tensor]]
) -> Iterator[tuple[int, SequenceChunk, Tensor]]:
    """``(i, chunk, mine)`` for each feature ``i`` with prefixes in each chunk of one pass over
    all features' ``prefixes`` (``(seq, t)`` each), ``mine`` its rows of the chunk's."""
    sizes = torch.tensor([len(s) for s, _ in prefixes])
    if int(sizes.sum()) == 0:
        return
    owner = torch.repeat_interleave(torch.arange(len(prefixes)), sizes)
    seq = torch.cat([s.cpu() for s, _ in prefixes])
    t = torch.cat([t.cpu() for _, t in prefixes])
    for chunk in read(seq, t):
        mine_of = owner[chunk.rows.cpu()]
        for i in mine_of.unique().tolist():
            yield i, chunk, mine_of == i


def settle(
    results: list[FeatureResult],
    exs: list[FeatureExamples],
    collector: ExemplarCollector,
    read: ReadChunks,
) -> None:
    """Distance bounds, precision where the rules fire and the final test scores of a group of
    features (``core.heldout``): candidate bounds from where each term's nearest key is in the
    train and val positives and at the val half's positions where the feature is on, kept
    where they raise the val half's F1; then the test split scored with the test half's hard
    negatives (``result.test``)."""
    helds = [collector.held_out(r.feature, ex) for r, ex in zip(results, exs, strict=True)]
    positives = [(~ex.part("test") & (ex.act > 0)).cpu() for ex in exs]
    parts: list[list[Tensor]] = [[] for _ in results]  # nearest-key distances of positives
    if len(collector.held_seq):
        prefixes = [(ex.seq[p], ex.t[p]) for ex, p in zip(exs, positives, strict=True)]
        for i, chunk, mine in _owned(read, prefixes):
            m = mine.to(chunk.where.device)
            terms = results[i].terms.to(chunk.feats.device)
            parts[i].append(nearest_key_distance(chunk.feats, chunk.t[m], chunk.where[m], terms))
    # the held-out positions where some term matches: rows, positions, matches, distances
    seen: list[list[tuple[Tensor, Tensor, Tensor, Tensor]]] = [[] for _ in results]
    seq = collector.held_seq.cpu()
    if len(seq) and results:
        free_terms, offsets = joined([r.terms for r in results])
        ends = torch.full_like(seq, collector.seq_len - 1)
        for chunk in read(seq, ends):
            rows = chunk.rows.cpu()[chunk.where.cpu().argsort()]  # chunk row -> held-out row
            free = term_matches(chunk.feats, free_terms.to(chunk.feats.device))
            dist = nearest_key_distances(chunk.feats, free_terms)
            fires = any_of(free, offsets)  # [batch, pos, n_features]
            for i, (lo, hi) in enumerate(itertools.pairwise(offsets.tolist())):
                b, p = torch.nonzero(fires[..., i], as_tuple=True)
                seen[i].append(
                    (rows[b.cpu()], p.cpu(), free[b, p, lo:hi].cpu(), dist[b, p, lo:hi].cpu())
                )
    for result, ex, held, part, spots in zip(results, exs, helds, parts, seen, strict=True):
        fire = None
        if spots:
            row, pos, free, dist = (torch.cat(x) for x in zip(*spots, strict=True))
            on = held.act.cpu()[row, pos] > 0
            val = held.rows("val").cpu()
            at = val[row]
            held_dist = torch.where(free[at & on], dist[at & on], -1)
            cand = candidate_bounds(torch.cat([*part, held_dist]).cpu())
            bound = free & ((cand < 0) | (dist <= cand))
            elsewhere = int((held.act.cpu()[val] > 0).sum()) - int(on[at].sum())
            result.terms = choose_bounds(result.terms, cand, free[at], bound[at], on[at], elsewhere)
            chosen = result.terms.max_distance
            if chosen is not None:
                free = torch.where(chosen.cpu() >= 0, bound, free)
            firing = torch.zeros(len(held.seq), held.act.shape[1], dtype=torch.bool)
            firing[row, pos] = free.any(dim=1)
            n_neg = int((ex.part("test") & (ex.act <= 0)).sum())
            fire = fire_counts(firing, held, n_neg)
        pred = result.test_pred
        if result.terms.bounded:
            pred = _bounded_test_predictions(read, ex, result.terms)
        assert pred is not None
        result.test = score_predictions(pred, ex, fire).as_dict()


def _bounded_test_predictions(read: ReadChunks, ex: FeatureExamples, terms: Terms) -> Tensor:
    """``[n]`` predictions of bounded ``terms`` on the feature's test prefixes (0 elsewhere)."""
    test = ex.part("test").cpu()
    pred = torch.zeros(len(ex.seq))
    rows = torch.nonzero(test).flatten()
    for _, chunk, mine in _owned(read, [(ex.seq.cpu()[rows], ex.t.cpu()[rows])]):
        m = mine.to(chunk.where.device)
        own = terms.to(chunk.feats.device)
        q, k = chunk.stats()
        k_act = window_key_act(chunk.feats, chunk.t[m], chunk.where[m], own)
        pred[rows[chunk.rows.cpu()[mine]]] = predict_from(q[m], k[m], own, k_act).float().cpu()
    return pred


def extract_head(
    model: Model,
    sae_in: SAE,
    sae_out: SAE,
    tokens: Tensor,
    layer: int,
    head: int,
    collector: ExemplarCollector,
    ln_scale: float,
    cfg: ExtractConfig,
    progress: Progress = no_progress,
    token_of: Tensor | None = None,
    token_table: dict[int, list[str]] | None = None,
    kept: KeptInputs | None = None,
) -> HeadResult:
    """Rank, evaluate and keep the skip-gram terms of the chosen features of one head, then
    ask every rule kind for its candidate claims (``FeatureResult.claims``). With ``token_of``
    (``[d_sae_in]`` top token per input feature) the kinds that insert tokens find theirs;
    ``token_table`` names input features by their top tokens; with ``kept`` (the corpus
    pass's input-SAE activations) the prefixes are read from it, not run again."""
    features = pick_features(collector, cfg, layer, head)
    w = head_weights(model, layer, head)
    d = input_directions(sae_in, w, ln_scale)
    u = head_encoder(sae_out, head, model.cfg.d_head).to(d.dtype)
    vs = value_scores(d, w.W_V, u[:, features])  # [d_sae_in, n_features]
    results = []
    for group in feature_groups(features, sae_in.cfg.d_sae, tokens.shape[1], cfg):
        candidates = [
            candidate_terms(
                d,
                w.W_Q,
                w.W_K,
                w.form,
                vs[:, i],
                cfg.keys,
                cfg.queries_per_key,
                n_distances=tokens.shape[1],
            )
            for i, _ in group
        ]
        exs = [collector.examples(f) for _, f in group]
        # one pass over the distinct sequences of the group's prefixes gives both rankings:
        # the book's, and the other's F1 curve
        seq, t = torch.cat([ex.seq for ex in exs]), torch.cat([ex.t for ex in exs])
        chunks = (
            sequence_chunks(model, sae_in, tokens, layer, seq, t, cfg.batch_size)
            if kept is None
            else kept.chunks(seq, t, cfg.batch_size)
        )
        train = torch.cat([ex.part("train") for ex in exs])
        stats = prefix_features(
            chunks, [len(ex.seq) for ex in exs], candidates, train, cfg.batch_size
        )
        group_results = []
        for terms, ex, pf in zip(candidates, exs, stats, strict=True):
            rankings = {"weight": rank_by_weight(terms)}
            if cfg.method == "gradient" or pf.importance is not None:  # none without train
                # every feature has train prefixes: its first positive is one (split_labels)
                assert pf.importance is not None
                rankings["gradient"] = rank_by_importance(with_importance(terms, pf.importance))
            ranked = rankings[cfg.method]
            result = evaluate_feature(
                ranked, ex, pf.q_act, pf.k_max, cfg.max_terms, cfg.term_margin
            )
            result.f1_by_ranking = {
                m: f1_curve(r, ex, pf.q_act, pf.k_max)
                for m, r in rankings.items()
                if r is not ranked and cfg.compare_rankings
            }
            group_results.append(result)

        def read(seq: Tensor, t: Tensor) -> Iterator[SequenceChunk]:
            if kept is not None:
                return kept.chunks(seq, t, cfg.batch_size)
            return sequence_chunks(model, sae_in, tokens, layer, seq, t, cfg.batch_size)

        if cfg.held_out:
            settle(group_results, exs, collector, read)
        else:
            for result, ex in zip(group_results, exs, strict=True):
                assert result.test_pred is not None
                result.test = score_predictions(result.test_pred, ex).as_dict()
        for (i, f), result, ex in zip(group, group_results, exs, strict=True):
            found = kinds.Found(
                feature=f,
                probe=Probe(model, sae_out, layer, head, f),
                tokens=tokens,
                examples=ex,
                d=d,
                weights=w,
                value_score=vs[:, i],
                terms=result.terms,
                token_of=token_of if cfg.rules else None,
                ref=lambda j: TokenRef(feature=j, tokens=list((token_table or {}).get(j, []))),
            )
            result.claims = {kind.key: kind.find(found) for kind in kinds.kinds()}
            results.append(result)
            progress(f"L{layer}H{head} features", 1, len(features))
    return HeadResult(
        layer=layer,
        head=head,
        ln_scale=ln_scale,
        features=results,
        n_sequences=collector.n_seen,
        n_eligible=len(collector.eligible()),
        collector=collector,
    )


def layer_tokens(
    model: Model, sae_in: SAE, layer: int, cfg: ExtractConfig
) -> tuple[Tensor | None, dict[int, list[str]] | None]:
    """The top token of each input feature (``[d_sae_in]``, -1 where none; None when rules
    other than skip-grams are not searched) and each feature's top tokens by name."""
    token_of = top_token(model, sae_in, layer).cpu() if cfg.rules else None
    return token_of, layer_token_table(model, sae_in, layer, cfg.top_tokens)


def extract_layer(
    model: Model,
    sae_in: SAE,
    sae_outs: dict[int, SAE],
    tokens: Tensor,
    layer: int,
    cfg: ExtractConfig,
    corpus_name: str = "corpus",
    progress: Progress = no_progress,
) -> list[HeadResult]:
    """Extract every head in ``sae_outs`` of ``layer`` from one pass over ``tokens``."""
    check_corpus_size(tokens.shape[0], cfg.exemplars, corpus_name)
    model.eval()
    collectors, ln_scale = collect_layer(model, sae_outs, tokens, layer, cfg, progress)
    token_of, table = layer_tokens(model, sae_in, layer, cfg)
    return [
        extract_head(
            model,
            sae_in,
            sae,
            tokens,
            layer,
            h,
            collectors[h],
            ln_scale,
            cfg,
            progress,
            token_of,
            table,
        )
        for h, sae in sae_outs.items()
    ]
