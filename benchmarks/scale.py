"""How extraction's cost grows: a GPT-2-shaped synthetic model built by code, extracted at
several numbers of heads, features and corpus sizes, each in its own process (wall time and
peak memory). ``python -m benchmarks.scale [--full]``; figures go to BENCHMARKS.md.

The model has random weights (TransformerLens's initialisation), a word-level tokenizer, a
Zipf-distributed random corpus, and random SAEs whose encoder biases are set from the
activations so that each feature fires on about 1% of tokens (about half the sequences: the
protocol needs active and inactive ones). Nothing is learned, so the rules mean nothing; what
is measured is the work. The default is one layer of GPT-2 small's width (d_model 768, 12
heads of 64) with 4,096-feature SAEs, sized for a CPU; ``--full`` uses 24,576-feature SAEs
and 50,000 sequences, for a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    d_model: int = 768
    n_heads: int = 12
    d_head: int = 64
    d_sae_in: int = 4096
    d_sae_out: int = 4096
    d_vocab: int = 4096
    n_ctx: int = 64
    fire: float = 0.011  # share of tokens a feature fires on: 1 - (1 - 0.011)^63 ~ 0.5 of sequences


def _tokenizer(d_vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<bos>": 0, **{f"w{i}": i for i in range(1, d_vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<bos>"])
    return tok


def _calibrated_sae(
    d_in: int, d_sae: int, hook: str, head: int | None, acts: torch.Tensor, fire: float, seed: int
):
    """A random SAE whose features each fire on about ``fire`` of the rows of ``acts``."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            metadata=SAEMetadata(hook_name=hook, hook_head_index=head, model_name="synthetic"),
        )
    )
    w_dec = torch.randn(d_sae, d_in, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.zero_()
        pre = acts @ w_dec.T  # [rows, d_sae]
        sae.b_enc.copy_(-torch.quantile(pre[:20_000], 1 - fire, dim=0))
    return sae


def build(out: Path, shape: Shape, n_seq: int, seed: int = 0) -> Path:
    """Write model, input SAE, per-head output SAEs and corpus under ``out``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from rulecheck.loading import save_model

    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        d_head=shape.d_head,
        d_mlp=4 * shape.d_model,
        d_vocab=shape.d_vocab,
        n_ctx=shape.n_ctx,
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
    )
    model = HookedTransformer(cfg)
    save_model(model, out / "model")
    _tokenizer(shape.d_vocab).save(str(out / "model" / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, shape.d_vocab)  # Zipf over the words
    tokens = 1 + rng.choice(shape.d_vocab - 1, size=(n_seq, shape.n_ctx), p=p / p.sum())
    tokens[:, 0] = 0
    np.save(out / "tokens.npy", tokens.astype(np.int32))
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.from_numpy(tokens[:400]).long())
    resid = cache["blocks.0.hook_resid_pre"][:, 1:].reshape(-1, shape.d_model)
    z = cache["blocks.0.attn.hook_z"][:, 1:]  # [batch, pos, head, d_head]
    _calibrated_sae(
        shape.d_model, shape.d_sae_in, "blocks.0.hook_resid_pre", None, resid, shape.fire, seed
    ).save_model(str(out / "sae_in" / "L0"))
    for h in range(shape.n_heads):
        acts = z[:, :, h].reshape(-1, shape.d_head)
        sae = _calibrated_sae(
            shape.d_head, shape.d_sae_out, "blocks.0.attn.hook_z", h, acts, shape.fire, seed + h
        )
        sae.save_model(str(out / "sae_out" / f"L0H{h}"))
    return out


def extract(root: Path, heads: int, features: int, n_seq: int, out: Path) -> tuple[float, float]:
    """Wall seconds and peak memory (GiB) of ``rulecheck extract`` in its own process."""
    corpus = root / f"tokens_{n_seq}.npy"
    if not corpus.exists():
        np.save(corpus, np.load(root / "tokens.npy")[:n_seq])
    argv = [
        sys.executable, "-m", "rulecheck.cli", "extract",
        "--model", str(root / "model"),
        "--sae-in", str(root / "sae_in" / "L{layer}"),
        "--sae-out", str(root / "sae_out" / "L{layer}H{head}"),
        "--corpus", str(corpus), "--layer", "0",
        "--heads", ",".join(map(str, range(heads))), "--features", str(features),
        "--out", str(out),
    ]  # fmt: skip
    # the peak of this process's own memory: Linux's VmHWM, which starts afresh at exec (the
    # rusage maximum does not: a child forked from a large parent reports the parent's peak)
    probe = (
        "import pathlib, resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "code = 0\n"
        "try:\n    runpy.run_module('rulecheck.cli', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code or 0\n"
        "status = pathlib.Path('/proc/self/status')\n"
        "hwm = [l for l in status.read_text().splitlines() if l.startswith('VmHWM')] "
        "if status.exists() else []\n"
        "kib = int(hwm[0].split()[1]) if hwm else "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('PEAK', kib, file=sys.stderr)\n"
        "sys.exit(code)"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv[2:]], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if not line.startswith("PEAK")]
        raise SystemExit(f"extract failed: {said[-1] if said else done.returncode}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK")][-1]
    return wall, int(peak.split()[1]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    parser.add_argument("--full", action="store_true", help="24,576-feature SAEs, 50,000 sequences")
    args = parser.parse_args()
    shape = Shape(d_sae_in=24_576, d_sae_out=24_576) if args.full else Shape()
    base = {"heads": 1, "features": 8, "n_seq": 1000}
    grid = [
        base,
        {**base, "heads": 2},
        {**base, "heads": 4},
        {**base, "features": 16},
        {**base, "features": 32},
        {**base, "n_seq": 2000},
        {**base, "n_seq": 4000},
    ]
    if args.full:
        grid = [{"heads": h, "features": 100, "n_seq": 50_000} for h in (1, 12)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = build(Path(tmp) / "synthetic", shape, max(g["n_seq"] for g in grid))
        for i, point in enumerate(grid):
            wall, peak = extract(root, out=Path(tmp) / f"out{i}", **point)
            rows.append({**point, "seconds": round(wall, 1), "peak_gib": round(peak, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"shape": shape.__dict__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
