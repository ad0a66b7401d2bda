"""Mapping files: which features of a retrained SAE are which features of the old one.

A mapping file is YAML, short enough to review in a pull request: a header naming both SAEs
and how they were matched, one flow list per kept pair, then the features without a partner::

    rulecheck_mapping: 1
    old: rulecheck-tiny:sae_out/L0H1
    new: retrained/L0H1
    hook: blocks.0.attn.hook_z
    head: 1
    fingerprints: {old: 'sha256:...', new: 'sha256:...'}
    settings: {k: 8, threshold: 0.5, split_threshold: 0.7}
    corpus: rulecheck-tiny:eval      # only when activations were correlated
    n_tokens: 4032
    pairs:                           # [old, new, cosine, correlation, confidence, status]
    - [0, 17, 0.998, 0.991, 0.995, matched]
    lost:                            # old features with no partner: [best candidate, score]
      3: [112, 0.412]
    new_features: [40]               # new features with no partner
    split: {5: [9, 12]}              # old feature -> its extra new partners
    merged: {21: [30]}               # new feature -> its extra old partners

``save_mapping`` writes it atomically (numbers at 3 significant digits), ``load_mapping``
reads it back with PyYAML's safe loader; a malformed file is one ``InvalidMapping`` line
naming the file, line and field. Reading one loads no torch (``rulecheck diff --mapping``);
``rulecheck.match`` computes the matching.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rulecheck.atomic import atomic_write
from rulecheck.config import MatchConfig
from rulecheck.core.pairs import Matching, Pair
from rulecheck.errors import InvalidMapping, InvalidSpec
from rulecheck.files import read_limited
from rulecheck.schema import Where, significant

FORMAT = 1
AUTO = "auto"  # the source that matches SAEs on the fly instead of reading mapping files
# one line a pair: an SAE of 2^17 features writes about 10 MiB; larger files are refused at once
MAX_BYTES = 64 * 2**20
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where present: same result
STATUSES = ("matched", "split", "merged")
PAIR_FIELDS = ("old", "new", "cosine", "correlation", "confidence", "status")
REQUIRED = ("rulecheck_mapping", "old", "new", "hook", "settings", "pairs", "lost", "new_features")
OPTIONAL = ("head", "fingerprints", "corpus", "n_tokens", "split", "merged")
SETTINGS = ("k", "threshold", "split_threshold")


@dataclass
class MappingHeader:
    """What was matched and how: the two SAE specs, the hook they read (``head`` for per-head
    SAEs), their fingerprints, the matching settings and, where activations were correlated,
    the corpus and the number of tokens."""

    old: str
    new: str
    hook: str
    head: int | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)
    k: int = 8
    threshold: float = 0.5
    split_threshold: float = 0.7
    corpus: str | None = None
    n_tokens: int | None = None


# ---------------------------------------------------------------------------- writing


def _scalar(value: Any) -> str:
    """One YAML scalar as ``yaml.safe_dump`` writes it (quoted where it must be)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def _number(x: float | None) -> str:
    if x is None:
        return "null"
    return _scalar(significant(float(x)))


def _ids(ids: list[int]) -> str:
    return "[" + ", ".join(str(int(i)) for i in ids) + "]"


def _groups(groups: dict[int, list[int]]) -> list[str]:
    return [f"  {int(key)}: {_ids(groups[key])}" for key in sorted(groups)]


