"""The names of the zoo's entries, importable without what builds them."""

ENTRIES = ("planted", "planted-local", "planted-rotary", "rulecheck-tiny", "rulecheck-tiny-llama")
