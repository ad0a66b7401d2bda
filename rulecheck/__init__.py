"""rulecheck: rule-based descriptions of attention-head SAE features, run as tests.

The Python API (``rulecheck.objects``, ``rulecheck.results``), imported on first use so that
``import rulecheck`` stays cheap::

    import rulecheck
    result = rulecheck.extract(model, sae_in, sae_out, tokens, head="L0H1", features=[3, 17])
    result.save("books/")
    rulecheck.check("books/L0H1.yaml", model=model, sae_in=sae_in, sae_out=sae_out, tokens=tokens)
"""

from __future__ import annotations

import importlib

from rulecheck.errors import RulecheckError

TYPE_CHECKING = False  # typing is not imported for this: ``import rulecheck`` stays cheap

if TYPE_CHECKING:
    from rulecheck.api import save_rulebook
    from rulecheck.book import Rulebook
    from rulecheck.loading import load_corpus, load_model, load_sae
    from rulecheck.objects import check, check_claim, extract, load_rulebook
    from rulecheck.results import CheckResult, ExtractResult, ItemResult

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first read
LAZY = {
    "extract": "rulecheck.objects",
    "check": "rulecheck.objects",
    "check_claim": "rulecheck.objects",
    "load_rulebook": "rulecheck.objects",
    "save_rulebook": "rulecheck.api",
    "load_model": "rulecheck.loading",
    "load_sae": "rulecheck.loading",
    "load_corpus": "rulecheck.loading",
    "Rulebook": "rulecheck.book",
    "ExtractResult": "rulecheck.results",
    "CheckResult": "rulecheck.results",
    "ItemResult": "rulecheck.results",
}

__all__ = [
    "CheckResult",
    "ExtractResult",
    "ItemResult",
    "Rulebook",
    "RulecheckError",
    "__version__",
    "check",
    "check_claim",
    "extract",
    "load_corpus",
    "load_model",
    "load_rulebook",
    "load_sae",
    "save_rulebook",
]


def __getattr__(name: str) -> object:
    if name not in LAZY:
        raise AttributeError(f"module 'rulecheck' has no attribute {name!r}")
    from rulecheck.heap import collector_paused

    with collector_paused():  # the model libraries' import, without a fifth of its time
        value = getattr(importlib.import_module(LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
