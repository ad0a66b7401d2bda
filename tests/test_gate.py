"""The retraining gate end to end: shipped rulebooks of rulecheck-tiny checked against
permuted, retrained, untrained and mislabelled SAEs through ``--rulecheck-remap``, and
``rulecheck remap`` writing translated books."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import permuted_copy, random_sae

from rulecheck.cli import main
from rulecheck.gate import gated
from rulecheck.loading import load_sae
from rulecheck.mapping import load_mapping
from rulecheck.paths import exemplar_cache
from rulecheck.rulebook import dump_rulebook, load_rulebook, parse_rulebook
from rulecheck.session import Workbench
from rulecheck.specs import Specs, locate

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "rulebooks" / "rulecheck-tiny"
SCHEMA = json.loads((ROOT / "rulecheck/schemas/rulebook.schema.json").read_text())
N_FEATURES = 4  # features of each shipped book the end-to-end runs check (time)
RETRAINED = {
    "sae_in": "rulecheck-tiny:retrained/sae_in/L{layer}",
    "sae_out": "rulecheck-tiny:retrained/sae_out/L{layer}H{head}",
}


def trimmed(name: str, directory: Path) -> Path:
    """The first ``N_FEATURES`` features of a shipped book, written to ``directory``."""
    book = load_rulebook(SHIPPED / f"{name}.yaml")
    path = directory / f"{name}.yaml"
    path.write_text(dump_rulebook(replace(book, features=book.features[:N_FEATURES])))
    return path


@pytest.fixture(scope="module")
def permuted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Permuted copies, with noise of 1e-4 of each weight's spread, of L0H1's output SAE and
    layer 0's input SAE; ``perms.json`` holds each permutation (new j is old perm[j])."""
    root = tmp_path_factory.mktemp("permuted")
    perms = {
        "sae_out": permuted_copy("rulecheck-tiny:sae_out/L0H1", root / "out" / "L0H1", 1, 1e-4),
        "sae_in": permuted_copy("rulecheck-tiny:sae_in/L0", root / "in" / "L0", 2, 1e-4),
    }
    (root / "perms.json").write_text(json.dumps(perms))
    return root


def test_a_permuted_copy_is_matched_completely(permuted: Path) -> None:
    """Every feature of both permuted SAEs finds its old partner, nothing is lost."""
    perms = json.loads((permuted / "perms.json").read_text())
    overrides = Specs(
        model=None,
        sae_in=f"{permuted}/in/L{{layer}}",
        sae_out=f"{permuted}/out/L{{layer}}H{{head}}",
    )
    bench = Workbench(overrides=overrides, cache_dir=None)
    book = load_rulebook(SHIPPED / "L0H1.yaml")
    gate = gated(bench, book, str(SHIPPED / "L0H1.yaml"), "auto")
    for part, perm in perms.items():
        fmap = gate.maps[part]
        assert fmap is not None
        assert fmap.new_of == {old: new for new, old in enumerate(perm)}, part
    assert not gate.remapped.lost and gate.remapped.by_tokens == 0


@pytest.fixture
def gate_dir(pytester: pytest.Pytester, tmp_path: Path) -> pytest.Pytester:
    trimmed("L0H1", pytester.path)
    return pytester


@pytest.fixture(scope="module")
def cache() -> Path:
    """The test run's exemplar cache (``conftest``), the one every workbench and command of
    the run shares, so that a pass one run streams is read by the next (entries are keyed by
    the fingerprints and the ids draws are keyed by, so runs against other SAEs never share
    one)."""
    return exemplar_cache()


def run(
    pytester: pytest.Pytester, tmp_path: Path, *args: str, cache: Path | None = None
) -> pytest.RunResult:
    report = tmp_path / "report.json"
    return pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        f"--rulecheck-cache={cache or tmp_path / 'cache'}",
        f"--rulecheck-report={report}",
        *args,
    )


def outcomes(tmp_path: Path) -> dict[str, tuple[str, float | None]]:
    results = json.loads((tmp_path / "report.json").read_text())
    return {r["nodeid"]: (r["outcome"], r.get("measured")) for r in results}


