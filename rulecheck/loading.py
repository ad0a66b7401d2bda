"""Specs in, objects out: models, SAEs and corpora, each failure a one-line RulecheckError.

Specs are paths and names; zoo specs (``planted``, ``rulecheck-tiny:eval``) are turned into
paths by ``rulecheck.specs.locate`` before they get here.

Model specs: a rulecheck model directory (``config.json`` with the
``HookedTransformerConfig`` keyword arguments, ``model.safetensors``, optional
``tokenizer.json``), a Hugging Face model directory, or a TransformerLens model name (``gpt2``).

SAE specs (``{layer}`` and ``{head}`` are filled in first): a sae_lens directory
(``cfg.json``, ``sae_weights.safetensors``), a sae_lens registry id ``release:sae_id``, or the
attention-output-SAE format ``NAME_cfg.json`` + ``NAME.pt``. Input SAEs read
``blocks.{layer}.hook_resid_pre``; output SAEs read ``blocks.{layer}.attn.hook_z``, one head
(``hook_head_index``) or all heads concatenated.

Corpus specs: ``.npy`` token ids ``[n_seq, seq_len]`` with BOS in column 0, ``.txt`` (one
document a line), ``.jsonl`` (``{"text": ...}`` a line) or a Hugging Face dataset name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rulecheck.atomic import atomic_directory
from rulecheck.errors import RulecheckError
from rulecheck.paths import cache_dir

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerBase

MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_TOKENIZER = "tokenizer.json"
SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
PAPER_CONFIG_SUFFIX = "_cfg.json"
PAPER_WEIGHTS_SUFFIX = ".pt"
PAPER_WEIGHT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
PAPER_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
STREAMED_SEQUENCES = 1024
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Hugging Face config attributes that TransformerLens still reads under an older name.
HF_LEGACY_KEYS = {"gpt2": {"n_ctx": "n_positions"}}
# HookedTransformerConfig fields that describe a run, not the weights: never written.
UNSAVED_CONFIG_FIELDS = frozenset(
    {
        "device",
        "n_devices",
        "n_params",
        "seed",
        "init_weights",
        "tokenizer_name",
        "tokenizer_prepends_bos",
        "trust_remote_code",
        "load_in_4bit",
        "quantization_method",
        "from_checkpoint",
        "checkpoint_index",
        "checkpoint_label_type",
        "checkpoint_value",
    }
)
BOS_NAMES = ("<|endoftext|>", "<|bos|>", "<bos>", "<s>", "[BOS]", "<|begin_of_text|>")
EOS_NAMES = ("<|endoftext|>", "<|eos|>", "<eos>", "</s>", "[EOS]", "<|end_of_text|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path(spec: str | Path) -> Path:
    return Path(spec).expanduser()


def _looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be a path (absolute, or starting with ``~`` or ``.``), never a
    model name, registry id or dataset name, so a missing one is reported as a missing file."""
    return spec.startswith(("~", ".")) or Path(spec).is_absolute()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RulecheckError("file not found", file=path, fix="check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RulecheckError(
            f"not readable JSON ({_one_line(exc)})", file=path, fix="rewrite the file as JSON"
        ) from None


def _read_json_object(path: Path) -> dict[str, Any]:
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise RulecheckError(
            f"expected a JSON object, found {type(raw).__name__}",
            file=path,
            fix="write the settings as one JSON object",
        )
    return raw


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise RulecheckError("file not found", file=path, fix="check the path")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RulecheckError(
            f"not a readable safetensors file ({_one_line(exc)})",
            file=path,
            fix="write it again with safetensors.torch.save_file",
        ) from None


def _parse_dtype(value: Any, *, file: Path | str, field: str = "dtype") -> torch.dtype:
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise RulecheckError(
            f"{value!r} is not a torch dtype",
            file=file,
            field=field,
            fix='use a name such as "float32" or "bfloat16"',
        )
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fill_template(spec: str, *, layer: int | None, head: int | None) -> str:
    for name, value in (("layer", layer), ("head", head)):
        token = "{" + name + "}"
        if token not in spec:
            continue
        if value is None:
            raise RulecheckError(
                f"the spec contains {token} but no {name} was given",
                file=spec,
                field=name,
                fix=f"pass {name}=... or write the number into the spec",
            )
        spec = spec.replace(token, str(value))
    return spec


