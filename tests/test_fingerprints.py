"""Fingerprints are checked: a rulebook run by the plugin against a model, SAE or corpus other
than the one it records fails every item with one line (which part, the file and line, the
fix), unless ``--rulecheck-accept-changed`` names the part. Books on ``planted``, run with
pytester; and fingerprints the same wherever the same content is loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import rulecheck.loaded
from rulecheck.loading import (
    fingerprint_model,
    fingerprint_sae,
    load_model,
    load_sae,
)
from rulecheck.loading.fingerprints import _tensor_bytes
from rulecheck.session import Head, Workbench
from rulecheck.specs import Specs, locate

pytest_plugins = ["pytester"]

WRONG = "sha256:" + "0" * 64
FIX = "regenerate it with --rulecheck-extract, or accept the change with"
SHORT = r"sha256:[0-9a-f]{8}\u2026"  # how the error shows a digest


TRUE_CLAIMS = {0: [("if", "then"), ("when", "do")], 1: [("from", "to")]}  # feature 1, by head


def book_text(fingerprints: dict[str, str], head: int = 0, xfail: str | None = None) -> str:
    """A rulebook on planted whose claims about feature 1 of ``head`` hold (two items: f1,
    precision), recording ``fingerprints``; with ``xfail``, a false claim marked as expected
    to fail instead (one item)."""
    lines = ["rulecheck: 2", "model: planted"]
    if fingerprints:
        lines += ["fingerprints:", *(f"  {k}: {v}" for k, v in fingerprints.items())]
    lines += ["layer: 0", f"head: {head}", "features:", "  - feature: 1", "    source: extracted"]
    claims = [("from", "to")] if xfail else TRUE_CLAIMS[head]
    lines += ["    skipgrams:"]
    lines += [f"      - '[{k}] ... [{q}]'" for k, q in claims]
    if xfail:
        lines += ["    expect: {f1: 0.9}", f"    xfail: {xfail}"]
    else:
        lines += ["    expect: {f1: 0.9, precision: 0.9}"]
    return "\n".join(lines) + "\n"


def line_of(text: str, name: str) -> int:
    """The line (from 1) of ``fingerprints.<name>`` in a book's text."""
    lines = text.splitlines()
    start = lines.index("fingerprints:")
    return next(i + 1 for i in range(start, len(lines)) if lines[i].startswith(f"  {name}:"))