def test_a_permuted_copy_passes_the_gate_for_input_and_output_saes(
    gate_dir: pytest.Pytester, permuted: Path, tmp_path: Path, cache: Path
) -> None:
    swap = [
        f"--rulecheck-sae-out={permuted}/out/L{{layer}}H{{head}}",
        f"--rulecheck-sae-in={permuted}/in/L{{layer}}",
    ]
    # without remapping, the book does not describe these SAEs
    refused = run(gate_dir, tmp_path, *swap, cache=cache)
    assert "differ from the ones this rulebook was extracted with" in refused.stdout.str()
    assert refused.ret == 1
    plain = run(gate_dir, tmp_path, cache=cache)
    plain.assert_outcomes(passed=len(outcomes(tmp_path)))
    before = outcomes(tmp_path)
    page = tmp_path / "gate.html"
    remap = ("--rulecheck-remap=auto", f"--rulecheck-html={page}")
    result = run(gate_dir, tmp_path, *swap, *remap, cache=cache)
    result.assert_outcomes(passed=len(before) + 1)  # and the gate item
    assert "rulecheck gate: passed (1 of 1 heads pass)" in result.stdout.str()
    after = outcomes(tmp_path)
    assert after.pop("L0H1.yaml::gate")[0] == "passed"
    assert after.keys() == before.keys()  # same items, named by the book's ids
    for node, (_, value) in before.items():
        if value is not None:
            assert after[node][1] == pytest.approx(value, abs=0.02), node
    # the run's report shows the gate: every feature kept, under its id in the permuted SAE
    html = page.read_text(encoding="utf-8")
    start = html.index('<section id="gate">')
    gate = html[start : html.index("</section>", start)]
    # the verdict and its statistics lead, then the features
    assert gate.index('<span class="badge passed">gate passed</span>') < gate.index("kept</td>")
    assert "<td>holding</td><td>1.000 &gt;= 0.385</td>" in gate
    features = [rules.feature for rules in load_rulebook(gate_dir.path / "L0H1.yaml").features]
    new_id = {
        old: new
        for new, old in enumerate(json.loads((permuted / "perms.json").read_text())["sae_out"])
    }
    assert f'<tr class="kept"><td>kept</td><td>{len(features)}</td>' in gate
    assert '<tr class="changed"><td>changed</td><td>0</td>' in gate
    assert '<tr class="lost"><td>lost</td><td>0</td>' in gate
    for f in features:
        assert f">{f}&rarr;{new_id[f]}</a>" in gate, f


def test_mapping_files_gate_like_auto_and_are_checked_against_the_saes(
    gate_dir: pytest.Pytester, permuted: Path, tmp_path: Path, cache: Path
) -> None:
    maps = tmp_path / "maps"
    maps.mkdir()
    for old, new, name in (
        ("rulecheck-tiny:sae_out/L0H1", permuted / "out" / "L0H1", "out.yaml"),
        ("rulecheck-tiny:sae_in/L0", permuted / "in" / "L0", "in.yaml"),
    ):
        assert main(["match", "--old", old, "--new", str(new), "--out", str(maps / name)]) == 0
    swap = [
        f"--rulecheck-sae-out={permuted}/out/L{{layer}}H{{head}}",
        f"--rulecheck-sae-in={permuted}/in/L{{layer}}",
    ]
    result = run(gate_dir, tmp_path, *swap, f"--rulecheck-remap={maps}", cache=cache)
    assert result.ret == 0, result.stdout.str()
    # a mapping of the input SAE only: the output SAE's mapping is missing, one line
    (maps / "out.yaml").unlink()
    result = run(gate_dir, tmp_path, *swap, f"--rulecheck-remap={maps}", cache=cache)
    text = result.stdout.str()
    assert "--rulecheck-remap: no mapping of blocks.0.attn.hook_z head 1 here" in text
    assert "Traceback" not in text
    # a mapping made for other SAEs than the ones loaded
    assert main(
        ["match", "--old", "rulecheck-tiny:sae_out/L0H1", "--new", "rulecheck-tiny:sae_out/L0H1",
         "--out", str(maps / "out.yaml")]
    ) == 0  # fmt: skip
    text = run(gate_dir, tmp_path, *swap, f"--rulecheck-remap={maps}", cache=cache).stdout.str()
    assert "fingerprints.new: its new SAE (rulecheck-tiny:sae_out/L0H1) is not" in text
    assert "match these SAEs again" in text and "Traceback" not in text


def _untrained(directory: Path) -> None:
    random_sae(32, 64, "blocks.0.attn.hook_z", head=1, seed=3).save_model(str(directory))


