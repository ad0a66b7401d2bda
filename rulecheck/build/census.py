"""The model card's census of the shipped rulebooks: per layer, how many features have absence,
counting and distance-bounded rules (against the paper's figures and the books they replaced),
and precision on the paper's protocol against precision where the rules fire.

``python -m rulecheck.build.census card`` rewrites that section of ``MODEL_CARD.md`` from the
books under ``--rulebooks``; ``train_tiny card`` writes the same section.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rulecheck.html.gather import PAPER_FIGURES as PAPER

TITLE = "## Rules where they fire: distances, absence and counting"

# the books these replaced (before hard negatives, distance bounds and strengths), counted by
# ``census`` from them: layer -> features, with absence, counting, bounded, median precision
# and F1 on the protocol
FORMER: dict[int, dict[str, Any]] = {
    0: {"features": 352, "absence": 12, "counting": 1, "bounded": 0, "precision": 0.97, "f1": 0.88},
    1: {"features": 359, "absence": 3, "counting": 0, "bounded": 0, "precision": 0.94, "f1": 0.90},
}


def _median(values: Iterable[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def census(rulebooks: Path) -> dict[int, dict[str, Any]]:
    """Per layer, over the extracted features of the books under ``rulebooks``: counts of
    features with each rule kind and with a distance bound, and median precision and F1 on
    the protocol, with hard negatives and over the corpus."""
    from rulecheck.rulebook import load_rulebook

    rows: dict[int, dict[str, Any]] = {}
    for path in sorted(rulebooks.glob("L*H*.yaml")):
        book = load_rulebook(path, measurements=True)
        row = rows.setdefault(
            book.layer,
            {k: 0 for k in ("features", "absence", "strength", "counting", "bounded")}
            | {k: [] for k in ("protocol_precision", "precision", "corpus_precision")}
            | {k: [] for k in ("protocol_f1", "f1", "n_fire")},
        )
        for f in book.features:
            if f.source != "extracted":
                continue
            m = f.measured
            row["features"] += 1
            row["absence"] += bool(f.absence)
            row["strength"] += any(a.min_drop is not None for a in f.absence)
            row["counting"] += bool(f.counting)
            row["bounded"] += any(
                s.max_distance is not None or s.min_distance is not None for s in f.skipgrams
            )
            for key in ("protocol_precision", "precision", "corpus_precision", "protocol_f1"):
                row[key].append(m.get(key, math.nan))
            row["f1"].append(m.get("f1", math.nan))
            row["n_fire"].append(m.get("n_fire", 0))
    return {
        layer: {
            **{k: v for k, v in row.items() if isinstance(v, int)},
            **{k: _median(v) for k, v in row.items() if isinstance(v, list)},
        }
        for layer, row in sorted(rows.items())
    }


def _share(n: int, of: int) -> str:
    return f"{n} ({n / of:.0%})" if of else "0"


def census_lines(rulebooks: Path, against: tuple[str, Path] | None = None) -> list[str]:
    """The card's section, from the books under ``rulebooks``: beside the books they replaced
    (``FORMER``), or beside another model's books (``against``: its name and directory)."""
    now = census(rulebooks)
    if against is None:
        other, labels = FORMER, ("former", "shipped")
        beside = "in\nthe shipped books and in the books they replaced (before hard negatives, bounds and\nstrengths)"
    else:
        other, labels = census(against[1]), (against[0], "this model")
        beside = f"in\nthis model's books and in {against[0]}'s (another family, the same corpus)"
    lines = [
        "",
        TITLE,
        "",
        "Per layer, over extracted features: how many have an absence claim (of them, with a",
        "stated mean drop, `min_drop`), a counting claim and a distance-bounded skip-gram, "
        + beside
        + ", with the paper's figures for GPT-2 small. Every claim counted here passes",
        "its check (extraction keeps only those).",
        "",
        "| layer | books | features | absence | counting | distance-bounded |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for layer, row in now.items():
        old = other.get(layer)
        if old is not None:
            n = old["features"]
            strength = f", {old['strength']} with min_drop" if "strength" in old else ""
            lines.append(
                f"| {layer} | {labels[0]} | {n} | {_share(old['absence'], n)}{strength} | "
                f"{_share(old['counting'], n)} | {_share(old['bounded'], n)} |"
            )
        n = row["features"]
        lines.append(
            f"| {layer} | {labels[1]} | {n} | {_share(row['absence'], n)}, {row['strength']} "
            f"with min_drop | "
            f"{_share(row['counting'], n)} | {_share(row['bounded'], n)} |"
        )
    lines += [
        "",
        f"The paper: absence, {PAPER['absence']}; counting, {PAPER['counting']}; distances, "
        f"{PAPER['bounded']}.",
        "",
        "Precision of the skip-gram disjunction, median over features: on the paper's protocol",
        f"({PAPER['precision'].removesuffix(' (A.2)')}, A.2), where the rules fire (the share of the positions of 256",
        "held-out sequences where the rules predict the feature on at which it is on), and as",
        "the books check it (the protocol's test split plus the misses among a seeded draw of",
        "firing positions as hard negatives); F1 the same two ways:",
        "",
        "| layer | books | protocol precision | corpus precision | checked precision | "
        "protocol F1 | checked F1 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for layer, row in now.items():
        old = other.get(layer)
        if old is not None and against is None:
            lines.append(
                f"| {layer} | former | {old['precision']:.2f} | - | - | {old['f1']:.2f} | - |"
            )
        elif old is not None:
            lines.append(
                f"| {layer} | {labels[0]} | {old['protocol_precision']:.2f} | "
                f"{old['corpus_precision']:.2f} | {old['precision']:.2f} | "
                f"{old['protocol_f1']:.2f} | {old['f1']:.2f} |"
            )
        lines.append(
            f"| {layer} | {labels[1]} | {row['protocol_precision']:.2f} | "
            f"{row['corpus_precision']:.2f} | {row['precision']:.2f} | "
            f"{row['protocol_f1']:.2f} | {row['f1']:.2f} |"
        )
    return lines


def with_section(card: str, lines: list[str]) -> str:
    """``card`` with its census section replaced by ``lines`` (or inserted before the gate's
    section, or at the end)."""
    text = "\n".join(lines).strip("\n")
    if TITLE in card:
        head, rest = card.split("\n" + TITLE + "\n", 1)
        tail = rest.split("\n## ", 1)
        after = "\n## " + tail[1] if len(tail) == 2 else ""
        return head.rstrip("\n") + "\n\n" + text + "\n" + after
    gate = "\n## The retraining gate\n"
    if gate in card:
        head, rest = card.split(gate, 1)
        return head.rstrip("\n") + "\n\n" + text + "\n" + gate + rest
    return card.rstrip("\n") + "\n\n" + text + "\n"


def main(argv: list[str] | None = None) -> None:
    from rulecheck import zoo

    parser = argparse.ArgumentParser(prog="python -m rulecheck.build.census")
    parser.add_argument("step", choices=["card", "show"])
    parser.add_argument("--rulebooks", type=Path, default=Path("rulebooks/rulecheck-tiny"))
    parser.add_argument("--out", type=Path, default=zoo.entry_dir("rulecheck-tiny"))
    args = parser.parse_args(argv)
    if args.step == "show":
        for layer, row in census(args.rulebooks).items():
            print(layer, row)
        return
    card = args.out / "MODEL_CARD.md"
    card.write_text(with_section(card.read_text(), census_lines(args.rulebooks)))


if __name__ == "__main__":
    main()
