"""What the loaders share: one-line error text, JSON and safetensors readers that fail with a
RulecheckError naming the file, dtype names, telling a path from a name, and the checks of
config fields and state dicts that run before a library builds anything."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rulecheck.errors import InvalidSpec
from rulecheck.files import read_limited

MODEL_CONFIG = "config.json"  # a model directory's config (rulecheck or Hugging Face)
SAE_CONFIG = "cfg.json"  # a sae_lens directory's config

# TransformerLens 3 says on every HookedTransformer it builds that the class is deprecated:
# rulecheck's models are HookedTransformers, a choice its users cannot act on
MODEL_DEPRECATED = (DeprecationWarning, r"HookedTransformer(\.from_pretrained)? is deprecated")
# sae_lens asks whoever builds an SAE whose config has model_from_pretrained_kwargs to load the
# model with them: rulecheck does (specs.processing_for), so the advice is not for its users
SAE_MODEL_KWARGS = (UserWarning, r"\s*This SAE has non-empty model_from_pretrained_kwargs")


@contextmanager
def without_warning(notice: tuple[type[Warning], str]) -> Iterator[None]:
    """Inside, the one warning ``notice`` (its category and the start of its message, a
    regular expression) is not shown; every other warning is, as outside."""
    category, message = notice
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=category)
        yield


def one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expand_path(spec: str | Path) -> Path:
    return Path(spec).expanduser()


def check_finite(module: torch.nn.Module, spec: str, what: str) -> None:
    """``InvalidSpec`` naming ``spec`` and the first parameter of ``module`` holding a NaN or an
    infinity: such a weight makes activations NaN, which would otherwise be reported as a
    feature never active, far from its cause."""
    for name, param in module.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise InvalidSpec(
                f"{what} weight {name} holds NaN or infinite values",
                file=spec,
                field=name,
                fix="retrain or save it again: every weight must be finite (a diverged "
                "training run or a damaged file writes NaN)",
            )


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be a path (absolute, or starting with ``~`` or ``.``), never a
    model name, registry id or dataset name, so a missing one is reported as a missing file."""
    return spec.startswith(("~", ".")) or Path(spec).is_absolute()


MAX_JSON_BYTES = 64 * 2**20  # settings files (config.json, cfg.json): kilobytes


def _read_json(path: Path) -> Any:
    data = read_limited(path, MAX_JSON_BYTES, noun="JSON settings file")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidSpec(
            f"not readable JSON ({one_line(exc)})", file=path, fix="rewrite the file as JSON"
        ) from None


def read_json_object(path: Path) -> dict[str, Any]:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise InvalidSpec(
            f"expected a JSON object, found {type(raw).__name__}",
            file=path,
            fix="write the settings as one JSON object",
        )
    return raw


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InvalidSpec("file not found", file=path, fix="check the path")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidSpec(
            f"not a readable safetensors file ({one_line(exc)})",
            file=path,
            fix="write it again with safetensors.torch.save_file",
        ) from None


def parse_dtype(value: Any, *, file: Path | str, field: str = "dtype") -> torch.dtype:
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidSpec(
            f"{value!r} is not a torch dtype",
            file=file,
            field=field,
            fix='use a name such as "float32" or "bfloat16"',
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# config fields and state dicts, checked before a library builds anything from them

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class FieldRules:
    """How the fields of a JSON config are checked: ``hints`` gives each known field's type (the
    type hints of the dataclass the library builds), the tables add what a type cannot say."""

    hints: Mapping[str, Any]
    required: tuple[str, ...] = ()
    minimums: Mapping[str, int] = field(default_factory=dict)  # integer fields, least value
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # the allowed values
    derive: Mapping[str, str] = field(default_factory=dict)  # field: what -1 derives it from


def dataclass_hints(cls: type) -> dict[str, Any]:
    """The type hints of the fields a dataclass takes as keyword arguments."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def json_text(value: Any, limit: int = 60) -> str:
    """``value`` as it is written in JSON (strings quoted, null, true), cut to ``limit``."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(name: str) -> str:
    """A name read from a file, quoted and escaped where printing it as is could break the line."""
    return name if name.isprintable() else json_text(name)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, inner) for inner in typing.get_args(hint))
    if origin is typing.Literal:
        return isinstance(value, str) and value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, torch.dtype):
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # a type JSON cannot spell is left to the library


