"""``rulecheck diff``: features kept, lost and new, rules added and removed, F1 changes, the
verdict (exit status) and the Markdown for a pull request."""

from __future__ import annotations

from pathlib import Path

import pytest

from rulecheck.book import FeatureRules, Rulebook
from rulecheck.bookdiff import diff_books
from rulecheck.cli import main
from rulecheck.kinds.skipgram import SkipGram
from rulecheck.refs import TokenRef
from rulecheck.report import diff_markdown
from rulecheck.rulebook import save_rulebook


def term(key: str, query: str) -> SkipGram:
    return SkipGram(TokenRef(None, [key]), TokenRef(None, [query]))


def feature(fid: int, terms: list[SkipGram], f1: float | None) -> FeatureRules:
    measured = {} if f1 is None else {"f1": f1, "n_test": 100}
    return FeatureRules(fid, "extracted", skipgrams=terms, expect={"f1": 0.5}, measured=measured)


def old_book() -> Rulebook:
    return Rulebook(
        layer=0,
        head=3,
        features=[
            feature(1, [term("if", "then")], 0.95),
            feature(2, [term("a", "b")], 0.8),
            feature(3, [term("x", "y")], None),
        ],
    )


def new_book() -> Rulebook:
    return Rulebook(
        layer=0,
        head=3,
        features=[
            feature(1, [term("if", "then")], 0.94),
            feature(2, [term("a", "b"), term("c", "d")], 0.6),
            feature(4, [term("p", "q")], 0.9),
        ],
    )


def test_features_are_kept_lost_new_with_rules_and_f1() -> None:
    head = diff_books(old_book(), new_book())
    by_status = {
        s: [(f.old, f.new) for f in head.features if f.status == s] for s in ("kept", "lost", "new")
    }
    assert by_status == {"kept": [(1, 1), (2, 2)], "lost": [(3, None)], "new": [(None, 4)]}
    one, two = head.features[:2]
    assert not one.added and not one.removed and one.delta_f1 == pytest.approx(-0.01)
    assert two.added == {"skipgrams": ["[c] ... [d]"]} and not two.removed
    assert [f.old for f in head.regressions(0.05)] == [2]
    assert head.regressions(0.25) == []
    assert head.features[2].f1_old == 0.5  # no measurement: the expect minimum


def test_a_mapping_translates_old_ids_and_unmapped_ones_are_lost() -> None:
    head = diff_books(old_book(), new_book(), mapping={1: 4, 2: 2})
    kept = [(f.old, f.new) for f in head.features if f.status == "kept"]
    assert kept == [(1, 4), (2, 2)]
    assert head.features[0].removed == {"skipgrams": ["[if] ... [then]"]}
    assert [f.old for f in head.features if f.status == "lost"] == [3]
    assert [f.new for f in head.features if f.status == "new"] == [1]


def write_pair(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "old", tmp_path / "new"
    save_rulebook(old_book(), old / "L0H3.yaml")
    save_rulebook(new_book(), new / "L0H3.yaml")
    return old, new


def test_cli_verdict_and_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = write_pair(tmp_path)
    assert main(["diff", str(old), str(new)]) == 1  # feature 2 regressed
    out = capsys.readouterr().out
    assert "regressed" in out and "L0H3" in out
    assert main(["diff", str(old), str(new), "--tolerance", "0.3"]) == 0
    assert main(["diff", str(old / "L0H3.yaml"), str(old / "L0H3.yaml")]) == 0


def test_markdown_for_a_pull_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = write_pair(tmp_path)
    assert main(["diff", str(old), str(new), "--format", "md"]) == 1
    out = capsys.readouterr().out
    assert out == diff_markdown([diff_books(old_book(), new_book())], 0.05)
    lines = out.splitlines()
    assert lines[:3] == [
        "### rulecheck diff",
        "",
        "**1 kept feature regressed** (F1 fell by more than 0.05)",
    ]
    assert "| L0H3 | 2 | 1 | 1 | 1 | 0 | 1 |" in lines
    assert "| L0H3 | 2 | regressed | 0.80 -> 0.60 | -0.200 | +skipgrams [c] ... [d] |" in lines


def test_changed_features_come_most_important_first_and_are_cut_at_the_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = Rulebook(layer=0, head=3, features=[feature(i, [term("a", "b")], 0.5) for i in range(60)])
    new = Rulebook(layer=0, head=3, features=[feature(i, [term("a", "b")], 0.5) for i in range(60)])
    for i, rules in enumerate(new.features):
        rules.measured["f1"] = 0.5 + i / 1000  # feature 59 moved most
    new.features[7].measured["f1"] = 0.3  # regressed
    new.features[3].skipgrams.append(term("c", "d"))  # a rule added, F1 barely moved
    new.features.pop(11)  # lost
    save_rulebook(old, tmp_path / "old" / "L0H3.yaml")
    save_rulebook(new, tmp_path / "new" / "L0H3.yaml")
    args = ["diff", str(tmp_path / "old"), str(tmp_path / "new"), "--format", "md"]
    assert main([*args, "--limit", "5"]) == 1
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("Changed features:") + 4 :]
    rows = [line.split(" | ")[1:3] for line in table if line.startswith("| L0H3 | ")]
    assert rows[:4] == [["7", "regressed"], ["11", "lost"], ["3", "kept"], ["59", "kept"]]
    assert len(rows) == 5
    assert lines[-1] == "... and 54 more changed features (--limit 0 lists all)"
    assert main([*args, "--limit", "0"]) == 1
    out = capsys.readouterr().out
    assert out.count("| L0H3 | ") == 1 + 59 and "more changed" not in out
    assert main(["diff", str(tmp_path / "old"), str(tmp_path / "new"), "--limit", "-1"]) == 2
    assert "--limit" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("file_and_dir", "compares a file with a directory"),
        ("missing_head", "has no L0H4.yaml"),
        ("no_such", "no such file or directory"),
    ],
)
def test_cli_errors_are_one_line(tmp_path: Path, capsys, case: str, message: str) -> None:
    old, new = write_pair(tmp_path)
    args = {
        "file_and_dir": [str(old / "L0H3.yaml"), str(new)],
        "missing_head": [str(old), str(new)],
        "no_such": [str(old), str(tmp_path / "nowhere")],
    }[case]
    if case == "missing_head":
        save_rulebook(Rulebook(layer=0, head=4), new / "L0H4.yaml")
    assert main(["diff", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
