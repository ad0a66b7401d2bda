"""Where a head's exemplars are kept once collected: in memory, and in the disk cache
(``rulecheck.paths.exemplar_cache()`` unless told otherwise), keyed by the fingerprints of model,
output SAE and corpus and by the protocol's settings, so a second run with unchanged inputs
skips the pass over the corpus. Each entry keeps its key inside (one copied under another name
is rebuilt), a layer's lock lets processes sharing the cache stream it once, and a cache that
cannot be read or written is a warning, never a failure."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows has no fcntl: there each process streams its own layers
    fcntl = None  # type: ignore[assignment]

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from rulecheck import __version__
from rulecheck.atomic import atomic_write
from rulecheck.core.exemplars import ExemplarCollector, ExemplarConfig, FeatureExamples
from rulecheck.errors import InvalidRulebook, NotEligible
from rulecheck.loaded import Loaded
from rulecheck.specs import Head

COLLECTOR_STATE = ("active", "top_val", "top_seq", "top_pos", "neg_key", "neg_seq")
HELD_STATE = ("held_feat", "held_row", "held_pos", "held_val")  # ``core.heldout``
LN_SCALE = "ln_scale"  # the pass's mean inverse LayerNorm scale, exact (float64)


class CacheWarning(UserWarning):
    """A cache entry could not be read and was rebuilt, or could not be written."""


class ForeignEntry(ValueError):
    """A cache entry whose key is not the one it is read for: copied under another name."""


class ExemplarStore:
    """The exemplar states of heads under one protocol (``cfg``), in memory and in the disk
    cache at ``cache_dir`` (None keeps none). ``sample_ids`` (a head's draws keyed by other
    ids, ``sample_by``) may be shared with the stores of other protocols."""

    def __init__(
        self,
        loaded: Loaded,
        cfg: ExemplarConfig,
        cache_dir: Path | None,
        sample_ids: dict[Head, Tensor] | None = None,
    ) -> None:
        self.loaded = loaded
        self.cfg = cfg
        self.cache_dir = cache_dir
        self.sample_ids: dict[Head, Tensor] = {} if sample_ids is None else sample_ids
        # each head's exemplars, with the mean LayerNorm scale of the pass that collected
        # them where known (an entry written before entries kept it has none)
        self._held: dict[tuple[Head, str | None], tuple[ExemplarCollector, float | None]] = {}

    # ------------------------------------------------------------------------ sample ids

    def sample_by(self, head: Head, ids: Tensor) -> None:
        """Key the random draws of ``head``'s features by ``ids [d_sae]`` (a retrained
        SAE's features by their old partners' ids; ``rulecheck.gate``) from now on."""
        self.sample_ids[head] = ids.to(torch.int64).cpu()

    def ids_digest(self, head: Head) -> str | None:
        ids = self.sample_ids.get(head)
        if ids is None:
            return None
        return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]

    # --------------------------------------------------------------------------- memory

    def held(self, head: Head) -> ExemplarCollector | None:
        """The head's exemplar state if it is in memory."""
        held = self._held.get((head, self.ids_digest(head)))
        return None if held is None else held[0]

    def ln_scale(self, head: Head) -> float | None:
        """The mean inverse LayerNorm scale of the pass that collected the head's exemplars
        (the layer's, whichever heads it collected), if known."""
        held = self._held.get((head, self.ids_digest(head)))
        return None if held is None else held[1]

    def has(self, head: Head) -> bool:
        """Whether the head's exemplars are at hand (in memory or the disk cache)."""
        if self.held(head) is not None:
            return True
        return self.cache_dir is not None and self._path(head).exists()

    def keep(
        self, group: Sequence[Head], collectors: dict[int, ExemplarCollector], ln_scale: float
    ) -> None:
        """Hold a pass's exemplars and its LayerNorm scale (and write them to the disk cache),
        so that a head a pass collected is never streamed again, whichever pass it was."""
        for other in group:
            key = (other, self.ids_digest(other))
            if key in self._held:
                continue
            col = collectors[other.head]
            col.flush()
            self._held[key] = (col, ln_scale)
            if self.cache_dir is not None:
                self._write(other, col, ln_scale)

    # ----------------------------------------------------------------------------- disk

    @contextlib.contextmanager
    def layer_lock(self, heads: Sequence[Head]) -> Iterator[None]:
        """Hold the disk cache's locks of ``heads`` (a pass's group) at their layer under their
        output SAEs, taken in one order: processes sharing the cache (pytest workers) wait for
        one pass over a layer instead of each streaming it, also when each asks for another
        head of the group and each head's book names its own output SAE, or names it otherwise
        (a template, the head's own name); a pass for other output SAEs (a retrain gated beside
        the shipped SAEs' checks) does not wait for it."""
        # named by fingerprints: without a cache nothing is locked, and nothing need be hashed
        names = sorted({self._lock_name(h) for h in heads}) if self.cache_dir is not None else []
        with contextlib.ExitStack() as held:
            for name in names:
                held.enter_context(cache_lock(self.cache_dir, name))
            yield

    def _lock_name(self, head: Head) -> str:
        """The lock of the head's layer under its output SAE: by what the pass reads (the
        fingerprints its cache entry is keyed by), not by how the specs spell it."""
        fp = self.loaded.fingerprints(head, ("model", "corpus", "sae_out"))
        name = repr((fp["model"], fp["corpus"], head.layer, fp["sae_out"])).encode()
        return f"layer-{hashlib.sha256(name).hexdigest()[:16]}"

    def read(self, head: Head) -> ExemplarCollector | None:
        """The head's exemplar state from the disk cache, if a whole entry of its key is there
        (then held in memory too); an unreadable one is a warning and is removed."""
        if self.cache_dir is None or not self._path(head).exists():
            return None
        _, _, sae_out, tokens = self.loaded.load(head)
        device = self.loaded.device
        col = ExemplarCollector(
            sae_out.cfg.d_sae,
            tokens.shape[1],
            self.cfg,
            torch.device(device),
            self.sample_ids.get(head),
            tokens.shape[0],
        )
        path = self._path(head)
        try:
            state = _read_entry(path, self._key_parts(head), str(device))
            _check_state(state, col)
        except Exception as exc:  # any unreadable entry: a cache is never worth a failure
            cache_warning(f"{path}: unreadable exemplar cache entry ({_why(exc)}), rebuilt")
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        for name in (*COLLECTOR_STATE, *HELD_STATE):
            setattr(col, name, state[name])
        col.n_seen = int(state["n_seen"])
        scale = float(state[LN_SCALE]) if LN_SCALE in state else None
        self._held[(head, self.ids_digest(head))] = (col, scale)
        return col

    def _write(self, head: Head, col: ExemplarCollector, ln_scale: float) -> None:
        """Write the head's exemplar state and its pass's LayerNorm scale to the disk cache,
        its key inside; a cache that cannot be written (a full disk) is a warning: the run
        goes on without it."""
        names = (*COLLECTOR_STATE, *HELD_STATE)
        state = {name: getattr(col, name).contiguous().cpu() for name in names}
        state["n_seen"] = torch.tensor(col.n_seen)
        state[LN_SCALE] = torch.tensor(ln_scale, dtype=torch.float64)
        path = self._path(head)
        try:
            atomic_write(path, save(state, metadata={"key": self._key_parts(head)}))
        except OSError as exc:
            why = exc.strerror or exc
            cache_warning(f"{path}: exemplar cache entry not written ({why}); going on uncached")

    def _path(self, head: Head) -> Path:
        assert self.cache_dir is not None
        digest = hashlib.sha256(self._key_parts(head).encode()).hexdigest()[:32]
        return self.cache_dir / f"exemplars-{digest}.safetensors"

    def _key_parts(self, head: Head) -> str:
        """What a head's exemplars depend on, as JSON: also kept inside its cache entry, so
        that an entry copied under another name is told apart on reading."""
        fp = self.loaded.fingerprints(head)
        parts = {
            **{k: fp[k] for k in ("model", "sae_out", "corpus")},
            "layer": head.layer,
            "head": head.head,
            "exemplars": asdict(self.cfg),
            "rulecheck": __version__,
        }
        if head in self.sample_ids:
            parts["sample_ids"] = self.ids_digest(head)
        return json.dumps(parts, sort_keys=True)


