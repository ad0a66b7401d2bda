"""Absence and counting rules as Hypothesis properties on the planted model, the strategies they
draw from, and rulebooks with such rules run by pytest."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st

from rulecheck import zoo
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.build.planted import token_id as word
from rulecheck.core.counterfactuals import INSERTED, Edit
from rulecheck.core.distractors import matches_term, split_positives
from rulecheck.errors import RulecheckError, RuleFailed
from rulecheck.kinds import KINDS, CheckContext
from rulecheck.kinds.absence import AbsenceRule
from rulecheck.kinds.counting import CountingRule
from rulecheck.kinds.skipgram import SkipGram
from rulecheck.profiles import CI_PROFILE
from rulecheck.refs import Resolver, TokenRef
from rulecheck.rulebook import load_rulebook, save_rulebook
from rulecheck.session import Workbench
from rulecheck.strategies import (
    check_settings,
    distractor_insertions,
    filler_insertions,
    key_repetitions,
    prompts,
)

pytest_plugins = ["pytester"]

EXAMPLES = 10


def ref(*tokens: str) -> TokenRef:
    return TokenRef(tokens=list(tokens))


def absence(distractor: str | TokenRef, key: str = "if", query: str = "then") -> AbsenceRule:
    d = ref(distractor) if isinstance(distractor, str) else distractor
    return AbsenceRule(key=ref(key), query=ref(query), distractor=d)


def save(directory: Path, head: int, *features: FeatureRules) -> Path:
    """A planted rulebook written to ``directory`` as ``L0H{head}.yaml``."""
    book = Rulebook(layer=0, head=head, model="planted", features=list(features))
    return save_rulebook(book, directory / f"L0H{head}.yaml")


def if_then(*rules: AbsenceRule) -> FeatureRules:
    return FeatureRules(
        feature=1,
        source="manual",
        skipgrams=[SkipGram(ref("if"), ref("then")), SkipGram(ref("when"), ref("do"))],
        absence=list(rules),
    )


def counts(key: str, *rules: CountingRule) -> FeatureRules:
    """The feature read by ``key``: head 1's 0 for ``[games] ... [score]``, 1 for ``[from] ...
    [to]``; head 2's 0 for ``[again] ... [again]``."""
    feature, query = {"games": (0, "score"), "from": (1, "to"), "again": (0, "again")}[key]
    return FeatureRules(
        feature=feature,
        source="manual",
        skipgrams=[SkipGram(ref(key), ref(query))],
        counting=list(rules),
    )


UNREAD = absence("unless", key="to", query="score")  # no positive reads [to] ... [score]
GAMES = counts(
    "games",
    CountingRule(ref("games"), "increasing", 2),
    CountingRule(ref("games"), "increasing", 1),
    CountingRule(ref("games"), "decreasing"),
)
AGAIN = counts(  # the query is the key: it counts itself, an again after an again fires
    "again",
    CountingRule(ref("again"), "increasing", 2),
    CountingRule(ref("again"), "increasing", 1),
    CountingRule(ref("again"), "increasing", 3),
)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Workbench:
    return Workbench(device="cpu", cache_dir=tmp_path_factory.mktemp("exemplars"))


@pytest.fixture(scope="module")
def books(tmp_path_factory) -> dict[str, tuple[Rulebook, str]]:
    """Rulebooks saved and loaded back: the claims the tests check."""
    out = {}
    for name, head, feature in [
        ("absence", 0, if_then(*map(absence, ["unless", "the", "from"]), UNREAD)),
        ("games", 1, GAMES),
        ("from", 1, counts("from", CountingRule(ref("from"), "increasing", 2))),
        ("again", 2, AGAIN),
    ]:
        path = save(tmp_path_factory.mktemp(name), head, feature)
        out[name] = (load_rulebook(path), str(path))
    return out


def check(bench, head, rules, key: str, index: int, file: str, examples: int = EXAMPLES):
    """The message of the rule kind's ``RuleFailed``, or None when the claim holds."""
    try:
        KINDS[key].check(CheckContext(bench, head, file, examples=examples), rules, index)
    except RuleFailed as failed:
        return str(failed)
    return None


def absence_check(bench, books, index: int, examples: int = EXAMPLES) -> str | None:
    book, file = books["absence"]
    rules = book.features[0]
    head = bench.head_of(book, file)
    return check(bench, head, rules, "absence", index, file, examples)


