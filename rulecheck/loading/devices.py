"""Devices: ``auto`` and device names, checked against what this machine has."""

from __future__ import annotations

import torch

from rulecheck.errors import InvalidSpec


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is cuda when available, else cpu; any other name must be a usable torch device."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise InvalidSpec(
                f"{device!r} is not a device name",
                field="device",
                fix='use "auto", "cpu", "cuda" or "cuda:N"',
            ) from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if resolved.type in available and not available[resolved.type]:
        raise InvalidSpec(
            f"{device!s} requested but {resolved.type} is not available on this machine",
            field="device",
            fix='use "cpu" or "auto"',
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InvalidSpec(
            f"{device!s} requested but this machine has {torch.cuda.device_count()} CUDA devices",
            field="device",
            fix='use "cuda" (the first) or "auto"',
        )
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InvalidSpec(
            f"unsupported device type {resolved.type!r}",
            field="device",
            fix='use "auto", "cpu" or "cuda"',
        )
    return resolved


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