@contextlib.contextmanager
def cache_lock(cache_dir: Path | None, name: str) -> Iterator[None]:
    """Hold the lock ``name`` of the disk cache at ``cache_dir``, so that processes sharing the
    cache compute what it will hold once; without a cache (or ``fcntl``) nothing is locked."""
    if cache_dir is None or fcntl is None:
        yield
        return
    path = cache_dir / f"{name}.lock"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = path.open("a")
    except OSError as exc:
        cache_warning(f"{path}: cache unusable ({exc.strerror or exc}); unlocked")
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def feature_examples(
    col: ExemplarCollector, head: Head, feature: int, cfg: ExemplarConfig, file: str = ""
) -> FeatureExamples:
    """A feature's exemplars from its head's state; an error if the feature is out of range
    or not eligible under ``cfg``."""
    d_sae = col.active.shape[0]
    if not 0 <= feature < d_sae:
        raise InvalidRulebook(
            f"feature {feature} is out of range: the output SAE has {d_sae} features",
            file=file or None,
            field=f"feature[{feature}]",
            fix=f"use a feature id in 0..{d_sae - 1}",
        )
    if feature not in set(col.eligible().tolist()):
        active = int(col.active[feature])
        raise NotEligible(
            f"feature {feature} of L{head.layer}H{head.head} is active in {active} of "
            f"{col.n_seen} sequences; the protocol needs >= {cfg.min_active}"
            f" active and >= {cfg.min_inactive} inactive",
            file=file or None,
            field=f"feature[{feature}]",
            fix="check that the checkpoint is the one the rulebook was written for",
        )
    return col.examples(feature)