def _other_heads(directory: Path) -> None:
    sae = load_sae(locate("rulecheck-tiny:sae_out/L0H2"))
    sae.cfg.metadata.hook_head_index = 1  # mislabelled: head 2's weights claim head 1
    sae.save_model(str(directory))


@pytest.mark.parametrize("make", [_untrained, _other_heads], ids=["untrained", "other-head"])
def test_a_wrong_sae_fails_the_gate_with_a_verdict(
    gate_dir: pytest.Pytester, tmp_path: Path, make, cache: Path
) -> None:
    make(tmp_path / "wrong" / "L0H1")
    swap = f"--rulecheck-sae-out={tmp_path}/wrong/L{{layer}}H{{head}}"
    result = run(gate_dir, tmp_path, swap, "--rulecheck-remap=auto", "-rfx", cache=cache)
    text = result.stdout.str()
    assert result.ret == 1 and "Traceback" not in text
    # the gate item alone fails, with one line: the statistic, its threshold, by how much
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    assert failed == [line for line in failed if line.startswith("FAILED L0H1.yaml::gate")]
    assert len(failed) == 1
    [reason] = [line for line in text.splitlines() if line.startswith("L0H1.yaml: gate: ")]
    assert re.search(r"gate: holding 0\.[0-2]\d\d < 0\.385 \(by 0\.\d{3}\)", reason)
    assert "look at" in reason
    assert "rulecheck gate: FAILED (0 of 1 heads pass)" in text
    # the claims are the evidence: xfailed, each lost one saying why
    lost = [line for line in text.splitlines() if "has no confident partner" in line]
    assert lost and all(line.startswith("XFAIL") and "best candidate" in line for line in lost)
    if make is not _untrained:
        return
    # thresholds are options: with none to pass, the same SAE passes the gate
    off = ("--rulecheck-gate-holding=0", "--rulecheck-gate-f1-change=-1")
    result = run(
        gate_dir,
        tmp_path,
        swap,
        "--rulecheck-remap=auto",
        *off,
        "--rulecheck-gate-fresh=0",
        cache=cache,
    )
    assert result.ret == 0, result.stdout.str()


