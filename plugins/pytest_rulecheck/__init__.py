"""pytest plugin: rulebooks are test files, each claim about a feature is a test item.

``pytest rulebooks/`` collects every YAML file with a top-level ``rulecheck:`` key; each
feature yields ``f1``, ``precision`` and ``recall`` items (thresholds from ``expect``), and
``absence[<distractor>]`` and ``counting[<key>]`` items for its absence and counting rules::

    L0H3.yaml::feature[94]::f1
    L0H3.yaml::feature[94]::absence[twitter]

With ``--rulecheck-remap`` (a retraining gate) each book also yields ``L0H3.yaml::gate``, its
verdict from statistics of the whole book; the claims then are its evidence, a claim that no
longer holds reported xfailed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import rulecheck.profiles  # registers its profiles before Hypothesis reads --hypothesis-profile
from rulecheck.atomic import interrupted, noting_interrupts
from rulecheck.errors import InvalidSpec, RulecheckError, printable

STASH_BENCH = pytest.StashKey["Any"]()
STASH_CHECK = pytest.StashKey["Any"]()
STASH_CHANGED = pytest.StashKey["dict[str, Any]"]()
STASH_BOOKS = pytest.StashKey["list[tuple[Any, str]]"]()  # collected books, for the workbench
STASH_SELECTED = pytest.StashKey["dict[str, set[int]]"]()  # features whose items run, by file
STASH_INTERRUPTS = pytest.StashKey[contextlib.ExitStack]()  # SIGINT noted for the session


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


EXTRACT_MODES = ("extracted", "all")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args: list[str]) -> None:
    """A bare ``--rulecheck-extract`` takes no value: written out, it cannot swallow the path
    after it (``pytest --rulecheck-extract rulebooks/``)."""
    args[:] = ["--rulecheck-extract=extracted" if a == "--rulecheck-extract" else a for a in args]


def setting(config: pytest.Config, name: str, default: Any = None) -> Any:
    """A rulecheck option: command line first, then ``[tool.pytest.ini_options]``."""
    dest = "rulecheck_" + name.replace("-", "_")
    value = config.getoption(dest, default=None)
    if value is None:
        value = config.getini(dest) or None
    return default if value is None else value


def setting_source(config: pytest.Config, name: str) -> dict[str, Any]:
    """Where a rulecheck option's value comes from, as an error names it: the command line's
    ``--rulecheck-NAME``, else the ini file's ``rulecheck_NAME`` key."""
    dest = "rulecheck_" + name.replace("-", "_")
    if config.getoption(dest, default=None) is None and config.getini(dest):
        return {"file": config.inipath, "field": dest}
    return {"field": f"--rulecheck-{name}"}


def parse_setting(config: pytest.Config, name: str, cls: type) -> Any:
    """The option ``name`` read through the bound of ``cls``'s field of that name (None when
    not given); an error names the option or the ini key that gave it."""
    from rulecheck.config import bound_of

    text = setting(config, name)
    if text is None:
        return None
    where = setting_source(config, name)
    return bound_of(cls, name.replace("-", "_")).parse(text, where.pop("field"), **where)


def cache_dir(config: pytest.Config) -> Path:
    """The exemplar cache's directory: ``--rulecheck-cache`` (relative to the rootdir), else
    the one every rulecheck tool shares (``rulecheck.paths.exemplar_cache``)."""
    given = setting(config, "cache")
    if given is None:
        from rulecheck.paths import exemplar_cache

        return exemplar_cache()
    cache = Path(given)
    return cache if cache.is_absolute() else config.rootpath / cache