# ---------------------------------------------------------------------------------------------
# devices


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
            raise RulecheckError(
                f"{device!r} is not a device name",
                field="device",
                fix='use "auto", "cpu", "cuda" or "cuda:N"',
            ) from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
    if resolved.type in available and not available[resolved.type]:
        raise RulecheckError(
            f"{device!s} requested but {resolved.type} is not available on this machine",
            field="device",
            fix='use "cpu" or "auto"',
        )
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise RulecheckError(
            f"unsupported device type {resolved.type!r}",
            field="device",
            fix='use "auto", "cpu" or "cuda"',
        )
    return resolved


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# ---------------------------------------------------------------------------------------------
# tokenizers


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
        raise RulecheckError(
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


def _tokenizer_from_file(path: Path) -> PreTrainedTokenizerBase:
    """A transformers tokenizer from a ``tokenizers`` JSON file.

    TransformerLens rebuilds tokenizers from ``name_or_path``, so the tokenizer is saved once to
    a cache directory (keyed by content) and loaded from there.
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = _read_json_object(path)
    roles = _special_token_roles(raw, file=path)
    digest = hashlib.sha256(path.read_bytes() + json.dumps(roles, sort_keys=True).encode())
    saved = cache_dir() / "tokenizers" / digest.hexdigest()[:24]
    if not (saved / "tokenizer_config.json").is_file():
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise RulecheckError(
                f"not a readable tokenizers file ({_one_line(exc)})",
                file=path,
                fix="write it with tokenizers.Tokenizer.save",
            ) from None
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
        with atomic_directory(saved, replace=False) as staging:
            fast.save_pretrained(str(staging))
    return AutoTokenizer.from_pretrained(str(saved))


def _attach_tokenizer(
    model: HookedTransformer, tokenizer: PreTrainedTokenizerBase, *, file: Path
) -> None:
    """Set the tokenizer and check that it tokenizes into the model's vocabulary."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= model.cfg.d_vocab:
        raise RulecheckError(
            f"tokenizer has token id {largest} but the model has d_vocab={model.cfg.d_vocab}",
            file=file,
            field="d_vocab",
            fix="use the tokenizer the model was trained with",
        )
    try:
        model.set_tokenizer(tokenizer)
        tokens = model.to_tokens("hello")
    except Exception as exc:
        raise RulecheckError(
            f"tokenizer does not work with the model ({_one_line(exc)})",
            file=file,
            field="tokenizer",
            fix="use a Hugging Face fast tokenizer with a BOS token",
        ) from None
    if tokens.ndim != 2 or tokens.shape[1] == 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise RulecheckError(
            f"tokenizing 'hello' gave {tokens.tolist()}, outside d_vocab={model.cfg.d_vocab}",
            file=file,
            field="tokenizer",
            fix="use the tokenizer the model was trained with",
        )


# ---------------------------------------------------------------------------------------------
# models


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
) -> HookedTransformer:
    """A HookedTransformer from a rulecheck or Hugging Face directory, or a TL name.

    The processing flags apply to Hugging Face directories and TL names (as in
    ``HookedTransformer.from_pretrained``); a rulecheck directory is loaded as saved.
    """
    resolved = resolve_device(device)
    processing = {
        "fold_ln": fold_ln,
        "center_writing_weights": center_writing_weights,
        "center_unembed": center_unembed,
        "fold_value_biases": fold_value_biases,
    }
    path = _path(spec)
    if path.is_dir():
        config_path = path / MODEL_CONFIG
        if not config_path.is_file():
            raise RulecheckError(
                f"not a model directory: no {MODEL_CONFIG}",
                file=path,
                fix=f"pass a directory with {MODEL_CONFIG} and {MODEL_WEIGHTS}",
            )
        if "model_type" in _read_json_object(config_path):
            return _load_hf_directory(path, resolved, **processing)
        return _load_rulecheck_directory(path, resolved)
    if path.exists():
        raise RulecheckError(
            "not a model directory",
            file=path,
            fix=f"pass a directory with {MODEL_CONFIG} and {MODEL_WEIGHTS}",
        )
    return _load_named_model(spec, resolved, **processing)


def _model_config(path: Path, device: torch.device) -> HookedTransformerConfig:
    from transformer_lens import HookedTransformerConfig

    raw = _read_json_object(path)
    known = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RulecheckError(
            f"not a HookedTransformerConfig field: {', '.join(unknown)}",
            file=path,
            field=unknown[0],
            fix="remove it; config.json holds HookedTransformerConfig keyword arguments",
        )
    kwargs = dict(raw)
    if "dtype" in kwargs:
        kwargs["dtype"] = _parse_dtype(kwargs["dtype"], file=path)
    kwargs.update(device=str(device), n_devices=1, init_weights=False)
    try:
        return HookedTransformerConfig(**kwargs)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise RulecheckError(
            f"invalid model config ({_one_line(exc)})",
            file=path,
            fix="write config.json with save_model or fix the named value",
        ) from None


