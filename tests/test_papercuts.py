"""What a person reads stays exact: loading without the libraries' notices that say nothing to
rulecheck's users."""

from __future__ import annotations

import warnings

from rulecheck.loading._common import MODEL_DEPRECATED, SAE_MODEL_KWARGS, without_warning

pytest_plugins = ["pytester"]

# ------------------------------------------------------------------------- no notices for our users


NOTICES = ("model_from_pretrained_kwargs", "HookedTransformer is deprecated")


def test_loading_the_shipped_model_and_saes_shows_no_library_notice():
    from rulecheck.build import planted, planted_local, planted_rotary
    from rulecheck.loading import load_model, load_sae
    from rulecheck.specs import locate

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the project's filterwarnings hide both: show all
        load_model(locate("rulecheck-tiny"))
        load_sae(locate("rulecheck-tiny:sae_in/L0"))
        load_sae(locate("rulecheck-tiny:sae_in/L1"))
        load_sae(locate("rulecheck-tiny:sae_out/L0H1"))
        for module in (planted, planted_local, planted_rotary):
            module.build_model()
    shown = [str(w.message) for w in seen]
    assert not [m for m in shown if any(n in m for n in NOTICES)], shown


def test_only_the_named_notice_is_silenced():
    deprecated = ("HookedTransformer is deprecated and will be removed", DeprecationWarning)
    kwargs = ("\nThis SAE has non-empty model_from_pretrained_kwargs. ", UserWarning)
    other_category = ("HookedTransformer is deprecated", UserWarning)
    other_message = ("something else is deprecated", DeprecationWarning)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with without_warning(MODEL_DEPRECATED), without_warning(SAE_MODEL_KWARGS):
            for message, category in (deprecated, kwargs, other_category, other_message):
                warnings.warn(message, category, stacklevel=1)
        warnings.warn(*deprecated, stacklevel=1)  # outside, as before
    shown = [(str(w.message), w.category) for w in seen]
    assert shown == [other_category, other_message, deprecated]
