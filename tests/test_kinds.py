"""Rule kinds are modules: a new kind, registered, reads and writes in rulebooks and runs as
test items, with no change anywhere else (CONTRIBUTING.md, "Add a rule kind").

The toy kind below, ``prompts``, is what a person adds for hand-written examples: "at the last
token of this text the feature is on (or off)". Its source is written as a project's
``conftest.py`` in the pytester runs, exactly as a user would add a kind of their own.
"""

from __future__ import annotations

import re
import sys
import types

import pytest

from rulecheck import kinds
from rulecheck.cli import main
from rulecheck.errors import InvalidRulebook
from rulecheck.rulebook import dump_rulebook, parse_rulebook

pytest_plugins = ["pytester"]

TOY_KIND = '''
from dataclasses import dataclass

from rulecheck import kinds, schema
from rulecheck.errors import RuleFailed


@dataclass
class Prompt(schema.Record):
    """At the last token of ``text`` the feature is active (``active: false``: inactive)."""

    text: str = schema.entry(schema.text, required=True)
    active: bool = schema.entry(lambda where, value, path: bool(value), default=True)


class Prompts(kinds.RuleKind):
    key = "prompts"
    claim = Prompt
    item = "prompt"

    def name(self, claim):
        return claim.text

    def check(self, ctx, rules, index):
        claim = rules.prompts[index]
        act = self.evidence(ctx, rules, index)
        record = {"rule": self.key, "passed": (act > 0) == claim.active}
        if not record["passed"]:
            state = "on" if claim.active else "off"
            raise RuleFailed(
                f"feature {rules.feature} of {ctx.head.name} should be {state} at the end of "
                f"{claim.text!r}: activation {act:.4f}",
                record=record,
            )
        return record

    def evidence(self, ctx, rules, index):
        """The activation at the last token, for the report's card."""
        model = ctx.bench.load(ctx.head)[0]
        tokens = model.to_tokens(rules.prompts[index].text)
        return float(ctx.bench.probe(ctx.head, rules.feature).activations(tokens)[0, -1])

    def marks(self, claim, outcome, evidence):
        measured = [] if evidence is None else [kinds.Mark.score(f"activation {evidence:.4f}")]
        return measured + super().marks(claim, outcome, evidence)


def pytest_configure(config):
    kinds.register(Prompts())


def pytest_unconfigure(config):
    kinds.unregister("prompts")
'''

BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    label: "[if] ... [then]"
    skipgrams:
      - {key: {tokens: [if]}, query: {tokens: [then]}}
    prompts:
      - {text: "the if a then"}
      - {text: "the a then", active: false}
      - {text: "the when a then"}
"""


@pytest.fixture
def toy(monkeypatch):
    """The toy kind registered in this process, and removed afterwards."""
    module = types.ModuleType("toy_kind")
    monkeypatch.setitem(sys.modules, "toy_kind", module)
    exec(compile(TOY_KIND, "toy_kind.py", "exec"), module.__dict__)
    module.pytest_configure(None)
    yield module
    module.pytest_unconfigure(None)


def test_a_registered_kind_reads_and_writes_its_key(toy):
    book = parse_rulebook(BOOK)
    prompts = book.features[0].prompts
    assert [p.text for p in prompts] == ["the if a then", "the a then", "the when a then"]
    assert [p.active for p in prompts] == [True, False, True]
    text = dump_rulebook(book)
    assert "    prompts:\n      - {text: the if a then, active: true}\n" in text
    assert text.index("skipgrams:") < text.index("prompts:")  # kinds in registration order
    assert parse_rulebook(text).to_dict() == book.to_dict()


def test_an_unregistered_key_is_an_error_naming_it(toy):
    kinds.unregister("prompts")
    with pytest.raises(InvalidRulebook) as err:
        parse_rulebook(BOOK, "L0H0.yaml")
    assert (err.value.line, err.value.field) == (11, "features[0].prompts")
    assert "unknown key" in err.value.what
    kinds.register(toy.Prompts())


def test_a_kind_claim_missing_a_required_field(toy):
    with pytest.raises(InvalidRulebook) as err:
        parse_rulebook(BOOK.replace('{text: "the a then", active: false}', "{active: false}"))
    assert err.value.field == "features[0].prompts[1].text"
    assert "missing required field `text`" in err.value.what


def test_a_kind_defined_in_a_conftest_runs_as_test_items(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("RULECHECK_CACHE", str(tmp_path / "zoo"))
    pytester.makeconftest(TOY_KIND)
    pytester.makefile(".yaml", L0H0=BOOK)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--rulecheck-html", "r.html")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*L0H0.yaml::feature[[]1[]]::prompt[[]the if a then[]] PASSED*",
            "*L0H0.yaml::feature[[]1[]]::prompt[[]the a then[]] PASSED*",
            "*L0H0.yaml::feature[[]1[]]::prompt[[]the when a then[]] FAILED*",
            "*feature 1 of L0H0 should be on at the end of 'the when a then': activation 0.0000*",
        ]
    )
    assert "prompts" not in kinds.KINDS  # the conftest's kind is gone with its session
    # its card: each claim as the kind reads it, with what it measured and its item's outcome
    html = (pytester.path / "r.html").read_text(encoding="utf-8")
    card = html[html.index('id="L0H0-f1"') :]
    card = card[: card.index("</details>")]
    part = card[card.index("<h4>Prompts</h4>") :]
    claims = re.findall(r"<li[^>]*><code>(.*?)</code>\n(.*?)</li>", part)
    assert [text for text, _ in claims] == [
        "text: the if a then, active: true",
        "text: the a then, active: false",
        "text: the when a then, active: true",
    ]
    marks = [re.findall(r'<span class="([^"]*)">([^<]*)</span>', m) for _, m in claims]
    acts = [float(m[0][1].removeprefix("activation ")) for m in marks]
    assert acts[0] > 0 and acts[1] == acts[2] == 0.0  # as the checks measured them
    assert [m[1] for m in marks] == [
        ("badge passed", "passed"),
        ("badge passed", "passed"),
        ("badge failed", "failed"),
    ]
    assert "should be on at the end of &#39;the when a then&#39;: activation 0.0000" in card


def test_a_registered_kind_has_a_column_in_rulecheck_show(toy, tmp_path, capsys):
    (tmp_path / "L0H0.yaml").write_text(BOOK)
    for fmt in ("plain", "markdown", "table"):
        assert main(["show", str(tmp_path / "L0H0.yaml"), "--format", fmt]) == 0
        out = capsys.readouterr().out
        if fmt == "plain":
            header, row = out.splitlines()
            assert dict(zip(header.split("\t"), row.split("\t"), strict=True)) == {
                "feature": "1",
                "src": "manual",
                "label": "[if] ... [then]",
                "terms": "1",
                "next terms": "",
                "abs": "0",
                "cnt": "0",
                "prompts": "3",
                "F1": "",
                "prec": "",
                "recall": "",
                "≥F1": "",
            }
        else:
            assert re.search(r"cnt\s*[|┃]\s*prompts\s*[|┃]\s*F1", out), out


def test_builtin_kinds_in_the_order_they_are_written():
    assert list(kinds.KINDS) == ["skipgrams", "absence", "counting"]
    assert {kind.key: kind.item for kind in kinds.kinds()} == {
        "skipgrams": "",
        "absence": "absence",
        "counting": "counting",
    }