def counting_check(bench, books, name: str, index: int) -> str | None:
    book, file = books[name]
    rules = book.features[0]
    head = bench.head_of(book, file)
    return check(bench, head, rules, "counting", index, file)


def if_then_positives(bench, books) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and positions of the test positives of L0H0's feature 1."""
    book, file = books["absence"]
    head = bench.head_of(book, file)
    return split_positives(bench.load(head)[3], bench.examples(head, 1, file))


def number(text: str, label: str) -> float:
    return float(re.search(rf"{label} (-?[0-9.]+)", text)[1])


# -------------------------------------------------------------------------------- absence


def test_true_absence_claim_holds(bench, books):
    assert absence_check(bench, books, 0) is None


@pytest.mark.parametrize(("index", "distractor"), [(1, "the"), (2, "from")])
def test_false_absence_claim_fails_with_the_minimal_counterexample(bench, books, index, distractor):
    message = absence_check(bench, books, index)
    assert message is not None
    assert f"[{distractor}] suppresses feature 1 ([if] ... [then]) of L0H0: falsified" in message
    assert "1 copy inserted" in message
    prompt = message.splitlines()[4].strip()
    assert prompt.startswith(f"⟦{distractor}⟧ ") and prompt.count("⟦") == 1  # right after BOS
    assert prompt.endswith("then") and " if " in prompt
    before, after = number(message, "before"), number(message, "after")
    assert before > 0 and after > 0.5 * before
    rows, t = if_then_positives(bench, books)  # the shortest prompt reading [if] ... [then]
    shortest = int(t[matches_term(rows, t, word("if"), word("then"))].min())
    assert f"({shortest} before the insertion)" in message


def test_the_counterexample_is_moved_to_the_shortest_failing_prompt(bench, books):
    # [unless] suppresses only the [then] positives; the shortest positives are [then] ones
    message = absence_check(bench, books, 3, examples=50)
    assert message is not None and "(none reads [to] ... [score] at t)" in message
    assert message.splitlines()[4].strip().endswith(" do")
    rows, t = if_then_positives(bench, books)
    at_do = rows[torch.arange(len(t)), t] == word("do")
    assert f"({int(t[at_do].min())} before the insertion)" in message


def test_a_distractor_given_by_input_feature_uses_its_token(bench, books):
    feature_of = json.loads(zoo.resolve("planted:ground_truth.json").read_text())["input_features"]
    rules = if_then(*(absence(TokenRef(feature=feature_of[w])) for w in ("unless", "the")))
    book, file = books["absence"]
    head = bench.head_of(book, file)
    assert check(bench, head, rules, "absence", 0, file) is None
    message = check(bench, head, rules, "absence", 1, file)
    assert message is not None and "[the] suppresses feature 1" in message and "⟦the⟧" in message


def test_references_resolve_by_one_rule(bench, books):
    """Tokens alone must each be one token; beside a feature id they describe it, and the
    first single one is inserted; a feature id alone at layer > 0 has no token to insert."""
    book, file = books["absence"]
    head = bench.head_of(book, file)
    model, sae_in, _, _ = bench.load(head)
    field = "feature[1].absence[0].distractor"
    at_layer = {n: Resolver(model.tokenizer, sae_in.cfg.d_sae, n, file) for n in (0, 1)}
    with pytest.raises(RulecheckError) as err:
        at_layer[0].token(ref("if then", "unless"), field)
    assert f"{field}.tokens[0]" in str(err.value) and "splits into" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    unless = TokenRef(feature=3, tokens=["if then", "unless"])
    assert at_layer[0].token(unless, field) == word("unless")
    assert at_layer[0].resolve(unless, field).feature == 3
    with pytest.raises(RulecheckError) as err:
        at_layer[1].token(TokenRef(feature=3), field)
    message = str(err.value)
    assert file in message and "distractor" in message and "add `tokens:" in message
    assert len(message.splitlines()) == 1


# ------------------------------------------------------------------------------- counting


def test_true_counting_claim_holds(bench, books):
    assert counting_check(bench, books, "games", 0) is None


