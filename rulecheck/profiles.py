"""Hypothesis settings profiles of rulecheck, registered on import.

``rulecheck`` replaces Hypothesis's ``default`` (no deadline: a model forward pass is slow);
``rulecheck-ci`` is derandomised with no example database, so a CI gate is reproducible::

    pytest rulebooks/ --hypothesis-profile rulecheck-ci
"""

from __future__ import annotations

from hypothesis import settings

DEFAULT_PROFILE = "rulecheck"
CI_PROFILE = "rulecheck-ci"

settings.register_profile(DEFAULT_PROFILE, deadline=None)
settings.register_profile(
    CI_PROFILE, derandomize=True, database=None, deadline=None, print_blob=False
)