def dump_mapping(matching: Matching, header: MappingHeader) -> str:
    """The text of a mapping file."""
    lines = [
        f"rulecheck_mapping: {FORMAT}",
        f"old: {_scalar(header.old)}",
        f"new: {_scalar(header.new)}",
        f"hook: {_scalar(header.hook)}",
    ]
    if header.head is not None:
        lines.append(f"head: {int(header.head)}")
    if header.fingerprints:
        lines.append("fingerprints:")
        lines += [
            f"  {key}: {_scalar(header.fingerprints[key])}" for key in sorted(header.fingerprints)
        ]
    lines += [
        "settings:",
        f"  k: {int(header.k)}",
        f"  threshold: {_number(header.threshold)}",
        f"  split_threshold: {_number(header.split_threshold)}",
    ]
    if header.corpus is not None:
        lines.append(f"corpus: {_scalar(header.corpus)}")
    if header.n_tokens is not None:
        lines.append(f"n_tokens: {int(header.n_tokens)}")
    lines.append("# [old, new, cosine, correlation, confidence, status]")
    lines.append("pairs:" + ("" if matching.pairs else " []"))
    for p in matching.pairs:
        values = [
            str(p.old),
            str(p.new),
            _number(p.cosine),
            _number(p.correlation),
            _number(p.confidence),
            p.status,
        ]
        lines.append(f"- [{', '.join(values)}]")
    lines.append("lost:" + ("" if matching.lost else " {}"))
    for i in matching.lost:
        best = matching.best.get(i)
        value = "null" if best is None else f"[{int(best[0])}, {_number(best[1])}]"
        lines.append(f"  {int(i)}: {value}")
    lines.append(f"new_features: {_ids(matching.new)}")
    for name, groups in (("split", matching.split), ("merged", matching.merged)):
        lines.append(f"{name}:" + ("" if groups else " {}"))
        lines += _groups(groups)
    return "\n".join(lines) + "\n"


def save_mapping(matching: Matching, path: str | Path, header: MappingHeader) -> Path:
    """Write the mapping file atomically; return its path."""
    return atomic_write(Path(path), dump_mapping(matching, header).encode())


# ---------------------------------------------------------------------------- reading


