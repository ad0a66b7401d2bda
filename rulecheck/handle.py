"""Checking a feature from a Python test: the pytest plugin's ``feature`` fixture.

    def test_if_then(feature):
        f = feature("rulecheck-tiny", layer=0, head=1, id=37)
        assert f.activation("If it is, then")[-1] > 0
        f.aligned("If it is, then")  # (token, activation) at every position
        f.assert_rule([(" If", " then")], f1=0.6)

The assertions are the ones the YAML form runs, on the same exemplars, and fail the same way
(``RuleFailed``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from rulecheck.book import FeatureRules
from rulecheck.core.evaluate import Measured
from rulecheck.kinds.skipgram import (
    SkipGram,
    assert_minimums,
    claim_text,
    measure,
    missed_lines,
)
from rulecheck.refs import TokenRef
from rulecheck.session import Head, Workbench
from rulecheck.specs import Specs

Ref = str | int  # a token (text) or an input-SAE feature id


def _ref(ref: Ref) -> TokenRef:
    return TokenRef(feature=ref) if isinstance(ref, int) else TokenRef(tokens=[ref])


class FeatureHandle:
    """One output feature of one head of a checkpoint."""

    def __init__(
        self,
        bench: Workbench,
        model: str,
        layer: int,
        head: int,
        feature: int,
        sae_in: str | None = None,
        sae_out: str | None = None,
        corpus: str | None = None,
    ) -> None:
        self.bench = bench
        self.feature = feature
        self.head = Head(Specs(model, sae_in, sae_out, corpus).resolve(), layer, head)

    def activation(self, prompt: str | Tensor) -> Tensor:
        """``[pos]`` activation of the feature at every position of ``prompt`` (text gets BOS
        prepended; token ids are used as given)."""
        tokens = self.tokens(prompt).reshape(1, -1)
        return self.bench.probe(self.head, self.feature).activations(tokens)[0]

    def tokens(self, prompt: str | Tensor) -> Tensor:
        """``[pos]`` token ids of ``prompt`` as ``activation`` reads it (text gets BOS)."""
        model = self.bench.load(self.head)[0]
        tokens = model.to_tokens(prompt) if isinstance(prompt, str) else prompt.reshape(1, -1)
        return tokens[0]

    def to_str_tokens(self, prompt: str | Tensor) -> list[str]:
        """The tokens of ``prompt`` as text, one per position of ``activation(prompt)``
        (as TransformerLens's ``to_str_tokens``, BOS first)."""
        model = self.bench.load(self.head)[0]
        return list(model.to_str_tokens(self.tokens(prompt)))

    def aligned(self, prompt: str | Tensor) -> list[tuple[str, float]]:
        """``(token, activation)`` at every position of ``prompt``."""
        acts = self.activation(prompt).tolist()
        return list(zip(self.to_str_tokens(prompt), acts, strict=True))

    def rules(self, skipgrams: Sequence[tuple[Ref, Ref]]) -> FeatureRules:
        """``[(key, query), ...]`` as a hand-written feature entry."""
        terms = [SkipGram(key=_ref(k), query=_ref(q)) for k, q in skipgrams]
        return FeatureRules(self.feature, "manual", skipgrams=terms)

    def measure(self, skipgrams: Sequence[tuple[Ref, Ref]]) -> Measured:
        """Precision, recall, F1 and Spearman of ``[(key, query), ...]`` on the test split."""
        return measure(self.bench, self.head, self.rules(skipgrams), f"<feature {self.feature}>")

    def assert_rule(
        self,
        skipgrams: Sequence[tuple[Ref, Ref]],
        f1: float | None = None,
        precision: float | None = None,
        recall: float | None = None,
    ) -> Measured:
        """Assert the disjunction of ``skipgrams`` reaches the given minimums (``RuleFailed``
        otherwise)."""
        rules, file = self.rules(skipgrams), f"<feature {self.feature}>"
        measured = measure(self.bench, self.head, rules, file)
        wanted = {"f1": f1, "precision": precision, "recall": recall}
        minimums = {k: v for k, v in wanted.items() if v is not None}

        def missed() -> list[str]:
            return missed_lines(self.bench, self.head, rules, file)

        assert_minimums(measured, minimums, claim_text(rules, self.head.name), {}, missed)
        return measured

    def __repr__(self) -> str:
        return f"<feature {self.feature} of {self.head.name}>"
