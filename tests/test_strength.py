"""Absence and counting claims that state their strength (``min_drop``, ``min_spearman``),
read from real YAML and checked on the planted model: a true strength passes, a neutral
token at the smallest strength allowed fails, a strength above the measured one fails with
what was measured, and the measured statistics equal slow references computed here prompt
by prompt (insert, run the model, encode with the output SAE, average)."""

from __future__ import annotations

import re

import pytest
import torch
from scipy.stats import spearmanr

from rulecheck.book import Rulebook
from rulecheck.build.planted import token_id as word
from rulecheck.core.counts import default_filler
from rulecheck.errors import RuleFailed
from rulecheck.kinds import KINDS, CheckContext
from rulecheck.kinds.base import STRENGTH_FLOOR
from rulecheck.rulebook import load_rulebook
from rulecheck.session import Head, Workbench

ABSENCE = f"""\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    skipgrams: ["[if] ... [then]", "[when] ... [do]"]
    absence:
      - "[if] ... [then] unless [unless] (drop >= 0.5)"
      - "[if] ... [then] unless [the] (drop >= {STRENGTH_FLOOR})"
      - {{key: if, query: then, distractor: unless, min_drop: 0.95}}
"""
COUNTING = """\
rulecheck: 2
model: planted
layer: 0
head: 1
features:
  - feature: 0
    source: manual
    skipgrams: ["[games] ... [score]"]
    counting:
      - count [games] >= 2 (spearman >= 0.9)
      - {key: games, min_spearman: 0.99}
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Workbench:
    return Workbench(device="cpu", cache_dir=tmp_path_factory.mktemp("exemplars"))


def book(tmp_path_factory, text: str, name: str) -> tuple[Rulebook, str]:
    path = tmp_path_factory.mktemp("books") / name
    path.write_text(text)
    return load_rulebook(path), str(path)


@pytest.fixture(scope="module")
def absence(tmp_path_factory) -> tuple[Rulebook, str]:
    return book(tmp_path_factory, ABSENCE, "L0H0.yaml")


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> tuple[Rulebook, str]:
    return book(tmp_path_factory, COUNTING, "L0H1.yaml")


def check(bench: Workbench, loaded: tuple[Rulebook, str], key: str, index: int) -> dict | str:
    """The check's record, or the message of its ``RuleFailed``."""
    rulebook, file = loaded
    head = bench.head_of(rulebook, file)
    try:
        return KINDS[key].check(CheckContext(bench, head, file), rulebook.features[0], index)
    except RuleFailed as failed:
        return str(failed)


def activation(bench: Workbench, head: Head, feature: int, tokens: list[int], t: int) -> float:
    """The feature's activation at ``t``: the model's ``hook_z`` of the head, encoded by the
    output SAE (sae_lens), one prompt at a time."""
    model, _, sae_out, _ = bench.load(head)
    hook = f"blocks.{head.layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([tokens]), names_filter=hook)
        return float(sae_out.encode(cache[hook][0, t, head.head][None])[0, feature])


def test_the_books_read_the_strengths(absence, counting):
    claims = absence[0].features[0].absence
    assert [c.min_drop for c in claims] == [0.5, STRENGTH_FLOOR, 0.95]
    assert [c.min_spearman for c in counting[0].features[0].counting] == [0.9, 0.99]


def test_the_planted_distractor_passes_with_a_strength(bench, absence):
    record = check(bench, absence, "absence", 0)
    assert isinstance(record, dict) and record["passed"], record
    assert 0.7 < record["mean_drop"] < 0.85  # planted: about 0.78 for one copy


def test_a_neutral_token_fails_at_the_smallest_strength_allowed(bench, absence):
    message = check(bench, absence, "absence", 1)
    assert isinstance(message, str)
    head = message.splitlines()[0]
    match = re.fullmatch(
        r"\[the\] suppresses feature 1 \(\[if\] \.\.\. \[then\]\) of L0H0 \(drop >= 0\.1\): "
        r"falsified: mean drop (-?[0-9.]+) < 0\.1 stated, over ([0-9]+) prompts",
        head,
    )
    assert match is not None, head
    assert abs(float(match[1])) < 0.01  # the planted head ignores it


def test_a_strength_above_the_measured_one_fails_with_the_weakest_prompt(bench, absence):
    message = check(bench, absence, "absence", 2)
    assert isinstance(message, str)
    lines = message.splitlines()
    match = re.fullmatch(
        r"\[unless\] suppresses feature 1 \(\[if\] \.\.\. \[then\]\) of L0H0 \(drop >= 0\.95\): "
        r"falsified: mean drop (0\.[0-9]+) < 0\.95 stated, over ([0-9]+) prompts",
        lines[0],
    )
    assert match is not None, lines[0]
    mean, n = float(match[1]), int(match[2])
    assert f"prompts: {n} test positives reading [if] ... [then] at t" in message
    ref = reference_drops(bench, absence)
    assert len(ref) == n and mean == pytest.approx(sum(ref) / n, abs=1e-3)
    weakest = re.search(r"the prompt with the smallest drop \((-?[0-9.]+)%\):", message)
    assert weakest is not None and float(weakest[1]) / 100 == pytest.approx(min(ref), abs=1e-3)
    at = next(k for k, line in enumerate(lines) if "the prompt with the smallest drop" in line)
    prompt = lines[at + 1].strip()
    assert prompt.startswith("⟦unless⟧ ") and prompt.count("⟦") == 1 and prompt.endswith("then")
    acts = re.search(r"activation at t: before ([0-9.]+), after ([0-9.]+)", message)
    assert acts is not None
    before, after = float(acts[1]), float(acts[2])
    assert (before - after) / before == pytest.approx(min(ref), abs=1e-3)