@dataclass
class _Reader:
    """Checks values read from one file, naming the file, the line and the field path."""

    file: str
    lines: dict[str, int]

    def fail(self, path: str, what: str, fix: str) -> InvalidMapping:
        line = Where(self.file, self.lines).line(path)  # the nearest enclosing field's line
        return InvalidMapping(what, file=self.file, line=line, field=path or None, fix=fix)

    def integer(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(
                path, f"expected an integer >= 0, got {value!r}", "write a whole number >= 0"
            )
        return value

    def number(self, value: Any, path: str, *, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            fix = "write a number, or null" if optional else "write a number"
            raise self.fail(path, f"expected a number, got {value!r}", fix)
        return float(value)

    def text(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a string, got {value!r}", "write the spec or name")
        return value

    def ids(self, value: Any, path: str) -> list[int]:
        if not isinstance(value, list):
            raise self.fail(
                path, f"expected a list of feature ids, got {value!r}", "write e.g. [3, 7] or []"
            )
        return [self.integer(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def lost(self, value: Any, path: str) -> tuple[list[int], dict[int, tuple[int, float]]]:
        """``lost:``: old ids with their best candidate and its score (``null``: none), or a
        plain list of old ids."""
        if isinstance(value, list):
            return self.ids(value, path), {}
        if value is None:
            return [], {}
        if not isinstance(value, dict):
            raise self.fail(
                path,
                f"expected a mapping of old feature id to [candidate, score], got {value!r}",
                "write e.g. {3: [112, 0.41]} or {}",
            )
        lost, best = [], {}
        for k, v in value.items():
            sub = f"{path}[{k!r}]"
            lost.append(self.integer(k, sub))
            if v is None:
                continue
            if not isinstance(v, list) or len(v) != 2:
                raise self.fail(
                    sub, f"expected [candidate, score], got {v!r}", "write e.g. [112, 0.41]"
                )
            best[k] = (self.integer(v[0], sub), self.number(v[1], sub))
        return sorted(lost), best  # type: ignore[return-value]

    def groups(self, value: Any, path: str) -> dict[int, list[int]]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(
                path,
                f"expected a mapping of feature id to ids, got {value!r}",
                "write e.g. {5: [9, 12]} or {}",
            )
        return {
            self.integer(k, f"{path}[{k!r}]"): self.ids(v, f"{path}[{k!r}]")
            for k, v in value.items()
        }


def _lines(node: yaml.Node) -> dict[str, int]:
    """The line (1-based) of each top-level key, pair and group of the composed document."""
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        name = str(key.value)
        lines[name] = key.start_mark.line + 1
        if isinstance(value, yaml.SequenceNode):
            for i, item in enumerate(value.value):
                lines[f"{name}[{i}]"] = item.start_mark.line + 1
        elif isinstance(value, yaml.MappingNode):
            for k, _ in value.value:
                lines[f"{name}.{k.value}"] = k.start_mark.line + 1
                if name in ("split", "merged", "lost") and str(k.value).isdigit():
                    lines[f"{name}[{int(k.value)!r}]"] = k.start_mark.line + 1
    return lines


def load_mapping(path: str | Path) -> tuple[MappingHeader, Matching]:
    """Read a mapping file written by :func:`save_mapping`; ``InvalidMapping`` on any problem."""
    path = Path(path)
    file = str(path)
    data = read_limited(
        path,
        MAX_BYTES,
        noun="mapping file",
        error=InvalidMapping,
        missing="run rulecheck match --out FILE first",
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMapping(
            f"cannot read it ({exc})", file=file, fix="pass a mapping file"
        ) from None
    try:
        node = yaml.compose(text, Loader=_LOADER)
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise InvalidMapping(
            f"not valid YAML: {problem}",
            file=file,
            line=None if mark is None else mark.line + 1,
            fix="rewrite it with rulecheck match --out",
        ) from None
    r = _Reader(file, _lines(node) if node is not None else {})
    if not isinstance(data, dict):
        raise r.fail(
            "",
            "expected a mapping with `rulecheck_mapping: 1` at the top",
            "rewrite it with rulecheck match --out",
        )
    for key in data:
        if key not in REQUIRED + OPTIONAL:
            raise r.fail(
                str(key), "unknown key", f"remove it; known keys: {', '.join(REQUIRED + OPTIONAL)}"
            )
    for key in REQUIRED:
        if key not in data:
            raise r.fail(key, f"missing required field `{key}`", f"add `{key}:`")
    if data["rulecheck_mapping"] != FORMAT or isinstance(data["rulecheck_mapping"], bool):
        raise r.fail(
            "rulecheck_mapping", f"unknown format {data['rulecheck_mapping']!r}", f"write {FORMAT}"
        )
    settings = data["settings"]
    if not isinstance(settings, dict) or set(settings) != set(SETTINGS):
        raise r.fail(
            "settings",
            f"expected a mapping with exactly {', '.join(SETTINGS)}",
            "write k, threshold and split_threshold",
        )
    k = settings["k"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise r.fail("settings.k", f"expected an integer >= 1, got {k!r}", "write the k used")
    fingerprints = data.get("fingerprints") or {}
    if not isinstance(fingerprints, dict) or not all(
        isinstance(v, str) for v in fingerprints.values()
    ):
        raise r.fail(
            "fingerprints",
            "expected a mapping of names to sha256 strings",
            "write {old: 'sha256:...', new: 'sha256:...'}",
        )
    head = data.get("head")
    n_tokens = data.get("n_tokens")
    header = MappingHeader(
        old=r.text(data["old"], "old"),
        new=r.text(data["new"], "new"),
        hook=r.text(data["hook"], "hook"),
        head=None if head is None else r.integer(head, "head"),
        fingerprints={str(key): value for key, value in fingerprints.items()},
        k=k,
        threshold=r.number(settings["threshold"], "settings.threshold"),  # type: ignore[arg-type]
        split_threshold=r.number(settings["split_threshold"], "settings.split_threshold"),  # type: ignore[arg-type]
        corpus=None if data.get("corpus") is None else r.text(data["corpus"], "corpus"),
        n_tokens=None if n_tokens is None else r.integer(n_tokens, "n_tokens"),
    )
    pairs_data = data["pairs"]
    if pairs_data is None:
        pairs_data = []
    if not isinstance(pairs_data, list):
        raise r.fail(
            "pairs",
            "expected a list of pairs",
            f"write one `- [{', '.join(PAIR_FIELDS)}]` per line",
        )
    pairs: list[Pair] = []
    seen_old: set[int] = set()
    seen_new: set[int] = set()
    for i, item in enumerate(pairs_data):
        where = f"pairs[{i}]"
        if not isinstance(item, list) or len(item) != len(PAIR_FIELDS):
            raise r.fail(
                where, f"expected [{', '.join(PAIR_FIELDS)}], got {item!r}", "write six values"
            )
        old = r.integer(item[0], f"{where}.old")
        new = r.integer(item[1], f"{where}.new")
        if old in seen_old or new in seen_new:
            which, fid = ("old", old) if old in seen_old else ("new", new)
            raise r.fail(
                f"{where}.{which}",
                f"{which} feature {fid} is in two pairs",
                "keep one pair per feature",
            )
        seen_old.add(old)
        seen_new.add(new)
        status = item[5]
        if status not in STATUSES:
            raise r.fail(
                f"{where}.status", f"unknown status {status!r}", f"use one of {', '.join(STATUSES)}"
            )
        pairs.append(
            Pair(
                old=old,
                new=new,
                cosine=r.number(item[2], f"{where}.cosine"),  # type: ignore[arg-type]
                correlation=r.number(item[3], f"{where}.correlation", optional=True),
                confidence=r.number(item[4], f"{where}.confidence"),  # type: ignore[arg-type]
                status=status,
            )
        )
    lost, best = r.lost(data["lost"], "lost")
    matching = Matching(
        pairs=pairs,
        lost=lost,
        best=best,
        new=r.ids(data["new_features"], "new_features"),
        split=r.groups(data.get("split"), "split"),
        merged=r.groups(data.get("merged"), "merged"),
    )
    return header, matching


def mapping_for(
    source: str | Path, hook: str, heads: tuple[int | None, ...], *, field: str, or_else: str = ""
) -> tuple[MappingHeader, Matching]:
    """The mapping of ``hook`` in the mapping file or directory ``source``: the first of
    ``heads`` (a head index, or None for a layer-level SAE) that one maps; every file is read
    once per modification. Errors name ``field``, the option that gave ``source``, and end
    their fix with ``or_else``."""
    path = Path(source)
    found: dict[int | None, tuple[MappingHeader, Matching]] = {}
    for header, matching in read_mappings(source, field):
        if header.hook == hook:
            found.setdefault(header.head, (header, matching))
    for head in heads:
        if head in found:
            return found[head]
    what = hook if heads[0] is None else f"{hook} head {heads[0]}"
    raise InvalidSpec(
        f"no mapping of {what} here",
        file=path,
        field=field,
        fix=f"write one with rulecheck match --old OLD --new NEW --out {path}"
        f"{'/NAME.yaml' if path.is_dir() else ''}{or_else}",
    )


def read_mappings(source: str | Path, field: str) -> list[tuple[MappingHeader, Matching]]:
    """Every mapping in the file or directory ``source`` (given by the option ``field``), each
    read and checked (once per modification): called before any work, so a bad file or a
    missing directory is an error even where no SAE changed and no mapping is needed."""
    path = Path(source)
    if not path.exists():
        raise InvalidSpec(
            "no such file or directory",
            file=path,
            field=field,
            fix="give a mapping file or a directory of them (rulecheck match --out)",
        )
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise InvalidSpec(
            "holds no mapping file (.yaml)",
            file=path,
            field=field,
            fix="write mappings into it with rulecheck match --out DIR/NAME.yaml, or give auto",
        )
    out = []
    for file in files:
        stat = file.stat()
        out.append(_read_mapping(str(file), (stat.st_mtime_ns, stat.st_size)))
    return out


@functools.lru_cache(maxsize=64)
def _read_mapping(file: str, stamp: tuple[int, int]) -> tuple[MappingHeader, Matching]:
    """``load_mapping(file)``, once for each ``stamp`` (modification time and size)."""
    return load_mapping(file)


def header_for(
    old_spec: str, new_spec: str, old: Any, new: Any, cfg: MatchConfig, fingerprint: Any
) -> MappingHeader:
    """The header of a mapping of ``old`` (loaded from ``old_spec``) to ``new``;
    ``fingerprint`` is ``rulecheck.loading.fingerprint_sae``."""
    return MappingHeader(
        old=old_spec,
        new=new_spec,
        hook=str(old.cfg.metadata.hook_name),
        head=old.cfg.metadata.hook_head_index,
        fingerprints={"old": fingerprint(old), "new": fingerprint(new)},
        k=cfg.k,
        threshold=cfg.threshold,
        split_threshold=cfg.split_threshold,
    )
