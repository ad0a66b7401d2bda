"""Hypothesis settings profiles of rulecheck, registered on import.

``rulecheck`` replaces Hypothesis's ``default``: derandomised, so that a rulebook passes or
fails the same way on every run (a rule that holds on one run and not the next is no gate), and
no deadline (a model forward pass is slow). ``rulecheck-ci`` is the same without an example
database, for CI machines. To search with fresh randomness, register and load a profile of your
own (``--hypothesis-profile NAME``); extraction validates rules under ``rulecheck-ci``.
"""

from __future__ import annotations

from hypothesis import settings

DEFAULT_PROFILE = "rulecheck"
CI_PROFILE = "rulecheck-ci"

settings.register_profile(DEFAULT_PROFILE, derandomize=True, deadline=None)
settings.register_profile(
    CI_PROFILE, derandomize=True, database=None, deadline=None, print_blob=False
)
