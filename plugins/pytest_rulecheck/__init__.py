"""pytest plugin for rulecheck rulebooks (collection arrives with the plugin issue)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rulecheck", "rule-based tests of attention-head SAE features")
    group.addoption(
        "--rulecheck-device",
        default=None,
        help="device for models and SAEs: auto (CUDA when present), cpu or cuda",
    )
    parser.addini("rulecheck_device", "default device for rulecheck", default="auto")