def reference_drops(bench: Workbench, loaded: tuple[Rulebook, str]) -> list[float]:
    """One copy of ``unless`` inserted right after BOS into each test positive that reads
    ``if ... then`` at its tracked position, prompt by prompt: the relative drops."""
    rulebook, file = loaded
    head = bench.head_of(rulebook, file)
    corpus = bench.load(head)[3]
    ex = bench.examples(head, 1, file)
    if_, then, unless = word("if"), word("then"), word("unless")
    drops = []
    for i in range(len(ex.seq)):
        if not (bool(ex.part("test")[i]) and float(ex.act[i]) > 0):
            continue
        tokens, t = corpus[int(ex.seq[i])].tolist(), int(ex.t[i])
        if tokens[t] != then or if_ not in tokens[1:t]:
            continue
        edited = [tokens[0], unless, *tokens[1:]]
        if t < len(tokens) - 1:  # a token after t makes room
            edited, t_new = edited[: len(tokens)], t + 1
        else:  # the oldest body token that is not the key makes room
            drop_at = next(j for j in range(2, t + 1) if edited[j] != if_)
            edited, t_new = edited[:drop_at] + edited[drop_at + 1 :], t
        before = activation(bench, head, 1, tokens, t)
        after = activation(bench, head, 1, edited, t_new)
        if before > 0:
            drops.append((before - after) / before)
    return drops


def test_a_counting_strength_passes_and_fails_by_the_spearman_of_a_slow_reference(bench, counting):
    record = check(bench, counting, "counting", 0)
    assert isinstance(record, dict) and record["passed"], record
    spearman, contexts = reference_spearman(bench, counting)
    assert record["spearman"] == pytest.approx(spearman, abs=1e-6)
    assert record["contexts"] == contexts
    message = check(bench, counting, "counting", 1)
    assert isinstance(message, str)
    assert message.splitlines()[0] == (
        "feature 0 of L0H1 rises with the count of [games] (spearman >= 0.99): falsified: "
        f"Spearman {spearman:.3f} < 0.99 stated, over {contexts} base contexts"
    )
    assert "the context whose activation rises least with n, 6 copies inserted:" in message
    assert message.count("⟦games⟧") == 6


def reference_spearman(bench: Workbench, loaded: tuple[Rulebook, str]) -> tuple[float, int]:
    """The base contexts (test positives, ``games`` before ``t`` replaced by the filler) with
    ``n = 0..6`` copies of ``games`` at ``1 + floor(i (t - 1) / n)``, prompt by prompt: the
    Spearman of activation against ``n``, and the number of contexts."""
    rulebook, file = loaded
    head = bench.head_of(rulebook, file)
    corpus = bench.load(head)[3]
    ex = bench.examples(head, 0, file)
    games, filler = word("games"), default_filler(corpus, exclude=(word("games"),))
    counts, acts, n_contexts = [], [], 0
    for i in range(len(ex.seq)):
        if not (bool(ex.part("test")[i]) and float(ex.act[i]) > 0):
            continue
        n_contexts += 1
        row, t = corpus[int(ex.seq[i])].tolist(), int(ex.t[i])
        row = [filler if 0 < j < t and x == games else x for j, x in enumerate(row)]
        for n in range(7):
            at = [1 + k * (t - 1) // n for k in range(n)]
            seq = []  # (token, original position; -1 for a copy)
            for j, x in enumerate(row):
                seq += [(games, -1)] * at.count(j) + [(x, j)]
            right = min(len(row) - 1 - t, n)
            seq = seq[: len(seq) - right]
            for _ in range(n - right):  # the oldest body tokens make room
                seq.remove(next(p for p in seq if 0 < p[1] < t))
            t_new = [p[1] for p in seq].index(t)
            counts.append(n)
            acts.append(activation(bench, head, 0, [x for x, _ in seq], t_new))
    return float(spearmanr(counts, acts).statistic), n_contexts


def test_extraction_keeps_the_first_candidate_of_each_slot_that_holds(bench, absence):
    """Candidates as extraction proposes them, a distractor strictly and then with a strength:
    the strict claim where it holds; else the strength where it holds; else nothing."""
    from dataclasses import replace

    from rulecheck.api import keep_rules_that_hold
    from rulecheck.book import FeatureRules
    from rulecheck.kinds.absence import AbsenceRule
    from rulecheck.refs import TokenRef

    def claim(key: str, query: str, distractor: str, min_drop: float | None) -> AbsenceRule:
        refs = (TokenRef(tokens=[w]) for w in (key, query, distractor))
        return AbsenceRule(*refs, min_drop=min_drop)

    # no positive reads [to] ... [score]: all positives, of which the [do] ones are not
    # suppressed, so the strict claim fails and a weak strength holds
    candidates = [
        claim("to", "score", "unless", None),
        claim("to", "score", "unless", STRENGTH_FLOOR),
        claim("if", "then", "the", None),
        claim("if", "then", "the", STRENGTH_FLOOR),
        claim("if", "then", "unless", None),
        claim("if", "then", "unless", 0.5),
    ]
    rulebook, file = absence
    rules = FeatureRules(feature=1, source="extracted", absence=candidates)
    kept = keep_rules_that_hold(
        replace(rulebook, features=[rules]), bench, bench.head_of(rulebook, file)
    )
    assert kept.features[0].absence == [candidates[1], candidates[4]]
