"""Build scripts of the zoo entries: ``planted`` (built by code on first use) and
``rulecheck-tiny`` (trained once; its files ship under ``rulecheck/zoo/tiny``)."""
