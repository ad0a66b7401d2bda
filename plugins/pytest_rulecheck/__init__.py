"""pytest plugin: rulebooks are test files, each claim about a feature is a test item.

``pytest rulebooks/`` collects every YAML file with a top-level ``rulecheck:`` key; each
feature yields ``f1``, ``precision`` and ``recall`` items (thresholds from ``expect``), and
``absence[<distractor>]`` and ``counting[<key>]`` items for its absence and counting rules::

    L0H3.yaml::feature[94]::f1
    L0H3.yaml::feature[94]::absence[twitter]

With ``--rulecheck-remap`` (a retraining gate) each book also yields ``L0H3.yaml::gate``, its
verdict from statistics of the whole book; the claims then are its evidence, a claim that no
longer holds reported xfailed.

This module holds the options, hooks, items and fixtures; what they do is in
``rulecheck.plugin`` (settings, regeneration, running a claim, the summary and reports).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, cast

import pytest

import rulecheck.profiles  # noqa: F401  registers its profiles before Hypothesis reads them
from rulecheck.atomic import interrupted, noting_interrupts
from rulecheck.errors import RulecheckError
from rulecheck.plugin.settings import check_hypothesis_profile, check_settings, worker_threads
from rulecheck.plugin.state import (
    STASH_BOOKS,
    STASH_CHECK,
    STASH_INTERRUPTS,
    STASH_SELECTED,
    head_name,
    relative,
    workbench,
)

# ------------------------------------------------------------------------------------ options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rulecheck", "rule-based tests of attention-head SAE features")

    def option(name: str, help: str) -> None:
        dest = "rulecheck_" + name.replace("-", "_")
        group.addoption(f"--rulecheck-{name}", dest=dest, default=None, help=help)
        parser.addini(dest, help, default=None)

    option("model", "model spec overriding the rulebooks' model")
    option("sae-in", "input SAE spec ({layer}) overriding the rulebooks'")
    option("sae-out", "output SAE spec ({layer}, {head}) overriding the rulebooks'")
    option("corpus", "corpus spec overriding the rulebooks'")
    option("device", "auto (CUDA when present), cpu or cuda")
    option("tolerance", "lower every expected minimum by this much: a number in [0, 1) (default 0)")
    option("examples", "Hypothesis examples per absence/counting property (default 25)")
    option("report", "write a JSON report of every checked rule to this path")
    option(
        "html",
        "write an HTML report of the run to this path: the figures, and every feature's "
        "evidence (exemplars, curves, counterexamples) with its items' outcomes",
    )
    option(
        "cache",
        "directory of cached exemplars (default: exemplars/ in $RULECHECK_CACHE, "
        "~/.cache/rulecheck)",
    )
    option(
        "accept-changed",
        "run rulebooks although these differ from the fingerprints they record: a comma list"
        " of model, sae_in, sae_out, corpus, or all",
    )
    option(
        "remap",
        "translate each rulebook's claims into the ids of the SAEs this run loads (retrained "
        "ones, from --rulecheck-sae-in/--rulecheck-sae-out): auto (match the features on the "
        "fly) or mapping files from rulecheck match (a file or a directory)",
    )
    option(
        "allow-lost",
        "features of a rulebook that may have no partner in the retrained SAE: a count (3) or "
        "a share of the book with a percent sign; their claims skip instead of failing (default 0)",
    )
    from rulecheck.config import GateConfig
    from rulecheck.core.verdict import STATISTICS

    for name, meaning in STATISTICS.items():
        default = getattr(GateConfig(), name)
        option(
            f"gate-{name.replace('_', '-')}",
            f"with --rulecheck-remap, the least {name} a head passes the gate with ({meaning}; "
            f"default {default:g})",
        )
    group.addoption(
        "--rulecheck-extract",
        dest="rulecheck_extract",
        nargs="?",
        const="extracted",
        default=None,
        metavar="all",
        help="regenerate the named rulebooks' extracted features from the checkpoint first "
        "(manual entries, comments and key order kept); items whose claims changed fail once, "
        "for review. =all also fills books holding only manual entries, when named on the "
        "command line",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args: list[str]) -> None:
    """A bare ``--rulecheck-extract`` takes no value: written out, it cannot swallow the path
    after it (``pytest --rulecheck-extract rulebooks/``)."""
    args[:] = ["--rulecheck-extract=extracted" if a == "--rulecheck-extract" else a for a in args]


# ---------------------------------------------------------------------------------- collection


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note, per book, the features whose items run (after ``-k`` and other deselection)."""
    selected: dict[str, set[int]] = {}
    for item in items:
        if isinstance(item, RuleItem):
            selected.setdefault(str(item.path), set()).add(item.rules.feature)
    config.stash[STASH_SELECTED] = selected


