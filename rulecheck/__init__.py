"""rulecheck: rule-based descriptions of attention-head SAE features, run as tests."""

from rulecheck.errors import RulecheckError

__version__ = "0.1.0"

__all__ = ["RulecheckError", "__version__"]