def test_the_budget_skips_lost_features_of_a_remapped_book(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """Outside a gate run, the lost features of a book written by ``rulecheck remap`` fail,
    unless ``--rulecheck-allow-lost`` allows them; they then skip, saying why."""
    _untrained(tmp_path / "wrong" / "L0H1")
    book = trimmed("L0H1", tmp_path)
    out = pytester.path / "remapped"
    argv = ["remap", str(book), "--sae-out", f"{tmp_path}/wrong/L{{layer}}H{{head}}"]
    assert main([*argv, "--out", str(out)]) == 0
    assert load_rulebook(out / "L0H1.yaml").lost
    failed = run(pytester, tmp_path, "-k", "lost", "-rs")
    assert failed.ret == 1 and "--rulecheck-allow-lost allows 0" in failed.stdout.str()
    allowed = run(pytester, tmp_path, "-k", "lost", "-rs", "--rulecheck-allow-lost=100%")
    assert allowed.ret == 0 and "within --rulecheck-allow-lost 100%" in allowed.stdout.str()


def test_bad_gate_options_are_one_line(gate_dir: pytest.Pytester, tmp_path: Path) -> None:
    text = run(gate_dir, tmp_path, "--rulecheck-allow-lost=lots").stderr.str()
    assert "--rulecheck-allow-lost: must be a whole number >= 0, got 'lots'" in text
    text = run(gate_dir, tmp_path, "--rulecheck-allow-lost=150%").stderr.str()
    assert "must be a number in [0, 100]" in text
    text = run(gate_dir, tmp_path, "--rulecheck-remap=auto", "--rulecheck-extract").stderr.str()
    assert "cannot regenerate and remap in one run" in text
    text = run(gate_dir, tmp_path, "--rulecheck-gate-holding=1.5").stderr.str()
    assert "--rulecheck-gate-holding: must be a number in [0, 1], got 1.5" in text
    text = run(gate_dir, tmp_path, "--rulecheck-gate-f1-change=lots").stderr.str()
    assert "--rulecheck-gate-f1-change: must be a number in [-1, 1], got 'lots'" in text
    swap = "--rulecheck-sae-in=rulecheck-tiny:retrained/sae_in/L{layer}"
    text = run(gate_dir, tmp_path, swap, "--rulecheck-remap=nowhere", "-x").stderr.str()
    assert "nowhere: --rulecheck-remap: no such file or directory" in text
    gate_dir.makeini("[pytest]\nrulecheck_gate_fresh = nan\n")
    text = run(gate_dir, tmp_path).stderr.str()
    assert "--rulecheck-gate-fresh: must be a number in [0, 10]" in text


def test_the_retrained_translation_is_the_same_every_time(tmp_path: Path) -> None:
    """Matching and translating against the retrained SAEs, twice from scratch, gives the
    same book byte for byte."""
    book = load_rulebook(SHIPPED / "L0H0.yaml")
    texts = []
    for _ in range(2):
        bench = Workbench(overrides=Specs(model=None, **RETRAINED), cache_dir=None)
        gate = gated(bench, book, str(SHIPPED / "L0H0.yaml"), "auto")
        texts.append(dump_rulebook(gate.remapped.written()))
    assert texts[0] == texts[1]
    kept = parse_rulebook(texts[0])
    assert 0.5 < len(kept.features) / len(book.features) < 1.0  # retrained: some are lost
    assert all(f.best_candidate is not None for f in kept.lost)


def test_remap_writes_books_for_the_new_saes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "remapped"
    argv = ["remap", str(SHIPPED / "L0H0.yaml"), "--out", str(out)]
    argv += ["--sae-in", RETRAINED["sae_in"], "--sae-out", RETRAINED["sae_out"]]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "lost features written under `lost:`" in printed
    text = (out / "L0H0.yaml").read_text()
    jsonschema.validate(yaml.safe_load(text), SCHEMA)
    book = parse_rulebook(text, out / "L0H0.yaml")
    assert (book.sae_in, book.sae_out) == (RETRAINED["sae_in"], RETRAINED["sae_out"])
    bench = Workbench(overrides=Specs(model=None), cache_dir=None)
    head = bench.head_of(book, str(out / "L0H0.yaml"))
    bench.check_fingerprints(book, head, str(out / "L0H0.yaml"))  # records the new SAEs
    # the same again is byte-identical; the source directory is refused as --out
    assert main(argv) == 0 and (out / "L0H0.yaml").read_text() == text
    assert main(["remap", str(SHIPPED / "L0H0.yaml"), "--out", str(SHIPPED), "--sae-out", "x"]) == 2
    assert "--out: holds the rulebooks being remapped" in capsys.readouterr().err


def test_remap_without_a_new_sae_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["remap", str(SHIPPED / "L0H0.yaml"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--sae-out: names no retrained SAE" in err and len(err.strip().splitlines()) == 1


def test_diff_pairs_features_through_a_mapping(permuted: Path, tmp_path: Path, capsys) -> None:
    """The old book against the same claims under the permuted SAE's ids: the gate verdict
    leads, then through the mapping every feature is kept with no rule changed; without it
    the ids do not line up."""
    maps = tmp_path / "maps"
    maps.mkdir()
    new_sae = permuted / "out" / "L0H1"
    argv = ["match", "--old", "rulecheck-tiny:sae_out/L0H1", "--new", str(new_sae)]
    assert main([*argv, "--out", str(maps / "L0H1.yaml")]) == 0
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_path = trimmed("L0H1", old_dir)
    book = load_rulebook(old_path)
    mapping = load_mapping(maps / "L0H1.yaml")[1].mapping()
    moved = [replace(f, feature=mapping[f.feature]) for f in book.features]
    moved_book = replace(
        book, features=sorted(moved, key=lambda f: f.feature), sae_out=str(new_sae)
    )
    (new_dir / "L0H1.yaml").write_text(dump_rulebook(moved_book))
    capsys.readouterr()
    assert main(["diff", str(old_dir), str(new_dir), "--mapping", str(maps), "--format", "md"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("**rulecheck gate: passed** (1 of 1 heads pass)")
    assert "| L0H1 | pass | 1.000 | 1.000 >= 0.385 |" in text
    assert text.index("rulecheck gate") < text.index(f"| L0H1 | {N_FEATURES} | 0 | 0 | 0 | 0 | 0 |")
    main(["diff", str(old_dir), str(new_dir), "--format", "md"])
    assert f"| L0H1 | {N_FEATURES} |" not in capsys.readouterr().out
    assert main(["diff", str(old_dir), str(new_dir), "--mapping", str(tmp_path / "none")]) == 2
    assert "--mapping: no such file or directory" in capsys.readouterr().err


def test_the_example_workflow_runs_real_commands(pytester: pytest.Pytester) -> None:
    """Every rulecheck and pytest command of the example workflow parses with this
    rulecheck's command line and plugin, with the workflow's environment filled in."""
    import shlex

    from rulecheck.cli import build_parser

    flow = yaml.safe_load((ROOT / "docs/examples/github-actions-gate.yml").read_text())
    job = flow["jobs"]["gate"]
    env = job["env"]
    commands = [
        line.strip()
        for step in job["steps"]
        for line in step.get("run", "").splitlines()
        if line.strip().startswith(".venv/bin/")
    ]
    assert len(commands) == 5
    seen = set()
    for command in commands:
        for name, value in env.items():
            command = command.replace(f'"${name}"', shlex.quote(value))
        argv = shlex.split(command.split(" > ")[0].split(" || ")[0])
        if argv[0] == ".venv/bin/rulecheck":
            args = build_parser().parse_args(argv[1:])
            seen.add(args.command)
        else:
            assert argv[:3] == [".venv/bin/python", "-m", "pytest"]
            config = pytester.parseconfig(*argv[3:])
            assert config.getoption("rulecheck_remap") == "gate/maps"
            assert config.getoption("rulecheck_sae_out") == RETRAINED["sae_out"]
            seen.add("pytest")
    assert seen == {"match", "pytest", "extract", "diff"}


def test_the_gate_verdict_is_the_same_under_xdist(
    pytester: pytest.Pytester, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A book's gate on the shipped retrain (input and output SAEs, seed 1), serial and under
    xdist: the same verdict, the same statistics and the same outcome and measure of every item
    (the workers read the exemplars the serial run cached, and compute the gate themselves),
    each of the two workers running torch on its share of the cores (``worker_threads``)."""
    pytester.makeconftest(
        """
        import torch

        def pytest_sessionfinish(session):
            worker = getattr(session.config, "workerinput", None)
            if worker is not None:
                with open(f"threads-{worker['workerid']}.txt", "w") as out:
                    out.write(str(torch.get_num_threads()))
        """
    )
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    book = load_rulebook(SHIPPED / "L0H0.yaml")
    path = pytester.path / "L0H0.yaml"
    path.write_text(dump_rulebook(replace(book, features=book.features[:N_FEATURES])))
    swap = [f"--rulecheck-{k.replace('_', '-')}={v}" for k, v in RETRAINED.items()]
    runs = []
    for i, extra in enumerate(([], ["-n", "2"])):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        result = run(pytester, run_dir, *swap, "--rulecheck-remap=auto", *extra, cache=cache)
        assert "Traceback" not in result.stdout.str()
        entries = json.loads((run_dir / "report.json").read_text())
        [gate] = [e for e in entries if e.get("rule") == "gate"]
        items = {e["nodeid"]: (e["outcome"], e.get("measured")) for e in entries}
        runs.append((result.ret, gate, items))
    (ret, gate, items), (xret, xgate, xitems) = runs
    assert ret == xret == (0 if gate["passed"] else 1)
    assert {k: v for k, v in gate.items() if k != "nodeid"} == {
        k: v for k, v in xgate.items() if k != "nodeid"
    }
    assert items == xitems and items["L0H0.yaml::gate"][0] == gate["outcome"]
    assert "xfailed" in {o for o, _ in items.values()}  # changed claims: evidence, not failures
    share = str(max(1, (os.cpu_count() or 1) // 2))
    threads = sorted(pytester.path.glob("threads-*.txt"))
    assert [t.read_text() for t in threads] == [share, share]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "2"], "--threshold: must be a number in [-1, 1], got 2.0"),
        (["--threshold", "nan"], "--threshold: must be a number in [-1, 1]"),
        (["--mapping", "nowhere"], "nowhere: --mapping: no such file or directory"),
    ],
)
def test_bad_remap_options_are_one_line(tmp_path: Path, capsys, extra, message) -> None:
    argv = ["remap", str(SHIPPED / "L0H0.yaml"), "--out", str(tmp_path / "out")]
    argv += ["--sae-out", RETRAINED["sae_out"], *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_remap_out_must_be_a_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "file"
    out.write_text("")
    argv = ["remap", str(SHIPPED / "L0H0.yaml"), "--out", str(out), "--sae-out", "x"]
    assert main(argv) == 2
    assert "--out: is not a directory" in capsys.readouterr().err
