"""What a person reads stays exact: loading without the libraries' notices that say nothing to
rulecheck's users, item names on one line, tokens shown with their spaces, ``rulecheck show``
with every number at 80 columns and in each format and a failed recall naming the positives it
missed with the terms that would have matched them."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from rulecheck import zoo
from rulecheck.book import FeatureRules, Rulebook
from rulecheck.cli import main
from rulecheck.errors import RuleFailed
from rulecheck.kinds import KINDS, CheckContext
from rulecheck.kinds.skipgram import SkipGram
from rulecheck.loading._common import MODEL_DEPRECATED, SAE_MODEL_KWARGS, without_warning
from rulecheck.refs import TokenRef, escaped, shown_token
from rulecheck.report import rulebook_table
from rulecheck.rulebook import load_rulebook
from rulecheck.session import Workbench

pytest_plugins = ["pytester"]

# ------------------------------------------------------------------------- no notices for our users


NOTICES = ("model_from_pretrained_kwargs", "HookedTransformer is deprecated")


def test_loading_the_shipped_model_and_saes_shows_no_library_notice():
    from rulecheck.build import planted, planted_local, planted_rotary
    from rulecheck.loading import load_model, load_sae
    from rulecheck.specs import locate

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the project's filterwarnings hide both: show all
        load_model(locate("rulecheck-tiny"))
        load_sae(locate("rulecheck-tiny:sae_in/L0"))
        load_sae(locate("rulecheck-tiny:sae_in/L1"))
        load_sae(locate("rulecheck-tiny:sae_out/L0H1"))
        for module in (planted, planted_local, planted_rotary):
            module.build_model()
    shown = [str(w.message) for w in seen]
    assert not [m for m in shown if any(n in m for n in NOTICES)], shown


def test_only_the_named_notice_is_silenced():
    deprecated = ("HookedTransformer is deprecated and will be removed", DeprecationWarning)
    kwargs = ("\nThis SAE has non-empty model_from_pretrained_kwargs. ", UserWarning)
    other_category = ("HookedTransformer is deprecated", UserWarning)
    other_message = ("something else is deprecated", DeprecationWarning)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with without_warning(MODEL_DEPRECATED), without_warning(SAE_MODEL_KWARGS):
            for message, category in (deprecated, kwargs, other_category, other_message):
                warnings.warn(message, category, stacklevel=1)
        warnings.warn(*deprecated, stacklevel=1)  # outside, as before
    shown = [(str(w.message), w.category) for w in seen]
    assert shown == [other_category, other_message, deprecated]


# ----------------------------------------------------------------------------- node ids on one line


def run(pytester, *args):
    return pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly", *args)


@pytest.fixture
def planted_books(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    return pytester


def test_item_names_escape_line_breaks_and_stay_distinct(planted_books):
    unless = json.loads(zoo.resolve("planted:ground_truth.json").read_text())["input_features"][
        "unless"
    ]

    def absence(tokens: list[str]) -> str:
        ref = json.dumps({"feature": unless, "tokens": tokens})
        return f"      - {{key: if, query: then, distractor: {ref}}}\n"

    # a feature id's tokens only describe it: the check inserts the planted "unless" token,
    # while the first listed token names the item
    planted_books.makefile(
        ".yaml",
        L0H0="rulecheck: 2\nmodel: planted\nlayer: 0\nhead: 0\nfeatures:\n"
        "  - feature: 1\n    source: manual\n"
        '    skipgrams: ["[if] ... [then]", "[when] ... [do]"]\n'
        "    absence:\n"
        + absence(["\n", "unless"])
        + absence(["\\n", "unless"])
        + absence(["\t\u2028", "unless"]),
    )
    collected = run(planted_books, "--collect-only", "-q")
    ids = [line for line in collected.stdout.lines if "::" in line]
    assert ids == [
        "L0H0.yaml::feature[1]::absence[\\n]",
        "L0H0.yaml::feature[1]::absence[\\\\n]",
        "L0H0.yaml::feature[1]::absence[\\t\\u2028]",
    ]
    result = run(planted_books, "-v", "-k", "absence[\\n]", "--rulecheck-examples", "5")
    result.assert_outcomes(passed=1, deselected=2)
    assert any(
        line.startswith("L0H0.yaml::feature[1]::absence[\\n] PASSED")
        for line in result.stdout.lines
    ), result.stdout.str()


def test_escaped_is_one_to_one_on_one_line():
    texts = ["\n", "\\n", "\\\n", "\t", " a ", "\u2028", "\x1b[0m", "é", ""]
    shown = [escaped(t) for t in texts]
    assert len(set(shown)) == len(texts)
    assert all(s.isprintable() for s in shown)
    assert escaped(" a b ") == " a b " and escaped("é") == "é"


# ------------------------------------------------------------------------- tokens with their spaces


def _render(renderable, width: int = 200) -> str:
    from rich.console import Console

    console = Console(record=True, width=width)
    console.print(renderable)
    return console.export_text()


@pytest.fixture(scope="module")
def tiny_bench() -> Workbench:
    return Workbench(device="cpu")  # the run's exemplar cache: L0H1 is streamed once a run


@pytest.mark.parametrize(
    ("token", "shown"),
    [
        ("then", "[then]"),
        (" the", '[" the"]'),
        ("the ", '["the "]'),
        ("   ", '["   "]'),
        ("\n", '["\\n"]'),
        ("\n   ", '["\\n   "]'),
        ("a\tb", '["a\\tb"]'),
        ("\x7f", '["\\u007f"]'),
        ("[x]", '["[x]"]'),
        ('"', '["\\""]'),
        ("\\", '["\\\\"]'),
        ("#12", '["#12"]'),
        ("if then", "[if then]"),
    ],
)
def test_a_token_is_shown_with_every_character_visible(token, shown):
    assert shown_token(token) == shown
    # what is shown reads back as the token, in the shorthand's JSON form
    inner = shown[1:-1]
    assert (json.loads(inner) if inner.startswith('"') else inner) == token


def test_rulecheck_show_keeps_a_tokens_spaces():
    terms = [SkipGram(TokenRef(tokens=["If"]), TokenRef(tokens=[" then"]))]
    terms.append(SkipGram(TokenRef(tokens=["\n"]), TokenRef(tokens=["x "])))
    features = [
        FeatureRules(3, "extracted", "[If] ... [ then]", skipgrams=terms),  # extraction's label
        FeatureRules(4, "manual", "two\nlines", skipgrams=terms[1:]),
    ]
    text = _render(rulebook_table(Rulebook(layer=0, head=0, features=features)))
    assert '[If] ... [" then"]' in text and '["\\n"] ... ["x "]' in text
    assert "[ then]" not in text
    assert "two\\nlines" in text


TINY_SPACES = """\
rulecheck: 2
model: rulecheck-tiny
layer: 0
head: 1
features:
  - feature: 7
    source: manual
    label: "[ v] ... [is]"
    skipgrams: ["[ v] ... [is]"]
    absence:
      - {key: " v", query: is, distractor: " the", min_drop: 0.95}
    counting:
      - {key: " the", direction: increasing, min_spearman: 0.95}
