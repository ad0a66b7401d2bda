"""Build ``rulecheck-tiny``: corpus, tokenizer, model and SAEs, deterministically from a seed.

    python -m rulecheck.build.train_tiny corpus     # needs Debian's python3.11-doc
    python -m rulecheck.build.train_tiny tokenizer
    python -m rulecheck.build.train_tiny model
    python -m rulecheck.build.train_tiny saes
    python -m rulecheck.build.train_tiny ship       # into the package, with SAE quality
    python -m rulecheck.build.train_tiny rules      # rulebooks/rulecheck-tiny/
    python -m rulecheck.build.train_tiny analysis   # weight vs gradient ranking, distractors
    python -m rulecheck.build.train_tiny card       # MODEL_CARD.md from the measured reports
    python -m rulecheck.build.train_tiny all
    python -m rulecheck.build.train_tiny retrain    # sae_in/L0, sae_out/L0H0 again, another seed
    python -m rulecheck.build.calibration saes && ... table  # the retraining gate, calibrated

Corpus: the reStructuredText sources of the Python 3.11 documentation (Debian package
``python3.11-doc``) and Python standard-library modules (``libpython3.11-stdlib``), both under
the PSF license. Each file is a document; documents are cut into 63-token pieces, BOS first.
Whole documents are held out for evaluation. Work files go to ``--work`` (default
``build/tiny``); the shipped files go to ``--out`` (default the package's ``zoo/tiny``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
CODE_ROOT = Path("/usr/lib/python3.11")
CODE_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
BOS = "<|endoftext|>"
SEQ_LEN = 64
HELD_OUT_PERCENT = 24


@dataclass(frozen=True)
class TinyConfig:
    """Every setting of the build; written into the model card."""

    seed: int = 0
    vocab_size: int = 4096
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    batch_size: int = 64
    steps: int = 4000
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.1
    code_share: float = 1.0  # code characters per documentation character, at most
    family: str = "gpt2"  # "gpt2": LayerNorm, GELU, learned positions; "llama": see FAMILIES
    n_key_value_heads: int | None = None  # grouped-query attention (llama family)

    @property
    def name(self) -> str:
        """The zoo entry this config builds."""
        return "rulecheck-tiny" if self.family == "gpt2" else f"rulecheck-tiny-{self.family}"


# rulecheck-tiny-llama: the modern family on the same corpus and tokenizer. RMSNorm, rotary
# positions on the whole head, two query heads per key/value head, a gated SiLU MLP whose
# d_mlp (8/3 d_model, rounded up to 32) gives the MLP the parameters of rulecheck-tiny's.
FAMILIES = {
    "gpt2": TinyConfig(),
    "llama": TinyConfig(family="llama", d_mlp=352, n_key_value_heads=2),
}


def out_default(cfg: TinyConfig) -> Path:
    from rulecheck import zoo

    return zoo.entry_dir(cfg.name)


# ------------------------------------------------------------------------------------ corpus


def held_out(name: str) -> bool:
    """Whole documents go to the held-out split by a hash of their name."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def collect_documents(cfg: TinyConfig) -> list[tuple[str, str]]:
    """``(name, text)`` of every document, documentation first, then code, sorted by name."""
    if not DOC_ROOT.is_dir():
        raise SystemExit(
            f"{DOC_ROOT}: not found (fix: apt-get install python3.11-doc, the corpus's source)"
        )
    docs = [
        (f"doc/{p.relative_to(DOC_ROOT)}", p.read_text(encoding="utf-8", errors="replace"))
        for p in sorted(DOC_ROOT.rglob("*.txt"))
    ]
    budget = cfg.code_share * sum(len(t) for _, t in docs)
    code = []
    for p in sorted(CODE_ROOT.rglob("*.py")):
        if any(part in CODE_SKIP for part in p.relative_to(CODE_ROOT).parts):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        if budget - len(text) < 0:
            continue
        budget -= len(text)
        code.append((f"code/{p.relative_to(CODE_ROOT)}", text))
    return docs + code


def chunk(ids: list[int], bos: int, seq_len: int = SEQ_LEN) -> np.ndarray:
    """``[n, seq_len]`` pieces of one document, BOS first; a shorter tail is dropped."""
    body = seq_len - 1
    n = len(ids) // body
    if n == 0:
        return np.zeros((0, seq_len), dtype=np.int32)
    arr = np.asarray(ids[: n * body], dtype=np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), bos, dtype=np.int32), arr], axis=1)


