"""Shared fixtures: small random TransformerLens models and sae_lens SAEs."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

# before anything imports huggingface_hub, which reads these once at import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# zoo entries built by code, and the exemplar cache, go to a fresh directory per test run,
# shared by xdist's workers (they inherit the controller's), so that a layer streamed by one
# worker is read from the cache by the other; the process that made it removes it when the run
# ends (a few hundred megabytes). A directory given in RULECHECK_TEST_CACHE is kept.
TEST_CACHE: str | None = None  # the directory this process made
if "RULECHECK_TEST_CACHE" not in os.environ:
    TEST_CACHE = os.environ["RULECHECK_TEST_CACHE"] = tempfile.mkdtemp(prefix="rulecheck-test-")
os.environ["RULECHECK_CACHE"] = os.environ["RULECHECK_TEST_CACHE"]

if TYPE_CHECKING:  # loaded where used: the xdist controller runs no test and never loads them
    import torch
    from sae_lens import StandardSAE
    from transformer_lens import HookedTransformer

warnings.filterwarnings("ignore", category=DeprecationWarning)


_cache_owner: pytest.Config | None = None  # the first session configured in this process


def pytest_configure(config: pytest.Config) -> None:
    """The first session of the process owns the cache it made, and collects with the cyclic
    collector paused (``pytest_collection_finish`` resumes it): the test modules import torch,
    TransformerLens and sae_lens, whose half a million objects the collector would walk a
    thousand times meanwhile."""
    global _cache_owner
    controller = config.getoption("numprocesses", None) and not hasattr(config, "workerinput")
    if _cache_owner is None:
        _cache_owner = config
        if not controller:
            gc.disable()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's cache removed by the session of the process that made it (the controller,
    under xdist: its workers have ended by now; not a session a test runs in this process)."""
    if TEST_CACHE is not None and config is _cache_owner:
        shutil.rmtree(TEST_CACHE, ignore_errors=True)


GC_YOUNGEST = 7000  # allocations between collections of the youngest generation (Python: 700)


def pytest_collection_finish(session: pytest.Session) -> None:
    """In a process that runs tests (an xdist worker, or a serial run; the controller collects
    nothing), once collected: sae_lens and TransformerLens imported, every object alive then
    frozen out of the cyclic garbage collector (``rulecheck.heap``), and the collector resumed.

    Imported before any test: pytester's in-process runs restore ``sys.modules`` afterwards,
    dropping what they imported first, and importing ``datasets`` or ``torch.distributed`` a
    second time registers their types twice (pyarrow's ``ArrowKeyError``, torch's "Only a
    single TORCH_LIBRARY"). Frozen (``gc.freeze``): the ~900k objects of those libraries and
    the collected tests live as long as the process, and each full collection, dozens a run
    and pytest's two at the session's end, would walk them all again; objects the tests make
    are collected as before, the youngest after 7,000 allocations instead of 700 (a full
    collection walks the ~250k objects the tests keep: models, reports). The collector's time
    in the two workers of ``make test``: 22 s before, 10 s after.

    Torch on one thread in a serial run; xdist workers get their share of the cores from the
    rulecheck plugin. A process that runs no test (the xdist controller, ``--collect-only``)
    does not load torch here (a second and more before any worker starts)."""
    if session.config is not _cache_owner:
        return
    if session.items and not session.config.option.collectonly:
        from rulecheck.heap import import_model_libraries

        import_model_libraries(kept=True)
        gc.set_threshold(GC_YOUNGEST, 10, 10)
        if not hasattr(session.config, "workerinput"):
            import torch

            torch.set_num_threads(1)
    gc.enable()


