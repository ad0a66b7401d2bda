"""rulecheck-tiny's retrained SAEs: the shipped recipe with another seed (``python -m
rulecheck.build.train_tiny retrain``), loaded through the zoo specs, for gating rulebooks
against SAEs that are not the ones they were extracted from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rulecheck import zoo
from rulecheck.build.quality import clean_loss, sae_quality
from rulecheck.build.train_tiny import RETRAIN_SEED, SaeConfig, TinyConfig
from rulecheck.loading import check_sae, load_model, load_sae
from rulecheck.specs import locate

ROOT = zoo.entry_dir("rulecheck-tiny")
SEQUENCES = 300  # held-out sequences the test measures on: a few seconds on two cores
# SAE name -> (zoo spec template, layer, head)
RETRAINED = {
    "sae_in/L0": ("sae_in/L{layer}", 0, None),
    "sae_out/L0H0": ("sae_out/L{layer}H{head}", 0, 0),
}
EV_TOLERANCE = 0.05
CE_TOLERANCE = 0.05


def load(template: str, layer: int, head: int | None, *, retrained: bool):
    prefix = "retrained/" if retrained else ""
    return load_sae(locate(f"rulecheck-tiny:{prefix}{template}"), layer=layer, head=head)


@pytest.fixture(scope="module")
def model():
    return load_model(locate("rulecheck-tiny"))


@pytest.fixture(scope="module")
def tokens():
    return torch.from_numpy(np.load(zoo.resolve("rulecheck-tiny:eval"))[:SEQUENCES]).long()


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((ROOT / "retrained" / "quality.json").read_text())


@pytest.fixture(scope="module")
def measured(model, tokens) -> dict[str, dict[str, dict[str, float]]]:
    """Quality of the shipped and the retrained SAEs, measured alike on ``tokens``."""
    clean = clean_loss(model, tokens)
    out: dict[str, dict[str, dict[str, float]]] = {"shipped": {}, "retrained": {}}
    for name, (template, layer, head) in RETRAINED.items():
        for kind in out:
            sae = load(template, layer, head, retrained=kind == "retrained")
            out[kind][name] = sae_quality(model, sae, tokens, layer, head, loss_clean=clean)
    return out


def test_the_retrained_files_are_shipped():
    for name in RETRAINED:
        for file in ("cfg.json", "sae_weights.safetensors"):
            assert (ROOT / "retrained" / name / file).is_file(), (name, file)
    assert (ROOT / "retrained" / "quality.json").is_file()


@pytest.mark.parametrize("name", RETRAINED)
def test_retrained_saes_read_the_shipped_ones_hooks(model, name):
    template, layer, head = RETRAINED[name]
    shipped = load(template, layer, head, retrained=False)
    retrained = load(template, layer, head, retrained=True)
    kind = "in" if head is None else "out"
    check_sae(retrained, model, layer=layer, head=head, kind=kind, spec=name)
    assert type(retrained) is type(shipped)
    for field in ("d_in", "d_sae"):
        assert getattr(retrained.cfg, field) == getattr(shipped.cfg, field), field
    for field in ("hook_name", "hook_head_index"):
        assert getattr(retrained.cfg.metadata, field) == getattr(shipped.cfg.metadata, field)
    assert retrained.cfg.metadata.hook_head_index == head


@pytest.mark.parametrize("name", RETRAINED)
def test_retrained_saes_are_other_weights(name):
    """Another seed: other weights, not a copy of the shipped SAE."""
    template, layer, head = RETRAINED[name]
    shipped = load(template, layer, head, retrained=False)
    retrained = load(template, layer, head, retrained=True)
    for param in ("W_enc", "W_dec", "b_enc"):
        a, b = getattr(shipped, param), getattr(retrained, param)
        assert a.shape == b.shape, param
        assert not torch.allclose(a, b), param


def test_the_report_records_the_run(report):
    assert report["seed"] == RETRAIN_SEED != TinyConfig.seed
    assert report["training_tokens"] == SaeConfig.training_tokens
    assert report["train_seconds"] > 0 and report["machine"]
    assert set(report["quality"]["retrained"]) == set(RETRAINED)


def test_recorded_quality_is_the_shipped_ones_range(report, measured):
    """quality.json (the first QUALITY_SEQUENCES held-out sequences) against the shipped SAEs
    measured here on fewer of them."""
    for name, q in report["quality"]["retrained"].items():
        shipped = measured["shipped"][name]
        assert abs(q["explained_variance"] - shipped["explained_variance"]) <= EV_TOLERANCE, name
        assert q["dead_fraction"] < 0.10, name


def test_retrained_quality_is_the_shipped_ones_range(measured):
    """Measured alike on the same sequences: explained variance and (output SAEs) cross-entropy
    recovered close to the shipped SAE's, L0 of the same order."""
    for name, shipped in measured["shipped"].items():
        retrained = measured["retrained"][name]
        ev = (retrained["explained_variance"], shipped["explained_variance"])
        assert abs(ev[0] - ev[1]) <= EV_TOLERANCE, (name, ev)
        assert 0.5 <= retrained["l0"] / shipped["l0"] <= 2.0, (name, retrained, shipped)
        assert retrained["dead_fraction"] < 0.10, name
        if "ce_recovered" in shipped:
            ce = (retrained["ce_recovered"], shipped["ce_recovered"])
            assert abs(ce[0] - ce[1]) <= CE_TOLERANCE, (name, ce)
