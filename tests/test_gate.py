"""The retraining gate end to end: shipped rulebooks of rulecheck-tiny checked against
permuted, retrained, untrained and mislabelled SAEs through ``--rulecheck-remap``, and
``rulecheck remap`` writing translated books."""

from __future__ import annotations

import json
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
from rulecheck.rulebook import dump_rulebook, load_rulebook, parse_rulebook
from rulecheck.session import Workbench
from rulecheck.specs import Specs, locate

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "rulebooks" / "rulecheck-tiny"
SCHEMA = json.loads((ROOT / "rulecheck/schemas/rulebook.schema.json").read_text())
N_FEATURES = 6  # features of each shipped book the end-to-end runs check (time)
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
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exemplar cache for the module's runs (entries are keyed by the fingerprints and the
    ids draws are keyed by, so runs against other SAEs never share one)."""
    return tmp_path_factory.mktemp("cache")


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
    result.assert_outcomes(passed=len(before))
    after = outcomes(tmp_path)
    assert after.keys() == before.keys()  # same items, named by the book's ids
    for node, (_, value) in before.items():
        if value is not None:
            assert after[node][1] == pytest.approx(value, abs=0.02), node
    # the run's report shows the gate: every feature kept, under its id in the permuted SAE
    html = page.read_text(encoding="utf-8")
    start = html.index('<section id="gate">')
    gate = html[start : html.index("</section>", start)]
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
    gate_dir: pytest.Pytester, tmp_path: Path, make
) -> None:
    make(tmp_path / "wrong" / "L0H1")
    swap = f"--rulecheck-sae-out={tmp_path}/wrong/L{{layer}}H{{head}}"
    result = run(gate_dir, tmp_path, swap, "--rulecheck-remap=auto")
    text = result.stdout.str()
    assert result.ret == 1 and "Traceback" not in text
    assert "likely another head's or an untrained SAE" in text
    lost = [line for line in text.splitlines() if "has no confident partner" in line]
    assert lost and all("best candidate" in line for line in lost)
    # every failure is a line of rulecheck's, none an exception from inside
    for line in text.splitlines():
        if line.startswith("FAILED"):
            assert "Error" not in line.split(" - ", 1)[-1].split(":")[0], line


def test_the_budget_skips_lost_features_and_counts_them(
    gate_dir: pytest.Pytester, tmp_path: Path
) -> None:
    _untrained(tmp_path / "wrong" / "L0H1")
    swap = f"--rulecheck-sae-out={tmp_path}/wrong/L{{layer}}H{{head}}"
    result = run(
        gate_dir, tmp_path, swap, "--rulecheck-remap=auto", "--rulecheck-allow-lost=100%", "-rs"
    )
    text = result.stdout.str()
    assert "within --rulecheck-allow-lost 100%" in text
    assert "has no confident partner" not in "".join(
        line for line in text.splitlines() if line.startswith("FAILED")
    )


def test_bad_gate_options_are_one_line(gate_dir: pytest.Pytester, tmp_path: Path) -> None:
    text = run(gate_dir, tmp_path, "--rulecheck-allow-lost=lots").stderr.str()
    assert "--rulecheck-allow-lost: must be a whole number >= 0, got 'lots'" in text
    text = run(gate_dir, tmp_path, "--rulecheck-allow-lost=150%").stderr.str()
    assert "must be a number in [0, 100]" in text
    text = run(gate_dir, tmp_path, "--rulecheck-remap=auto", "--rulecheck-extract").stderr.str()
    assert "cannot regenerate and remap in one run" in text
    swap = "--rulecheck-sae-in=rulecheck-tiny:retrained/sae_in/L{layer}"
    text = run(gate_dir, tmp_path, swap, "--rulecheck-remap=nowhere", "-x").stdout.str()
    assert "nowhere: --rulecheck-remap: no such file or directory" in text


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
    """The old book against the same claims under the permuted SAE's ids: through the
    mapping every feature is kept with no rule changed; without it the ids do not line up."""
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
    moved_book = replace(book, features=sorted(moved, key=lambda f: f.feature))
    (new_dir / "L0H1.yaml").write_text(dump_rulebook(moved_book))
    capsys.readouterr()
    assert main(["diff", str(old_dir), str(new_dir), "--mapping", str(maps), "--format", "md"]) == 0
    text = capsys.readouterr().out
    assert f"| L0H1 | {N_FEATURES} | 0 | 0 | 0 | 0 | 0 |" in text
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


def test_the_gate_on_retrained_saes_gives_the_same_verdict_twice(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    trimmed("L0H0", pytester.path)
    swap = [f"--rulecheck-{k.replace('_', '-')}={v}" for k, v in RETRAINED.items()]
    verdicts = []
    for i in range(2):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        result = run(pytester, run_dir, *swap, "--rulecheck-remap=auto")
        assert "Traceback" not in result.stdout.str()
        verdicts.append({k: v[0] for k, v in outcomes(run_dir).items()})
    assert verdicts[0] == verdicts[1]
    assert len(set(verdicts[0].values())) > 1  # retrained: some claims hold, some do not


def test_the_model_card_reports_the_recorded_gate_run() -> None:
    from rulecheck.build.train_tiny import gate_lines

    tiny = ROOT / "rulecheck/zoo/tiny"
    report = json.loads((tiny / "retrained/gate.json").read_text())
    card = (tiny / "MODEL_CARD.md").read_text()
    assert card.endswith("\n".join(gate_lines(report)) + "\n")
    assert report["identical_verdicts"] == report["reruns"] == 10
    assert report["kept"] + report["lost"] == report["features"]
    assert sum(report["outcomes"].values()) == sum(
        1 for _ in _items(SHIPPED / f"{report['book']}.yaml")
    )


def _items(path: Path):
    """The items pytest collects from a rulebook (names only)."""
    from rulecheck.kinds import kinds

    for rules in load_rulebook(path).features:
        for kind in kinds():
            yield from kind.items(rules)


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
