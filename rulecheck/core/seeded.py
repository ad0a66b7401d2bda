"""Seeded pseudo-random keys: every random draw of the protocol, reproducible anywhere."""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (murmur3 finaliser) of an int64 tensor, as int64 in [0, 2**32)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x85EBCA6B) & _MASK32
    x = ((x ^ (x >> 13)) * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def seeded_keys(seed: int, seq: Tensor, feature: Tensor, salt: int = 0) -> Tensor:
    """Deterministic pseudo-random keys in [0, 2**32) for (sequence, feature) pairs."""
    base = mix32(torch.as_tensor(seed * 0x9E3779B1 + salt, dtype=torch.int64))
    return mix32(mix32(seq * 0x27D4EB2F + base) ^ (feature * 0x165667B1))