def _check_state_dict_keys(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *, file: Path
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + ("..." if len(missing) > 3 else ""))
        if unexpected:
            more = "..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {', '.join(unexpected[:3])}{more}")
        raise RulecheckError(
            f"weights do not match the config: {'; '.join(parts)}",
            file=file,
            field="state_dict",
            fix="save the weights and config.json together with save_model",
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise RulecheckError(
                f"shape {list(tensor.shape)}, expected {list(expected[name].shape)}",
                file=file,
                field=name,
                fix="save the weights and config.json together with save_model",
            )


def _load_rulecheck_directory(directory: Path, device: torch.device) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    cfg = _model_config(directory / MODEL_CONFIG, device)
    state = _read_safetensors(directory / MODEL_WEIGHTS)
    tokenizer_path = directory / MODEL_TOKENIZER
    tokenizer = _tokenizer_from_file(tokenizer_path) if tokenizer_path.is_file() else None
    if tokenizer is not None:
        cfg.tokenizer_name = None
    try:
        model = HookedTransformer(cfg)
    except (OSError, ValueError) as exc:
        raise RulecheckError(
            f"cannot build the model ({_one_line(exc)})",
            file=directory / MODEL_CONFIG,
            fix=f"remove tokenizer_name and add {MODEL_TOKENIZER} to the directory",
        ) from None
    _check_state_dict_keys(state, model.state_dict(), file=directory / MODEL_WEIGHTS)
    model.load_state_dict(state, strict=True)
    model.eval()
    if tokenizer is not None:
        _attach_tokenizer(model, tokenizer, file=tokenizer_path)
    return model


@contextlib.contextmanager
def _hf_config_view(directory: Path) -> Iterator[Path]:
    """A directory holding only the model's config.json, with the keys TransformerLens reads.

    It also keeps TransformerLens from guessing the architecture from words in the path.
    """
    raw = _read_json_object(directory / MODEL_CONFIG)
    for legacy, current in HF_LEGACY_KEYS.get(raw.get("model_type", ""), {}).items():
        if legacy not in raw and current in raw:
            raw[legacy] = raw[current]
    with tempfile.TemporaryDirectory(prefix="rulecheck-hf-config-") as view:
        (Path(view) / MODEL_CONFIG).write_text(json.dumps(raw), encoding="utf-8")
        yield Path(view)


def _effective_processing(cfg: HookedTransformerConfig, flags: dict[str, bool]) -> dict[str, bool]:
    """The processing ``HookedTransformer.from_pretrained`` would apply to this architecture."""
    from transformer_lens.utilities import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    flags = dict(flags)
    shortformer = cfg.positional_embedding_type == "shortformer"
    if shortformer or cfg.original_architecture in POST_NORM_ARCHITECTURES:
        flags["fold_ln"] = flags["center_writing_weights"] = False
    if shortformer or softcap_enabled(cfg.output_logits_soft_cap):
        flags["center_unembed"] = False
    return flags


def _load_hf_directory(
    directory: Path, device: torch.device, **processing: bool
) -> HookedTransformer:
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = next((directory / n for n in HF_WEIGHT_FILES if (directory / n).is_file()), directory)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise RulecheckError(
            f"cannot load the Hugging Face model ({_one_line(exc)})",
            file=weights,
            fix="save it again with model.save_pretrained(directory)",
        ) from None
    try:
        with _hf_config_view(directory) as view:
            cfg = tl_loading.get_pretrained_model_config(
                str(view),
                hf_cfg=hf_model.config.to_dict(),
                fold_ln=processing["fold_ln"],
                device=str(device),
                dtype=torch.float32,
            )
        cfg.model_name = directory.name
        cfg.tokenizer_name = None
        state = tl_loading.get_pretrained_state_dict(str(directory), cfg, hf_model)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        NotImplementedError,
    ) as exc:
        raise RulecheckError(
            f"TransformerLens cannot convert this model ({_one_line(exc)})",
            file=directory / MODEL_CONFIG,
            field="architectures",
            fix="use an architecture TransformerLens supports, or save a rulecheck directory",
        ) from None
    model = HookedTransformer(cfg, move_to_device=False)
    try:
        model.load_and_process_state_dict(state, **_effective_processing(cfg, processing))
    except (RuntimeError, KeyError) as exc:
        raise RulecheckError(
            f"converted weights do not fit the converted config ({_one_line(exc)})",
            file=weights,
            field="state_dict",
            fix="save the model as a rulecheck directory with save_model",
        ) from None
    model.move_model_modules_to_device()
    model.eval()
    if any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as exc:
            raise RulecheckError(
                f"cannot load the tokenizer ({_one_line(exc)})",
                file=directory,
                field="tokenizer",
                fix="save it with tokenizer.save_pretrained(directory)",
            ) from None
        _attach_tokenizer(model, tokenizer, file=directory)
    return model


