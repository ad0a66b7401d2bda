"""The plugin's options read and checked: ``--rulecheck-NAME`` on the command line, else the
ini file's ``rulecheck_NAME``; every one is checked before anything is collected or run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from rulecheck.errors import InvalidSpec

EXTRACT_MODES = ("extracted", "all")


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
    bound = bound_of(cls, name.replace("-", "_"))
    if bound is None:
        raise TypeError(f"{cls.__name__}.{name} has no bound")  # a rulecheck bug
    where = setting_source(config, name)
    return bound.parse(text, where.pop("field"), **where)


def cache_dir(config: pytest.Config) -> Path:
    """The exemplar cache's directory: ``--rulecheck-cache`` (relative to the rootdir), else
    the one every rulecheck tool shares (``rulecheck.paths.exemplar_cache``)."""
    given = setting(config, "cache")
    if given is None:
        from rulecheck.paths import exemplar_cache

        return exemplar_cache()
    cache = Path(given)
    return cache if cache.is_absolute() else config.rootpath / cache


def check_settings(config: pytest.Config):
    """The checking options as a ``CheckConfig``, each read through its bound
    (``rulecheck.config``), and the device, modes, caches and outputs checked: all before
    anything is collected or run."""
    checked = read_check_config(config)
    check_device(config)
    check_extract_mode(config.getoption("rulecheck_extract", None), checked.remap)
    check_caches(config)
    check_outputs(config)
    return checked


def read_check_config(config: pytest.Config):
    """The ``CheckConfig`` of the options; mapping files are read (and refused) now."""
    from rulecheck.config import (
        Budget,
        CheckConfig,
        GateConfig,
        parse_accept_changed,
        parse_budget,
        parse_config,
    )
    from rulecheck.core.verdict import STATISTICS
    from rulecheck.mapping import AUTO, read_mappings

    given = {name: parse_setting(config, name, CheckConfig) for name in ("tolerance", "examples")}
    accept = parse_accept_changed(
        setting(config, "accept-changed", ""), "--rulecheck-accept-changed"
    )
    remap = setting(config, "remap")
    if remap is not None and remap != AUTO:
        read_mappings(remap, setting_source(config, "remap")["field"])
    allow_lost = setting(config, "allow-lost")
    budget = Budget() if allow_lost is None else parse_budget(allow_lost, "--rulecheck-allow-lost")
    gate = parse_config(
        GateConfig,
        {name: setting(config, f"gate-{name.replace('_', '-')}") for name in STATISTICS},
        "--rulecheck-gate-{}",
    )
    return CheckConfig(
        **{name: value for name, value in given.items() if value is not None},
        accept_changed=accept,
        remap=remap,
        allow_lost=budget,
        gate=gate,
    )


def check_device(config: pytest.Config) -> None:
    """``--rulecheck-device`` names a device this machine has (``auto`` and ``cpu`` always
    do: torch is not imported for them, as the xdist controller, which runs no test, would
    pay two seconds for it before any worker starts)."""
    device = setting(config, "device", "auto")
    if device in ("auto", "cpu"):
        return
    from rulecheck.loading.devices import resolve_device

    try:
        resolve_device(device)
    except InvalidSpec as exc:
        raise InvalidSpec(exc.what, field="--rulecheck-device", fix=exc.fix) from None


def check_extract_mode(mode: str | None, remap: str | None) -> None:
    """``--rulecheck-extract`` takes a known mode, and not with ``--rulecheck-remap``."""
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


def check_caches(config: pytest.Config) -> None:
    """``--rulecheck-cache`` and ``RULECHECK_CACHE`` as places a cache can be written to
    (nothing is created yet): a file there, or under a file, is a usage error now, not a
    traceback in every item after all the work."""
    from rulecheck.paths import check_cache_dir, check_writable_dir

    check_writable_dir(
        cache_dir(config), "--rulecheck-cache", "name a directory you can write to, or leave it out"
    )
    check_cache_dir()


def check_outputs(config: pytest.Config) -> None:
    """``--rulecheck-report`` and ``--rulecheck-html`` can be written (by the main process)."""
    from rulecheck.files import check_output_file

    for name in ("report", "html"):
        path = setting(config, name)
        if path is not None and not hasattr(config, "workerinput"):
            check_output_file(path, f"--rulecheck-{name}")


def check_hypothesis_profile(name: str | None) -> None:
    """An unknown ``--hypothesis-profile`` is a usage error naming the option."""
    from hypothesis import settings
    from hypothesis.errors import InvalidArgument

    from rulecheck.profiles import CI_PROFILE, DEFAULT_PROFILE

    if name is None:
        return
    try:
        settings.get_profile(name)
    except InvalidArgument:
        raise pytest.UsageError(
            f"--hypothesis-profile: no profile {name!r} is registered (fix: use "
            f"{DEFAULT_PROFILE} or {CI_PROFILE}, or "
            "register yours with settings.register_profile in a conftest.py)"
        ) from None


def worker_threads(workers: int | None, cores: int | None, env: Mapping[str, str]) -> int | None:
    """Torch threads for one of ``workers`` xdist workers: ``cores // workers`` (torch's
    default, all cores in each, oversubscribes them and runs many times slower); None, torch
    left as it is, outside xdist or where ``OMP_NUM_THREADS`` says."""
    if not workers or "OMP_NUM_THREADS" in env:
        return None
    return max(1, (cores or 1) // int(workers))