@pytest.fixture(scope="module")
def recorded() -> dict[str, str]:
    """The fingerprints of planted's L0H0 as extraction records them."""
    bench = Workbench(cache_dir=None, device="cpu")
    return bench.fingerprints(Head(Specs("planted").resolve(), 0, 0))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One exemplar cache for the module's runs: planted's corpus pass runs once."""
    return tmp_path_factory.mktemp("exemplars")


def run(pytester, cache: Path, *args: str):
    return pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "--rulecheck-device=cpu",
        f"--rulecheck-cache={cache}",
        *args,
    )


def error_lines(result) -> list[str]:
    """The lines that start ``L0H0.yaml:<line>:``, as an error about the book does."""
    return [line for line in result.stdout.lines if re.match(r"L0H0\.yaml:\d+: ", line)]


def assert_no_traceback(result) -> None:
    out = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in out
    assert not any(f"{module}.py" in out for module in ("session", "loaded", "targets"))
    assert "raise " not in out and "_ _ _" not in out


# ------------------------------------------------------------------------------ the failure


def test_a_changed_sae_out_fails_every_item_with_one_line(pytester, recorded, cache):
    text = book_text({**recorded, "sae_out": WRONG})
    pytester.makefile(".yaml", L0H0=text)
    result = run(pytester, cache)
    result.assert_outcomes(failed=2)
    expected = (
        f"L0H0.yaml:{line_of(text, 'sae_out')}: fingerprints.sae_out: the output SAE differs"
        " from the one this rulebook was extracted with (recorded sha256:00000000\u2026, now"
        f" {recorded['sae_out'][:15]}\u2026) (fix: {FIX} --rulecheck-accept-changed=sae_out)"
    )
    assert error_lines(result) == [expected, expected]  # one line per item, nothing else
    assert_no_traceback(result)


def test_several_changed_parts_are_named_in_one_line(pytester, recorded, cache):
    text = book_text({**recorded, "model": WRONG, "sae_out": WRONG, "corpus": WRONG})
    pytester.makefile(".yaml", L0H0=text)
    result = run(pytester, cache)
    result.assert_outcomes(failed=2)
    pattern = re.compile(
        rf"L0H0\.yaml:{line_of(text, 'model')}: "
        r"fingerprints\.model, fingerprints\.sae_out, fingerprints\.corpus: "
        r"the model, the output SAE and the corpus differ from the ones this rulebook was"
        rf" extracted with \(model: recorded {SHORT}, now {SHORT}; sae_out: recorded {SHORT},"
        rf" now {SHORT}; corpus: recorded {SHORT}, now {SHORT}\) "
        rf"\(fix: {FIX} --rulecheck-accept-changed=model,sae_out,corpus\)$"
    )
    found = error_lines(result)
    assert len(found) == 2 and all(pattern.match(line) for line in found), found
    assert f"now {recorded['corpus'][:15]}\u2026" in found[0]
    assert_no_traceback(result)


def test_an_expected_failure_with_a_changed_checkpoint_fails(pytester, recorded, cache):
    """``xfail`` expects the claim not to hold; a changed checkpoint is no such outcome."""
    pytester.makefile(".yaml", L0H0=book_text({**recorded, "sae_out": WRONG}, xfail="wrong"))
    result = run(pytester, cache)
    result.assert_outcomes(failed=1)
    assert "fingerprints.sae_out: the output SAE differs" in result.stdout.str()
    pytester.makefile(".yaml", L0H0=book_text(recorded, xfail="wrong"))
    run(pytester, cache).assert_outcomes(xfailed=1)


# ------------------------------------------------------------------------ what passes, and why


@pytest.mark.parametrize(
    "record",
    [lambda fp: fp, lambda fp: {}, lambda fp: {"sae_out": fp["sae_out"]}],
    ids=["all-correct", "none", "only-sae-out"],
)
def test_a_book_recording_correct_fingerprints_or_none_passes(pytester, recorded, cache, record):
    pytester.makefile(".yaml", L0H0=book_text(record(recorded)))
    result = run(pytester, cache)
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    ("wrong", "accept", "still_changed"),
    [
        (("sae_out",), "sae_out", None),
        (("model", "sae_out"), "sae_out", "model"),
        (("model", "sae_out"), " sae_out , model ", None),
        (("model", "sae_in", "sae_out", "corpus"), "all", None),
        (("model", "sae_in", "sae_out", "corpus"), "corpus,all", None),
    ],
)
def test_accept_changed_accepts_only_the_parts_it_names(
    pytester, recorded, cache, wrong, accept, still_changed
):
    text = book_text({**recorded, **dict.fromkeys(wrong, WRONG)})
    pytester.makefile(".yaml", L0H0=text)
    result = run(pytester, cache, f"--rulecheck-accept-changed={accept}")
    if still_changed is None:
        result.assert_outcomes(passed=2)
        return
    result.assert_outcomes(failed=2)
    line = error_lines(result)[0]
    assert line.startswith(
        f"L0H0.yaml:{line_of(text, still_changed)}: fingerprints.{still_changed}: "
    )
    assert line.endswith(f"(fix: {FIX} --rulecheck-accept-changed={still_changed})")


def test_accept_changed_from_the_ini_file(pytester, recorded, cache):
    pytester.makefile(".yaml", L0H0=book_text({**recorded, "sae_out": WRONG}))
    pytester.makeini("[pytest]\nrulecheck_accept_changed = sae_out\n")
    run(pytester, cache).assert_outcomes(passed=2)
    # the command line wins; an empty value accepts nothing
    run(pytester, cache, "--rulecheck-accept-changed=").assert_outcomes(failed=2)


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--rulecheck-accept-changed=sae_out,tokenizer"], "tokenizer"),
        (["--rulecheck-accept-changed=sae-out"], "sae-out"),
        (["--rulecheck-accept-changed", "L0H0.yaml"], "L0H0.yaml"),  # a path is not swallowed
    ],
)
def test_an_unknown_name_is_a_usage_error_naming_the_option(pytester, cache, args, name):
    pytester.makefile(".yaml", L0H0=book_text({}))
    result = run(pytester, cache, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        f"--rulecheck-accept-changed: unknown name {name!r}"
        " (fix: give a comma list of model, sae_in, sae_out, corpus, or all)"
    ) in result.stderr.str()
    assert "Traceback" not in result.stderr.str()


# ---------------------------------------------------------------------------------- overrides


@pytest.fixture(scope="module")
def other_sae(tmp_path_factory) -> Path:
    """planted's L0H0 output SAE with its decoder doubled: the same features fire on the same
    prefixes, but it is another SAE."""
    sae = load_sae(locate("planted:sae_out/L0H0"))
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    directory = tmp_path_factory.mktemp("other") / "sae"
    sae.save_model(directory)
    return directory


def test_an_override_spec_does_not_accept_a_change(pytester, recorded, cache, other_sae):
    text = book_text(recorded)
    pytester.makefile(".yaml", L0H0=text)
    result = run(pytester, cache, f"--rulecheck-sae-out={other_sae}")
    result.assert_outcomes(failed=2)
    pattern = re.compile(
        rf"L0H0\.yaml:{line_of(text, 'sae_out')}: fingerprints\.sae_out: the output SAE differs"
        rf" from the one this rulebook was extracted with \(recorded {SHORT}, now {SHORT}, from"
        rf" --rulecheck-sae-out={re.escape(str(other_sae))}\); an override does not accept a"
        r" change: the rulebook's feature ids and minimums are those of what it was extracted"
        rf" with \(fix: {FIX} --rulecheck-accept-changed=sae_out\)$"
    )
    found = error_lines(result)
    assert len(found) == 2 and all(pattern.match(line) for line in found), found
    assert_no_traceback(result)
    accepted = run(
        pytester, cache, f"--rulecheck-sae-out={other_sae}", "--rulecheck-accept-changed=sae_out"
    )
    accepted.assert_outcomes(passed=2)


# ------------------------------------------------------------------------------------- cost


def test_each_fingerprint_is_computed_once_per_session(pytester, recorded, cache, monkeypatch):
    calls: dict[str, int] = {}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return function(*args, **kwargs)

        monkeypatch.setattr(rulecheck.loaded, name, wrapper)

    for name in ("load_model", "fingerprint_model", "fingerprint_sae", "fingerprint_corpus"):
        counted(name, getattr(rulecheck.loaded, name))
    pytester.makefile(".yaml", L0H0=book_text(recorded))
    pytester.makefile(".yaml", L0H1=book_text({}, head=1))
    run(pytester, cache).assert_outcomes(passed=4)
    # one model; the input SAE and each head's output SAE; one corpus: for four items
    assert calls == {
        "load_model": 1,
        "fingerprint_model": 1,
        "fingerprint_sae": 3,
        "fingerprint_corpus": 1,
    }


# ----------------------------------------------------------------------- the same on any machine


def test_shipped_rulebooks_record_the_shipped_checkpoints():
    """What ``pytest rulebooks/`` compares: every shipped book against rulecheck-tiny (only
    the headers are read: the books are several MB each)."""
    bench = Workbench(cache_dir=None, device="cpu")
    books = sorted((Path(__file__).parents[1] / "rulebooks" / "rulecheck-tiny").glob("*.yaml"))
    assert len(books) == 8
    for path in books:
        text = path.read_text(encoding="utf-8")
        header = yaml.safe_load(text[: text.index("\nfeatures:")])
        specs = Specs(*(header[k] for k in ("model", "sae_in", "sae_out", "corpus")))
        head = Head(specs.resolve(), header["layer"], header["head"])
        assert set(header["fingerprints"]) == {"model", "sae_in", "sae_out", "corpus"}
        assert bench.fingerprints(head) == header["fingerprints"], path.name


def test_tensor_bytes_are_little_endian_on_any_machine():
    values = torch.tensor([1.5, -2.25, 3e-7, 0.0])
    little = b"".join(torch.tensor([v]).numpy().astype("<f4").tobytes() for v in values.tolist())
    assert _tensor_bytes(values, "little") == little
    # the same values as a big-endian machine holds them in memory
    big_memory = values.view(torch.uint8).reshape(-1, 4).flip(-1).reshape(-1).view(torch.float32)
    assert _tensor_bytes(big_memory, "big") == little
    flags = torch.tensor([True, False, True])
    assert _tensor_bytes(flags, "big") == _tensor_bytes(flags, "little") == b"\x01\x00\x01"


def test_a_model_directory_name_is_not_part_of_the_fingerprint(tmp_path):
    """A Hugging Face directory's name becomes the model's ``model_name``: moving or renaming
    the directory must not change the fingerprint; its weights must."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=60)).eval()
    for name in ("one", "two"):
        hf.save_pretrained(tmp_path / name)
    one, two = load_model(str(tmp_path / "one")), load_model(str(tmp_path / "two"))
    assert one.cfg.model_name != two.cfg.model_name
    assert fingerprint_model(one) == fingerprint_model(two)
    with torch.no_grad():
        two.blocks[0].attn.W_V.add_(1e-3)
    assert fingerprint_model(one) != fingerprint_model(two)


