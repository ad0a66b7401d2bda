"""What the loaders share: one-line error text, JSON and safetensors readers that fail with a
RulecheckError naming the file, dtype names, and telling a path from a name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rulecheck.errors import InvalidSpec


def one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expand_path(spec: str | Path) -> Path:
    return Path(spec).expanduser()


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be a path (absolute, or starting with ``~`` or ``.``), never a
    model name, registry id or dataset name, so a missing one is reported as a missing file."""
    return spec.startswith(("~", ".")) or Path(spec).is_absolute()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidSpec("file not found", file=path, fix="check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