# The files `make test`'s two workers start first (`--dist loadfile --no-loadscope-reorder`
# hands files out in collection order): the longest first, so that none of them starts last
# and keeps one worker busy alone; a rulebook of each layer side by side, so that on a cold
# exemplar cache each worker streams its own layer instead of waiting on the other's (the
# cache's layer lock); and rulecheck-tiny's layer 0 before the gate files, whose books are on
# it: its pass collects every head, and their sessions read the shipped SAEs' heads from the
# cache instead of streaming the layer for each of them. Seconds on 2 cores, cold cache, in
# the comments.
FIRST = (
    "rulebooks/rulecheck-tiny/L0H2.yaml",  # 8: streams layer 0, every head
    "rulebooks/rulecheck-tiny-llama/L1H0.yaml",  # 26: streams layer 1 of the second family
    "tests/test_gate.py",  # 50: retrained, permuted and broken SAEs gated end to end
    "tests/test_gate_calibration.py",  # 30: a broken and a healthy input retrain gated live
    "rulebooks/rulecheck-tiny/L1H0.yaml",  # 34: streams layer 1
    "rulebooks/rulecheck-tiny-llama/L0H0.yaml",  # 13: streams its layer 0
    "tests/test_tiny_rulebooks.py",  # 25
    "tests/test_plugin.py",  # 28
    "tests/test_regenerate.py",  # 22
    "tests/test_tiny.py",  # 20: the shipped SAEs against the card
    "tests/test_distances.py",  # 8
    "tests/test_extract.py",  # 11
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Items of the ``FIRST`` files first, in that order; the rest as collected."""
    root = config.rootpath

    def rank(item: pytest.Item) -> int:
        try:
            name = item.path.relative_to(root).as_posix()
        except ValueError:
            return len(FIRST)
        return FIRST.index(name) if name in FIRST else len(FIRST)

    items.sort(key=rank)


# a manual book of one skip-gram on the planted model, true (its F1 is above 0.5)
PLANTED_BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    skipgrams:
      - {key: {tokens: [if]}, query: {tokens: [then]}}
    expect: {f1: 0.5}
"""


def at_once(*calls: Callable[[], Any]) -> list[Any]:
    """Each call in a thread of its own, all started together (sessions sharing a cache, as
    pytest workers do); their results, in order."""
    import threading

    got: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        got[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return got


def random_model(
    seed: int = 0, normalization_type: str | None = "LN", **config: object
) -> HookedTransformer:
    """Two layers, LayerNorm with non-trivial weights, random biases everywhere; ``config``
    sets other ``HookedTransformerConfig`` fields (``positional_embedding_type``, ...)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields: dict = {
        "n_layers": 2,
        "d_model": 16,
        "n_heads": 2,
        "d_head": 8,
        "d_mlp": 32,
        "d_vocab": 40,
        "n_ctx": 16,
        "act_fn": "gelu",
    }
    cfg = HookedTransformerConfig(
        **(fields | config), normalization_type=normalization_type, seed=seed
    )
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".b_Q", ".b_K", ".b_V", ".b_O", ".b")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if name.endswith(".w"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model.eval()
    return model


def random_sae(
    d_in: int, d_sae: int, hook_name: str, head: int | None = None, seed: int = 0
) -> StandardSAE:
    """A sae_lens SAE with random weights and biases (some features fire, most do not)."""
    import torch
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(
        StandardSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            metadata=SAEMetadata(hook_name=hook_name, hook_head_index=head),
        )
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
        sae.b_enc.copy_(0.2 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=g))
    return sae


def permuted_copy(spec: str, directory, seed: int = 7, noise: float = 0.01) -> list[int]:
    """Save to ``directory`` a copy of the SAE at ``spec`` with its features permuted and
    noise (``noise`` times each weight's std) on every weight; returns ``perm``: new feature
    ``j`` is old feature ``perm[j]``."""
    import torch

    from rulecheck.loading import load_sae
    from rulecheck.specs import locate

    sae = load_sae(locate(spec))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(sae.cfg.d_sae, generator=g)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "W_enc":
                p.copy_(p[:, perm])
            elif name in ("b_enc", "W_dec", "threshold", "log_threshold"):
                p.copy_(p[perm])
        for p in sae.parameters():
            p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
    sae.save_model(str(directory))
    return perm.tolist()


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return random_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    import torch

    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, 40, (24, 16), generator=g)
    t[:, 0] = 0
    return t