def pytest_collection_finish(session: pytest.Session) -> None:
    """A session about to run rulebook items imports the model libraries now, with the cyclic
    collector paused, and, the first session of a process that runs pytest, freezes every
    object alive out of the collector's reach: it keeps them until it ends, and every full pass
    of the collector would walk them again (``rulecheck.heap``). A session run inside another,
    or by ``pytest.main`` in a longer-lived program (a notebook), leaves its objects to the
    collector."""
    if session.config.option.collectonly:
        return
    if any(isinstance(item, (RuleItem, BookItem)) for item in session.items):
        from rulecheck.heap import import_model_libraries

        config = session.config
        import_model_libraries(kept=config is _first_config and runs_the_process(config))


def runs_the_process(config: pytest.Config) -> bool:
    """Whether pytest is the program its process runs (``pytest``, ``python -m pytest``, an
    xdist worker), not a ``pytest.main`` call of a longer-lived one."""
    if hasattr(config, "workerinput"):
        return True
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = spec.name if spec is not None else Path(sys.argv[0]).name
    return program.split(".")[0] in ("pytest", "py")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """A YAML file with a top-level ``rulecheck:`` key is a rulebook; a YAML file named on the
    command line is read as one too, so that an empty or broken one is reported, not skipped
    as "not found"."""
    if file_path.suffix in (".yaml", ".yml"):
        from rulecheck.rulebook import is_rulebook_file

        if is_rulebook_file(file_path) or parent.session.isinitpath(file_path):
            return RulebookFile.from_parent(parent, path=file_path)
    return None


class OneLine:
    """A rulecheck error fails a node with its one line, not a traceback."""

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, RulecheckError):
            return relative(self.config, excinfo.value)  # type: ignore[attr-defined]
        if isinstance(excinfo.value, pytest.xfail.Exception):  # a claim changed in a gate run
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)  # type: ignore[misc]


class BookItem(OneLine, pytest.Item):
    """An item about a whole entry of a rulebook, reported by its name."""

    def reportinfo(self):
        return self.path, None, self.name


class RulebookFile(OneLine, pytest.File):
    """A rulebook: one head's claims."""

    def collect(self):
        from rulecheck.plugin.regenerate import regeneration
        from rulecheck.rulebook import load_rulebook

        book = load_rulebook(self.path)
        book.protocol()  # a recorded setting out of range fails the file, with its line
        self.book = book
        self.config.stash.setdefault(STASH_BOOKS, []).append((book, str(self.path)))
        self.regenerated = regeneration(self.config, self.path)
        if self.config.stash[STASH_CHECK].remap:
            yield GateItem.from_parent(self, name="gate")
        for rules in book.features:
            yield FeatureNode.from_parent(self, name=f"feature[{rules.feature}]", rules=rules)
        for rules in book.lost:
            yield LostItem.from_parent(self, name=f"lost[{rules.feature}]", rules=rules)
        if self.regenerated["removed"]:
            yield RemovedItem.from_parent(self, name="regenerated")


def rulebook_of(node: pytest.Item) -> RulebookFile:
    """The rulebook file ``node`` was collected from."""
    return cast(RulebookFile, node.getparent(RulebookFile))


class FeatureNode(pytest.Collector):
    """One output feature and the items checking its rules: each rule kind names its own."""

    def __init__(self, *, rules, **kw: Any) -> None:
        super().__init__(**kw)
        self.rules = rules
        if getattr(rules, "xfail", None):
            # only a claim that does not hold is the expected failure: bad input or a changed
            # checkpoint fails the item
            from rulecheck.errors import RuleFailed

            self.add_marker(pytest.mark.xfail(reason=rules.xfail, strict=True, raises=RuleFailed))

    def collect(self):
        from rulecheck.kinds import kinds

        for kind in kinds():
            for name, index in kind.items(self.rules):
                yield RuleItem.from_parent(self, name=name, kind=kind, index=index)


