"""Models run by TransformerLens's ``TransformerBridge``: a model spec ``bridge:PATH`` boots
the Hugging Face model at ``PATH`` (a ``save_pretrained`` directory with its tokenizer, or a
hub name) with ``TransformerBridge.boot_transformers`` and turns on its compatibility mode,
the weight processing ``HookedTransformer.from_pretrained`` applies (LayerNorm folded,
writing weights centred, value biases folded: the flags an input SAE records are honoured).

The prefix is part of the spec, so a rulebook extracted on a bridge records it and is checked
on a bridge again: the two load the same checkpoint into differently rounded weights.
What rulecheck reads of a bridge is in ``rulecheck.core.modelview``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import TYPE_CHECKING

import torch

from rulecheck.errors import InvalidSpec
from rulecheck.loading._common import expand_path, one_line
from rulecheck.loading.tokenizer import check_vocabulary

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

BRIDGE_PREFIX = "bridge:"


def is_bridge_spec(spec: str) -> bool:
    return spec.startswith(BRIDGE_PREFIX)


def load_bridge(spec: str, device: torch.device, **processing: bool) -> TransformerBridge:
    """The ``TransformerBridge`` of ``spec`` (``bridge:PATH``), in compatibility mode with the
    processing flags ``processing`` (``fold_ln``, ``center_writing_weights``,
    ``center_unembed``, ``fold_value_biases``), in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    target = spec.removeprefix(BRIDGE_PREFIX)
    if not target:
        raise InvalidSpec(
            "names no model",
            file=spec,
            fix="write bridge:PATH with a Hugging Face model directory (save_pretrained)",
        )
    path = expand_path(target)
    if path.exists() and not (path / "config.json").is_file():
        raise InvalidSpec(
            "not a Hugging Face model directory: no config.json",
            file=path,
            fix="pass a directory written by save_pretrained, with its tokenizer",
        )
    name = str(path) if path.exists() else target
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(name, device=str(device))
    except Exception as exc:  # transformers and TransformerLens raise many kinds
        raise InvalidSpec(
            f"TransformerBridge cannot boot it ({one_line(exc, 160)})",
            file=name,
            fix="pass a Hugging Face model directory (save_pretrained) with its tokenizer",
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge.enable_compatibility_mode(disable_warnings=True, **processing)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise InvalidSpec(
            f"TransformerBridge has no compatibility mode for it ({one_line(exc, 160)})",
            file=name,
            fix="load it as a HookedTransformer (the directory without 'bridge:')",
        ) from None
    bridge.eval()
    tokenizer = bridge.tokenizer
    if tokenizer is None:
        raise InvalidSpec(
            "TransformerBridge booted no tokenizer",
            file=name,
            field="tokenizer",
            fix="save the tokenizer beside the model (tokenizer.save_pretrained(directory))",
        )
    check_vocabulary(tokenizer, bridge.cfg.d_vocab, file=name)
    return bridge
