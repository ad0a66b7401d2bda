"""SAEs: ``load_sae`` reads the SAE formats of ``SAE_FORMATS``; ``check_sae`` checks that an
SAE reads the hook it is used at.

SAE specs (``{layer}`` and ``{head}`` are filled in first): a Gemma Scope folder
(``params.npz``), a Llama Scope folder (``hyperparams.json``, ``checkpoints/final.safetensors``),
a sae_lens directory (``cfg.json``, ``sae_weights.safetensors``), the attention-output-SAE
format ``NAME_cfg.json`` + ``NAME.pt``, or a sae_lens registry id ``release:sae_id`` (read from
the Hugging Face cache when ``HF_HUB_OFFLINE`` is set). Input SAEs read
``blocks.{layer}.hook_resid_pre`` (or the previous block's ``hook_resid_post``); output SAEs
read ``blocks.{layer}.attn.hook_z``, one head (``hook_head_index``) or all heads concatenated,
or ``blocks.{layer}.hook_attn_out``, read per head through ``W_O``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

import rulecheck.loading.scope as scope
from rulecheck.errors import InvalidSpec
from rulecheck.loading._common import (
    INT64_MAX,
    SAE_CONFIG,
    SAE_MODEL_KWARGS,
    FieldRules,
    check_fields,
    dataclass_hints,
    expand_path,
    json_text,
    looks_like_path,
    one_line,
    parse_dtype,
    read_json_object,
    read_safetensors,
    shown,
    without_warning,
)
from rulecheck.loading.devices import resolve_device

if TYPE_CHECKING:
    from packaging.version import Version
    from sae_lens import SAE
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

SAE_WEIGHTS = "sae_weights.safetensors"
PAPER_CONFIG_SUFFIX = "_cfg.json"
PAPER_WEIGHTS_SUFFIX = ".pt"
PAPER_WEIGHT_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")
PAPER_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class SaeFormat:
    """One way a spec can name an SAE: ``recognise(spec, path)`` says whether the spec is in
    this format, ``read(spec, path, device)`` loads it; ``description`` names the format in the
    error when no format recognises a spec."""

    name: str
    description: str
    recognise: Callable[[str, Path], bool]
    read: Callable[[str, Path, torch.device], SAE]


# Checked before sae_lens sees cfg.json: each field's type comes from the type hints of the
# architecture's config class; these tables add what the types cannot say.
SAE_REQUIRED = ("d_in", "d_sae", "architecture")
SAE_MINIMUMS = {
    "d_in": 1,
    "d_sae": 1,
    "d_out": 1,
    "k": 1,
    "n_heads": 1,
    "n_attn_layers": 1,
    "bottleneck_factor": 1,
    "kval_topk": 1,
    "max_iterations": 1,
}
# SAEConfig.__post_init__ accepts more than its type hint lists
SAE_NORMALIZATIONS = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
    "covariance_whitening",
)
# the metadata rulecheck reads (check_sae, processing_for)
SAE_METADATA_RULES = FieldRules(
    hints={
        "hook_name": str | None,
        "hook_head_index": int | None,
        "model_from_pretrained_kwargs": dict | None,
        "sae_lens_version": str | None,
    },
    minimums={"hook_head_index": 0},
)
# sae_lens reads a cfg.json without a version (or older than this) as a pre-6.0 config
SAE_LENS_6 = "6.0.0-rc.0"
SAE_DIRECTORY_FIX = "save the SAE with sae.save_model(directory)"


def _is_sae_directory(spec: str, path: Path) -> bool:
    return path.is_dir()


def _sae_lens_version(raw: Mapping[str, Any], *, file: Path) -> tuple[Version | None, str]:
    """The version that wrote ``cfg.json`` and its field, where sae_lens looks for it: top
    level, then ``metadata``."""
    from packaging.version import InvalidVersion, Version

    where, value = "sae_lens_version", raw.get("sae_lens_version")
    if not value and isinstance(raw.get("metadata"), dict):
        where, value = "metadata.sae_lens_version", raw["metadata"].get("sae_lens_version")
    if not value:
        return None, "metadata.sae_lens_version"
    try:
        if not isinstance(value, str):
            raise InvalidVersion
        return Version(value), where
    except InvalidVersion:
        raise InvalidSpec(
            f'expected a version such as "6.54.0", found {json_text(value)}',
            file=file,
            field=where,
            fix="set it to the sae_lens version that wrote the file",
        ) from None


def _sae_config_dict(path: Path) -> dict[str, Any]:
    """``cfg.json`` as sae_lens will read it (pre-6.0 configs brought up to date), every field
    rulecheck or sae_lens relies on checked."""
    from packaging.version import Version
    from sae_lens.constants import DTYPE_MAP
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from sae_lens.registry import SAE_CLASS_REGISTRY

    raw = read_json_object(path)
    if "metadata" in raw and not isinstance(raw["metadata"], dict):
        raise InvalidSpec(
            f"expected an object, found {json_text(raw['metadata'])}",
            file=path,
            field="metadata",
            fix=SAE_DIRECTORY_FIX,
        )
    version, where = _sae_lens_version(raw, file=path)
    pre_6 = version is None or version < Version(SAE_LENS_6)
    if pre_6 and "metadata" in raw:
        # sae_lens rebuilds the metadata of a pre-6.0 config from its top-level keys
        found = "missing" if version is None else f"{version}, before 6.0,"
        raise InvalidSpec(
            f"{found} beside a metadata block: sae_lens reads cfg.json as a pre-6.0 config and"
            " drops metadata.hook_name and metadata.hook_head_index",
            file=path,
            field=where,
            fix='add "sae_lens_version": "6.x" to metadata, naming the sae_lens version that'
            " wrote the file, as sae.save_model does",
        )
    choices = {"architecture": tuple(SAE_CLASS_REGISTRY)}
    required = () if pre_6 else ("architecture",)  # pre-6.0 configs default to "standard"
    check_fields(raw, FieldRules(hints={}, required=required, choices=choices), file=path)
    try:
        cfg = handle_config_defaulting(copy.deepcopy(raw))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidSpec(
            f"cannot read it as a pre-6.0 sae_lens config ({one_line(exc)})",
            file=path,
            fix=SAE_DIRECTORY_FIX + " with sae_lens 6",
        ) from None
    fields = {k: v for k, v in cfg.items() if k not in ("metadata", "device")}
    config_class = SAE_CLASS_REGISTRY[cfg["architecture"]][1]
    hints = dataclass_hints(config_class)
    rules = FieldRules(
        hints={k: v for k, v in hints.items() if k not in ("metadata", "device")},
        required=SAE_REQUIRED,
        minimums=SAE_MINIMUMS,
        choices=choices | {"dtype": tuple(DTYPE_MAP), "normalize_activations": SAE_NORMALIZATIONS},
    )
    check_fields(fields, rules, file=path)
    prefix = "" if pre_6 else "metadata."
    check_fields(cfg.get("metadata") or {}, SAE_METADATA_RULES, file=path, prefix=prefix)
    return cfg


def _read_sae_directory(spec: str, directory: Path, device: torch.device) -> SAE:
    from sae_lens import SAE

    config_path, weights_path = directory / SAE_CONFIG, directory / SAE_WEIGHTS
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise InvalidSpec(
                f"not a sae_lens directory: no {needed.name}",
                file=directory,
                fix=SAE_DIRECTORY_FIX,
            )
    _sae_config_dict(config_path)
    read_safetensors(weights_path)
    try:
        return SAE.load_from_disk(str(directory), device=str(device))
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or misshapen weights
        raise InvalidSpec(
            f"weights do not match the config ({one_line(exc)})",
            file=weights_path,
            field="state_dict",
            fix=f"save the weights and {SAE_CONFIG} together with sae.save_model(directory)",
        ) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidSpec(
            f"cannot build the SAE ({one_line(exc)})",
            file=config_path,
            fix=SAE_DIRECTORY_FIX,
        ) from None


def _paper_files(path: Path) -> tuple[Path, Path]:
    """``(NAME_cfg.json, NAME.pt)`` for a ``path`` that names either file or their common stem."""
    text = str(path)
    if text.endswith(PAPER_CONFIG_SUFFIX):
        text = text[: -len(PAPER_CONFIG_SUFFIX)]
    elif text.endswith(PAPER_WEIGHTS_SUFFIX):
        text = text[: -len(PAPER_WEIGHTS_SUFFIX)]
    return Path(text + PAPER_CONFIG_SUFFIX), Path(text + PAPER_WEIGHTS_SUFFIX)


def _is_paper_sae(spec: str, path: Path) -> bool:
    return any(file.is_file() for file in _paper_files(path))


def _paper_int(cfg: Mapping[str, Any], key: str, *, file: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= INT64_MAX:
        raise InvalidSpec(
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
        raise InvalidSpec(
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
        raise InvalidSpec(
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
        raise InvalidSpec(
            f"not a readable weights file ({one_line(exc)})",
            file=path,
            fix="save the state dict with torch.save(sae.state_dict(), path)",
        ) from None
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise InvalidSpec(
            "expected a state dict of tensors",
            file=path,
            fix=f"save a dict with {', '.join(PAPER_WEIGHT_KEYS)}",
        )
    if set(raw) != set(PAPER_WEIGHT_KEYS):
        found = ", ".join(sorted(shown(str(key)) for key in raw))  # keys need not be strings
        raise InvalidSpec(
            f"expected keys {', '.join(PAPER_WEIGHT_KEYS)}, found {found}",
            file=path,
            field="state_dict",
            fix=f"save a dict with exactly {', '.join(PAPER_WEIGHT_KEYS)}",
        )
    return dict(raw)


def _read_paper_sae(spec: str, path: Path, device: torch.device) -> SAE:
    from sae_lens import StandardSAE

    config_path, weights_path = _paper_files(path)
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise InvalidSpec(
                "file not found (the SAE format needs NAME_cfg.json and NAME.pt side by side)",
                file=needed,
                fix=f"put {config_path.name} and {weights_path.name} in the same directory",
            )
    sae_cfg = _paper_sae_config(read_json_object(config_path), file=config_path, device=device)
    weights = _read_paper_weights(weights_path)
    dtype = parse_dtype(sae_cfg.dtype, file=config_path)
    expected = {
        "W_enc": (sae_cfg.d_in, sae_cfg.d_sae),
        "W_dec": (sae_cfg.d_sae, sae_cfg.d_in),
        "b_enc": (sae_cfg.d_sae,),
        "b_dec": (sae_cfg.d_in,),
    }
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise InvalidSpec(
                f"shape {list(weights[name].shape)}, expected {list(shape)} from act_size/dict_size",
                file=weights_path,
                field=name,
                fix=f"check that {config_path.name} belongs to these weights",
            )
    sae_cfg.device = "meta"  # built once the weights show its sizes are real
    sae = StandardSAE(sae_cfg)
    sae.cfg.device = str(device)
    sae.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True, assign=True)
    return sae.to(device=device, dtype=dtype)


def _is_registry_id(spec: str, path: Path) -> bool:
    return ":" in spec and not looks_like_path(spec)


def _read_registry_sae(spec: str, path: Path, device: torch.device) -> SAE:
    from sae_lens import SAE

    release, _, sae_id = spec.partition(":")
    try:
        return SAE.from_pretrained(release, sae_id, device=str(device))
    except ValueError as exc:
        raise InvalidSpec(
            f"not a sae_lens SAE ({one_line(exc, 160)})",
            file=spec,
            fix="check the release and id against sae_lens's pretrained_saes.yaml",
        ) from None
    except OSError as exc:
        from huggingface_hub.constants import HF_HUB_CACHE, is_offline_mode

        if is_offline_mode():
            raise InvalidSpec(
                f"not in the Hugging Face cache {HF_HUB_CACHE} and HF_HUB_OFFLINE is set"
                f" ({one_line(exc, 120)})",
                file=spec,
                fix="download it once with network into that cache (HF_HOME or HF_HUB_CACHE),"
                " or pass the downloaded folder",
            ) from None
        raise InvalidSpec(
            f"cannot download the SAE from the Hugging Face hub ({one_line(exc, 120)})",
            file=spec,
            fix="pass a local Gemma Scope, Llama Scope or sae_lens folder, or NAME_cfg.json"
            " + NAME.pt files",
        ) from None


# tried in order; the first format that recognises a spec loads it
SAE_FORMATS: tuple[SaeFormat, ...] = (
    SaeFormat(
        "Gemma Scope folder",
        f"a Gemma Scope folder ({scope.GEMMA_SCOPE_WEIGHTS})",
        scope.is_gemma_scope,
        scope.read_gemma_scope,
    ),
    SaeFormat(
        "Llama Scope folder",
        f"a Llama Scope folder ({scope.LLAMA_SCOPE_CONFIG}, {scope.LLAMA_SCOPE_WEIGHTS})",
        scope.is_llama_scope,
        scope.read_llama_scope,
    ),
    SaeFormat(
        "sae_lens directory",
        f"a sae_lens directory ({SAE_CONFIG}, {SAE_WEIGHTS})",
        _is_sae_directory,
        _read_sae_directory,
    ),
    SaeFormat(
        "attention-output SAE files",
        f"NAME{PAPER_CONFIG_SUFFIX} + NAME{PAPER_WEIGHTS_SUFFIX}",
        _is_paper_sae,
        _read_paper_sae,
    ),
    SaeFormat(
        "sae_lens registry id",
        "a sae_lens id release:sae_id",
        _is_registry_id,
        _read_registry_sae,
    ),
)


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
    path = expand_path(spec)
    for sae_format in SAE_FORMATS:
        if sae_format.recognise(spec, path):
            with without_warning(SAE_MODEL_KWARGS):
                return sae_format.read(spec, path, resolved)
    *others, last = (sae_format.description for sae_format in SAE_FORMATS)
    raise InvalidSpec(
        "no such file or directory",
        file=path,
        fix=f"pass {', '.join(others)}, or {last}",
    )


def _fill_template(spec: str, *, layer: int | None, head: int | None) -> str:
    for name, value in (("layer", layer), ("head", head)):
        token = "{" + name + "}"
        if token not in spec:
            continue
        if value is None:
            raise InvalidSpec(
                f"the spec contains {token} but no {name} was given",
                file=spec,
                field=name,
                fix=f"pass {name}=... or write the number into the spec",
            )
        spec = spec.replace(token, str(value))
    return spec


# ---------------------------------------------------------------------------------------------
# checks


def check_sae(
    sae: SAE,
    model: HookedTransformer | TransformerBridge,
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
        raise InvalidSpec(
            f"layer {layer} is out of range: the model has n_layers={cfg.n_layers}"
            f" (expected 0..{cfg.n_layers - 1})",
            file=spec,
            field="layer",
            fix=f"pick a layer in 0..{cfg.n_layers - 1}",
        )
    if kind == "in":
        _check_hook(sae, *input_hooks(model, layer), spec=spec)
        _check_d_in(sae, cfg.d_model, "d_model", spec=spec)
        if sae.cfg.metadata.hook_head_index is not None:
            raise InvalidSpec(
                f"an input SAE reads the whole residual stream, found hook_head_index="
                f"{sae.cfg.metadata.hook_head_index}",
                file=spec,
                field="hook_head_index",
                fix="use an SAE trained on hook_resid_pre",
            )
        return
    if kind != "out":
        raise InvalidSpec(
            f"unknown SAE kind {kind!r}", file=spec, field="kind", fix='use "in" or "out"'
        )
    if sae.cfg.metadata.hook_name == attn_out_hook(layer):  # read per head: ``head_view``
        _check_d_in(sae, cfg.d_model, "d_model, the attention output", spec=spec)
        if head is not None:
            _check_head(head, cfg.n_heads, spec=spec, field="head")
        return
    _check_hook(sae, f"blocks.{layer}.attn.hook_z", attn_out_hook(layer), spec=spec)
    sae_head = sae.cfg.metadata.hook_head_index
    if sae_head is not None:
        if head is not None and head != sae_head:
            raise InvalidSpec(
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
        raise InvalidSpec(
            f"d_in={sae.cfg.d_in} is one head's d_head, but the SAE has no hook_head_index",
            file=spec,
            field="hook_head_index",
            fix="set metadata.hook_head_index to the head it was trained on",
        )
    _check_d_in(sae, cfg.n_heads * cfg.d_head, "n_heads*d_head, all heads", spec=spec)


def attn_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


LINEAR_ENCODERS = ("standard", "jumprelu", "topk")  # act(x @ W_enc + b_enc), nothing else


def head_view(
    sae: SAE, model: HookedTransformer | TransformerBridge, layer: int, head: int, spec: str
) -> SAE:
    """An output SAE on ``blocks.{layer}.hook_attn_out`` as one head reads it: a per-head SAE
    on ``hook_z`` whose features are the original's on ``z_h W_O[h] + b_O``, the head's write
    and the output bias alone (the other heads' writes, which add to the same features, are
    left out). Exact for that input: ``W_enc' = W_O[h] W_enc``, ``b_enc' = (b_O - b_dec)
    W_enc + b_enc``; the decoder maps back through the pseudo-inverse of ``W_O[h]``."""
    arch = sae.cfg.architecture()
    norm = getattr(sae.cfg, "normalize_activations", "none")
    if arch not in LINEAR_ENCODERS or norm not in ("none", None):
        raise InvalidSpec(
            f"an output SAE on hook_attn_out is read per head through W_O, which needs a linear "
            f"encoder without input normalisation; found architecture {arch!r}, "
            f"normalize_activations {norm!r}",
            file=spec,
            field="architecture",
            fix="fold the normalisation into the weights, or use a hook_z SAE",
        )
    from rulecheck.core.modelview import view

    W_O, b_O = view(model).output_weights(layer)  # b_O: zeros where the model has none
    W_O = W_O[head].to(sae.W_enc.dtype)  # [d_head, d_model]
    b_O = b_O.to(sae.W_enc.dtype)
    per_head = copy.deepcopy(sae)
    b_in = b_O - sae.b_dec.detach() * float(sae.cfg.apply_b_dec_to_input)
    with torch.no_grad():
        per_head.W_enc = torch.nn.Parameter(W_O @ sae.W_enc.detach())
        per_head.b_enc = torch.nn.Parameter(b_in @ sae.W_enc.detach() + sae.b_enc.detach())
        per_head.W_dec = torch.nn.Parameter(sae.W_dec.detach() @ torch.linalg.pinv(W_O))
        per_head.b_dec = torch.nn.Parameter(torch.zeros(W_O.shape[0], dtype=W_O.dtype))
    per_head.cfg.d_in = W_O.shape[0]
    per_head.cfg.metadata.hook_name = f"blocks.{layer}.attn.hook_z"
    per_head.cfg.metadata.hook_head_index = head
    return per_head


def input_hooks(model: HookedTransformer | TransformerBridge, layer: int) -> tuple[str, ...]:
    """The hooks that hold the tensor an input SAE of ``layer`` reads, ``hook_resid_pre``
    first: the previous block's ``hook_resid_post`` (Gemma Scope's residual SAEs), and at
    layer 0 ``hook_embed`` where no position embedding is added to it (rotary, ALiBi)."""
    names = [f"blocks.{layer}.hook_resid_pre"]
    if layer > 0:
        names.append(f"blocks.{layer - 1}.hook_resid_post")
    elif model.cfg.positional_embedding_type in ("rotary", "alibi"):
        names.append("hook_embed")
    return tuple(names)


def _check_hook(sae: SAE, expected: str, *same: str, spec: str) -> None:
    """``sae`` reads ``expected`` or one of the other hooks accepted there (``same``: one
    holding the same tensor, or ``hook_attn_out`` for an output SAE), all named when not."""
    found = sae.cfg.metadata.hook_name
    if found is not None and found not in (expected, *same):
        also = "".join(f" or {name!r}" for name in same)
        raise InvalidSpec(
            f"expected {expected!r}{also}, found {found!r}",
            file=spec,
            field="hook_name",
            fix=f"load the SAE trained on {expected}",
        )


def _check_d_in(sae: SAE, expected: int, meaning: str, *, spec: str) -> None:
    if sae.cfg.d_in != expected:
        raise InvalidSpec(
            f"expected {expected} ({meaning}), found {sae.cfg.d_in}",
            file=spec,
            field="d_in",
            fix="load the SAE trained on this model and hook",
        )


def _check_head(head: int, n_heads: int, *, spec: str, field: str) -> None:
    if not 0 <= head < n_heads:
        raise InvalidSpec(
            f"head {head} is out of range: the model has n_heads={n_heads}"
            f" (expected 0..{n_heads - 1})",
            file=spec,
            field=field,
            fix=f"pick a head in 0..{n_heads - 1}",
        )