class RuleItem(OneLine, pytest.Item):
    """One claim about a feature, checked by its rule kind (``rulecheck.plugin.checkrun``)."""

    def __init__(self, *, kind, index: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.kind = kind
        self.index = index
        self.remapped_to: int | None = None  # the feature's id in a gate run's retrained SAE

    @property
    def book(self):
        return self.parent.parent.book

    @property
    def rules(self):
        return self.parent.rules

    def runtest(self) -> None:
        from rulecheck.plugin.checkrun import run_claim
        from rulecheck.plugin.regenerate import regenerated_claims

        what = rulebook_of(self).regenerated["features"].get(self.rules.feature)
        if what is not None:
            raise regenerated_claims(what, self.path, self.rules.feature)
        run_claim(self)

    def record(self, values: dict[str, Any]) -> None:
        entry = {"head": head_name(self.book), "feature": self.rules.feature, **values}
        if self.remapped_to is not None:
            entry["remapped_to"] = self.remapped_to
        self.user_properties.append(("rulecheck", entry))

    def reportinfo(self):
        return self.path, None, self.nodeid.split("::", 1)[-1]


class LostItem(BookItem):
    """A feature under a remapped book's ``lost:``: it fails with one line (skips within
    ``--rulecheck-allow-lost``) until a person re-homes its claims or removes it."""

    def __init__(self, *, rules, **kw: Any) -> None:
        super().__init__(**kw)
        self.rules = rules

    def runtest(self) -> None:
        from rulecheck.plugin.checkrun import run_lost

        run_lost(self.config, rulebook_of(self).book, self.rules, str(self.path))


class GateItem(BookItem):
    """``L0H0.yaml::gate``: the head's verdict under the retrained SAEs, from statistics of the
    whole book (``rulecheck.core.verdict``); in a gate run only these items decide the exit
    status, the claims' items show which claims changed."""

    def runtest(self) -> None:
        from rulecheck.plugin.checkrun import run_gate

        def keep(record: dict[str, Any]) -> None:
            self.user_properties.append(("rulecheck-gate", record))

        run_gate(self.config, rulebook_of(self).book, str(self.path), keep)


class RemovedItem(BookItem):
    """Fails once after regeneration removed extracted features, so the removal is reviewed."""

    def runtest(self) -> None:
        from rulecheck.plugin.regenerate import removed_features

        raise removed_features(rulebook_of(self).regenerated["removed"], self.path)


# ---------------------------------------------------------------------------------- extraction


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """With ``--rulecheck-extract``, regenerate the rulebooks named on the command line before
    anything is collected: once, in the main process (before xdist starts its workers). What
    changed is kept so that those items fail, to be reviewed."""
    config = session.config
    mode = config.getoption("rulecheck_extract")
    if not mode or hasattr(config, "workerinput"):
        return
    from rulecheck.plugin.regenerate import regenerate

    notes = regenerate(config, mode)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in notes:
            reporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: the workers learn what regeneration changed."""
    from rulecheck.plugin.regenerate import changes_for_workers

    node.workerinput["rulecheck_changed"] = changes_for_workers(node.config)


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def rulecheck_workbench(pytestconfig: pytest.Config):
    """The session's Workbench: checkpoints, SAEs and exemplars loaded once."""
    return workbench(pytestconfig)


@pytest.fixture
def feature(rulecheck_workbench):
    """``feature(model, layer, head, id)``: a handle for checking a feature from Python."""
    from rulecheck.handle import FeatureHandle

    def make(model: str = "rulecheck-tiny", layer: int = 0, head: int = 0, id: int = 0, **specs):
        return FeatureHandle(rulecheck_workbench, model, layer, head, id, **specs)

    return make


# ------------------------------------------------------------------------------------- session


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """An unknown ``--hypothesis-profile`` is a usage error naming the option, before
    Hypothesis's plugin loads it (which raises inside pytest_configure: an INTERNALERROR)."""
    check_hypothesis_profile(config.getoption("hypothesis_profile", None))


_first_config: pytest.Config | None = None  # the process's first session


def pytest_configure(config: pytest.Config) -> None:
    """Every option checked (bad input is a usage error, before collection), interrupts
    noted, the summary registered and each xdist worker given its share of the cores."""
    from rulecheck.plugin.summary import Summary

    global _first_config
    _first_config = _first_config or config

    try:
        config.stash[STASH_CHECK] = check_settings(config)
    except RulecheckError as e:
        raise pytest.UsageError(str(e)) from None
    stack = config.stash[STASH_INTERRUPTS] = contextlib.ExitStack()
    stack.enter_context(noting_interrupts())
    config.pluginmanager.register(Summary(config), "rulecheck-summary")
    threads = worker_threads(
        getattr(config, "workerinput", {}).get("workercount"), os.cpu_count(), os.environ
    )
    if threads is not None:
        from rulecheck.heap import collector_paused

        with collector_paused():
            import torch

        torch.set_num_threads(threads)


def pytest_unconfigure(config: pytest.Config) -> None:
    if STASH_INTERRUPTS in config.stash:
        config.stash[STASH_INTERRUPTS].close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """An interrupt is never a pass: one that the code under test swallowed (a cleanup hook
    catching everything) interrupts the session after the item, as it would have."""
    try:
        return (yield)
    finally:
        if interrupted():
            raise KeyboardInterrupt  # also in place of an error the interrupt became
