"""The shipped rulecheck-tiny rulebooks are what ``rulecheck extract`` writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rulecheck.cli import main

SHIPPED_BOOKS = Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny"


@pytest.fixture
def one_thread():
    """One torch thread (float sums in the order the shipped rulebooks were made with)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_extraction_reproduces_the_shipped_rulebook(tmp_path, one_thread):
    assert main(["extract", "--model", "rulecheck-tiny", "--layer", "0", "--heads", "1",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "L0H1.yaml").read_bytes() == (SHIPPED_BOOKS / "L0H1.yaml").read_bytes()
