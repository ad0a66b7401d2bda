"""What the pytest plugin (``pytest_rulecheck``) does; the plugin itself holds its options,
hooks, items and fixtures, and calls these.

- ``settings``: the ``--rulecheck-*`` options and ini keys read and checked before any work
  (``check_settings`` builds the ``CheckConfig``), the exemplar cache's directory;
- ``state``: what a session keeps in pytest's stash, its Workbench, how its errors and heads
  are named;
- ``regenerate``: ``--rulecheck-extract``, the books rewritten before collection and what
  changed in each;
- ``checkrun``: running one claim, a lost feature or a book's gate, the retraining gate's
  branch (``--rulecheck-remap``) included;
- ``summary``: the table per head at the end of a run, the JSON and HTML reports.
"""
