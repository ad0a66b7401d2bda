"""Rule kinds are modules: a new kind, registered, reads and writes in rulebooks and runs as
test items, with no change anywhere else (CONTRIBUTING.md, "Add a rule kind").

The toy kind below, ``prompts``, is what a person adds for hand-written examples: "at the last
token of this text the feature is on (or off)". Its source is written as a project's
``conftest.py`` in the pytester runs, exactly as a user would add a kind of their own.
"""

from __future__ import annotations

import sys
import types

import pytest

from rulecheck import kinds
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
        model = ctx.bench.load(ctx.head)[0]
        act = float(ctx.bench.probe(ctx.head, rules.feature).activations(
            model.to_tokens(claim.text))[0, -1])
        record = {"rule": self.key, "passed": (act > 0) == claim.active}
        if not record["passed"]:
            state = "on" if claim.active else "off"
            raise RuleFailed(
                f"feature {rules.feature} of {ctx.head.name} should be {state} at the end of "
                f"{claim.text!r}: activation {act:.4f}",
                record=record,
            )
        return record


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
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
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


def test_builtin_kinds_in_the_order_they_are_written():
    assert list(kinds.KINDS) == ["skipgrams", "absence", "counting"]
    assert {kind.key: kind.item for kind in kinds.kinds()} == {
        "skipgrams": "",
        "absence": "absence",
        "counting": "counting",
    }