def build_tokenizer(texts: list[str], cfg: TinyConfig):
    """Byte-level BPE trained on the training documents, ``<|endoftext|>`` as BOS (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def step_corpus(cfg: TinyConfig, work: Path) -> None:
    """Documents -> tokenizer -> train/held-out token arrays in ``work``."""
    from tokenizers import Tokenizer

    docs = collect_documents(cfg)
    train_docs = [t for n, t in docs if not held_out(n)]
    tok_path = work / "tokenizer.json"
    if not tok_path.exists():
        build_tokenizer(train_docs, cfg).save(str(tok_path))
    tok = Tokenizer.from_file(str(tok_path))
    bos = tok.token_to_id(BOS)
    if bos is None:
        raise SystemExit(f"{tok_path}: has no {BOS} token (fix: remove it to train it again)")
    splits: dict[str, list[np.ndarray]] = {"train": [], "eval": []}
    for (name, _), enc in zip(docs, tok.encode_batch([t for _, t in docs]), strict=True):
        splits["eval" if held_out(name) else "train"].append(chunk(enc.ids, bos))
    stats = {"documents": len(docs), "doc_files": sum(n.startswith("doc/") for n, _ in docs)}
    for split, parts in splits.items():
        arr = np.concatenate(parts)
        np.save(work / f"{split}_tokens.npy", arr.astype(np.int16))
        stats[f"{split}_sequences"] = int(arr.shape[0])
        stats[f"{split}_documents"] = sum(1 for n, _ in docs if held_out(n) == (split == "eval"))
    stats["characters"] = sum(len(t) for _, t in docs)
    (work / "corpus.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))


def share_corpus(work: Path) -> None:
    """Another family's corpus: the documents of today's Debian packages cut with
    rulecheck-tiny's shipped tokenizer, the held-out documents chosen by the same hash of their
    name, and rulecheck-tiny's shipped held-out split as the held-out tokens, so that both
    models are measured on the same tokens. (The packages' text can change between Debian
    point releases; no training document is a held-out one, whatever the version.)"""
    import shutil

    tiny = out_default(TinyConfig())
    shutil.copy(tiny / "model" / "tokenizer.json", work / "tokenizer.json")
    step_corpus(TinyConfig(), work)
    shutil.copy(tiny / "eval_tokens.npy", work / "eval_tokens.npy")
    stats = json.loads((work / "corpus.json").read_text())
    stats["eval_sequences"] = int(np.load(work / "eval_tokens.npy").shape[0])
    stats["eval_from"] = "rulecheck-tiny"
    stats["packages"] = debian_versions()
    (work / "corpus.json").write_text(json.dumps(stats, indent=2) + "\n")


def debian_versions() -> dict[str, str]:
    """Versions of the Debian packages the corpus is read from, where dpkg knows them."""
    import subprocess

    out = {}
    for pkg in ("python3.11-doc", "libpython3.11-stdlib"):
        try:
            run = subprocess.run(
                ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True
            )
        except OSError:
            continue
        if run.returncode == 0:
            out[pkg] = run.stdout
    return out


# ------------------------------------------------------------------------------------- model


def model_config(cfg: TinyConfig):
    from transformer_lens import HookedTransformerConfig

    common: dict[str, Any] = {  # HookedTransformerConfig keyword arguments
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_model // cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.vocab_size,
        "n_ctx": SEQ_LEN,
        "seed": cfg.seed,
    }
    if cfg.family == "llama":
        return HookedTransformerConfig(
            **common,
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            final_rms=True,
            positional_embedding_type="rotary",
            rotary_dim=cfg.d_model // cfg.n_heads,
            n_key_value_heads=cfg.n_key_value_heads,
            original_architecture="LlamaForCausalLM",
        )
    return HookedTransformerConfig(
        **common, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard"
    )


def lr_at(step: int, cfg: TinyConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_loss(model, tokens: torch.Tensor, batch: int = 256) -> float:
    """Mean next-token loss over the held-out sequences (positions after BOS)."""
    total, count = 0.0, 0
    for s in range(0, len(tokens), batch):
        x = tokens[s : s + batch]
        loss = model(x, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
        total += float(loss.sum())
        count += loss.numel()
    return total / count


def unigram_loss(train: np.ndarray, held: np.ndarray, vocab: int) -> float:
    """Cross-entropy of held-out tokens under add-one unigram frequencies of the training set."""
    counts = np.bincount(train[:, 1:].ravel(), minlength=vocab).astype(np.float64) + 1
    logp = np.log(counts / counts.sum())
    return float(-logp[held[:, 1:].ravel()].mean())


def step_model(cfg: TinyConfig, work: Path, threads: int) -> None:
    """Train the model from ``cfg.seed`` and save it (rulecheck model directory)."""
    from rich.progress import Progress
    from transformer_lens import HookedTransformer

    from rulecheck.loading import save_model

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    train = torch.from_numpy(np.load(work / "train_tokens.npy").astype(np.int64))
    held = torch.from_numpy(np.load(work / "eval_tokens.npy").astype(np.int64))[:2000]
    model = HookedTransformer(model_config(cfg))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(train), generator=g)
    log = []
    start = time.time()
    with Progress() as bar:
        task = bar.add_task(f"training {cfg.name}", total=cfg.steps)
        for step in range(cfg.steps):
            pos = (step * cfg.batch_size) % len(train)
            if pos + cfg.batch_size > len(train):
                order = torch.randperm(len(train), generator=g)
                pos = 0
            x = train[order[pos : pos + cfg.batch_size]]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = model(x, return_type="loss")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % 500 == 0 or step + 1 == cfg.steps:
                ev = held_out_loss(model, held)
                log.append({"step": step + 1, "train_loss": float(loss), "held_out_loss": ev})
                bar.console.print(log[-1])
            bar.advance(task)
    seconds = time.time() - start
    model.eval()
    from tokenizers import Tokenizer

    model_dir = work / "model"
    save_model(model, model_dir)
    Tokenizer.from_file(str(work / "tokenizer.json")).save(str(model_dir / "tokenizer.json"))
    all_held = torch.from_numpy(np.load(work / "eval_tokens.npy").astype(np.int64))
    report = {
        "config": asdict(cfg),
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "machine": machine(),
        "tokens_seen": cfg.steps * cfg.batch_size * SEQ_LEN,
        "held_out_loss": round(held_out_loss(model, all_held), 4),
        "unigram_loss": round(unigram_loss(train.numpy(), all_held.numpy(), cfg.vocab_size), 4),
        "log": log,
    }
    (work / "model.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "log"}))


# -------------------------------------------------------------------------------------- saes


@dataclass(frozen=True)
class SaeConfig:
    """sae_lens training settings of the input and output SAEs."""

    d_sae_in: int = 1024
    d_sae_out: int = 256
    l1_in: float = 1.2
    l1_out: float = 2.0
    k_out: int | None = None  # a TopK-style output SAE with this k instead of L1
    k_arch: str = "topk"  # "topk" (k per token) or "batchtopk" (k per token on average)
    training_tokens: int = 6_000_000
    dead_window: int = 1000  # steps without firing before a TopK SAE's AuxK loss revives it
    batch_tokens: int = 1024
    lr: float = 1e-3
    d_sae_z: int | None = None  # a layer-level hook_z SAE (all heads) of this width, per layer
    k_z: int = 32  # its k (BatchTopK, saved for inference as JumpReLU as Gemma Scope's are)


# rulecheck-tiny-llama's SAEs: input SAEs as rulecheck-tiny's; per-head output SAEs with
# rulecheck-tiny's TopK recipe (the one that met the bars where L1 did not); one layer-level
# hook_z SAE per layer, as Gemma Scope's attention SAEs are.
SAE_OPTIONS = (
    "training_tokens",
    "batch_tokens",
    "lr",
    "l1_in",
    "l1_out",
    "d_sae_out",
    "dead_window",
    "k_out",
    "k_arch",
)
FAMILY_SAES = {
    "gpt2": SaeConfig(),
    "llama": SaeConfig(
        d_sae_out=64, k_out=16, dead_window=50, training_tokens=8_000_000, d_sae_z=512
    ),
}


# one SAE of a run: its hook, head (None: a layer-level SAE), width and sparsity settings
SaeRun = tuple[str, int | None, int, dict[str, Any]]


def sae_runs(model_cfg, sc: SaeConfig) -> list[dict[str, SaeRun]]:
    """One sae_lens run per head index: that head's output SAE in every layer, plus (in the
    first run) the input SAE of every layer. SAEs that share a hook in one run must share its
    head index, hence a run per head; layer-level hook_z SAEs (``d_sae_z``) read every head and
    get a run of their own. Entry: name -> (hook, head, d_sae, sparsity), sparsity
    ``{"l1": c}`` (standard ReLU SAE) or ``{"k": k, "arch": "topk" | "batchtopk"}``."""
    out_sparsity: dict[str, Any] = (
        {"l1": sc.l1_out}
        if sc.k_out is None
        else {"k": sc.k_out, "arch": sc.k_arch, "dead_window": sc.dead_window}
    )
    runs: list[dict[str, SaeRun]] = []
    for h in range(model_cfg.n_heads):
        run: dict[str, SaeRun] = {
            f"sae_out/L{layer}H{h}": (f"blocks.{layer}.attn.hook_z", h, sc.d_sae_out, out_sparsity)
            for layer in range(model_cfg.n_layers)
        }
        if h == 0:
            for layer in range(model_cfg.n_layers):
                run[f"sae_in/L{layer}"] = (
                    f"blocks.{layer}.hook_resid_pre",
                    None,
                    sc.d_sae_in,
                    {"l1": sc.l1_in},
                )
        runs.append(run)
    if sc.d_sae_z is not None:
        z_sparsity: dict[str, Any] = {
            "k": sc.k_z,
            "arch": "batchtopk",
            "dead_window": sc.dead_window,
        }
        runs.append(
            {
                f"sae_z/L{layer}": (f"blocks.{layer}.attn.hook_z", None, sc.d_sae_z, z_sparsity)
                for layer in range(model_cfg.n_layers)
            }
        )
    return runs


def sae_d_in(model_cfg, hook: str, head: int | None) -> int:
    """What an SAE at ``hook`` reads: the residual, one head's z, or every head's z."""
    if not hook.endswith("hook_z"):
        return model_cfg.d_model
    return model_cfg.d_head if head is not None else model_cfg.n_heads * model_cfg.d_head


def training_config(d_in: int, d_sae: int, sparsity: dict):
    """sae_lens's training config for one SAE: a standard ReLU SAE with an L1 penalty, a TopK
    SAE, or a BatchTopK SAE (saved for inference as JumpReLU)."""
    from sae_lens import (
        BatchTopKTrainingSAEConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    common = {"d_in": d_in, "d_sae": d_sae, "normalize_activations": "expected_average_only_in"}
    if "k" in sparsity:
        kind = {"topk": TopKTrainingSAEConfig, "batchtopk": BatchTopKTrainingSAEConfig}
        return kind[sparsity["arch"]](k=sparsity["k"], **common)
    return StandardTrainingSAEConfig(l1_coefficient=sparsity["l1"], l1_warm_up_steps=200, **common)


def training_dataset(work: Path):
    """The training split of ``work`` as a Hugging Face dataset of token ids."""
    from datasets import Dataset

    train = np.load(work / "train_tokens.npy").astype(np.int64)
    return Dataset.from_dict({"input_ids": train.tolist()})


def train_run(
    model, dataset, run: dict, sc: SaeConfig, seed: int, model_name: str = "rulecheck-tiny"
) -> dict:
    """Train the SAEs of one entry of ``sae_runs`` together with sae_lens's multi-SAE runner,
    the runner seeded with ``seed``; name -> trained SAE."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from sae_lens import LoggingConfig, MultiSAETrainingRunner
    from sae_lens.multi_sae_training_runner import MultiSAETrainingRunnerConfig

    saes = {
        name.replace("/", "_"): training_config(sae_d_in(model.cfg, hook, head), d_sae, sparsity)
        for name, (hook, head, d_sae, sparsity) in run.items()
    }
    runner = MultiSAETrainingRunner(
        MultiSAETrainingRunnerConfig(
            saes=saes,
            hook_names={n.replace("/", "_"): v[0] for n, v in run.items()},
            hook_head_indices={n.replace("/", "_"): v[1] for n, v in run.items()},
            model_name=model_name,
            context_size=SEQ_LEN,
            training_tokens=sc.training_tokens,
            train_batch_size_tokens=sc.batch_tokens,
            n_batches_in_buffer=max(32, 2 * sc.batch_tokens // SEQ_LEN),  # must cover a batch
            store_batch_size_prompts=64,
            lr=sc.lr,
            lr_warm_up_steps=100,
            seed=seed,
            device="cpu",
            logger=LoggingConfig(log_to_wandb=False),
            output_path=None,
            checkpoint_path=None,
            n_eval_batches=0,
            n_batches_for_norm_estimate=50,
            dead_feature_window=sc.dead_window,
        ),
        override_model=model,
        override_dataset=dataset,
    )
    trained = runner.run()
    return {name: trained[name.replace("/", "_")] for name in run}


def step_saes(
    cfg: TinyConfig,
    sc: SaeConfig,
    work: Path,
    threads: int,
    heads: list[int] | None = None,
    only: list[str] | None = None,
) -> None:
    """Train the SAEs with sae_lens's multi-SAE runner on the training split: the runs of
    ``heads`` only, or only the SAEs named in ``only``, when given. The report keeps earlier
    runs made with the same settings, and the tokens each SAE was trained on."""
    from rulecheck.loading import load_model

    torch.set_num_threads(threads)
    model = load_model(str(work / "model"))
    dataset = training_dataset(work)
    per_sae = ("training_tokens", "l1_in", "l1_out", "k_out", "k_arch", "d_sae_out", "dead_window")
    settings_of = {k: v for k, v in asdict(sc).items() if k not in per_sae}
    report: dict[str, Any] = {"config": settings_of, "machine": machine(), "runs": []}
    previous = work / "saes.json"
    if previous.exists():
        before = json.loads(previous.read_text())
        if {k: v for k, v in before["config"].items() if k not in per_sae} == settings_of:
            report["runs"] = before["runs"]
    for i, run in enumerate(sae_runs(model.cfg, sc)):
        if heads is not None and i not in heads:
            continue
        if only is not None:
            run = {name: spec for name, spec in run.items() if name in only}
            if not run:
                continue
        start = time.time()
        for name, sae in train_run(model, dataset, run, sc, cfg.seed + i, cfg.name).items():
            sae.save_inference_model(work / name)
        entry = {
            "saes": list(run),
            "sparsity": {name: spec[3] for name, spec in run.items()},
            "d_sae": {name: spec[2] for name, spec in run.items()},
            "tokens": sc.training_tokens,
            "seconds": round(time.time() - start, 1),
        }
        # an SAE trained again replaces its earlier run's record
        kept = []
        for r in report["runs"]:
            rest = [n for n in r["saes"] if n not in run]
            if rest:
                kept.append(
                    dict(
                        r,
                        saes=rest,
                        sparsity={n: r["sparsity"][n] for n in rest},
                        d_sae={n: r["d_sae"][n] for n in rest},
                    )
                )
        report["runs"] = [*kept, entry]
        print(json.dumps(report["runs"][-1]))
    (work / "saes.json").write_text(json.dumps(report, indent=2) + "\n")


# ------------------------------------------------------------------------------ ship and card

QUALITY_SEQUENCES = 2000


def machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def step_ship(work: Path, out: Path) -> None:
    """Copy model, SAEs and held-out tokens into the package (atomically) and measure every
    SAE on the first held-out sequences."""
    import shutil

    from rulecheck.atomic import atomic_directory
    from rulecheck.build.quality import clean_loss, sae_quality
    from rulecheck.loading import load_model, load_sae

    parts = [p for p in ("model", "sae_in", "sae_out", "sae_z") if (work / p).is_dir()]
    with atomic_directory(out) as staging:
        for part in parts:
            shutil.copytree(work / part, staging / part)
        shutil.copy(work / "eval_tokens.npy", staging / "eval_tokens.npy")

    model = load_model(str(out / "model"))
    tokens = torch.from_numpy(np.load(out / "eval_tokens.npy")[:QUALITY_SEQUENCES]).long()
    quality = {}
    clean = clean_loss(model, tokens)
    for layer in range(model.cfg.n_layers):
        for name, head, all_heads in shipped_saes(model.cfg, layer):
            if (out / name).is_dir():
                sae = load_sae(str(out / name))
                quality[name] = sae_quality(
                    model, sae, tokens, layer, head, loss_clean=clean, all_heads=all_heads
                )
        print(json.dumps({k: v for k, v in quality.items() if k.endswith(str(layer))}))
    (work / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")


def shipped_saes(model_cfg, layer: int) -> list[tuple[str, int | None, bool]]:
    """``(name, head, all_heads)`` of each SAE a zoo entry may ship at ``layer``, in the
    card's order: the input SAE, each head's output SAE, the layer-level hook_z SAE."""
    return [
        (f"sae_in/L{layer}", None, False),
        *((f"sae_out/L{layer}H{h}", h, False) for h in range(model_cfg.n_heads)),
        (f"sae_z/L{layer}", None, True),
    ]


RETRAIN_SEED = 1  # the shipped SAEs' run was seeded with TinyConfig.seed (0)
RETRAINED = ("sae_in/L0", "sae_out/L0H0")
# what training writes into cfg.json that differs between two runs of one recipe
RUN_METADATA = ("l0", "num_dead_features")


def check_corpus(work: Path, out: Path) -> None:
    """Make sure ``work`` holds the training split the shipped model was trained on: rebuild it
    with the corpus step when it is missing, then stop unless its held-out split and tokenizer
    are byte for byte and value for value the shipped ones."""
    if not (work / "train_tokens.npy").exists():
        if not DOC_ROOT.is_dir():
            raise SystemExit(
                f"{work / 'train_tokens.npy'}: not found (fix: apt-get install python3.11-doc, "
                f"then python -m rulecheck.build.train_tiny corpus --work {work})"
            )
        print(f"{work / 'train_tokens.npy'}: not found, running the corpus step")
        step_corpus(TinyConfig(), work)
    if (work / "eval_tokens.npy").read_bytes() != (out / "eval_tokens.npy").read_bytes():
        raise SystemExit(
            f"{work / 'eval_tokens.npy'} differs from the shipped {out / 'eval_tokens.npy'}: "
            "this corpus is not the one the model was trained on (another python3.11-doc or "
            "libpython3.11-stdlib version?); SAEs trained on it would not be comparable"
        )
    rebuilt = json.loads((work / "tokenizer.json").read_text())
    if rebuilt != json.loads((out / "model" / "tokenizer.json").read_text()):
        raise SystemExit(
            f"{work / 'tokenizer.json'} differs from the shipped {out / 'model/tokenizer.json'}: "
            "remove it and run the corpus step again"
        )


def _recipe(cfg_json: Path) -> dict:
    """An SAE's cfg.json without what differs between two runs of the same recipe."""
    cfg = json.loads(cfg_json.read_text())
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if k not in RUN_METADATA}
    return cfg


def step_retrain(work: Path, out: Path, threads: int, sc: SaeConfig | None = None) -> None:
    """Train the SAEs in ``RETRAINED`` again from the shipped model with the shipped recipe
    (``SaeConfig``'s defaults) and ``RETRAIN_SEED``, and ship them atomically under
    ``retrained/`` with ``quality.json``: their quality and the shipped ones', measured as the
    ship step does, the training time and the machine. ``sc`` with fewer tokens makes a trial
    run; any setting that cfg.json records must still be the shipped one."""
    from rulecheck.atomic import atomic_directory
    from rulecheck.build.quality import clean_loss, sae_quality
    from rulecheck.loading import load_model, load_sae

    sc = sc or SaeConfig()
    check_corpus(work, out)
    torch.set_num_threads(threads)
    model = load_model(str(out / "model"))
    runs = [
        {name: spec for name, spec in run.items() if name in RETRAINED}
        for run in sae_runs(model.cfg, sc)
    ]
    [run] = [r for r in runs if r]  # all in the shipped ones' run: one head index
    dataset = training_dataset(work)
    with atomic_directory(out / "retrained") as staging:
        start = time.time()
        trained = train_run(model, dataset, run, sc, RETRAIN_SEED)
        seconds = time.time() - start
        for name, sae in trained.items():
            sae.save_inference_model(staging / name)
            if _recipe(staging / name / "cfg.json") != _recipe(out / name / "cfg.json"):
                raise SystemExit(f"{name}: cfg.json differs from the shipped SAE's beyond a run")
        tokens = torch.from_numpy(np.load(out / "eval_tokens.npy")[:QUALITY_SEQUENCES]).long()
        clean = clean_loss(model, tokens)
        quality: dict[str, dict] = {"retrained": {}, "shipped": {}}
        for name, (hook, head, _, _) in run.items():
            layer = int(hook.split(".")[1])  # blocks.{layer}....
            for kind, root in (("retrained", staging), ("shipped", out)):
                sae = load_sae(str(root / name))
                quality[kind][name] = sae_quality(model, sae, tokens, layer, head, loss_clean=clean)
        report = {
            "quality": quality,
            "sequences": QUALITY_SEQUENCES,
            "seed": RETRAIN_SEED,
            "training_tokens": sc.training_tokens,
            "train_seconds": round(seconds, 1),
            "threads": threads,
            "machine": machine(),
        }
        text = json.dumps(report, indent=2, sort_keys=True) + "\n"
        (staging / "quality.json").write_text(text)
        for path in [staging, *staging.rglob("*")]:  # readable as the rest of the package
            path.chmod(0o755 if path.is_dir() else 0o644)
    print(text, end="")


def step_rules(work: Path, rulebooks: Path, name: str = "rulecheck-tiny") -> None:
    """Extract every head of the shipped model ``name`` with the defaults of
    ``rulecheck extract``."""
    from rich.console import Console

    from rulecheck.cli import main as cli

    torch.set_num_threads(1)  # one thread: float sums in a fixed order, so tests can reproduce
    start = time.time()
    code = cli(["extract", "--model", name, "--out", str(rulebooks)])
    if code != 0:
        raise SystemExit(code)
    report = {"features": 100, "seconds": round(time.time() - start, 1), "machine": machine()}
    (work / "extraction.json").write_text(json.dumps(report, indent=2) + "\n")
    Console().print(report)


F1_TARGETS = (0.5, 0.6, 0.7, 0.8)


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else None


def analyse_layer(
    layer: int, name: str = "rulecheck-tiny"
) -> tuple[dict[str, dict[int, list[float]]], list[dict]]:
    """One layer of the analysis (one thread): F1 against the number of terms for each ranking
    method, and the distractor of every weight-extracted feature's top term."""
    from rulecheck.core.distractors import cooccurrence
    from rulecheck.core.extract import ExtractConfig, extract_layer
    from rulecheck.core.heads import Probe
    from rulecheck.core.tokens import top_token
    from rulecheck.kinds import KINDS
    from rulecheck.session import Workbench
    from rulecheck.specs import Specs

    torch.set_num_threads(1)
    art = Workbench(device="cpu", cache_dir=None).layer(Specs(name).resolve(), layer)
    token_of = top_token(art.model, art.sae_in, layer).cpu()
    f1_by_terms: dict[str, dict[int, list[float]]] = {}
    rows: list[dict[str, Any]] = []
    for method in ("weight", "gradient"):
        cfg = ExtractConfig(method=method, rules=method == "weight")
        results = extract_layer(art.model, art.sae_in, art.sae_outs, art.tokens, layer, cfg)
        by_n: dict[int, list[float]] = {}
        for hr in results:
            for f in hr.features:
                for n, f1 in f.f1_by_terms.items():
                    by_n.setdefault(n, []).append(f1)
        f1_by_terms[method] = by_n
        if method != "weight":
            continue
        for hr in results:
            for f in hr.features:
                # the candidate distractor of the top term (q, k), kept or not
                top_term = (int(f.terms.query[0]), int(f.terms.key[0])) if len(f.terms) else None
                top = [
                    a for a in f.claims["absence"] if (a.query.feature, a.key.feature) == top_term
                ]
                row: dict[str, Any] = {
                    "head": hr.head,
                    "feature": f.feature,
                    "distractor": bool(top),
                }
                if top:
                    a = top[0]
                    probe = Probe(art.model, art.sae_outs[hr.head], layer, hr.head, f.feature)
                    refs = (a.key, a.query, a.distractor)
                    ids = [int(token_of[r.feature]) for r in refs]
                    sample = art.tokens[:QUALITY_SEQUENCES]
                    co = cooccurrence(probe, sample, *ids) if min(ids) >= 0 else None
                    row |= {"drop": a.drop, "suppresses": KINDS["absence"].keep(a)}
                    if co is not None:
                        row |= {
                            "share": co.share,
                            "mean_with": co.mean_with,
                            "mean_without": co.mean_without,
                        }
                rows.append(row)
    return f1_by_terms, rows


def step_analysis(work: Path, rulebooks: Path, threads: int, name: str = "rulecheck-tiny") -> None:
    """The paper's Fig. 4a, 6a-c and 9 analogues on the shipped model: weight against gradient
    ranking, and the distractors of every extracted feature's top term. Layers run in
    parallel processes, one thread each, so the numbers do not depend on ``threads``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rulecheck.rulebook import load_rulebook

    layers = list(range(TinyConfig.n_layers))
    workers = max(1, min(threads, len(layers)))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        per_layer = list(pool.map(analyse_layer, layers, [name] * len(layers)))
    report: dict = {"f1_by_terms": {}, "distractors": {}}
    for layer, (f1_by_terms, rows) in zip(layers, per_layer, strict=True):
        for method, by_n in f1_by_terms.items():
            report["f1_by_terms"].setdefault(method, {})[layer] = by_n
        report["distractors"][layer] = rows
    validated: dict[int, list[int]] = {}  # layer -> features, with absence, with counting
    for path in sorted(rulebooks.glob("L*H*.yaml")):
        book = load_rulebook(path)
        v = validated.setdefault(book.layer, [0, 0, 0])
        v[0] += len(book.features)
        v[1] += sum(1 for f in book.features if f.absence)
        v[2] += sum(1 for f in book.features if f.counting)
    report["rulebooks"] = validated
    (work / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")


def fewest_terms(by_n: dict, target: float) -> int | None:
    """The fewest terms at which the median F1 over features reaches ``target``."""
    for n in sorted(by_n, key=int):
        if float(np.median(by_n[n])) >= target:
            return int(n)
    return None


def analysis_lines(analysis: dict) -> list[str]:
    """Model-card tables of the analysis step."""
    lines = [
        "",
        "## Weight-based against gradient-based ranking (paper Fig. 4a)",
        "",
        "Both rankings of the same candidates, evaluated on the same exemplars (all features of",
        "every head). The fewest terms at which the median test F1 reaches a level (- if never):",
        "",
        "| layer | method | " + " | ".join(f"F1 >= {t}" for t in F1_TARGETS) + " | "
        "median F1 at 4 terms | at 64 |",
        "|---|---|" + "---:|" * (len(F1_TARGETS) + 2),
    ]
    f1 = analysis["f1_by_terms"]
    for layer in sorted(f1["weight"], key=int):
        for method in ("weight", "gradient"):
            by_n = f1[method][layer]
            cells = [fewest_terms(by_n, t) for t in F1_TARGETS]
            med = {n: float(np.median(by_n[n])) for n in ("4", "64") if n in by_n}
            lines.append(
                f"| {layer} | {method} | "
                + " | ".join("-" if c is None else str(c) for c in cells)
                + f" | {med.get('4', float('nan')):.2f} | {med.get('64', float('nan')):.2f} |"
            )
    lines += [
        "",
        "## Distractors (paper Fig. 9, 6a-c)",
        "",
        "For each extracted feature's top term (q, k): a distractor k' with attn(q, k') >",
        "attn(q, k) and value(k') < -1e-3 max |value|, k' a corpus body token other than BOS",
        "(first in attention order). Its token inserted 1-4 times",
        "into test positives reading k ... q gives the mean relative drop (Fig. 6c); over the",
        f"first {QUALITY_SEQUENCES:,} held-out sequences, the share of k ... q sequences that",
        "also hold k' and the mean activation with and without it (Fig. 6a, 6b). Rulebooks keep",
        "an absence rule when one copy halves the activation on average and the plugin's",
        "property holds.",
        "",
        "| layer | features | with a distractor | drop 1 / 2 / 3 / 4 copies | co-occurring "
        "| act. with / without | absence rules kept | counting rules |",
        "|---|---:|---:|---|---:|---|---:|---:|",
    ]
    for layer, rows in sorted(analysis["distractors"].items(), key=lambda kv: int(kv[0])):
        with_d = [r for r in rows if r["distractor"]]
        drops = [_nanmean([r["drop"][i] for r in with_d]) for i in range(4)]
        share = _nanmean([r["share"] for r in with_d if "share" in r])
        mw = _nanmean([r["mean_with"] for r in with_d if "mean_with" in r])
        mwo = _nanmean([r["mean_without"] for r in with_d if "mean_without" in r])
        kept = analysis["rulebooks"].get(layer, analysis["rulebooks"].get(int(layer), [0, 0, 0]))

        def fmt(x: float | None, pct: bool = False) -> str:
            return "-" if x is None else (f"{x:.0%}" if pct else f"{x:.3f}")

        lines.append(
            f"| {layer} | {len(rows)} | {len(with_d)} ({len(with_d) / max(len(rows), 1):.0%}) | "
            + " / ".join(fmt(d, pct=True) for d in drops)
            + f" | {fmt(share, pct=True)} | {fmt(mw)} / {fmt(mwo)} | {kept[1]} | {kept[2]} |"
        )
    return lines


def f1_by_layer(rulebooks: Path) -> dict[int, dict[int, list[float]]]:
    """Test F1 of every extracted feature, by layer and number of terms."""
    from rulecheck.rulebook import load_rulebook

    table: dict[int, dict[int, list[float]]] = {}
    for path in sorted(rulebooks.glob("L*H*.yaml")):
        book = load_rulebook(path, measurements=True)
        for f in book.features:
            for n, f1 in (f.measured.get("f1_by_terms") or {}).items():
                table.setdefault(book.layer, {}).setdefault(int(n), []).append(f1)
    return table


# The format-1 books shipped before format 2 (weight ranking, the best validation F1 among up
# to 64 terms, every number at 6 significant digits, measurements inside), measured from them
# on 2026-11-22 before they were replaced: test F1 quartiles and mean skip-grams listed per
# extracted feature, the largest book and all books of the layer, in bytes.
FORMER_BOOKS: dict[int, dict[str, Any]] = {
    0: {"f1": (0.3175, 0.5695, 0.8265), "terms": 51.4, "largest": 997_458, "all": 3_426_922},
    1: {"f1": (0.6514, 0.8511, 0.9412), "terms": 49.3, "largest": 1_021_177, "all": 3_457_284},
}


def shipped_books_lines(rulebooks: Path) -> list[str]:
    """The shipped books against the former ones: quality, terms and size per layer."""
    from rulecheck.rulebook import load_rulebook

    rows: dict[int, dict[str, Any]] = {}  # layer -> f1, terms, bytes (lists), method (a set)
    for path in sorted(rulebooks.glob("L*H*.yaml")):
        book = load_rulebook(path, measurements=True)
        row = rows.setdefault(book.layer, {"f1": [], "terms": [], "bytes": [], "method": set()})
        row["f1"] += [f.measured["f1"] for f in book.features if f.source == "extracted"]
        row["terms"] += [len(f.skipgrams) for f in book.features if f.source == "extracted"]
        row["bytes"].append(path.stat().st_size)
        row["method"].add(book.extraction.get("method"))
    lines = [
        "",
        "## Shipped rulebooks against the former ones",
        "",
        "Median (quartiles) test F1 of the skip-gram disjunction over extracted features, mean",
        "skip-grams listed per feature, and size, for the shipped format-2 books (gradient",
        "ranking, the fewest terms within `term_margin` of the best validation F1) and the",
        "format-1 books they replaced (weight ranking, the best validation F1 up to 64 terms):",
        "",
        "| layer | books | features | test F1 | skip-grams per feature | largest book | all books |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for layer, row in sorted(rows.items()):
        old = FORMER_BOOKS.get(layer)
        if old is not None:
            low, mid, high = old["f1"]
            lines.append(
                f"| {layer} | format 1, weight | {len(row['f1'])} | "
                f"{mid:.2f} ({low:.2f}-{high:.2f}) | {old['terms']:.1f} | "
                f"{old['largest'] / 1e3:,.0f} KB | {old['all'] / 1e3:,.0f} KB |"
            )
        method = ", ".join(sorted(m for m in row["method"] if m))
        lines.append(
            f"| {layer} | format 2, {method} | {len(row['f1'])} | "
            f"{_quartiles(row['f1'])} | {sum(row['terms']) / len(row['terms']):.1f} | "
            f"{max(row['bytes']) / 1e3:.0f} KB | {sum(row['bytes']) / 1e3:.0f} KB |"
        )
    return lines


def _method(rulebooks: Path) -> str:
    """The ranking method the shipped books record."""
    from rulecheck.rulebook import load_rulebook

    methods = {load_rulebook(p).extraction.get("method") for p in rulebooks.glob("L*H*.yaml")}
    return ", ".join(sorted(str(m) for m in methods))


def _quartiles(values: list[float]) -> str:
    q = np.quantile(np.asarray(values), [0.25, 0.5, 0.75])
    return f"{q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f})"


def _family_lines(mc: dict) -> dict[str, list[str]]:
    """The parts of the card that differ between the families: its introduction, the
    corpus's source of tokens, the architecture, and what the SAEs read."""
    d_head = mc["d_model"] // mc["n_heads"]
    if mc.get("family", "gpt2") == "gpt2":
        return {
            "intro": ["A small GPT-2-style language model trained on real text"],
            "corpus": [],
            "model": [
                f"- {mc['n_layers']} layers, d_model {mc['d_model']}, {mc['n_heads']} heads of "
                f"d_head {d_head}, d_mlp {mc['d_mlp']}, LayerNorm, GELU, learned positions, "
                f"n_ctx {SEQ_LEN}."
            ],
            "saes": [],
        }
    return {
        "intro": [
            "A small Llama-style language model (rotary positions, grouped-query attention,",
            "RMSNorm, a gated SiLU MLP) trained on rulecheck-tiny's corpus with its tokenizer",
        ],
        "corpus": [
            "- The same documents as rulecheck-tiny's, cut with rulecheck-tiny's shipped",
            "  tokenizer and split by the same hash of their names; the held-out tokens are",
            "  rulecheck-tiny's shipped `eval_tokens.npy`, so both models are measured on the",
            "  same tokens (the training split was read from the Debian packages of this build's",
            "  machine, whose text may differ from rulecheck-tiny's by a point release).",
        ],
        "model": [
            f"- {mc['n_layers']} layers, d_model {mc['d_model']}, {mc['n_heads']} query heads "
            f"of d_head {d_head} sharing {mc['n_key_value_heads']} key/value heads, rotary "
            f"positions on the whole head (base 10000), RMSNorm, gated SiLU MLP of d_mlp "
            f"{mc['d_mlp']}, n_ctx {SEQ_LEN}."
        ],
        "saes": [
            "A layer-level SAE `sae_z/L{l}` reads every head's z of `blocks.{l}.attn.hook_z`",
            "concatenated, as Gemma Scope's attention SAEs do (BatchTopK, saved as JumpReLU);",
            "its CE recovered splices it into every head and compares with all heads ablated.",
        ],
    }


def family_lines(
    books: dict[str, Path], tables: dict[str, dict], held_out_loss: float, name: str
) -> list[str]:
    """What differs between rulecheck-tiny and another family's model on the same tokens:
    loss, features extracted, F1 at few terms (from ``tables``, each model's
    ``f1_by_layer``), and the share of rules of each kind."""
    import re

    from rulecheck.build.census import census

    tiny_card = (out_default(TinyConfig()) / "MODEL_CARD.md").read_text()
    found = re.search(r"Held-out loss: \*\*([0-9.]+)\*\*", tiny_card)
    losses = {"rulecheck-tiny": float(found.group(1)) if found else math.nan, name: held_out_loss}
    lines = [
        "",
        "## What differs between the two families",
        "",
        "Both models read the same documents with the same tokenizer, and are measured on the",
        "same held-out tokens, with",
        "the same sizes (2 layers, d_model 128, 4 heads of 32); the table sets their books",
        "side by side, per layer: held-out loss, features extracted (per-head output SAEs of",
        "256 L1 or 64 TopK features against 64 TopK features here), median test F1 with the",
        "book's terms and at 4 terms, and the share of features with a distance-bounded,",
        "absence or counting claim.",
        "",
        "| model | held-out loss | layer | features | F1 | F1 at 4 terms | bounded | absence |"
        " counting |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, path in books.items():
        rows = census(path)
        f1_4 = {layer: by_n.get(4, []) for layer, by_n in tables[model_name].items()}
        for layer, row in rows.items():
            n = row["features"]
            cells = [
                f"{row['f1']:.2f}",
                f"{np.median(f1_4[layer]):.2f}" if f1_4.get(layer) else "-",
                *(f"{row[k] / n:.0%}" if n else "-" for k in ("bounded", "absence", "counting")),
            ]
            lines.append(
                f"| {model_name} | {losses[model_name]:.3f} | {layer} | {n} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def step_card(work: Path, out: Path, rulebooks: Path, cfg: TinyConfig | None = None) -> None:
    """MODEL_CARD.md from the measured reports of every step and the shipped rulebooks."""
    from rulecheck.build.census import census_lines

    cfg = cfg or TinyConfig()
    corpus = json.loads((work / "corpus.json").read_text())
    model = json.loads((work / "model.json").read_text())
    saes = json.loads((work / "saes.json").read_text())
    quality = json.loads((work / "quality.json").read_text())
    extraction = json.loads((work / "extraction.json").read_text())
    mc = model["config"]
    family = _family_lines(mc)
    lines = [
        f"# {cfg.name}",
        "",
        *family["intro"],
        "and its sparse autoencoders trained by sae_lens, shipped so that rulecheck runs",
        "offline. Everything below is measured by `python -m rulecheck.build.train_tiny STEP"
        + ("" if cfg.family == "gpt2" else f" --family {cfg.family}")
        + "`",
        "(corpus, model, saes, ship, rules, analysis, card); none of it is estimated.",
        "",
        "## Corpus",
        "",
        "- Text: the reStructuredText sources of the Python 3.11 documentation (Debian package",
        "  `python3.11-doc`, `/usr/share/doc/python3.11/html/_sources`) and Python standard-library",
        "  modules (`/usr/lib/python3.11`, Debian `libpython3.11-stdlib`, tests excluded), at most",
        f"  {TinyConfig.code_share:g} character of code per character of documentation.",
        "- License: both are distributed under the Python Software Foundation License Version 2,",
        "  which permits redistribution of derived works with the license notice; the model and",
        "  its SAEs are derived works of that text.",
        *family["corpus"],
        f"- {corpus['documents']} documents ({corpus['doc_files']} documentation files), "
        f"{corpus['characters']:,} characters.",
        f"- Whole documents are held out by a hash of their name ({HELD_OUT_PERCENT}%): "
        f"{corpus['train_sequences']:,} training sequences from {corpus['train_documents']} "
        f"documents, {corpus['eval_sequences']:,} held-out sequences from "
        f"{corpus['eval_documents']} documents, each {SEQ_LEN} tokens, BOS first, from one "
        "document. The held-out ones ship as `eval_tokens.npy`.",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE ({mc['vocab_size']} tokens) trained with Hugging Face `tokenizers` on the",
        f"training documents; `{BOS}` (id 0) is BOS.",
        "",
        "## Model",
        "",
        *family["model"],
        f"- AdamW (lr {mc['lr']}, betas 0.9/0.95, weight decay {mc['weight_decay']}), "
        f"{mc['warmup']} warm-up steps then cosine to a tenth, batch {mc['batch_size']} x "
        f"{SEQ_LEN}, {mc['steps']} steps ({model['tokens_seen']:,} tokens), seed {mc['seed']}.",
        f"- Trained in {model['train_seconds'] / 60:.1f} minutes on {model['machine']} "
        f"({model['threads']} threads){'; ' + model['note'] if model.get('note') else ''}.",
        f"- Held-out loss: **{model['held_out_loss']:.3f}** nats/token, against "
        f"{model['unigram_loss']:.3f} for a unigram model of the training split.",
        "",
        "## SAEs",
        "",
        "Trained with sae_lens's `MultiSAETrainingRunner` (standard ReLU SAEs with an L1",
        "penalty, or TopK SAEs with the AuxK loss; inputs normalised to the expected norm",
        "and the factor folded in), batches of "
        f"{saes['config']['batch_tokens']:,} tokens at lr {saes['config']['lr']:g}, "
        f"in {sum(r['seconds'] for r in saes['runs']) / 60:.1f} minutes in all on "
        f"{saes['machine']} (SAEs sharing a hook point's head index train in one run).",
        *(
            [
                "Output SAEs that could not meet L0 <= 20 and 80% CE recovered together with an",
                "L1 penalty were trained again, alone, as TopK SAEs (fewer features, and the AuxK",
                "loss on features silent for `dead_window` steps): the table gives each shipped",
                "SAE's own.",
            ]
            if cfg.family == "gpt2"
            else [
                "Output SAEs use the TopK recipe that met the bars where an L1 penalty did not",
                "on rulecheck-tiny (fewer features, the AuxK loss on features silent for",
                "`dead_window` steps).",
            ]
        ),
        "Input SAEs read `blocks.{l}.hook_resid_pre`; output SAEs read one head of",
        "`blocks.{l}.attn.hook_z` (`hook_head_index`).",
        *family["saes"],
        f"Measured on the first {QUALITY_SEQUENCES:,} held-out sequences, positions after BOS.",
        "CE recovered splices the SAE's reconstruction into its head and compares the loss with",
        "the clean model and with that head's z zero-ablated.",
        "",
        "| SAE | d_sae | sparsity | tokens | L0 | dead | explained variance | CE recovered |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tokens_of = {name: r["tokens"] for r in saes["runs"] for name in r["saes"]}
    sparsity_of = {name: r["sparsity"][name] for r in saes["runs"] for name in r["saes"]}
    d_sae_of = {name: r["d_sae"][name] for r in saes["runs"] for name in r["saes"]}
    for name, q in quality.items():
        ce = f"{q['ce_recovered']:.1%}" if "ce_recovered" in q else ""
        sp = sparsity_of[name]
        arch = {"topk": "TopK", "batchtopk": "BatchTopK"}
        sparsity = (
            f"{arch[sp['arch']]} k={sp['k']}, dead_window {sp['dead_window']}"
            if "k" in sp
            else f"L1 {sp['l1']:g}"
        )
        lines.append(
            f"| {name} | {d_sae_of[name]} | {sparsity} | {tokens_of[name] / 1e6:g}M "
            f"| {q['l0']:.1f} "
            f"| {q['dead_fraction']:.1%} "
            f"| {q['explained_variance']:.3f} | {ce} |"
        )
    books = {cfg.name: rulebooks}
    if cfg.family != "gpt2":  # the family's books beside rulecheck-tiny's
        books = {"rulecheck-tiny": rulebooks.parent / "rulecheck-tiny", cfg.name: rulebooks}
    tables = {name: f1_by_layer(path) for name, path in books.items()}
    counts = sorted({n for t in tables.values() for layer in t.values() for n in layer})
    both = len(books) > 1
    lines += [
        "",
        "## Rules",
        "",
        f"`rulebooks/{cfg.name}/` holds one rulebook per head, written by `rulecheck extract`",
        f"({_method(rulebooks)} ranking, {extraction['features']} features per head at most, "
        f"{extraction['seconds']:.0f} s on {extraction['machine']}). Test-split F1 of the",
        "skip-gram disjunction against the number of terms, median (quartiles) over features"
        + (", for both families:" if both else ":"),
        "",
        ("| model " if both else "")
        + "| layer | features | "
        + " | ".join(str(n) for n in counts)
        + " |",
        ("|---" if both else "") + "|---|---:|" + "---:|" * len(counts),
    ]
    for name, table in tables.items():
        for layer, by_n in sorted(table.items()):
            n_feat = max(len(v) for v in by_n.values())
            cells = [_quartiles(by_n[n]) if n in by_n else "" for n in counts]
            lines.append(
                (f"| {name} " if both else "")
                + f"| {layer} | {n_feat} | "
                + " | ".join(cells)
                + " |"
            )
    if cfg.family == "gpt2":
        lines += shipped_books_lines(rulebooks)
    analysis_path = work / "analysis.json"
    if analysis_path.exists():
        lines += analysis_lines(json.loads(analysis_path.read_text()))
    if both:
        lines += family_lines(books, tables, model["held_out_loss"], cfg.name)
        lines += census_lines(rulebooks, against=("rulecheck-tiny", books["rulecheck-tiny"]))
    else:
        lines += census_lines(rulebooks)
    # the gate's section is rulecheck.build.calibration's (calibration card): kept as it is
    before = (out / "MODEL_CARD.md").read_text() if (out / "MODEL_CARD.md").exists() else ""
    if "\n## The retraining gate\n" in before:
        lines += [
            "",
            "## The retraining gate",
            *before.split("\n## The retraining gate\n")[1].rstrip("\n").split("\n"),
        ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------- cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rulecheck.build.train_tiny")
    parser.add_argument(
        "step",
        choices=[
            "corpus",
            "model",
            "saes",
            "ship",
            "rules",
            "analysis",
            "card",
            "retrain",
            "all",
        ],
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="gpt2",
        help="gpt2: rulecheck-tiny; llama: rulecheck-tiny-llama (same corpus and tokenizer)",
    )
    parser.add_argument("--rulebooks", type=Path, help="default rulebooks/NAME")
    parser.add_argument("--work", type=Path, help="default build/tiny, build/tiny-FAMILY")
    parser.add_argument("--out", type=Path, help="default the package's zoo entry")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=TinyConfig.steps)
    # SAE settings: the family's (FAMILY_SAES) unless given
    parser.add_argument("--sae-tokens", type=int, dest="training_tokens")
    parser.add_argument("--sae-batch", type=int, dest="batch_tokens")
    parser.add_argument("--sae-lr", type=float, dest="lr")
    parser.add_argument("--l1-in", type=float, dest="l1_in")
    parser.add_argument("--l1-out", type=float, dest="l1_out")
    parser.add_argument("--d-sae-out", type=int, dest="d_sae_out")
    parser.add_argument("--dead-window", type=int, dest="dead_window")
    parser.add_argument("--k-out", type=int, help="train TopK-style output SAEs with this k")
    parser.add_argument("--k-arch", choices=("topk", "batchtopk"))
    parser.add_argument(
        "--sae-only",
        type=lambda x: x.split(","),
        default=None,
        help="train only these SAEs, e.g. sae_in/L1,sae_out/L0H1",
    )
    parser.add_argument(
        "--sae-heads",
        type=lambda x: [int(h) for h in x.split(",")],
        default=None,
        help="train only these head runs (calibration)",
    )
    args = parser.parse_args(argv)
    cfg = replace(FAMILIES[args.family], steps=args.steps)
    args.rulebooks = args.rulebooks or Path("rulebooks") / cfg.name
    args.work = args.work or Path("build") / cfg.name.replace("rulecheck-", "")
    args.out = args.out or out_default(cfg)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step in ("corpus", "all"):
        if cfg.family == "gpt2":
            step_corpus(cfg, args.work)
        else:
            share_corpus(args.work)
    if args.step in ("model", "all"):
        step_model(cfg, args.work, args.threads)
    if args.step in ("saes", "all"):
        sc = replace(
            FAMILY_SAES[args.family],
            **{k: v for k, v in vars(args).items() if k in SAE_OPTIONS and v is not None},
        )
        step_saes(cfg, sc, args.work, args.threads, args.sae_heads, args.sae_only)
    if args.step in ("ship", "all"):
        step_ship(args.work, args.out)
    if args.step in ("rules", "all"):
        step_rules(args.work, args.rulebooks, cfg.name)
    if args.step in ("analysis", "all"):
        step_analysis(args.work, args.rulebooks, args.threads, cfg.name)
    if args.step in ("card", "all"):
        step_card(args.work, args.out, args.rulebooks, cfg)
    if args.step == "retrain":
        step_retrain(args.work, args.out, args.threads)


if __name__ == "__main__":
    main()
