"""``python -m rulecheck.schemas``: write the rulebook JSON Schema again from the schema
dataclasses (``--check``: only say whether the shipped file is up to date)."""

import sys

from rulecheck.schemas import main

sys.exit(main())