def _load_named_model(spec: str, device: torch.device, **processing: bool) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    if not _is_model_name(spec):
        raise RulecheckError(
            "no such file or directory, and not a TransformerLens model name",
            file=spec,
            fix="pass a model directory, a zoo name (planted, rulecheck-tiny) or a name like gpt2",
        )
    try:
        return HookedTransformer.from_pretrained(spec, device=str(device), **processing)
    except OSError as exc:
        raise RulecheckError(
            f"cannot download the model from the Hugging Face hub ({_one_line(exc, 120)})",
            file=spec,
            fix="pass a local model directory (rulecheck or Hugging Face format) or a zoo name",
        ) from None


def _is_model_name(spec: str) -> bool:
    """Whether TransformerLens knows ``spec`` as a model name or alias (a local lookup)."""
    import transformer_lens.loading_from_pretrained as tl_loading

    if _looks_like_path(spec):
        return False
    try:
        tl_loading.get_official_model_name(spec)
    except ValueError:
        return False
    return True


def _config_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The HookedTransformerConfig keyword arguments that rebuild ``cfg``, as JSON values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.init and f.name not in UNSAVED_CONFIG_FIELDS:
            out[f.name] = _json_value(getattr(cfg, f.name), field=f.name)
    return out


def _json_value(value: Any, *, field: str) -> Any:
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v, field=field) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v, field=field) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise RulecheckError(
        f"cannot write {type(value).__name__} to JSON",
        field=field,
        fix="set the config field to a JSON value",
    )