def cache_warning(message: str) -> None:
    """Warn that a cache entry was not used or not written (never an error)."""
    warnings.warn(message, CacheWarning, stacklevel=3)


def _why(exc: Exception) -> str:
    """Why an entry was not used, in the warning: a foreign key says so, else the error's type."""
    return str(exc) if isinstance(exc, ForeignEntry) else type(exc).__name__


def _read_entry(path: Path, key: str, device: str) -> dict[str, Tensor]:
    """The tensors of the cache entry at ``path``; ``ForeignEntry`` unless it holds ``key``."""
    with safe_open(str(path), framework="pt", device=device) as entry:
        if (entry.metadata() or {}).get("key") != key:
            raise ForeignEntry("its key is another head's or setting's")
        return {name: entry.get_tensor(name) for name in entry.keys()}  # noqa: SIM118


def _check_state(state: dict[str, Tensor], col: ExemplarCollector) -> None:
    """Raise ``ValueError`` unless ``state`` is a whole exemplar state shaped for ``col``."""
    missing = [n for n in (*COLLECTOR_STATE, "n_seen") if n not in state]
    if missing:
        raise ValueError(f"missing {missing}")
    d_sae = col.active.shape[0]
    if state["active"].shape != (d_sae,) or state["n_seen"].numel() != 1:
        raise ValueError("shape")
    scale = state.get(LN_SCALE)
    if scale is not None and (scale.numel() != 1 or not bool(torch.isfinite(scale).all())):
        raise ValueError("ln_scale")
    widths = {state[n].shape[1] if state[n].dim() == 2 else -1 for n in COLLECTOR_STATE[1:]}
    rows = {state[n].shape[0] for n in COLLECTOR_STATE}
    if rows != {d_sae} or -1 in widths:
        raise ValueError("shape")
    missing = [n for n in HELD_STATE if n not in state]
    if missing:
        raise ValueError(f"missing {missing}")
    held = [state[n] for n in HELD_STATE]
    if {x.dim() for x in held} != {1} or len({len(x) for x in held}) != 1:
        raise ValueError("shape")
    feat, row, pos = held[:3]
    if len(feat) and not (
        0 <= int(feat.min()) <= int(feat.max()) < d_sae
        and 0 <= int(row.min()) <= int(row.max()) < len(col.held_seq)
        and 1 <= int(pos.min()) <= int(pos.max()) < col.seq_len
        and bool((feat[1:] >= feat[:-1]).all())
    ):
        raise ValueError("held-out positions out of range")
