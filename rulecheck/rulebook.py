"""Rulebook files: YAML in and out.

One file per head, ``L{layer}H{head}.yaml``. Reading composes the YAML safely (no tags, no
merge keys, aliases bounded), records the line of every field and hands the plain values to
the schema (``rulecheck.book``), so every problem is an ``InvalidRulebook`` naming the file,
line and field. Writing is deterministic, so regenerated files diff cleanly, and atomic.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import yaml.constructor
import yaml.nodes

from rulecheck.atomic import atomic_write
from rulecheck.book import FILE_NAME, SCHEMA_VERSION, Rulebook, merge_manual, parse_book
from rulecheck.errors import InvalidRulebook, RulecheckError
from rulecheck.schema import Flow, Where, join

_MAX_REPEATS = 100_000
# Reading costs about 2 s and 80 MiB of memory a MiB of YAML (libyaml's parser, the node tree,
# and the line of every field; linear in the size, `make bench`): 8 MiB, eight times the largest
# book extraction writes, takes about 15 s. Larger books are refused, not read for minutes.
MAX_BYTES = 8 * 2**20
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _check_file_name(where: Where, rulebook: Rulebook, path: Path) -> None:
    match = FILE_NAME.match(path.name)
    if match is None:
        return
    layer, head = int(match[1]), int(match[2])
    if (layer, head) != (rulebook.layer, rulebook.head):
        where.fail(
            "layer" if layer != rulebook.layer else "head",
            f"file name says L{layer}H{head} but the file has layer {rulebook.layer}, "
            f"head {rulebook.head}",
            f"rename the file to {rulebook.name}{path.suffix} or correct layer/head",
        )


# ---------------------------------------------------------------------------- YAML in


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-05`` (no dot) as a float, as YAML 1.2 does."""


class _FastLoader(getattr(yaml, "CSafeLoader", _Loader)):
    """``_Loader`` with libyaml's parser (three times faster) where PyYAML has it; a file it
    cannot parse is parsed again by ``_Loader``, whose error lines are the more exact."""