"""


def test_a_failed_claim_keeps_its_tokens_spaces(tiny_bench, tmp_path):
    path = tmp_path / "L0H1.yaml"
    path.write_text(TINY_SPACES)
    book = load_rulebook(path)
    head = tiny_bench.head_of(book, str(path))
    messages = {}
    for key in ("absence", "counting"):
        with pytest.raises(RuleFailed) as failed:
            KINDS[key].check(CheckContext(tiny_bench, head, str(path)), book.features[0], 0)
        messages[key] = str(failed.value)
    first = messages["absence"].splitlines()[0]
    assert first.startswith(
        '[" the"] suppresses feature 7 ([" v"] ... [is]) of L0H1 (drop >= 0.95)'
    )
    assert 'one copy of [" the"] inserted' in messages["absence"]
    assert 'test positives reading [" v"] ... [is] at t' in messages["absence"]
    assert messages["counting"].startswith(
        'feature 7 of L0H1 rises with the count of [" the"] (spearman >= 0.95)'
    )
    assert "[the]" not in messages["absence"] + messages["counting"]


# ------------------------------------------------------------------------------- show at 80 columns


SHIPPED = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny" / "L0H1.yaml"


def _expected_rows() -> dict[str, str]:
    """Each feature id of the shipped book and its F1 as ``show`` writes it."""
    book = load_rulebook(SHIPPED, measurements=True)
    return {str(f.feature): f"{f.measured['f1']:.2f}" for f in book.features}


@pytest.mark.parametrize("fmt", ["table", "plain", "markdown", None])
def test_show_keeps_every_feature_and_its_f1_at_80_columns(fmt, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["show", str(SHIPPED)] + ([] if fmt is None else ["--format", fmt])) == 0
    out = capsys.readouterr().out
    expected = _expected_rows()
    assert len(expected) > 40 and all(expected.values())
    if fmt == "table":
        assert max(len(line) for line in out.splitlines()) <= 80
        rows = [
            [cell.strip() for cell in line.strip("│").split("│")]
            for line in out.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()
        ]
        header = next(line for line in out.splitlines() if line.startswith("┃"))
        names = [c.strip() for c in header.strip("┃").split("┃")]
        assert {"feature", "label", "F1", "prec", "recall"} <= set(names), header
        got = {row[0]: row[names.index("F1")] for row in rows}
    elif fmt == "markdown":
        lines = [line for line in out.splitlines() if line.startswith("| ")]
        names = [c.strip() for c in lines[0].strip("| ").split(" | ")]
        rows = [re.split(r"(?<!\\)\|", line.strip("|")) for line in lines[1:]]
        got = {row[0].strip(): row[names.index("F1")].strip() for row in rows}
    else:  # plain, also the default when the output is not a terminal
        lines = out.splitlines()
        names = lines[0].split("\t")
        rows = [line.split("\t") for line in lines[1:]]
        assert all(len(row) == len(names) for row in rows)
        got = {row[0]: row[names.index("F1")] for row in rows}
    assert got == expected


# ----------------------------------------------------------------- a failed recall names its misses


IF_THEN_ONLY = """\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    skipgrams:
      - "[if] ... [then]"
    expect: {recall: 0.95}
