"""What a (non-editable) install gets: every package of the source tree, and the data files
the code opens (the rulebook JSON Schema, ``py.typed``, the zoo's files).

An editable install maps the whole source tree, so a package or a data file that
pyproject.toml leaves out only goes missing from a wheel: these tests read pyproject.toml
as setuptools does, and build a wheel (a few seconds) and read its file list.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# where each top-level package lives in the source tree
SOURCES = {
    "rulecheck": ROOT / "rulecheck",
    "pytest_rulecheck": ROOT / "plugins" / "pytest_rulecheck",
}
DATA = [
    "rulecheck/schemas/rulebook.schema.json",
    "rulecheck/py.typed",
    "rulecheck/html/templates/report.html.j2",
    "rulecheck/html/templates/card.html.j2",
    "rulecheck/html/templates/report.css",
    "rulecheck/html/templates/report.js",
]


def tree_packages() -> dict[str, Path]:
    """Every directory with an ``__init__.py`` under the top-level packages, by dotted name."""
    out = {}
    for name, top in SOURCES.items():
        for init in sorted(top.rglob("__init__.py")):
            parts = init.parent.relative_to(top).parts
            out[".".join((name, *parts))] = init.parent
    return out


@pytest.fixture(scope="module")
def setuptools_config() -> dict:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return pyproject["tool"]["setuptools"]


def test_the_tree_has_the_packages_the_code_imports():
    packages = tree_packages()
    assert {"rulecheck", "rulecheck.core", "rulecheck.kinds", "rulecheck.schemas"} <= set(packages)
    assert "pytest_rulecheck" in packages


def test_every_package_is_found_by_the_build(setuptools_config):
    """pyproject.toml finds packages (``packages.find``) rather than listing them; setuptools'
    own finder, run as the build runs it, finds exactly the tree's packages."""
    setuptools = pytest.importorskip("setuptools")
    packages = setuptools_config["packages"]
    assert isinstance(packages, dict), "packages are found (packages.find), not listed"
    find = packages["find"]
    assert find.get("namespaces") is False  # only directories with an __init__.py
    found: dict[str, Path] = {}
    package_dir = setuptools_config.get("package-dir", {})
    for where in find["where"]:
        for name in setuptools.find_packages(
            where=str(ROOT / where),
            include=find.get("include", ("*",)),
            exclude=find.get("exclude", ()),
        ):
            top = name.split(".")[0]
            base = ROOT / package_dir[top] if top in package_dir else ROOT / where / top
            found[name] = base.joinpath(*name.split(".")[1:])
    tree = tree_packages()
    assert sorted(tree.keys() - found.keys()) == [], "packages the build leaves out"
    assert found == tree


def test_the_data_files_are_package_data(setuptools_config):
    patterns = setuptools_config["package-data"]["rulecheck"]
    for path in DATA:
        file = ROOT / path
        assert file.is_file(), path
        assert any(file in (ROOT / "rulecheck").glob(p) for p in patterns), (path, patterns)


def test_the_wheel_holds_every_module_and_the_schema(tmp_path):
    """Built from a copy of the sources (the build writes build/ and *.egg-info beside them),
    without the network."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "rulecheck", src / "rulecheck", ignore=ignore)
    shutil.copytree(ROOT / "plugins", src / "plugins", ignore=ignore)
    dist = tmp_path / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--disable-pip-version-check", "-q", "-w", str(dist), str(src)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    [wheel] = dist.glob("rulecheck-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        "/".join((name, *path.relative_to(top).parts))
        for name, top in SOURCES.items()
        for path in top.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    data = set(DATA) | {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "rulecheck" / "zoo").rglob("*")
        if path.is_file() and path.suffix != ".py" and "__pycache__" not in path.parts
    }
    assert sorted(modules - names) == [], "modules missing from the wheel"
    assert sorted(data - names) == [], "data missing from the wheel"
