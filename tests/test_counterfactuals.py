"""Counterfactual edits, absence rules and counting rules, against the planted ground truth."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rulecheck import zoo
from rulecheck.core.counterfactuals import (
    INSERTED,
    insert_before,
    insert_filler,
    insert_tokens_batch,
    render,
    repeat_token,
    repeat_token_batch,
    spread_positions,
)
from rulecheck.core.counts import (
    CountingCurve,
    as_counting_rule,
    counting_curve,
    own_counts,
    threshold_count,
)
from rulecheck.core.distractors import (
    VALUE_MARGIN,
    cooccurrence,
    distractor_drop,
    droppable_before,
    find_distractors,
    text_keys,
)
from rulecheck.core.heads import Probe, head_encoder, head_weights, input_directions
from rulecheck.core.scores import Terms, candidate_terms, value_scores
from rulecheck.core.tokens import top_token

BOS = 0
INS = 100  # inserted tokens are >= INS, original body tokens < INS

# --- edits -------------------------------------------------------------------------------


def reference_edit(tokens, t, items, protect=()):
    """Slow list version: ``items`` are (at, token); drop after t from the right, then the
    oldest unprotected body tokens before t."""
    T, m = len(tokens), len(items)
    seq = []
    for j, tok in enumerate(tokens):
        seq += [(INSERTED, x) for a, x in items if a == j]
        seq.append((j, tok))
    right = min(m, T - 1 - t)
    seq = seq[: len(seq) - right]
    left = m - right
    out = []
    for origin, tok in seq:
        if left and 0 < origin < t and origin not in protect:
            left -= 1
            continue
        out.append((origin, tok))
    return [tok for _, tok in out], [o for o, _ in out]


@st.composite
def edit_cases(draw):
    T = draw(st.integers(3, 24))
    body = draw(st.lists(st.integers(1, INS - 1), min_size=T - 1, max_size=T - 1))
    t = draw(st.integers(1, T - 1))
    m = draw(st.integers(0, T - 2))
    at = draw(st.lists(st.integers(1, t), min_size=m, max_size=m))
    insert = draw(st.lists(st.integers(INS, INS + 9), min_size=m, max_size=m))
    protect = draw(st.lists(st.integers(1, T - 1), max_size=4, unique=True))
    return torch.tensor([BOS, *body]), t, sorted(at), insert, protect


def check_invariants(tokens, t, edit, m):
    T = len(tokens)
    assert edit.tokens.shape == (T,)
    assert int(edit.tokens[0]) == BOS and int(edit.origin[0]) == 0
    assert int(edit.tokens[edit.t]) == int(tokens[t]) and int(edit.origin[edit.t]) == t
    assert len(edit.inserted) == m
    assert all(p < edit.t for p in edit.inserted)
    assert all(int(edit.tokens[p]) >= INS for p in edit.inserted)
    kept = [p for p in range(T) if p not in edit.inserted]
    assert all(int(edit.tokens[p]) < INS for p in kept)
    origins = edit.origin[kept]
    assert torch.equal(edit.tokens[kept], tokens[origins])
    assert bool((origins[1:] > origins[:-1]).all())
    assert len(edit.dropped) == m
    # the tracked token loses only as many prefix tokens as the suffix could not absorb
    lost_before_t = sum(1 for o in edit.dropped if o < t)
    assert lost_before_t == max(0, m - (T - 1 - t))


@settings(max_examples=150, deadline=None)
@given(edit_cases())
def test_edits_keep_length_bos_and_track_the_position(case):
    tokens, t, at, insert, protect = case
    T, m = len(tokens), len(insert)
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, protect] = True
    args = (tokens[None], torch.tensor([t]), torch.tensor(insert), [at], mask)
    droppable = sum(1 for p in range(1, t) if p not in protect)
    if m - min(m, T - 1 - t) > droppable:
        with pytest.raises(ValueError):
            insert_tokens_batch(*args)
        return
    edit = insert_tokens_batch(*args).row(0)
    check_invariants(tokens, t, edit, m)
    assert all(p in edit.origin.tolist() for p in protect if p < t)
    items = list(zip(at, insert, strict=True))
    ref_tokens, ref_origin = reference_edit(tokens.tolist(), t, items, protect)
    assert edit.tokens.tolist() == ref_tokens and edit.origin.tolist() == ref_origin


@settings(max_examples=100, deadline=None)
@given(edit_cases(), st.integers(0, 3))
def test_insert_before_puts_the_tokens_right_before_the_chosen_position(case, back):
    tokens, t, _, insert, _ = case
    at = max(1, t - back)
    edit = insert_before(tokens, t, insert, at=at)
    check_invariants(tokens, t, edit, len(insert))
    assert [int(edit.tokens[p]) for p in edit.inserted] == insert
    if insert:  # contiguous, and followed by the first kept original from ``at`` on
        first, last = edit.inserted[0], edit.inserted[-1]
        assert edit.inserted == list(range(first, last + 1))
        kept = [o for o in edit.origin.tolist() if o >= at]
        assert int(edit.origin[last + 1]) == min(kept)
        assert int(edit.origin[first - 1]) < at
    default = insert_before(tokens, t, insert)
    assert default.inserted == list(range(default.t - len(insert), default.t))


@settings(max_examples=100, deadline=None)
@given(edit_cases(), st.integers(0, 3))
def test_repeat_token_places_n_copies(case, n_extra):
    tokens, t, at, _, _ = case
    n = min(len(at) + n_extra, len(tokens) - 2)
    positions = spread_positions(torch.tensor([t]), n)[0].tolist()
    assert all(1 <= p <= t for p in positions)
    edit = repeat_token(tokens, t, INS + 1, n, positions=positions)
    check_invariants(tokens, t, edit, n)
    assert int((edit.tokens == INS + 1).sum()) == n
    ref_tokens, _ = reference_edit(tokens.tolist(), t, [(p, INS + 1) for p in positions])
    assert edit.tokens.tolist() == ref_tokens


@settings(max_examples=100, deadline=None)
@given(edit_cases())
def test_insert_filler_moves_the_key_away_and_keeps_it(case):
    tokens, t, _, insert, _ = case
    T = len(tokens)
    key_pos = t - 1
    assume(t >= 2 and len(insert) - (T - 1 - t) <= t - 2)  # else the key would have to go
    edit = insert_filler(tokens, t, key_pos, insert)
    check_invariants(tokens, t, edit, len(insert))
    new_key = edit.position_of(key_pos)
    assert new_key is not None and int(edit.tokens[new_key]) == int(tokens[key_pos])
    assert edit.t - new_key == 1 + len(insert)


def test_protected_positions_are_never_dropped():
    tokens = torch.tensor([BOS, 1, 2, 3, 4, 5])
    edit = insert_before(tokens, 5, [INS, INS], at=1, protect=[1, 2])
    assert edit.tokens.tolist() == [BOS, INS, INS, 1, 2, 5]
    assert edit.t == 5 and edit.inserted == [1, 2] and edit.dropped == [3, 4]
    unprotected = insert_before(tokens, 5, [INS, INS], at=1)
    assert unprotected.tokens.tolist() == [BOS, INS, INS, 3, 4, 5]
    with pytest.raises(ValueError, match="may be dropped"):
        insert_before(tokens, 5, [INS, INS, INS], protect=[1, 2, 3, 4])
    with pytest.raises(ValueError):
        insert_before(tokens, 2, [INS], at=3)


def test_right_end_goes_first():
    tokens = torch.tensor([BOS, 1, 2, 3, 4, 5, 6])
    edit = insert_before(tokens, 3, [INS, INS])
    assert edit.tokens.tolist() == [BOS, 1, 2, INS, INS, 3, 4]
    assert edit.t == 5 and edit.inserted == [3, 4] and edit.dropped == [5, 6]


def test_batched_repeat_matches_single_rows():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, INS, (5, 12), generator=g)
    tokens[:, 0] = BOS
    t = torch.tensor([1, 4, 11, 7, 9])
    positions = spread_positions(t, 3)
    batch = repeat_token_batch(tokens, t, INS, 3, positions=positions)
    for i in range(5):
        one = repeat_token(tokens[i], int(t[i]), INS, 3, positions=positions[i].tolist())
        assert torch.equal(batch.row(i).tokens, one.tokens)
        assert batch.row(i).t == one.t and batch.row(i).inserted == one.inserted


def test_render_marks_inserted_tokens(planted):
    model = planted["art"].model
    ids = {w: model.tokenizer.convert_tokens_to_ids(w) for w in ("if", "then", "unless", "the")}
    tokens = torch.tensor([BOS, ids["if"], ids["the"], ids["then"], ids["the"]])
    edit = insert_before(tokens, 3, [ids["unless"]], at=1)
    assert render(model, edit) == "⟦unless⟧ if the then"
    assert render(model, edit, upto_t=True) == "⟦unless⟧ if the then"
    assert render(None, edit) == f"⟦{ids['unless']}⟧ {ids['if']} {ids['the']} {ids['then']}"


# --- planted model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    from rulecheck.core.extract import ExtractConfig, collect_layer
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    art = Workbench(device="cpu", cache_dir=None).layer(Specs("planted").resolve(), 0)
    collectors, ln_scale = collect_layer(art.model, art.sae_outs, art.tokens, 0, ExtractConfig())
    truth = json.loads(zoo.resolve("planted:ground_truth.json").read_text())
    tok = art.model.tokenizer
    return {
        "art": art,
        "collectors": collectors,
        "ln_scale": ln_scale,
        "truth": truth,
        "id": lambda word: tok.convert_tokens_to_ids(word),
        "word": lambda i: tok.decode([int(i)]),
    }


def feature_scores(planted, head, feature):
    art = planted["art"]
    w = head_weights(art.model, 0, head)
    d = input_directions(art.sae_in, w, planted["ln_scale"])
    u = head_encoder(art.sae_outs[head], head, art.model.cfg.d_head)
    vs = value_scores(d, w.W_V, u[:, [feature]])[:, 0]
    terms = candidate_terms(d, w.W_Q, w.W_K, w.attn_scale, vs, n_keys=10, queries_per_key=10)
    return d, w, vs, terms


def test_find_distractors_picks_the_first_negative_key_in_attention_order():
    d = torch.eye(5)
    W_Q = torch.zeros(5, 1)
    W_Q[0, 0] = 1.0
    W_K = torch.tensor([[0.0], [5.0], [7.0], [9.0], [8.0]])
    value = torch.tensor([0.0, 1.0, -1.0, 1.0, -0.5])
    terms = Terms(torch.tensor([0]), torch.tensor([1]), torch.tensor([5.0]), torch.tensor([1.0]))
    (found,) = find_distractors(d, W_Q, W_K, 1.0, value, terms)
    assert (found.query, found.key, found.distractor) == (0, 1, 4)
    assert found.attn_score == 8.0 and found.value_score == -0.5 and found.key_attn_score == 5.0
    W_K[4, 0], W_K[2, 0] = 4.0, 4.0  # no negative key above the term any more
    assert find_distractors(d, W_Q, W_K, 1.0, value, terms) == []


def test_find_distractors_skips_bos_unseen_tokens_and_noise_for_the_next_real_key():
    # input feature j reads token token_of[j]; the corpus body holds tokens 3..6 (BOS is 0)
    tokens = torch.tensor([[0, 3, 4, 5, 6], [0, 6, 5, 4, 3]])
    token_of = torch.tensor([3, 4, 0, 9, -1, 5, 6])
    assert text_keys(tokens, token_of).tolist() == [True, True, False, False, False, True, True]
    # query 0, key 1; in attention order: BOS (2), an unseen token (3), no token (4), a value of
    # zero up to rounding (5), then the first real distractor (6)
    d, W_Q = torch.eye(7), torch.zeros(7, 1)
    W_Q[0, 0] = 1.0
    W_K = torch.tensor([[0.0], [5.0], [10.0], [9.5], [9.0], [8.5], [8.0]])
    value = torch.tensor([0.0, 1.0, -0.9, -0.9, -0.9, -1.2e-8, -0.4])
    terms = Terms(torch.tensor([0]), torch.tensor([1]), torch.tensor([5.0]), torch.tensor([1.0]))
    text = text_keys(tokens, token_of)
    assert find_distractors(d, W_Q, W_K, 1.0, value, terms)[0].distractor == 2  # BOS, unfiltered
    (found,) = find_distractors(d, W_Q, W_K, 1.0, value, terms, eligible=text)
    assert (found.distractor, found.value_score) == (6, pytest.approx(-0.4))
    value[5] = -0.5 * VALUE_MARGIN  # negative, but within the margin of the largest |score|
    assert find_distractors(d, W_Q, W_K, 1.0, value, terms, eligible=text)[0].distractor == 6
    value[5] = -2 * VALUE_MARGIN
    assert find_distractors(d, W_Q, W_K, 1.0, value, terms, eligible=text)[0].distractor == 5
    value[6] = -1e-8  # nothing real is left
    value[5] = 0.0
    assert find_distractors(d, W_Q, W_K, 1.0, value, terms, eligible=text) == []


def test_planted_distractor_is_text(planted):
    art, word = planted["art"], planted["word"]
    top = top_token(art.model, art.sae_in)
    d, w, vs, terms = feature_scores(planted, 0, 1)
    eligible = text_keys(art.tokens, top)
    assert not eligible[(top == planted["id"]("<bos>")).nonzero()[0]].any()
    found = find_distractors(d, w.W_Q, w.W_K, w.attn_scale, vs, terms, 3, eligible)
    named = [(word(top[x.key]), word(top[x.query]), word(top[x.distractor])) for x in found]
    assert ("if", "then", "unless") in named


def test_planted_distractors_match_the_ground_truth(planted):
    art, word = planted["art"], planted["word"]
    top = top_token(art.model, art.sae_in)
    for entry in planted["truth"]["features"]:
        d, w, vs, terms = feature_scores(planted, entry["head"], entry["feature"])
        found = find_distractors(d, w.W_Q, w.W_K, w.attn_scale, vs, terms, top_terms=1)
        named = [
            {
                "key": word(top[x.key]),
                "query": word(top[x.query]),
                "distractor": word(top[x.distractor]),
            }
            for x in found
        ]
        assert named == entry["absence"], (entry["head"], entry["feature"])
    d, w, vs, terms = feature_scores(planted, 0, 1)
    (unless,) = find_distractors(d, w.W_Q, w.W_K, w.attn_scale, vs, terms)
    assert unless.attn_score > unless.key_attn_score > 0 and unless.value_score < 0


def test_distractor_drop_grows_with_copies_and_a_filler_does_nothing(planted):
    art, id_ = planted["art"], planted["id"]
    ex = planted["collectors"][0].examples(1)
    args = (Probe(art.model, art.sae_outs[0], 0, 0, 1), art.tokens, ex)
    term = {"key_token": id_("if"), "query_token": id_("then")}
    drop = distractor_drop(*args, id_("unless"), **term)
    assert len(drop) == 4 and drop[0] > 0.5 and drop[-1] < 0.99
    assert all(b > a + 0.01 for a, b in itertools.pairwise(drop))  # grows, copy by copy
    near = distractor_drop(*args, id_("unless"), prepend=False, **term)
    assert near[0] > 0.5
    control = distractor_drop(*args, id_("the"), **term)
    assert max(abs(c) for c in control) < 0.05
    # a key with no distractor: from ... to, with "unless" inserted, keeps its activation
    ex_to = planted["collectors"][1].examples(1)
    other = distractor_drop(
        Probe(art.model, art.sae_outs[1], 0, 1, 1),
        art.tokens,
        ex_to,
        id_("unless"),
        key_token=id_("from"),
        query_token=id_("to"),
    )
    assert max(abs(c) for c in other) < 0.05


def reference_cooccurrence(planted, tokens, key, query, distractor):
    art = planted["art"]
    sae = art.sae_outs[0]
    n_pattern, with_acts, without_acts = 0, [], []
    for row in tokens.tolist():
        j = next((j for j in range(1, len(row)) if row[j] == query and key in row[1:j]), None)
        if j is None:
            continue
        n_pattern += 1
        with torch.no_grad():
            _, cache = art.model.run_with_cache(
                torch.tensor([row]), names_filter="blocks.0.attn.hook_z"
            )
            act = float(sae.encode(cache["blocks.0.attn.hook_z"][0, :, 0])[j, 1])
        (with_acts if distractor in row[1:j] else without_acts).append(act)
    return n_pattern, with_acts, without_acts


def test_cooccurrence_matches_a_slow_loop(planted):
    art, id_ = planted["art"], planted["id"]
    tokens = art.tokens[:800]
    words = (id_("if"), id_("then"), id_("unless"))
    stats = cooccurrence(Probe(art.model, art.sae_outs[0], 0, 0, 1), tokens, *words)
    n_pattern, with_acts, without_acts = reference_cooccurrence(planted, tokens, *words)
    assert stats.n_pattern == n_pattern > 0 and stats.n_with == len(with_acts) > 0
    assert stats.share == pytest.approx(len(with_acts) / n_pattern)
    assert stats.mean_with == pytest.approx(sum(with_acts) / len(with_acts), abs=1e-5)
    assert stats.mean_without == pytest.approx(sum(without_acts) / len(without_acts), abs=1e-5)
    assert 0 < stats.share < 0.5 and stats.mean_with < 0.5 * stats.mean_without  # Fig. 6a, 6b
    full = cooccurrence(Probe(art.model, art.sae_outs[0], 0, 0, 1), art.tokens, *words)
    assert full.n_pattern > stats.n_pattern and math.isfinite(full.mean_with)


# --- counting --------------------------------------------------------------------------


def test_threshold_count_and_the_reporting_criteria():
    share = torch.tensor([0.0, 0.2, 0.6, 1.0])
    assert threshold_count(share) == 2
    assert threshold_count(torch.tensor([1.0, 0.9, 0.4])) == 2
    assert threshold_count(torch.tensor([0.0, 0.0])) is None

    def curve(active, rho):
        return CountingCurve(1, active, active, rho, threshold_count(torch.tensor(active)), 10)

    assert as_counting_rule(curve([0.0, 0.0, 1.0], 0.9)).direction == "increasing"
    assert as_counting_rule(curve([1.0, 1.0, 0.0], -0.9)).direction == "decreasing"
    assert as_counting_rule(curve([0.0, 1.0, 1.0], 0.9)) is None  # presence: one copy suffices
    assert as_counting_rule(curve([0.0, 0.0, 1.0], 0.4)) is None  # weak correlation
    assert as_counting_rule(curve([0.0, 0.0, 1.0], -0.9)) is None  # direction disagrees


def test_counts_without_contexts_are_skipped():
    nan = math.nan
    assert threshold_count(torch.tensor([nan, 0.0, 0.6])) == 2
    assert threshold_count(torch.tensor([nan, 1.0, 0.0])) == 2
    assert threshold_count(torch.tensor([nan, 1.0, 1.0])) is None
    assert threshold_count(torch.tensor([nan, nan])) is None

    def curve(active, rho):
        return CountingCurve(1, active, active, rho, threshold_count(torch.tensor(active)), 10)

    rule = as_counting_rule(curve([nan, 0.0, 1.0], 0.9))
    assert rule is not None and (rule.direction, rule.threshold_count) == ("increasing", 2)
    assert curve([nan, 0.0, 1.0], 0.9).first_count == 1
    assert as_counting_rule(curve([nan, 1.0, 1.0], 0.9)) is None
    tokens = torch.tensor([[0, 7, 5, 7], [0, 5, 7, 5]])
    assert own_counts(tokens, torch.tensor([3, 3]), 7).tolist() == [1, 0]


def reference_counts(tokens, t, key):
    """Occurrences of ``key`` in ``[1, t]`` of each row, by a loop."""
    pairs = zip(tokens.tolist(), t.tolist(), strict=True)
    return [sum(x == key for x in row[1 : s + 1]) for row, s in pairs]


@pytest.mark.parametrize("key", ["games", "again"])
def test_planted_counting_rule_is_detected(planted, key):
    art, id_ = planted["art"], planted["id"]
    features = planted["truth"]["features"]
    (truth,) = [e for e in features if [c["key"] for c in e["counting"]] == [key]]
    rule = truth["counting"][0]
    head, feature = truth["head"], truth["feature"]
    ex = planted["collectors"][head].examples(feature)
    probe = Probe(art.model, art.sae_outs[head], 0, head, feature)
    found = as_counting_rule(counting_curve(probe, art.tokens, ex, id_(rule["key"])))
    assert found is not None and found.key == id_(rule["key"])
    assert found.direction == "increasing" and found.threshold_count == rule["threshold_count"]
    assert found.spearman > 0.8 and found.n_contexts > 10
    means = found.mean_by_count
    if rule["query"] == key:  # the query counts itself: no context has count 0
        assert math.isnan(means[0]) and means[1] == 0.0
    else:
        assert means[0] == means[1] == 0.0
    assert all(b > a for a, b in itertools.pairwise(means[2:]))


def test_the_count_includes_the_query_position(planted):
    """At the threshold the prefix [1, t] holds the key twice, t included, in every context
    turned on; the edit of the curve is checked against a loop."""
    from rulecheck.core.counterfactuals import repeat_token_batch
    from rulecheck.core.counts import base_contexts, default_filler

    art, id_ = planted["art"], planted["id"]
    again = id_("again")
    ex = planted["collectors"][2].examples(0)
    filler = default_filler(art.tokens, exclude=(again,))
    rows, t = base_contexts(art.tokens, ex, again, filler, "test")
    assert reference_counts(rows, t, again) == [1] * len(t)  # the query itself
    edit = repeat_token_batch(rows, t, again, 1, positions=spread_positions(t, 1))
    assert reference_counts(edit.tokens, edit.t, again) == [2] * len(t)
    probe = Probe(art.model, art.sae_outs[2], 0, 2, 0)
    assert (probe.at(rows, t) == 0).all() and (probe.at(edit.tokens, edit.t) > 0).all()


@pytest.mark.parametrize(("head", "feature", "key"), [(1, 1, "from"), (0, 0, "open"), (0, 1, "if")])
def test_presence_rules_are_not_counting_rules(planted, head, feature, key):
    art, id_ = planted["art"], planted["id"]
    ex = planted["collectors"][head].examples(feature)
    curve = counting_curve(
        Probe(art.model, art.sae_outs[head], 0, head, feature), art.tokens, ex, id_(key)
    )
    assert as_counting_rule(curve) is None
    assert curve.threshold_count == 1 and curve.active_by_count[1] > 0.9  # one copy suffices


def test_droppable_before_counts_free_prefix_positions_by_hand():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (40, 9), generator=g)
    t = torch.randint(1, 9, (40,), generator=g)
    protect = tokens == 3
    got = droppable_before(t, 9, protect)
    for row in range(40):
        want = sum(1 for j in range(1, int(t[row])) if int(tokens[row, j]) != 3)
        assert int(got[row]) == want


def test_distractor_drop_leaves_out_positives_without_room(planted):
    """Positives that cannot take the copies (too few droppable tokens) are left out, not an
    error: more copies than a context holds gives NaN; a prefix made all of key tokens is
    skipped while the other positives still count."""
    art, id_ = planted["art"], planted["id"]
    ex = planted["collectors"][0].examples(1)
    args = (Probe(art.model, art.sae_outs[0], 0, 0, 1), art.tokens, ex)
    term = {"key_token": id_("if"), "query_token": id_("then")}
    (drop,) = distractor_drop(*args, id_("unless"), copies=(art.tokens.shape[1] + 1,), **term)
    assert math.isnan(drop)
    tokens = art.tokens.clone()
    rows = ex.seq[ex.part("test") & (ex.act > 0)]
    t = ex.t[ex.part("test") & (ex.act > 0)]
    tokens[rows[0], 1 : int(t[0])] = id_("if")  # only key tokens before t
    tokens[rows[0], int(t[0]) :] = id_("then")  # and nothing after t may go either
    kept = distractor_drop(
        Probe(art.model, art.sae_outs[0], 0, 0, 1), tokens, ex, id_("unless"), **term
    )
    assert all(x > 0.3 for x in kept)
