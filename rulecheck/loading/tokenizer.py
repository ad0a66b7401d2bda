"""Tokenizers that come with a model: a ``tokenizer.json`` read into a Hugging Face fast
tokenizer with its special tokens found by name, and attached to a HookedTransformer."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rulecheck.atomic import atomic_directory
from rulecheck.errors import InvalidSpec
from rulecheck.loading._common import one_line, read_json_object
from rulecheck.paths import cache_dir

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

BOS_NAMES = ("<|endoftext|>", "<|bos|>", "<bos>", "<s>", "[BOS]", "<|begin_of_text|>")
EOS_NAMES = ("<|endoftext|>", "<|eos|>", "<eos>", "</s>", "[EOS]", "<|end_of_text|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


def _special_token_roles(raw: Mapping[str, Any], *, file: Path) -> dict[str, str]:
    """BOS/EOS/PAD/UNK token strings of a ``tokenizers`` JSON file.

    BOS is the special token the post-processor puts first, else a conventional name, else the
    only special token there is.
    """
    specials = [t["content"] for t in raw.get("added_tokens") or [] if t.get("special")]
    bos = _template_bos(raw.get("post_processor")) or next(
        (name for name in BOS_NAMES if name in specials), None
    )
    if bos is None and len(specials) == 1:
        bos = specials[0]
    if bos is None:
        raise InvalidSpec(
            f"cannot tell which special token is BOS (special tokens: {specials or 'none'})",
            file=file,
            field="added_tokens",
            fix=f"add one of {', '.join(BOS_NAMES[:4])} as a special token",
        )
    eos = next((name for name in EOS_NAMES if name in specials), bos)
    roles = {
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": next((name for name in PAD_NAMES if name in specials), eos),
    }
    unk = (raw.get("model") or {}).get("unk_token")
    if isinstance(unk, str):
        roles["unk_token"] = unk
    return roles


def _template_bos(post_processor: Any) -> str | None:
    if not isinstance(post_processor, dict):
        return None
    if post_processor.get("type") == "Sequence":
        for inner in post_processor.get("processors") or []:
            found = _template_bos(inner)
            if found:
                return found
        return None
    if post_processor.get("type") != "TemplateProcessing":
        return None
    single = post_processor.get("single") or []
    first = single[0] if single else {}
    return (first.get("SpecialToken") or {}).get("id")


def tokenizer_from_file(path: Path) -> PreTrainedTokenizerBase:
    """A transformers tokenizer from a ``tokenizers`` JSON file.

    TransformerLens rebuilds tokenizers from ``name_or_path``, so the tokenizer is saved once to
    a cache directory (keyed by content) and loaded from there.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = read_json_object(path)
    roles = _special_token_roles(raw, file=path)
    digest = hashlib.sha256(path.read_bytes() + json.dumps(roles, sort_keys=True).encode())
    saved = cache_dir() / "tokenizers" / digest.hexdigest()[:24]
    if not (saved / "tokenizer_config.json").is_file():
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise InvalidSpec(
                f"not a readable tokenizers file ({one_line(exc)})",
                file=path,
                fix="write it with tokenizers.Tokenizer.save",
            ) from None
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
        with atomic_directory(saved, replace=False) as staging:
            fast.save_pretrained(str(staging))
    return AutoTokenizer.from_pretrained(str(saved))


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, d_vocab: int, *, file: Path | str) -> None:
    """Every token id of ``tokenizer`` is below the model's ``d_vocab``."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= d_vocab:
        raise InvalidSpec(
            f"tokenizer has token id {largest} but the model has d_vocab={d_vocab}",
            file=file,
            field="d_vocab",
            fix="use the tokenizer the model was trained with",
        )


def attach_tokenizer(
    model: HookedTransformer, tokenizer: PreTrainedTokenizerBase, *, file: Path
) -> None:
    """Set the tokenizer and check that it tokenizes into the model's vocabulary."""
    check_vocabulary(tokenizer, model.cfg.d_vocab, file=file)
    try:
        model.set_tokenizer(tokenizer)
        tokens = model.to_tokens("hello")
    except Exception as exc:
        raise InvalidSpec(
            f"tokenizer does not work with the model ({one_line(exc)})",
            file=file,
            field="tokenizer",
            fix="use a Hugging Face fast tokenizer with a BOS token",
        ) from None
    if tokens.ndim != 2 or tokens.shape[1] == 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise InvalidSpec(
            f"tokenizing 'hello' gave {tokens.tolist()}, outside d_vocab={model.cfg.d_vocab}",
            file=file,
            field="tokenizer",
            fix="use the tokenizer the model was trained with",
        )