def test_counting_threshold_too_low_fails(bench, books):
    message = counting_check(bench, books, "games", 1)
    assert message is not None
    assert "feature 0 of L0H1 rises with the count of [games], on from 1 copy" in message
    assert "majority violated at n = 1: 0% of base contexts active" in message
    assert "1 copy inserted: off (activation <= 0) at n = 1" in message
    assert "⟦games⟧" in message and "activation at t by n: 0: 0.0000, 1: 0.0000" in message


def test_counting_direction_wrong_fails_on_monotonicity(bench, books):
    message = counting_check(bench, books, "games", 2)
    assert message is not None and "no threshold claimed" in message
    assert "2 copies inserted: the activation rises from n = 1 to 2" in message
    assert message.count("⟦games⟧") == 2


def test_a_presence_rule_is_no_counting_rule(bench, books):
    message = counting_check(bench, books, "from", 0)
    assert message is not None
    assert "1 copy inserted: on (activation > 0) at n = 1" in message
    assert message.count("⟦from⟧") == 1


def test_counting_the_query_itself_holds_at_the_total_count(bench, books):
    assert counting_check(bench, books, "again", 0) is None


def test_counting_the_query_itself_fails_below_the_total_count(bench, books):
    message = counting_check(bench, books, "again", 1)
    assert message is not None
    assert "feature 0 of L0H2 rises with the count of [again], on from 1 copy" in message
    assert "(n: the count of [again] in [1, t], t included)" in message
    assert "active by n (copies spread over the prefix): 1: 0%, 2: 100%" in message
    assert "majority violated at n = 1: 0% of base contexts active" in message
    assert "off (activation <= 0) at n = 1" in message
    assert "activation at t by n: 1: 0.0000, 2: 0." in message  # no count 0: t is an again


def test_counting_the_query_itself_fails_above_the_total_count(bench, books):
    message = counting_check(bench, books, "again", 2)
    assert message is not None
    assert "majority violated at n = 2: 100% of base contexts active" in message
    assert "1 copy inserted: on (activation > 0) at n = 2" in message
    assert message.count("⟦again⟧") == 1


def test_ci_profile_gives_identical_failures(bench, books):
    previous = settings.get_current_profile_name()
    settings.load_profile(CI_PROFILE)
    try:
        assert check_settings(5).derandomize and check_settings(5).database is None
        first, second = (absence_check(bench, books, 3, examples=50) for _ in range(2))
    finally:
        settings.load_profile(previous)
    assert first is not None and first == second


# ----------------------------------------------------------------------------- strategies

BOS, KEY, DISTRACTORS, FILLER = 0, 5, (90, 91), (50, 51)


@st.composite
def bases(draw) -> tuple[torch.Tensor, int]:
    T = draw(st.integers(3, 16))
    body = draw(st.lists(st.integers(2, 9), min_size=T - 1, max_size=T - 1))
    return torch.tensor([BOS, *body]), draw(st.integers(1, T - 1))


def assert_valid(tokens: torch.Tensor, t: int, edit: Edit, allowed: set[int]) -> None:
    """BOS kept, inserted tokens where reported and before t, the rest in order, t moved."""
    assert edit.tokens.shape == tokens.shape and int(edit.tokens[0]) == BOS
    assert int(edit.origin[edit.t]) == t and int(edit.tokens[edit.t]) == int(tokens[t])
    assert all(p < edit.t for p in edit.inserted)
    assert {int(edit.tokens[p]) for p in edit.inserted} <= allowed
    kept = [j for j in range(len(tokens)) if j not in edit.inserted]
    assert (edit.origin[edit.inserted] == INSERTED).all()
    origins = edit.origin[kept].tolist()
    assert origins == sorted(origins) and (edit.tokens[kept] == tokens[origins]).all()
    dropped_before = sum(1 for j in range(1, t) if j not in origins)
    assert edit.t == t + len(edit.inserted) - dropped_before


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_distractor_insertions_are_valid_edits(data):
    tokens, t = data.draw(bases())
    edit = data.draw(distractor_insertions((tokens, t), DISTRACTORS, protect_tokens=[KEY]))
    assert 1 <= len(edit.inserted) <= 4
    assert_valid(tokens, t, edit, set(DISTRACTORS))
    kept_keys = int((edit.tokens[: edit.t] == KEY).sum())
    assert kept_keys == int((tokens[1:t] == KEY).sum())  # the key is never dropped


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_key_repetitions_are_valid_edits(data):
    tokens, t = data.draw(bases())
    n, edit = data.draw(key_repetitions((tokens, t), KEY, max_count=6))
    assert 1 <= n <= 6 and len(edit.inserted) == n
    assert_valid(tokens, t, edit, {KEY})


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_filler_insertions_follow_the_key(data):
    tokens, t = data.draw(bases().filter(lambda b: b[1] >= 2))
    tokens[data.draw(st.integers(1, t - 1))] = KEY
    edit = data.draw(filler_insertions((tokens, t), FILLER, key_id=KEY))
    assert_valid(tokens, t, edit, set(FILLER))
    key_pos = int(torch.nonzero(tokens[1:t] == KEY).flatten()[-1]) + 1
    new = edit.position_of(key_pos)
    assert new is not None and int(edit.tokens[new]) == KEY
    assert edit.inserted == list(range(new + 1, new + 1 + len(edit.inserted)))


