# %% [markdown]
# # rulecheck from a notebook
#
# Objects in, results out: load the shipped `rulecheck-tiny` model and its SAEs, extract three
# features of head L0H1, look at them, write the rulebook, edit a claim and check it, all
# without the command line. Each `# %%` is a cell (VS Code, Jupytext, PyCharm run them so);
# `python examples/notebook.py` runs them all. `RULECHECK_NOTEBOOK_OUT` says where the book
# goes (default `build/notebook`).

# %%
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sae_lens import SAE

import rulecheck
from rulecheck import zoo

OUT = Path(os.environ.get("RULECHECK_NOTEBOOK_OUT", "build/notebook"))
# sae_lens suggests how to load the model its SAEs were trained on; rulecheck's loader does so
warnings.filterwarnings("ignore", message="(?s).*model_from_pretrained_kwargs")

# %% [markdown]
# The model is a HookedTransformer; `rulecheck.load_model` reads the zoo's directory (weights,
# config and tokenizer, offline). The SAEs are sae_lens SAEs read from the zoo's folders as
# any sae_lens folder is. The tokens are a slice of the held-out corpus: enough sequences for
# the protocol (150 positives and 150 negatives per feature, 512 held out), a few seconds to
# stream; features 18, 30 and 47 are active in enough of them.

# %%
model = rulecheck.load_model("rulecheck-tiny")
sae_in = SAE.load_from_disk(zoo.resolve("rulecheck-tiny:sae_in/L0"))
sae_out = SAE.load_from_disk(zoo.resolve("rulecheck-tiny:sae_out/L0H1"))
tokens = torch.from_numpy(np.load(zoo.resolve("rulecheck-tiny:eval")))[:2000]

# %% [markdown]
# Extract three features of L0H1 from the objects. `names` says what the book records for
# each object, so that the book also runs under pytest later (its fingerprints say whether
# what it is run on is what it was measured on).

# %%
names = {
    "model": "rulecheck-tiny",
    "sae_in": "rulecheck-tiny:sae_in/L0",
    "sae_out": "rulecheck-tiny:sae_out/L0H1",
    "tokens": "<the first 2000 held-out sequences>",
}
result = rulecheck.extract(
    model, sae_in, sae_out, tokens, head="L0H1", features=[18, 30, 47], names=names
)
result  # noqa: B018 (a table in a terminal, the report's feature cards in a notebook)

# %%
rulecheck_records = result.to_records()  # pandas.DataFrame(rulecheck_records)
path = result.save(OUT)
print(f"wrote {path}")

# %% [markdown]
# Edit a claim: raise the first feature's F1 minimum above what it measures, and mark the
# entry as written by hand (regeneration keeps manual entries). Then check the book against
# the objects in memory: every claim is an item, as under pytest.

# %%
book = rulecheck.load_rulebook(path)
edited = book.features[0]
edited.expect["f1"] = 0.99
edited.source = "manual"
rulecheck.save_rulebook(book, path)

checked = rulecheck.check(path, model=model, sae_in=sae_in, sae_out=sae_out, tokens=tokens)
checked  # noqa: B018 (per item: passed or failed, with the message)

# %%
verdict = checked.item(edited.feature, "f1")
print(f"feature {edited.feature} f1: {verdict.outcome}")
print(verdict.message)

# %%
if __name__ == "__main__":
    from rich import print as rich_print

    rich_print(result)
    rich_print(checked)