def _describe(hint: Any, minimum: int | None = None) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = typing.get_args(hint)
        if float in inner:  # a number already takes integers
            inner = tuple(h for h in inner if h is not int)
        return " or ".join(dict.fromkeys(_describe(h, minimum) for h in inner))
    if origin is typing.Literal:
        return "one of " + ", ".join(json_text(v) for v in typing.get_args(hint))
    if hint is int and minimum is not None:
        return f"an integer >= {minimum}"
    names = {
        type(None): "null",
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        torch.dtype: "a dtype name",
        list: "a list",
        dict: "an object",
    }
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _expected(name: str, rules: FieldRules) -> str:
    """What ``name`` may be set to, in words."""
    if name in rules.choices:
        return "one of " + ", ".join(json_text(c) for c in rules.choices[name])
    text = _describe(rules.hints.get(name, Any), rules.minimums.get(name))
    if name in rules.derive:
        text += f", or -1 to derive it from {rules.derive[name]}"
    return text


def _problem(name: str, value: Any, rules: FieldRules) -> tuple[str, str] | None:
    """What is wrong with ``value`` for field ``name`` and what it may be, or None."""
    expected = _expected(name, rules)
    if name in rules.choices:
        if any(value == c and type(value) is type(c) for c in rules.choices[name]):
            return None
        return f"unknown value {json_text(value)}", expected
    hint = rules.hints.get(name, Any)
    if not _matches(value, hint):
        return f"expected {_describe(hint)}, found {json_text(value)}", expected
    minimum = rules.minimums.get(name)
    if minimum is None or not isinstance(value, int) or isinstance(value, bool):
        return None
    if value < minimum and not (name in rules.derive and value == -1):
        return f"expected an integer >= {minimum}, found {value}", expected
    if value > INT64_MAX:
        return f"expected an integer < 2**63, found {value}", f"an integer in {minimum}..2**63-1"
    return None


def check_fields(
    raw: Mapping[str, Any], rules: FieldRules, *, file: Path | str, prefix: str = ""
) -> None:
    """Raise InvalidSpec for the first field of ``raw`` that is missing, of the wrong type, out
    of range or not one of its choices (``prefix`` is put before field names in the error)."""
    for name in rules.required:
        if name not in raw:
            raise InvalidSpec(
                "missing",
                file=file,
                field=prefix + name,
                fix=f"add {prefix + name} ({_expected(name, rules)})",
            )
    for name, value in raw.items():
        problem = _problem(name, value, rules)
        if problem is not None:
            what, expected = problem
            where = prefix + name
            raise InvalidSpec(what, file=file, field=where, fix=f"set {where} to {expected}")


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    file: Path,
    fix: str,
    derived: Collection[str] = (),
) -> None:
    """Keys and shapes of ``state`` against ``expected``: the first missing and unexpected keys
    named in one line. Keys in ``derived`` (computed from the config) may be absent, and are not
    compared."""
    missing = sorted(set(expected) - set(state) - set(derived))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        for word, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
                parts.append(f"{word} {shown(keys[0])}{more}")
        raise InvalidSpec(
            f"weights do not match the config: {'; '.join(parts)}",
            file=file,
            field="state_dict",
            fix=fix,
        )
    for name, tensor in state.items():
        if name not in derived and tuple(tensor.shape) != tuple(expected[name].shape):
            raise InvalidSpec(
                f"shape {list(tensor.shape)}, expected {list(expected[name].shape)}",
                file=file,
                field=shown(name),
                fix=fix,
            )