@settings(max_examples=20, deadline=None)
@given(distractor_insertions(bases(), DISTRACTORS))
def test_strategies_compose_with_strategies_of_bases(edit):
    assert int(edit.tokens[0]) == BOS and edit.inserted


def test_shrinking_goes_to_fewer_tokens_and_earlier_positions():
    base = (torch.tensor([BOS, 3, KEY, 4, 6, 7, 8, 9]), 5)
    edit = find(distractor_insertions(base, DISTRACTORS), lambda e: True)
    assert edit.inserted == [1] and int(edit.tokens[1]) == DISTRACTORS[0]
    n, edit = find(key_repetitions(base, KEY), lambda r: r[0] >= 3)
    assert n == 3 and edit.inserted == [1, 2, 3]
    edit = find(filler_insertions(base, FILLER, key_id=KEY), lambda e: True)
    assert edit.inserted == [3] and int(edit.tokens[3]) == FILLER[0]


def test_prompts_are_positives_shortest_first(bench, books):
    book, file = books["absence"]
    head = bench.head_of(book, file)
    _, _, _, corpus = bench.load(head)
    examples = bench.examples(head, 1, file)
    strategy = prompts(examples, corpus)
    _, t = find(strategy, lambda p: True)
    rows, ts = split_positives(corpus, examples)
    assert t == int(ts.min())

    @settings(max_examples=10, deadline=None)
    @given(strategy)
    def drawn_positive(prompt):
        tokens, t = prompt
        assert bench.probe(head, 1).activations(tokens.unsqueeze(0))[0, t] > 0
        assert any(int(s) == t and torch.equal(r, tokens) for r, s in zip(rows, ts, strict=True))

    drawn_positive()


# ------------------------------------------------------------------------------ end to end


def test_rulebooks_run_absence_and_counting_items(pytester, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path_factory.mktemp("zoo")))
    save(pytester.path, 0, if_then(absence("unless"), absence("the")))
    save(pytester.path, 1, counts("games", CountingRule(ref("games"), "increasing", 2)))
    result = pytester.runpytest("-p", "no:cacheprovider", "--rulecheck-examples", "10", "-v")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert re.search(r"L0H0\.yaml::feature\[1\]::absence\[unless\] PASSED", out)
    assert re.search(r"L0H1\.yaml::feature\[0\]::counting\[games\] PASSED", out)
    assert re.search(r"L0H0\.yaml::feature\[1\]::absence\[the\] FAILED", out)
    assert "[the] suppresses feature 1 ([if] ... [then]) of L0H0: falsified" in out
    assert "⟦the⟧" in out


def test_rulebooks_run_counting_items_whose_query_is_the_key(
    pytester, monkeypatch, tmp_path_factory
):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path_factory.mktemp("zoo")))
    save(pytester.path, 2, AGAIN)
    result = pytester.runpytest("-p", "no:cacheprovider", "--rulecheck-examples", "10", "-v")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert re.search(r"L0H2\.yaml::feature\[0\]::counting\[again\] PASSED", out)
    assert re.search(r"L0H2\.yaml::feature\[0\]::counting\[again\]#2 FAILED", out)
    assert re.search(r"L0H2\.yaml::feature\[0\]::counting\[again\]#3 FAILED", out)