class _Dumper(yaml.SafeDumper):
    """SafeDumper with rulecheck's float format, flow refs and no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


for _cls in (_Loader, _FastLoader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))

_PLAIN_TYPES = (type(None), bool, int, float, str)
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


@dataclass
class _Walk:
    """Turns a composed YAML node tree into plain values, recording each field's line."""

    where: Where
    constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor
    )
    seen: set[int] = field(default_factory=set)
    repeats: int = 0
    active: set[int] = field(default_factory=set)

    def value(self, node: yaml.nodes.Node, path: str) -> Any:
        self.where.lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in self.seen:
            self.repeats += 1
            if self.repeats > _MAX_REPEATS:
                self.where.fail(path, "too many YAML nodes from aliases", "write the values out")
        self.seen.add(id(node))
        if id(node) in self.active:
            self.where.fail(path, "recursive YAML alias", "write the value out instead of an alias")
        if isinstance(node, yaml.nodes.ScalarNode):
            return self.scalar(node, path)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.nodes.SequenceNode) and node.tag == _SEQ_TAG:
                return [self.value(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
            if isinstance(node, yaml.nodes.MappingNode) and node.tag == _MAP_TAG:
                return self.mapping(node, path)
        finally:
            self.active.discard(id(node))
        self.where.fail(path, f"unsupported YAML tag {node.tag}", "remove the tag")

    def mapping(self, node: yaml.nodes.MappingNode, path: str) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(key_node, path)
            sub = join(path, key)
            if key in out:
                first = self.where.key_lines.get(sub)
                self.where.lines[sub] = key_node.start_mark.line + 1
                self.where.fail(sub, f"duplicate key (first at line {first})", "keep only one")
            self.where.key_lines[sub] = key_node.start_mark.line + 1
            out[key] = self.value(value_node, sub)
        return out

    def key(self, node: yaml.nodes.Node, path: str) -> Any:
        line = node.start_mark.line + 1
        if node.tag == "tag:yaml.org,2002:merge":
            self.where.lines.setdefault(path, line)
            self.where.fail(path, "YAML merge keys (<<) are not supported", "write the keys out")
        if not isinstance(node, yaml.nodes.ScalarNode):
            self.where.lines.setdefault(path, line)
            self.where.fail(path, "mapping keys must be plain scalars", "use a string key")
        key = self.scalar(node, path)
        try:
            hash(key)
        except TypeError:
            self.where.fail(path, "mapping keys must be plain scalars", "use a string key")
        return key

    def scalar(self, node: yaml.nodes.ScalarNode, path: str) -> Any:
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
            what = f"cannot read value {node.value[:40]!r} as {node.tag}: {_first_line(exc)}"
            self.where.fail(path, what, "put it in quotes or correct it")
        if not isinstance(value, _PLAIN_TYPES):
            self.where.fail(
                path,
                f"unsupported {type(value).__name__} value {node.value[:40]!r}",
                "put it in quotes",
            )
        return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRulebook(
            "no such file", file=path, fix="check the path, or run `rulecheck extract`"
        ) from None
    except IsADirectoryError:
        raise InvalidRulebook("is a directory, not a rulebook file", file=path) from None
    except OSError as exc:
        raise InvalidRulebook(f"cannot read: {exc.strerror or exc}", file=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidRulebook(
            "not UTF-8 text", file=path, line=line, fix="save the file as UTF-8"
        ) from None


def _compose(text: str, file: str) -> yaml.nodes.Node:
    try:
        node = yaml.compose(text, Loader=_FastLoader)
    except (yaml.YAMLError, RecursionError):
        pass  # parsed again below, for the error
    else:
        if node is not None:
            return node
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "invalid YAML"
        if exc.context:
            at = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            what += f" ({exc.context}{at})"
        raise InvalidRulebook(
            f"not valid YAML: {what}",
            file=file,
            line=mark.line + 1 if mark is not None else None,
            fix="correct the YAML syntax",
        ) from None
    except yaml.YAMLError as exc:
        line = text.count("\n", 0, getattr(exc, "position", 0) or 0) + 1
        raise InvalidRulebook(
            f"not valid YAML: {_first_line(exc)}", file=file, line=line, fix="correct the file"
        ) from None
    except RecursionError:
        raise InvalidRulebook("YAML nested too deeply", file=file, fix="flatten the file") from None
    if node is None:
        raise InvalidRulebook(
            "empty file, not a rulebook",
            file=file,
            line=1,
            fix=f"start with `rulecheck: {SCHEMA_VERSION}`, `layer:`, `head:`, `features:`",
        )
    return node


def _check_size(size: int, file: str | Path) -> None:
    if size > MAX_BYTES:
        raise InvalidRulebook(
            f"rulebook is {size / 2**20:.1f} MiB; rulecheck reads rulebooks up to "
            f"{MAX_BYTES // 2**20} MiB",
            file=file,
            line=1,
            fix="split its features over several rulebook files of the same head, or extract "
            "fewer terms (--max-terms)",
        )


def parse_rulebook(text: str, file: str | Path = "<string>") -> Rulebook:
    """Validate the YAML ``text`` of a rulebook; ``file`` only names it in errors."""
    _check_size(
        len(text.encode("utf-8", errors="replace")) if len(text) * 4 > MAX_BYTES else 0, file
    )
    where = Where(file=str(file))
    node = _compose(text, str(file))
    try:
        data = _Walk(where).value(node, "")
    except RecursionError:
        raise InvalidRulebook("YAML nested too deeply", file=file, fix="flatten the file") from None
    rulebook = parse_book(where, data)
    _check_file_name(where, rulebook, Path(str(file)))
    return rulebook


def load_rulebook(path: str | Path) -> Rulebook:
    """Read and validate the rulebook at ``path``; every problem is an ``InvalidRulebook``."""
    path = Path(path)
    with contextlib.suppress(OSError):
        _check_size(path.stat().st_size, path)
    return parse_rulebook(_read_text(path), path)


_TOP_KEY_LINE = re.compile(r"""^(?:rulecheck|"rulecheck"|'rulecheck')[ \t]*:(?:[ \t]|$)""", re.M)


def rulebook_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Rulebook files named by pytest arguments (files, directories, ``file::node`` ids)."""
    for arg in paths:
        path = Path(str(arg).split("::", 1)[0])
        candidates = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path]
        for p in candidates:
            if p.suffix in (".yaml", ".yml") and p.is_file() and is_rulebook_file(p):
                yield p


def is_rulebook_file(path: str | Path) -> bool:
    """Whether ``path`` is a YAML file with a top-level ``rulecheck:`` key; never raises."""
    try:
        path = Path(path)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            return False
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except (OSError, ValueError):
        return False
    return _TOP_KEY_LINE.search(text) is not None


# ---------------------------------------------------------------------------- YAML out


def _float_text(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = f"{value:.6g}"
    if "e" in text and "." not in text:
        return text.replace("e", ".0e")
    if "e" not in text and "." not in text:
        return text + ".0"
    return text


def round_float(value: float) -> float:
    """``value`` as it reads back from a dumped rulebook (6 significant digits)."""
    return float(_float_text(value)) if math.isfinite(value) else value


def _represent_float(dumper: yaml.SafeDumper, value: float) -> yaml.nodes.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:float", _float_text(value))


_LINE_BREAKS = frozenset("\n\r\x85\u2028\u2029")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.nodes.ScalarNode:
    style = '"' if _LINE_BREAKS.intersection(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.nodes.SequenceNode:
    flow = all(not isinstance(v, dict | list) for v in value)
    return dumper.represent_sequence(_SEQ_TAG, value, flow_style=flow)


def _represent_dict(dumper: yaml.SafeDumper, value: dict[Any, Any]) -> yaml.nodes.MappingNode:
    return dumper.represent_mapping(_MAP_TAG, value.items(), flow_style=False)


def _represent_flow(dumper: yaml.SafeDumper, value: Flow) -> yaml.nodes.MappingNode:
    return dumper.represent_mapping(_MAP_TAG, value.items(), flow_style=True)


_Dumper.add_representer(float, _represent_float)
_Dumper.add_multi_representer(float, _represent_float)
_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(dict, _represent_dict)
_Dumper.add_representer(Flow, _represent_flow)


def dump_rulebook(rulebook: Rulebook) -> str:
    """The rulebook as YAML text; equal rulebooks give byte-identical text."""
    return yaml.dump(
        rulebook.to_dict(),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=4096,
    )


def _check_name_matches(rulebook: Rulebook, path: Path) -> None:
    match = FILE_NAME.match(path.name)
    if match and (int(match[1]), int(match[2])) != (rulebook.layer, rulebook.head):
        raise InvalidRulebook(
            f"rulebook for {rulebook.name} cannot be saved as {path.name}",
            file=path,
            fix=f"save it as {rulebook.name}{path.suffix}",
        )


def save_rulebook(rulebook: Rulebook, path: str | Path) -> Path:
    """Write ``rulebook`` to ``path`` atomically (temp file, fsync, rename); return the path."""
    path = Path(path)
    _check_name_matches(rulebook, path)
    return atomic_write(path, dump_rulebook(rulebook).encode("utf-8"))


# ---------------------------------------------------------------------------- regeneration


def merged_with_file(rulebook: Rulebook, path: Path) -> Rulebook:
    """``rulebook`` plus the manual features of the file at ``path`` (when there is one); a
    file there that is not a valid rulebook is never overwritten: ``InvalidRulebook``."""
    _check_name_matches(rulebook, path)
    old = None
    if path.exists():
        try:
            old = load_rulebook(path)
        except RulecheckError as exc:
            fix = f"{exc.fix}; " if exc.fix else ""
            raise InvalidRulebook(
                exc.what,
                file=exc.file,
                line=exc.line,
                field=exc.field,
                fix=f"{fix}the existing file was left as it is, correct or move it",
            ) from None
    return merge_manual(rulebook, old)


def write_rulebook(rulebook: Rulebook, path: str | Path) -> Path:
    """Save ``rulebook`` at ``path``, keeping the manual features of the file already there."""
    path = Path(path)
    return save_rulebook(merged_with_file(rulebook, path), path)
