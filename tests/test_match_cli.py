"""``rulecheck match`` end to end: real SAEs on disk, the mapping file it writes, its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import permuted_copy

from rulecheck.cli import main
from rulecheck.core.matching import Matching, Pair
from rulecheck.errors import InvalidMapping
from rulecheck.mapping import MappingHeader, dump_mapping, load_mapping, save_mapping

OLD = "rulecheck-tiny:sae_out/L0H1"


@pytest.fixture(scope="module")
def permuted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A copy of ``OLD`` with its features permuted and small noise on every weight: new
    feature ``j`` is old feature ``perm[j]``."""
    directory = tmp_path_factory.mktemp("permuted") / "L0H1"
    return directory, permuted_copy(OLD, directory)


def inverse(perm: list[int]) -> dict[int, int]:
    return {old: new for new, old in enumerate(perm)}


@pytest.mark.parametrize("correlate", [False, True], ids=["cosine", "correlation"])
def test_permuted_copy_is_matched_completely(
    permuted: tuple[Path, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture, correlate: bool
) -> None:
    directory, perm = permuted
    out = tmp_path / "mapping.yaml"
    extra = ["--model", "rulecheck-tiny", "--tokens", "2000"] if correlate else []
    argv = ["match", "--old", OLD, "--new", str(directory), *extra, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "64 of 64 old" in printed and "every feature has a partner" in printed
    header, matching = load_mapping(out)
    assert matching.mapping() == inverse(perm)
    assert matching.lost == [] and matching.new == []
    assert matching.split == {} and matching.merged == {}
    assert all(p.cosine > 0.95 and p.status == "matched" for p in matching.pairs)
    assert (header.old, header.new) == (OLD, str(directory))
    assert (header.hook, header.head) == ("blocks.0.attn.hook_z", 1)
    assert set(header.fingerprints) == {"old", "new"}
    assert header.fingerprints["old"] != header.fingerprints["new"]
    if correlate:
        assert header.corpus == "rulecheck-tiny:eval" and header.n_tokens >= 2000
        # a feature that never fires on the sample (the SAE has one dead feature) has none
        correlations = [p.correlation for p in matching.pairs if p.correlation is not None]
        assert len(correlations) >= 60 and min(correlations) > 0.8
    else:
        assert header.corpus is None and header.n_tokens is None
        assert all(p.correlation is None for p in matching.pairs)
    # what is read back is written back byte for byte
    text = out.read_text()
    assert dump_mapping(matching, header) == text


def test_unrelated_sae_is_mostly_lost_and_new(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mapping.yaml"
    argv = ["match", "--old", OLD, "--new", "rulecheck-tiny:sae_out/L0H2", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mostly lost and new" in printed
    _, matching = load_mapping(out)
    assert len(matching.pairs) * 2 < 64
    assert len(matching.lost) > 32 and len(matching.new) > 32


def test_mismatched_d_in_is_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mapping.yaml"
    new = "rulecheck-tiny:sae_in/L0"
    assert main(["match", "--old", OLD, "--new", new, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "Traceback" not in captured.err
    assert "d_in" in err and OLD in err and new in err and "fix:" in err
    assert not out.exists()


def test_model_without_corpus_is_one_line(tmp_path: Path, capsys) -> None:
    argv = ["match", "--old", OLD, "--new", OLD, "--corpus", "x.npy", "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    assert "--corpus is given without --model" in capsys.readouterr().err


def test_unwritable_out_is_one_line(capsys) -> None:
    argv = ["match", "--old", OLD, "--new", OLD, "--out", "/dev/null/mapping.yaml"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Traceback" not in err


def small_matching() -> tuple[MappingHeader, Matching]:
    header = MappingHeader(old="a b", new="n: 1", hook="blocks.0.attn.hook_z", head=None)
    pairs = [
        Pair(0, 2, 0.98765, None, 0.98765, "split"),
        Pair(1, 0, 0.71234, 0.6, 0.65617, "matched"),
        Pair(3, 4, 0.8, -0.25, 0.275, "merged"),
    ]
    matching = Matching(
        pairs, lost=[2], new=[1], split={0: [3]}, merged={4: [5]}, best={2: (5, 0.31)}
    )
    return header, matching


def test_round_trip(tmp_path: Path) -> None:
    header, matching = small_matching()
    path = save_mapping(matching, tmp_path / "m.yaml", header)
    header2, matching2 = load_mapping(path)
    assert header2 == header
    assert matching2.mapping() == matching.mapping()
    assert (matching2.lost, matching2.new) == (matching.lost, matching.new)
    assert matching2.best == {2: (5, 0.31)}
    assert (matching2.split, matching2.merged) == (matching.split, matching.merged)
    assert [p.status for p in matching2.pairs] == ["split", "matched", "merged"]
    assert matching2.pairs[0].cosine == 0.988 and matching2.pairs[0].correlation is None
    assert matching2.pairs[2].correlation == -0.25
    assert dump_mapping(matching2, header2) == path.read_text()


@pytest.mark.parametrize(
    ("edit", "field", "line"),
    [
        (("- [1, 0,", "- [1, x,"), "pairs[1].new", 12),
        (("0.988, null", "0.988, 'high'"), "pairs[0].correlation", 11),
        (("matched]", "kept]"), "pairs[1].status", 12),
        (("- [3, 4,", "- [3, 2,"), "pairs[2].new", 13),
        (("- [3, 4, 0.8, -0.25, 0.275, merged]", "- [3, 4]"), "pairs[2]", 13),
        (("lost:\n  2: [5, 0.31]", "lost: 2"), "lost", 14),
        (("  2: [5, 0.31]", "  2: [5]"), "lost[2]", 15),
        (("rulecheck_mapping: 1", "rulecheck_mapping: 9"), "rulecheck_mapping", 1),
        (("new_features: [1]", "new_feature: [1]"), "new_feature", 16),
        (("  k: 8", "  k: 0"), "settings.k", 6),
        (("split:\n  0: [3]", "split: [1]"), "split", 17),
    ],
)
def test_malformed_mapping_is_one_line(tmp_path: Path, edit, field: str, line: int) -> None:
    header, matching = small_matching()
    text = dump_mapping(matching, header)
    assert edit[0] in text
    path = tmp_path / "m.yaml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(InvalidMapping) as info:
        load_mapping(path)
    message = str(info.value)
    assert "\n" not in message and "fix:" in message
    assert message.startswith(f"{path}:{line}: {field}: "), message


def test_unreadable_mapping_files(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    with pytest.raises(InvalidMapping, match="no such file"):
        load_mapping(path)
    path.write_text("pairs: [\n")
    with pytest.raises(InvalidMapping, match=r"m\.yaml:\d+: not valid YAML"):
        load_mapping(path)
    path.write_text("- 1\n")
    with pytest.raises(InvalidMapping, match="expected a mapping"):
        load_mapping(path)