def test_an_sae_fingerprint_is_its_weights_config_and_hook_not_its_provenance():
    """``sae_lens_version`` is the installed sae_lens's where a file records none (the paper
    format, an SAE built in code): it must not change the fingerprint; the hook must."""
    sae = load_sae(locate("planted:sae_out/L0H0"))
    before = fingerprint_sae(sae)
    sae.cfg.metadata.sae_lens_version = "6.0.0"
    sae.cfg.metadata.sae_lens_training_version = "6.0.0"
    sae.cfg.metadata.model_name = "elsewhere"
    assert fingerprint_sae(sae) == before
    sae.cfg.metadata.hook_head_index = 1
    assert fingerprint_sae(sae) != before


def test_regenerating_a_book_records_the_fingerprints_it_is_run_against(pytester, recorded, cache):
    """The fix the line names: ``--rulecheck-extract`` re-measures the book on what is loaded
    and records its fingerprints; once its changed claims are reviewed, the book runs."""
    pytester.makefile(".yaml", L0H0=book_text({**recorded, "sae_out": WRONG}))
    regenerating = run(pytester, cache, "--rulecheck-extract", "L0H0.yaml")
    assert "fingerprints." not in regenerating.stdout.str()  # only the review failures
    text = (pytester.path / "L0H0.yaml").read_text(encoding="utf-8")
    assert f"sae_out: {recorded['sae_out']}" in text and WRONG not in text
    outcomes = run(pytester, cache, "L0H0.yaml").parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and set(outcomes) <= {"passed", "warnings"}, outcomes