def workbench(config: pytest.Config):
    """The session's Workbench (created on first use, in each xdist worker)."""
    if STASH_BENCH not in config.stash:
        from rulecheck.session import Workbench
        from rulecheck.specs import Specs

        overrides = Specs(
            model=setting(config, "model"),  # type: ignore[arg-type]
            sae_in=setting(config, "sae-in"),
            sae_out=setting(config, "sae-out"),
            corpus=setting(config, "corpus"),
        )
        bench = Workbench(
            overrides=overrides,
            device=setting(config, "device", "auto"),
            cache_dir=cache_dir(config),
        )
        selected = config.stash.get(STASH_SELECTED, None)
        for book, file in config.stash.get(STASH_BOOKS, []):
            # a layer's heads then share one corpus pass, a book's features one prefix pass
            bench.announce(book, file, None if selected is None else selected.get(file, ()))
        config.stash[STASH_BENCH] = bench
    return config.stash[STASH_BENCH]


# ---------------------------------------------------------------------------------- collection


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Note, per book, the features whose items run (after ``-k`` and other deselection)."""
    selected: dict[str, set[int]] = {}
    for item in items:
        if isinstance(item, RuleItem):
            selected.setdefault(str(item.path), set()).add(item.rules.feature)
    config.stash[STASH_SELECTED] = selected


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
            return _relative(self.config, excinfo.value)  # type: ignore[attr-defined]
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


def _relative(config: pytest.Config, error: RulecheckError) -> str:
    """``error``'s line, naming its file relative to where pytest was started."""
    if error.file is None or not os.path.isabs(error.file):
        return str(error)
    rel = os.path.relpath(error.file, config.invocation_params.dir)
    return str(error).replace(error.file, rel, 1)


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
    """One claim about a feature, checked by its rule kind."""

    def __init__(self, *, kind, index: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.kind = kind
        self.index = index

    @property
    def book(self):
        return self.parent.parent.book

    @property
    def rules(self):
        return self.parent.rules

    def runtest(self) -> None:
        from rulecheck.errors import Regenerated, RuleFailed
        from rulecheck.kinds import CheckContext

        what = self.parent.parent.regenerated["features"].get(self.rules.feature)
        if what is not None:
            raise Regenerated(
                f"claims regenerated by --rulecheck-extract ({what}); review the change in the "
                "book and run again",
                file=self.path,
                field=f"feature[{self.rules.feature}]",
            )
        config = self.config
        bench = workbench(config).for_book(self.book)  # under the protocol it was measured with
        settings = config.stash[STASH_CHECK]
        file = str(self.path)
        rules = self.rules
        if settings.remap:
            from rulecheck.gate import gated

            gate = gated(bench, self.book, file, settings.remap)
            bench.check_fingerprints(self.book, gate.old, file, settings.accept_changed)
            head, translated = gate.new, gate.remapped.rules(rules.feature)
            if translated is None:
                self.record({"rule": self.kind.key, "lost": True, "passed": False})
                changed(lost_reason(gate, gate.remapped.lost[rules.feature]))
            if (translated.feature, self.kind.key, self.index) in gate.remapped.untranslatable:
                from rulecheck.gate import untranslatable

                self.record({"rule": self.kind.key, "passed": False})
                try:
                    untranslatable(gate, rules.feature, self.kind.key, self.index, file)
                except RulecheckError as lost:
                    as_evidence(config, lost)
                    raise
            rules = translated
            self.remapped_to = translated.feature
        else:
            head = bench.head_of(self.book, file)
            bench.check_fingerprints(self.book, head, file, settings.accept_changed)
        ctx = CheckContext(
            bench, head, file, tolerance=settings.tolerance, examples=settings.examples
        )
        try:
            record = self.kind.check(ctx, rules, self.index)
        except RulecheckError as failed:
            if rules is not self.rules:
                from rulecheck.gate import note_remapped

                note_remapped(failed, self.rules.feature, rules.feature)
            if isinstance(failed, RuleFailed):
                self.record({**failed.record, "message": _relative(config, failed)})
            as_evidence(config, failed)
            raise
        self.record(record)

    def record(self, values: dict[str, Any]) -> None:
        entry = {"head": head_name(self.book), "feature": self.rules.feature, **values}
        if getattr(self, "remapped_to", None) is not None:
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
        from rulecheck.gate import gated, lost_verdict

        settings = self.config.stash[STASH_CHECK]
        if settings.remap:
            bench = workbench(self.config).for_book(self.parent.book)
            gate = gated(bench, self.parent.book, str(self.path), settings.remap)
            changed(lost_reason(gate, self.rules))
        pytest.skip(lost_verdict(self.parent.book, self.rules, settings.allow_lost, str(self.path)))


def lost_reason(gate, entry) -> str:
    """Why a feature of the book has no partner in the retrained SAE."""
    from rulecheck.gate import lost_reason

    return lost_reason(gate.remapped.book, entry, gate.specs["sae_out"], gate.threshold)


class GateItem(BookItem):
    """``L0H0.yaml::gate``: the head's verdict under the retrained SAEs, from statistics of the
    whole book (``rulecheck.core.verdict``); in a gate run only these items decide the exit
    status, the claims' items show which claims changed."""

    def runtest(self) -> None:
        from rulecheck.errors import GateFailed
        from rulecheck.gate import gate_verdict

        settings = self.config.stash[STASH_CHECK]
        book, file = self.parent.book, str(self.path)
        bench = workbench(self.config).for_book(book)
        verdict = gate_verdict(
            bench, book, file, settings.remap, settings.gate, accept_changed=settings.accept_changed
        )
        self.user_properties.append(("rulecheck-gate", verdict.record(head_name(book))))
        if not verdict.passed:
            raise GateFailed(verdict.reason(), file=file, field="gate")


def head_name(book) -> str:
    """How the run's tables name a book's head: ``rulecheck-tiny L0H3``."""
    head = f"L{book.layer}H{book.head}"
    return f"{printable(book.model)} {head}" if book.model else head


def changed(reason: str) -> None:
    """A claim that no longer holds under the retrained SAEs: evidence for the reviewer,
    reported as xfailed; the gate items decide the run."""
    pytest.xfail(f"changed under the retrained SAEs: {reason}")


def as_evidence(config: pytest.Config, error: RulecheckError) -> None:
    """In a gate run, a claim that does not hold (not bad input) is reported by ``changed``."""
    from rulecheck.errors import NotEligible, RemapLost, RuleFailed

    if config.stash[STASH_CHECK].remap and isinstance(error, RuleFailed | RemapLost | NotEligible):
        changed(_relative(config, error))


class RemovedItem(BookItem):
    """Fails once after regeneration removed extracted features, so the removal is reviewed."""

    def runtest(self) -> None:
        from rulecheck.errors import Regenerated

        removed = self.parent.regenerated["removed"]
        what = (
            f"feature {removed[0]} is no longer extracted and was"
            if len(removed) == 1
            else f"features {', '.join(map(str, removed))} are no longer extracted and were"
        )
        raise Regenerated(
            f"{what} removed by --rulecheck-extract; review the change in the book and run again",
            file=self.path,
        )


# ---------------------------------------------------------------------------------- extraction


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """With ``--rulecheck-extract``, regenerate the rulebooks named on the command line before
    anything is collected: once, in the main process (before xdist starts its workers). What
    changed is kept (``STASH_CHANGED``) so that those items fail, to be reviewed."""
    config = session.config
    mode = config.getoption("rulecheck_extract")
    if not mode or hasattr(config, "workerinput"):
        return
    from rulecheck.api import regenerated, write_rulebooks
    from rulecheck.book import changes, merge_manual
    from rulecheck.rulebook import load_rulebook, rulebook_files

    # =all fills manual-only books only where the user named them, never through testpaths
    named = config.args_source == pytest.Config.ArgsSource.ARGS
    notes, fresh, changed = [], [], {}
    try:
        todo = []
        for path in rulebook_files(config.args or [str(config.rootpath)]):
            old = load_rulebook(path)
            if not any(f.source == "extracted" for f in old.features) and not (
                mode == "all" and named
            ):
                notes.append(
                    f"rulecheck: {path}: only manual entries, left as it is "
                    "(--rulecheck-extract=all with this path named fills it)"
                )
                continue
            todo.append((path, old))
        bench = workbench(config)
        for path, old in todo:  # the heads of a layer then share one corpus pass
            bench.announce(old, str(path))
        for path, old in todo:
            new = regenerated(old, path, bench)
            features, removed = changes(old, merge_manual(new, old))
            changed[str(path.resolve())] = {"features": features, "removed": removed}
            fresh.append((new, path))
            n = len(features)
            what = f"{n} feature{'' if n == 1 else 's'} changed" if n else "no claim changed"
            notes.append(f"rulecheck: regenerated {path} ({what})")
        write_rulebooks(fresh)  # refused after an interrupt, even one swallowed below
    except RulecheckError as e:
        if interrupted():
            raise KeyboardInterrupt from None
        raise pytest.UsageError(f"--rulecheck-extract: {_relative(config, e)}") from None
    except Exception:
        if interrupted():  # an interrupt a library turned into another error
            raise KeyboardInterrupt from None
        raise
    config.stash[STASH_CHANGED] = changed
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in notes:
            reporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: the workers learn what regeneration changed."""
    node.workerinput["rulecheck_changed"] = json.dumps(node.config.stash.get(STASH_CHANGED, {}))


def regeneration(config: pytest.Config, path: Path) -> dict[str, Any]:
    """What ``--rulecheck-extract`` changed in the book at ``path`` this session."""
    if STASH_CHANGED not in config.stash:
        text = getattr(config, "workerinput", {}).get("rulecheck_changed", "{}")
        config.stash[STASH_CHANGED] = json.loads(text)
    entry = config.stash[STASH_CHANGED].get(str(path.resolve()), {})
    return {
        "features": {int(k): v for k, v in entry.get("features", {}).items()},
        "removed": entry.get("removed", []),
    }


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


# ---------------------------------------------------------------------------------- reporting


def check_settings(config: pytest.Config):
    """The checking options, each read through its bound (``rulecheck.config``), and the
    report path checked: all before anything is collected or run."""
    from rulecheck.config import (
        Budget,
        CheckConfig,
        GateConfig,
        parse_accept_changed,
        parse_budget,
        parse_config,
    )
    from rulecheck.core.verdict import STATISTICS
    from rulecheck.files import check_output_file

    given = {name: parse_setting(config, name, CheckConfig) for name in ("tolerance", "examples")}
    accept = parse_accept_changed(
        setting(config, "accept-changed", ""), "--rulecheck-accept-changed"
    )
    remap = setting(config, "remap")
    from rulecheck.mapping import AUTO, read_mappings

    if remap is not None and remap != AUTO:
        read_mappings(remap, setting_source(config, "remap")["field"])
    allow_lost = setting(config, "allow-lost")
    budget = Budget() if allow_lost is None else parse_budget(allow_lost, "--rulecheck-allow-lost")
    gate = parse_config(
        GateConfig,
        {name: setting(config, f"gate-{name.replace('_', '-')}") for name in STATISTICS},
        "--rulecheck-gate-{}",
    )
    checked = CheckConfig(
        **{name: value for name, value in given.items() if value is not None},
        accept_changed=accept,
        remap=remap,
        allow_lost=budget,
        gate=gate,
    )
    from rulecheck.loading.devices import resolve_device

    try:
        resolve_device(setting(config, "device", "auto"))
    except InvalidSpec as exc:
        raise InvalidSpec(exc.what, field="--rulecheck-device", fix=exc.fix) from None
    mode = config.getoption("rulecheck_extract", None)
    if mode is not None and remap is not None:
        raise InvalidSpec(
            "cannot regenerate and remap in one run",
            field="--rulecheck-remap",
            fix="remap first (rulecheck remap --out DIR), then regenerate the written books",
        )
    if mode is not None and mode not in EXTRACT_MODES:
        raise InvalidSpec(
            f"unknown mode {mode!r}",
            field="--rulecheck-extract",
            fix="give --rulecheck-extract alone (the extracted features) or "
            "--rulecheck-extract=all (also books holding only manual entries)",
        )
    check_caches(config)
    for name in ("report", "html"):
        path = setting(config, name)
        if path is not None and not hasattr(config, "workerinput"):
            check_output_file(path, f"--rulecheck-{name}")
    return checked


def check_caches(config: pytest.Config) -> None:
    """``--rulecheck-cache`` and ``RULECHECK_CACHE`` as places a cache can be written to
    (nothing is created yet): a file there, or under a file, is a usage error now, not a
    traceback in every item after all the work."""
    from rulecheck.paths import check_cache_dir, check_writable_dir

    check_writable_dir(
        cache_dir(config), "--rulecheck-cache", "name a directory you can write to, or leave it out"
    )
    check_cache_dir()


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """An unknown ``--hypothesis-profile`` is a usage error naming the option, before
    Hypothesis's plugin loads it (which raises inside pytest_configure: an INTERNALERROR)."""
    from hypothesis import settings
    from hypothesis.errors import InvalidArgument

    name = config.getoption("hypothesis_profile", None)
    if name is None:
        return
    try:
        settings.get_profile(name)
    except InvalidArgument:
        raise pytest.UsageError(
            f"--hypothesis-profile: no profile {name!r} is registered (fix: use "
            f"{rulecheck.profiles.DEFAULT_PROFILE} or {rulecheck.profiles.CI_PROFILE}, or "
            "register yours with settings.register_profile in a conftest.py)"
        ) from None


def pytest_configure(config: pytest.Config) -> None:
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


def worker_threads(workers: int | None, cores: int | None, env: Mapping[str, str]) -> int | None:
    """Torch threads for one of ``workers`` xdist workers: ``cores // workers`` (torch's
    default, all cores in each, oversubscribes them and runs many times slower); None, torch
    left as it is, outside xdist or where ``OMP_NUM_THREADS`` says."""
    if not workers or "OMP_NUM_THREADS" in env:
        return None
    return max(1, (cores or 1) // int(workers))


class Summary:
    """Collects every checked rule's outcome (from workers too, under xdist) and prints a
    table per head at the end; optionally writes them as JSON."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.gates: list[dict[str, Any]] = []  # each gate item's verdict (--rulecheck-remap)
        self.items: list[Any] = []  # every rulebook item's outcome, for the HTML report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and not (
            report.when == "setup" and (report.failed or report.skipped)
        ):
            return
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
        records = [value for name, value in report.user_properties if name == "rulecheck"]
        if report.when == "call" or report.failed:
            for value in records:
                self.results.append(dict(value, outcome=outcome, nodeid=report.nodeid))
            for name, value in report.user_properties:
                if name == "rulecheck-gate":
                    gate = dict(value, rule="gate", outcome=outcome, nodeid=report.nodeid)
                    self.gates.append(gate)
                    records.append(gate)
        if setting(self.config, "html") and report.nodeid.split("::", 1)[0].endswith(
            (".yaml", ".yml")
        ):
            from rulecheck.html.outcomes import Outcome

            failed = report.failed or outcome == "xfailed"
            self.items.append(
                Outcome(
                    nodeid=report.nodeid,
                    outcome=outcome,
                    record=dict(records[0]) if records else {},
                    message=_message(report, records) if failed else None,
                )
            )

    def table(self) -> Table:
        by_head: dict[str, dict[str, Any]] = {}
        for r in self.results:
            row = by_head.setdefault(
                r["head"],
                {"features": set(), "passed": 0, "failed": 0, "skipped": 0, "xfailed": 0},
            )
            row["features"].add(r["feature"])
            kept = ("passed", "skipped", "xfailed")
            row[r["outcome"] if r["outcome"] in kept else "failed"] += 1
            if "f1" in r:
                row.setdefault("f1", {})[r["feature"]] = r["f1"]
        table = Table(title="rulecheck: rules by head")
        for col in ("head", "features", "passed", "failed", "skipped", "xfailed", "median F1"):
            table.add_column(col, justify="left" if col == "head" else "right")
        for head in sorted(by_head, key=_head_order):
            row = by_head[head]
            f1 = statistics.median(row["f1"].values()) if row.get("f1") else None
            counts = [str(row[k]) for k in ("passed", "failed", "skipped", "xfailed")]
            table.add_row(
                escape(head), str(len(row["features"])), *counts, "" if f1 is None else f"{f1:.2f}"
            )
        return table

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config) -> None:
        # 120 columns: the gate's table holds each statistic against its threshold unwrapped
        console = Console(file=terminalreporter._tw._file, width=120)
        if self.gates:
            from rulecheck.report import print_gate

            print_gate(sorted(self.gates, key=lambda g: _head_order(g["head"])), console)
        stopped = exitstatus == pytest.ExitCode.INTERRUPTED or interrupted()
        if self.results or self.gates:
            if self.results:
                console.print(self.table())
            path = setting(self.config, "report")
            if path:
                entries = [*self.gates, *self.results]
                data = json.dumps(entries, indent=2, sort_keys=True) + "\n"
                self.write_output("report", Path(path), data, stopped, terminalreporter)
        html = setting(self.config, "html")
        if html and not hasattr(self.config, "workerinput"):
            if stopped:
                terminalreporter.write_line(f"rulecheck: interrupted; {html} not written")
            else:
                self.write_html(Path(html), terminalreporter)

    def write_output(self, name: str, path: Path, data: str, stopped: bool, reporter) -> None:
        """Write a run's output atomically, or say in one line why it was not: an
        interrupted run's outcomes are not the run's."""
        from rulecheck.atomic import atomic_write

        if stopped:
            reporter.write_line(f"rulecheck: interrupted; {path} not written")
            return
        try:
            atomic_write(path, data.encode())
        except (OSError, RulecheckError) as e:
            what = _relative(self.config, e) if isinstance(e, RulecheckError) else str(e)
            reporter.write_line(f"rulecheck: --rulecheck-{name}: {what}", red=True)

    def write_html(self, path: Path, terminalreporter) -> None:
        """The HTML report of the run's rulebooks, measured on the books' own checkpoints
        (the retrained SAEs' ids mean nothing to a book's features)."""
        import time

        from rulecheck.html import build_report, write_report

        start = time.perf_counter()
        root = self.config.rootpath
        files = sorted({o.file for o in self.items})
        books = [(root / f, f) for f in files if (root / f).is_file()]
        if not books:
            terminalreporter.write_line(f"rulecheck: no rulebook items ran; {path} not written")
            return
        settings = self.config.stash[STASH_CHECK]
        if settings.remap:
            from rulecheck.session import Workbench

            bench = Workbench(
                device=setting(self.config, "device", "auto"), cache_dir=cache_dir(self.config)
            )
        else:
            bench = workbench(self.config)
        try:
            html = build_report(books, self.items, bench=bench, root=root)
            write_report(path, html, "--rulecheck-html")
        except RulecheckError as e:
            terminalreporter.write_line(
                f"rulecheck: --rulecheck-html: {_relative(self.config, e)}", red=True
            )
            return
        seconds = time.perf_counter() - start
        terminalreporter.write_line(f"rulecheck: wrote {path} ({seconds:.1f} s)")


def _message(report: pytest.TestReport, records: list[dict[str, Any]]) -> str:
    """A failed item's message: its record's, else its report's text (without the line
    naming the xdist worker)."""
    for record in records:
        if isinstance(record.get("message"), str):
            return record["message"]
    lines = report.longreprtext.splitlines()
    return "\n".join(line for line in lines if not _WORKER_LINE.match(line)).strip()


_WORKER_LINE = re.compile(r"^\[gw\d+\] .* -- Python ")


def _head_order(name: str) -> tuple[str, int, int]:
    """Rows by model, then layer and head (``"model L0H3"``)."""
    model, _, name = name.rpartition(" ")
    layer, head = name[1:].split("H")
    return model, int(layer), int(head)