def save_model(model: HookedTransformer, directory: Path) -> Path:
    """Write ``model`` as a rulecheck model directory (atomically); return the directory."""
    directory = _path(directory)
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and not hasattr(tokenizer, "backend_tokenizer"):
        raise RulecheckError(
            f"cannot save a slow tokenizer ({type(tokenizer).__name__})",
            file=directory,
            field="tokenizer",
            fix="attach a fast tokenizer (use_fast=True) before saving",
        )
    with atomic_directory(directory) as staging:
        (staging / MODEL_CONFIG).write_text(
            json.dumps(_config_json(model.cfg), indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
        save_file(state, str(staging / MODEL_WEIGHTS))
        if tokenizer is not None:
            tokenizer.backend_tokenizer.save(str(staging / MODEL_TOKENIZER))
    return directory


# ---------------------------------------------------------------------------------------------
# SAEs


def load_sae(
    spec: str,
    *,
    layer: int | None = None,
    head: int | None = None,
    device: str | torch.device = "cpu",
) -> SAE:
    """A sae_lens SAE from a sae_lens directory, registry id or paper-format files."""
    resolved = resolve_device(device)
    spec = _fill_template(spec, layer=layer, head=head)
    path = _path(spec)
    if path.is_dir():
        return _load_sae_directory(path, resolved)
    paper = _paper_files(path)
    if paper is not None:
        return _load_paper_sae(*paper, device=resolved)
    if ":" in spec and not _looks_like_path(spec):
        return _load_registry_sae(spec, resolved)
    raise RulecheckError(
        "no such file or directory",
        file=path,
        fix=(
            f"pass a sae_lens directory ({SAE_CONFIG}, {SAE_WEIGHTS}), NAME{PAPER_CONFIG_SUFFIX}"
            f" + NAME{PAPER_WEIGHTS_SUFFIX}, or a sae_lens id release:sae_id"
        ),
    )


def _load_sae_directory(directory: Path, device: torch.device) -> SAE:
    from sae_lens import SAE

    config_path, weights_path = directory / SAE_CONFIG, directory / SAE_WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise RulecheckError(
                f"not a sae_lens directory: no {needed.name}",
                file=directory,
                fix="save the SAE with sae.save_model(directory)",
            )
    _read_json_object(config_path)
    _read_safetensors(weights_path)
    try:
        return SAE.load_from_disk(str(directory), device=str(device))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RulecheckError(
            f"cannot build the SAE ({_one_line(exc)})",
            file=config_path,
            fix="save the SAE with sae.save_model(directory)",
        ) from None


def _paper_files(path: Path) -> tuple[Path, Path] | None:
    """``(NAME_cfg.json, NAME.pt)`` when ``path`` names either file or their common stem."""
    text = str(path)
    if text.endswith(PAPER_CONFIG_SUFFIX):
        text = text[: -len(PAPER_CONFIG_SUFFIX)]
    elif text.endswith(PAPER_WEIGHTS_SUFFIX):
        text = text[: -len(PAPER_WEIGHTS_SUFFIX)]
    config_path = Path(text + PAPER_CONFIG_SUFFIX)
    weights_path = Path(text + PAPER_WEIGHTS_SUFFIX)
    if not (config_path.is_file() or weights_path.is_file()):
        return None
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise RulecheckError(
                "file not found (the SAE format needs NAME_cfg.json and NAME.pt side by side)",
                file=needed,
                fix=f"put {config_path.name} and {weights_path.name} in the same directory",
            )
    return config_path, weights_path


def _paper_int(cfg: Mapping[str, Any], key: str, *, file: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RulecheckError(
            f"expected a positive integer, found {value!r}",
            file=file,
            field=key,
            fix=f"set {key} in the config",
        )
    return value


def _paper_sae_config(cfg: Mapping[str, Any], *, file: Path, device: torch.device) -> Any:
    """The sae_lens config of an attention-output SAE config (``act_size``, ``dict_size``...)."""
    from sae_lens import StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in = _paper_int(cfg, "act_size", file=file)
    if "dict_size" in cfg:
        d_sae = _paper_int(cfg, "dict_size", file=file)
    else:
        d_sae = d_in * _paper_int(cfg, "dict_mult", file=file)
    hook_name = cfg.get("act_name")
    if hook_name is None and isinstance(cfg.get("layer"), int):
        hook_name = f"blocks.{cfg['layer']}.attn.hook_{cfg.get('site', 'z')}"
    if not isinstance(hook_name, str):
        raise RulecheckError(
            "no hook: neither act_name nor layer is set",
            file=file,
            field="act_name",
            fix='set act_name, e.g. "blocks.0.attn.hook_z"',
        )
    head = cfg.get("head")
    per_head = bool(cfg.get("per_head", False)) or (
        isinstance(head, int) and not isinstance(head, bool) and not cfg.get("concat_heads")
    )
    if per_head and (isinstance(head, bool) or not isinstance(head, int)):
        raise RulecheckError(
            f"per-head SAE without an integer head (found {head!r})",
            file=file,
            field="head",
            fix="set head to the head index",
        )
    layer_level_z = not per_head and hook_name.endswith("hook_z")
    return StandardSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        dtype=PAPER_DTYPES.get(str(cfg.get("enc_dtype", "fp32")), "float32"),
        device=str(device),
        apply_b_dec_to_input=True,
        reshape_activations="hook_z" if layer_level_z else "none",
        metadata=SAEMetadata(
            hook_name=hook_name,
            hook_head_index=head if per_head else None,
            model_name=cfg.get("model_name"),
        ),
    )


def _read_paper_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RulecheckError(
            f"not a readable weights file ({_one_line(exc)})",
            file=path,
            fix="save the state dict with torch.save(sae.state_dict(), path)",
        ) from None
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise RulecheckError(
            "expected a state dict of tensors",
            file=path,
            fix=f"save a dict with {', '.join(PAPER_WEIGHT_KEYS)}",
        )
    keys = set(raw)
    if keys != set(PAPER_WEIGHT_KEYS):
        raise RulecheckError(
            f"expected keys {', '.join(PAPER_WEIGHT_KEYS)}, found {', '.join(sorted(keys))}",
            file=path,
            field="state_dict",
            fix=f"save a dict with exactly {', '.join(PAPER_WEIGHT_KEYS)}",
        )
    return dict(raw)


def _load_paper_sae(config_path: Path, weights_path: Path, *, device: torch.device) -> SAE:
    from sae_lens import StandardSAE

    sae_cfg = _paper_sae_config(_read_json_object(config_path), file=config_path, device=device)
    weights = _read_paper_weights(weights_path)
    dtype = _parse_dtype(sae_cfg.dtype, file=config_path)
    sae_cfg.device = "meta"
    sae = StandardSAE(sae_cfg)
    sae.cfg.device = str(device)
    expected = {
        "W_enc": (sae_cfg.d_in, sae_cfg.d_sae),
        "W_dec": (sae_cfg.d_sae, sae_cfg.d_in),
        "b_enc": (sae_cfg.d_sae,),
        "b_dec": (sae_cfg.d_in,),
    }
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise RulecheckError(
                f"shape {list(weights[name].shape)}, expected {list(shape)} from act_size/dict_size",
                file=weights_path,
                field=name,
                fix=f"check that {config_path.name} belongs to these weights",
            )
    sae.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    return sae.to(device=device, dtype=dtype)


def _load_registry_sae(spec: str, device: torch.device) -> SAE:
    from sae_lens import SAE

    release, _, sae_id = spec.partition(":")
    try:
        return SAE.from_pretrained(release, sae_id, device=str(device))
    except ValueError as exc:
        raise RulecheckError(
            f"not a sae_lens SAE ({_one_line(exc, 160)})",
            file=spec,
            fix="check the release and id against sae_lens's pretrained_saes.yaml",
        ) from None
    except OSError as exc:
        raise RulecheckError(
            f"cannot download the SAE from the Hugging Face hub ({_one_line(exc, 120)})",
            file=spec,
            fix="pass a local sae_lens directory or NAME_cfg.json + NAME.pt files",
        ) from None


def check_sae(
    sae: SAE,
    model: HookedTransformer,
    *,
    layer: int,
    head: int | None,
    kind: Literal["in", "out"],
    spec: str,
) -> None:
    """Check that ``sae`` reads the hook it is used at: resid_pre (``in``) or attn.hook_z (``out``).

    ``out`` SAEs are per-head (``hook_head_index`` set, ``d_in == d_head``) or layer-level
    (``d_in == n_heads * d_head``).
    """
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers:
        raise RulecheckError(
            f"layer {layer} is out of range: the model has n_layers={cfg.n_layers}"
            f" (expected 0..{cfg.n_layers - 1})",
            file=spec,
            field="layer",
            fix=f"pick a layer in 0..{cfg.n_layers - 1}",
        )
    if kind == "in":
        _check_hook(sae, f"blocks.{layer}.hook_resid_pre", spec=spec)
        _check_d_in(sae, cfg.d_model, "d_model", spec=spec)
        if sae.cfg.metadata.hook_head_index is not None:
            raise RulecheckError(
                f"an input SAE reads the whole residual stream, found hook_head_index="
                f"{sae.cfg.metadata.hook_head_index}",
                file=spec,
                field="hook_head_index",
                fix="use an SAE trained on hook_resid_pre",
            )
        return
    if kind != "out":
        raise RulecheckError(
            f"unknown SAE kind {kind!r}", file=spec, field="kind", fix='use "in" or "out"'
        )
    _check_hook(sae, f"blocks.{layer}.attn.hook_z", spec=spec)
    sae_head = sae.cfg.metadata.hook_head_index
    if sae_head is not None:
        if head is not None and head != sae_head:
            raise RulecheckError(
                f"expected head {head}, the SAE reads hook_head_index={sae_head}",
                file=spec,
                field="head",
                fix=f"load the SAE of head {head}",
            )
        _check_head(sae_head, cfg.n_heads, spec=spec, field="hook_head_index")
        _check_d_in(sae, cfg.d_head, "d_head, one head", spec=spec)
        return
    if head is not None:
        _check_head(head, cfg.n_heads, spec=spec, field="head")
    if sae.cfg.d_in == cfg.d_head and cfg.n_heads > 1:
        raise RulecheckError(
            f"d_in={sae.cfg.d_in} is one head's d_head, but the SAE has no hook_head_index",
            file=spec,
            field="hook_head_index",
            fix="set metadata.hook_head_index to the head it was trained on",
        )
    _check_d_in(sae, cfg.n_heads * cfg.d_head, "n_heads*d_head, all heads", spec=spec)


def _check_hook(sae: SAE, expected: str, *, spec: str) -> None:
    found = sae.cfg.metadata.hook_name
    if found is not None and found != expected:
        raise RulecheckError(
            f"expected {expected!r}, found {found!r}",
            file=spec,
            field="hook_name",
            fix=f"load the SAE trained on {expected}",
        )


def _check_d_in(sae: SAE, expected: int, meaning: str, *, spec: str) -> None:
    if sae.cfg.d_in != expected:
        raise RulecheckError(
            f"expected {expected} ({meaning}), found {sae.cfg.d_in}",
            file=spec,
            field="d_in",
            fix="load the SAE trained on this model and hook",
        )


def _check_head(head: int, n_heads: int, *, spec: str, field: str) -> None:
    if not 0 <= head < n_heads:
        raise RulecheckError(
            f"head {head} is out of range: the model has n_heads={n_heads}"
            f" (expected 0..{n_heads - 1})",
            file=spec,
            field=field,
            fix=f"pick a head in 0..{n_heads - 1}",
        )


# ---------------------------------------------------------------------------------------------
# corpora


def load_corpus(
    spec: str,
    *,
    tokenizer: Any = None,
    bos_token_id: int | None = None,
    seq_len: int = 64,
    d_vocab: int | None = None,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Token ids ``[n_seq, seq_len]`` (int64, BOS in column 0) from a corpus spec.

    Rows of a ``.npy`` file longer than ``seq_len`` are cut to their first ``seq_len`` tokens
    (shorter rows are kept as they are); text is tokenized without BOS, cut into
    chunks of ``seq_len - 1`` tokens within each document (a shorter tail is dropped), and BOS
    is put in front. A streamed dataset stops at ``max_sequences`` (default 1024).
    """
    if seq_len < 2:
        raise RulecheckError(
            f"seq_len={seq_len} leaves no room after BOS",
            file=spec,
            field="seq_len",
            fix="use seq_len >= 2",
        )
    path = _path(spec)
    suffix = path.suffix.lower()
    looks_like_file = (
        _looks_like_path(spec) or suffix in (".npy", ".txt", ".jsonl") or path.exists()
    )
    if looks_like_file and not path.is_file():
        raise RulecheckError(
            "file not found", file=path, fix="pass a .npy, .txt or .jsonl file or a dataset name"
        )
    if suffix == ".npy":
        tokens = _npy_tokens(path, bos_token_id=bos_token_id)[:, :seq_len]
        where: Path | str = path
    else:
        bos = _bos_id(tokenizer, bos_token_id, spec=spec)
        if suffix in (".txt", ".jsonl"):
            documents = _file_documents(path)
        elif looks_like_file:
            raise RulecheckError(
                f"unknown corpus format {suffix or '(no suffix)'}",
                file=path,
                fix="use .npy (token ids), .txt (one document a line) or .jsonl",
            )
        else:
            documents = _dataset_documents(spec)
            max_sequences = STREAMED_SEQUENCES if max_sequences is None else max_sequences
        tokens = _chunk_documents(documents, tokenizer, bos, seq_len, max_sequences, spec=spec)
        where = path if looks_like_file else spec
    if max_sequences is not None:
        tokens = tokens[:max_sequences]
    _check_tokens(tokens, where=where, d_vocab=d_vocab)
    return tokens


def _npy_tokens(path: Path, *, bos_token_id: int | None) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise RulecheckError(
            f"not a readable .npy file ({_one_line(exc)})",
            file=path,
            fix="save an integer array with numpy.save",
        ) from None
    if not np.issubdtype(array.dtype, np.integer):
        raise RulecheckError(
            f"expected integer token ids, found {array.dtype}",
            file=path,
            field="dtype",
            fix="save token ids as an integer array, e.g. array.astype(np.int64)",
        )
    if array.ndim != 2:
        raise RulecheckError(
            f"expected shape [n_seq, seq_len], found {list(array.shape)}",
            file=path,
            field="shape",
            fix="save a 2-d array, one sequence a row",
        )
    tokens = torch.from_numpy(array.astype(np.int64, copy=False))
    if bos_token_id is not None and tokens.shape[1] > 0:
        bad = (tokens[:, 0] != bos_token_id).nonzero()
        if len(bad):
            row = int(bad[0, 0])
            raise RulecheckError(
                f"row {row} starts with {int(tokens[row, 0])}, not BOS {bos_token_id}"
                f" ({len(bad)} of {tokens.shape[0]} rows)",
                file=path,
                field="column 0",
                fix="put the BOS token id in column 0 of every row",
            )
    return tokens


def _bos_id(tokenizer: Any, bos_token_id: int | None, *, spec: str) -> int:
    if tokenizer is None:
        raise RulecheckError(
            "a text corpus needs a tokenizer",
            file=spec,
            field="tokenizer",
            fix="load a model with a tokenizer, or pass a .npy file of token ids",
        )
    bos = bos_token_id if bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise RulecheckError(
            "the tokenizer has no BOS token",
            file=spec,
            field="bos_token_id",
            fix="pass bos_token_id",
        )
    return int(bos)


def _file_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if path.suffix.lower() != ".jsonl":
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RulecheckError(
                    f"not JSON ({_one_line(exc)})",
                    file=path,
                    line=number,
                    fix='write one {"text": ...} object a line',
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise RulecheckError(
                    "expected an object with a string field text",
                    file=path,
                    line=number,
                    field="text",
                    fix='write one {"text": ...} object a line',
                )
            yield text


def _dataset_documents(name: str) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:
        raise RulecheckError(
            f"cannot load the dataset from the Hugging Face hub ({_one_line(exc, 120)})",
            file=name,
            fix="pass a local .npy, .txt or .jsonl file",
        ) from None
    rows = iter(dataset)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as exc:
            raise RulecheckError(
                f"cannot read the dataset ({_one_line(exc, 120)})",
                file=name,
                fix="pass a local .npy, .txt or .jsonl file",
            ) from None
        text = row.get("text")
        if not isinstance(text, str):
            raise RulecheckError(
                "dataset rows have no string field text",
                file=name,
                field="text",
                fix="use a dataset with a text column, or a local file",
            )
        yield text


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if hasattr(tokenizer, "encode_batch"):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chunk_documents(
    documents: Iterable[str],
    tokenizer: Any,
    bos: int,
    seq_len: int,
    max_sequences: int | None,
    *,
    spec: str,
) -> torch.Tensor:
    body = seq_len - 1
    rows: list[list[int]] = []
    for batch in _batched(documents, 256):
        for ids in _encode(tokenizer, batch):
            for start in range(0, len(ids) - body + 1, body):
                rows.append([bos, *ids[start : start + body]])
        if max_sequences is not None and len(rows) >= max_sequences:
            break
    if not rows:
        raise RulecheckError(
            f"no document is at least {body} tokens long",
            file=spec,
            field="seq_len",
            fix="use a smaller seq_len or longer documents",
        )
    return torch.tensor(rows, dtype=torch.int64)


def _check_tokens(tokens: torch.Tensor, *, where: Path | str, d_vocab: int | None) -> None:
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise RulecheckError(
            f"expected at least one sequence of 2+ tokens, found shape {list(tokens.shape)}",
            file=where,
            field="shape",
            fix="provide sequences of BOS plus at least one token",
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or (d_vocab is not None and high >= d_vocab):
        bad = low if low < 0 else high
        allowed = "non-negative" if d_vocab is None else f"in 0..{d_vocab - 1} (d_vocab={d_vocab})"
        raise RulecheckError(
            f"found token id {bad}, expected ids {allowed}",
            file=where,
            field="token ids",
            fix="tokenize the corpus with the model's tokenizer",
        )


# ---------------------------------------------------------------------------------------------
# fingerprints


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def fingerprint_tensors(
    named: Mapping[str, torch.Tensor], extra: Mapping[str, Any] | None = None
) -> str:
    """``sha256:<hex>`` of names, dtypes, shapes and bytes (any device) plus canonical ``extra``."""
    digest = hashlib.sha256()
    for name in sorted(named):
        tensor = named[name]
        header = [name, _dtype_name(tensor.dtype), list(tensor.shape)]
        data = _tensor_bytes(tensor)
        digest.update(json.dumps([*header, len(data)]).encode() + b"\0")
        digest.update(data)
    canonical = json.dumps(
        extra or {}, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True
    )
    digest.update(b"extra\0" + canonical.encode())
    return f"sha256:{digest.hexdigest()}"


def fingerprint_model(model: HookedTransformer) -> str:
    """Fingerprint of the model's weights and config."""
    return fingerprint_tensors(model.state_dict(), {"config": _config_json(model.cfg)})


def fingerprint_sae(sae: SAE) -> str:
    """Fingerprint of the SAE's weights and config (device left out)."""
    config = {k: v for k, v in sae.cfg.to_dict().items() if k != "device"}
    return fingerprint_tensors(sae.state_dict(), {"config": config})


def fingerprint_corpus(tokens: torch.Tensor) -> str:
    """Fingerprint of a token tensor."""
    return fingerprint_tensors({"tokens": tokens})


__all__ = [
    "check_sae",
    "fingerprint_corpus",
    "fingerprint_model",
    "fingerprint_sae",
    "fingerprint_tensors",
    "load_corpus",
    "load_model",
    "load_sae",
    "resolve_device",
    "save_model",
]