"""


def test_a_failed_recall_names_missed_positives_and_the_deleted_term(planted_books):
    # the planted feature fires on [if] ... [then] and [when] ... [do]; the second is deleted
    planted_books.makefile(".yaml", L0H0=IF_THEN_ONLY)
    result = run(planted_books, "-v")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "feature 1 of L0H0 ([if] ... [then]): recall is 0." in out
    assert "  missed: " in out, out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  missed: "))
    assert re.search(r"missed: \d+ of \d+ test positives predicted off; the 3 strongest", lines[at])
    shown = lines[at + 1 : at + 7]
    prompts, matches = shown[0::2], shown[1::2]
    for prompt, match in zip(prompts, matches, strict=True):
        assert re.search(r"t = \d+, activation 0\.\d{4}: .* when .* do$", prompt), prompt
        assert "none of the book's terms; the head's candidates here: [when] ... [do]" in match


def test_a_missed_positive_names_the_books_bounded_term_that_would_match(tmp_path):
    """A term bounded too tightly misses positives it would match without its bounds."""
    path = tmp_path / "L0H0.yaml"
    path.write_text(
        IF_THEN_ONLY.replace('"[if] ... [then]"', "{key: if, query: then, max_distance: 1}")
    )
    bench = Workbench(device="cpu", cache_dir=tmp_path / "exemplars")
    book = load_rulebook(path)
    head = bench.head_of(book, str(path))
    with pytest.raises(RuleFailed) as failed:
        KINDS["skipgrams"].check(CheckContext(bench, head, str(path)), book.features[0], 2)
    message = str(failed.value)
    assert (
        "would match: the book's [if] ... [then] (distance <= 1) without its distance bounds"
        in message
    )


def test_the_candidates_of_a_missed_prefix_are_its_strongest_live_pairs():
    """``candidate_matches`` against every pair of the prefix scored one at a time."""
    import torch

    from rulecheck.core.misses import candidate_matches, strongest_missed

    g = torch.Generator().manual_seed(0)
    d_sae, d_model, d_head, t = 12, 8, 4, 6
    feats = torch.randn(t + 1, d_sae, generator=g).clamp(min=0)
    d = torch.randn(d_sae, d_model, generator=g)
    W_Q, W_K = torch.randn(d_model, d_head, generator=g), torch.randn(d_model, d_head, generator=g)
    value = torch.randn(d_sae, generator=g)
    slow = []
    for q in range(d_sae):
        for k in range(d_sae):
            fq, fk = float(feats[t, q]), float(feats[:, k].max())
            attn = float((d[q] @ W_Q) @ (d[k] @ W_K)) / 2.0
            score = fq * fk * attn * fk * float(value[k])
            if fq > 0 and fk > 0 and attn > 0 and value[k] > 0:
                slow.append((-score, q * d_sae + k, k, q, int(feats[:, k].argmax())))
    slow.sort()
    got = candidate_matches(feats, d, W_Q, W_K, 2.0, value, 5)
    assert [(c.key, c.query, c.key_pos) for c in got] == [s[2:] for s in slow[:5]]
    assert all(
        abs(c.score + s[0]) < 1e-4 * max(1, abs(s[0])) for c, s in zip(got, slow, strict=False)
    )
    act = torch.tensor([0.5, 0.0, 0.9, 0.9, 0.2, 0.7])
    pred = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    assert strongest_missed(act, pred, 3).tolist() == [3, 5, 0]
