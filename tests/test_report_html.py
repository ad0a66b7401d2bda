"""The HTML report end to end: a real run (rulebooks extracted from ``planted`` plus a false
hand-written claim) through ``pytest --rulecheck-html`` and ``rulecheck report``, its data
checked against the books, the model and the run, and the page opened in headless Chromium.

The run is made once for the module (extraction, then pytest in a subprocess): every test
reads the same report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from benchmarks.report import ARGS as CHROMIUM_ARGS
from benchmarks.report import CHROMIUM
from rulecheck.cli import main
from rulecheck.rulebook import load_rulebook

ROOT = Path(__file__).parents[1]
FAILURE = ROOT / "rulebooks" / "examples" / "planted_expected_failure.yaml"
MAX_BYTES = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Planted L0H0 and L0H1 extracted, the false claim beside them, run by pytest with
    ``--rulecheck-html`` and ``--rulecheck-report``."""
    work = tmp_path_factory.mktemp("report-run")
    books = work / "books"
    args = ["extract", "--model", "planted", "--layer", "0", "--heads", "0,1"]
    assert main([*args, "--out", str(books)]) == 0
    shutil.copy(FAILURE, books / FAILURE.name)
    args = ["books", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-W", "ignore"]
    args += ["--rulecheck-html", "report.html", "--rulecheck-report", "run.json"]
    args += ["--rulecheck-cache", str(work / "cache"), "--rootdir", str(work)]
    here = Path.cwd()
    os.chdir(work)  # the run's paths are relative to where it starts, as on a command line
    try:
        code = pytest.main(args)
    finally:
        os.chdir(here)
    assert code == 0
    assert (work / "report.html").is_file()
    return work


def page_data(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="rc-data">(.*?)</script>', html, re.S)
    assert match is not None
    return json.loads(match[1])


@pytest.fixture(scope="module")
def html(run) -> str:
    return (run / "report.html").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def data(html) -> dict:
    return page_data(html)


def test_the_report_is_one_file_that_asks_for_nothing(run, html):
    assert (run / "report.html").stat().st_size < MAX_BYTES
    assert html.count("* plotly.js v") == 1  # inline, once
    assert not re.search(r"<(link|img|iframe)\b", html)
    assert not re.search(r"""<script[^>]*\ssrc=""", html)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_every_figure_is_drawn_from_the_measurements(run, data):
    """The per-feature F1 curves are the measured files' curves (both rankings), and Fig. 4
    is their mean per layer and term count."""
    import plotly.graph_objects as go

    for figure in data["figs"].values():
        go.Figure(figure)  # a property plotly.js does not know is an error here
    means: dict[str, dict[int, list[float]]] = {"gradient": {}, "weight": {}}
    for name in ("L0H0", "L0H1"):
        book = load_rulebook(run / "books" / f"{name}.yaml", measurements=True)
        for rules in book.features:
            fig = data["figs"][f"{name}-f{rules.feature}-f1"]
            curves = {"gradient": rules.measured["f1_by_terms"]}
            curves.update(rules.measured["f1_by_ranking"])
            assert set(curves) == {"gradient", "weight"}
            *rankings, kept = fig["data"]
            assert kept["name"] == f"kept: {rules.measured['n_terms']} terms"
            assert kept["x"] == [rules.measured["n_terms"]] * 2
            for trace in rankings:
                method = trace["name"].split()[0]
                assert trace["x"] == sorted(curves[method])
                assert trace["y"] == [curves[method][n] for n in trace["x"]]
                for n, f1 in curves[method].items():
                    means[method].setdefault(n, []).append(f1)
            for i, claim in enumerate(rules.absence):
                drop = data["figs"][f"{name}-f{rules.feature}-drop{i}"]["data"][0]["y"]
                assert drop == claim.drop
    for method, by_n in means.items():
        [trace] = data["figs"][f"planted-fig4-{method}"]["data"]
        want = [round(sum(v) / len(v), 4) for _, v in sorted(by_n.items())]
        assert [round(y, 4) for y in trace["y"]] == want
    # planted L0H1's counting rule, measured for the report: the mean activation rises with
    # the count and more contexts are active from the rule's threshold on
    book = load_rulebook(run / "books" / "L0H1.yaml")
    [(feature, rule)] = [(r.feature, c) for r in book.features for c in r.counting]
    mean, active = data["figs"][f"L0H1-f{feature}-count0"]["data"]
    assert mean["y"][-1] > mean["y"][1] and active["y"][-1] > 0.5
    assert active["y"][rule.threshold_count] > 0.5 >= active["y"][rule.threshold_count - 1]
    heat = data["figs"]["planted-heatmap"]["data"][0]
    assert heat["x"] == ["H0", "H1"] and heat["y"] == ["L0"]
    assert all(v is not None for v in heat["z"][0])


def test_exemplars_are_the_model_s_activations_and_attention(run, data):
    """Each exemplar's activations are the feature's at every token (the probe the checks
    use), and its attention row is the head's pattern from the query."""
    from rulecheck.session import Workbench

    bench = Workbench(cache_dir=run / "cache")
    book = load_rulebook(run / "books" / "L0H0.yaml")
    head = bench.head_of(book, "L0H0.yaml")
    model, _, _, corpus = bench.load(head)
    hook = "blocks.0.attn.hook_pattern"
    checked = 0
    for rules in book.features:
        exemplars = data["ex"][f"L0H0-f{rules.feature}"]
        assert len(exemplars) == 5
        acts = [x["act"] for x in exemplars]
        assert acts == sorted(acts, reverse=True) and acts[0] > 0
        probe = bench.probe(head, rules.feature)
        for x in exemplars:
            row, t = corpus[x["seq"]], x["pos"]
            lo = max(1, t - 20)
            assert x["t"] == t - lo
            full = probe.activations(row.unsqueeze(0))[0]
            want = full[lo : lo + len(x["a"])].tolist()
            assert x["a"] == pytest.approx(want, rel=2e-3, abs=1e-4)
            assert x["act"] == pytest.approx(float(full[t]), rel=2e-3)
            _, cache = model.run_with_cache(row.unsqueeze(0), names_filter=hook)
            pattern = cache[hook][0, head.head, t, lo : t + 1].tolist()
            assert x["w"][: t + 1 - lo] == pytest.approx(pattern, rel=2e-3, abs=1e-4)
            assert all(w is None for w in x["w"][t + 1 - lo :])  # never after the query
            decoded = [model.tokenizer.decode([int(i)]) for i in row[lo : lo + len(x["tok"])]]
            assert x["tok"] == decoded
            checked += 1
        # planted's rules hold on its exemplars: a term matches at each top exemplar's query
        assert all(x["term"] and x["keys"] for x in exemplars)
    assert checked >= 10


def test_the_false_claim_shows_its_counterexample(run, html, data):
    records = json.loads((run / "run.json").read_text())
    [absence] = [r for r in records if r["nodeid"].endswith("absence[the]")]
    assert absence["outcome"] == "xfailed"
    cx = absence["counterexample"]
    assert [cx["tokens"][i] for i in cx["inserted"]] == ["the"] * len(cx["inserted"])
    assert cx["after"] > 0.5 * cx["before"]  # what makes it a counterexample
    assert "falsified" in absence["message"]
    card = html[html.index('id="L0H0-2-f0"') :]
    card = card[: card.index("</details>")]
    assert card.count('<mark class="tok ins">the</mark>') == len(cx["inserted"])
    assert f"{cx['before']:.4f}" in card and f"{cx['after']:.4f}" in card
    assert "f1 is 0.000, expected &gt;= 0.900" in card  # the skip-gram claim's message


def test_the_cli_report_is_byte_identical_run_to_run(run, tmp_path, capsys):
    args = ["report", str(run / "books"), "--run", str(run / "run.json")]
    args += ["--cache", str(run / "cache")]
    assert main([*args, "-o", str(tmp_path / "a.html")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.html")]) == 0
    a, b = ((tmp_path / n).read_bytes() for n in ("a.html", "b.html"))
    assert a == b
    assert page_data(a.decode())["ex"].keys() == page_data(b.decode())["ex"].keys()
    assert f"wrote {tmp_path / 'b.html'}" in capsys.readouterr().out


BOOK = """\
rulecheck: 2
model: planted
layer: 0
head: 0
features:
  - feature: 1
    source: manual
    label: "</script><b>bold</b> & 'quotes' \\"double\\"\\nnext line"
    skipgrams:
      - {key: {tokens: [if]}, query: {tokens: [then]}}
    expect: {f1: 0.5}
"""


def test_text_from_books_is_escaped(tmp_path):
    (tmp_path / "L0H0.yaml").write_text(BOOK)
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path), "--exemplars", "0", "-o", str(out)]) == 0
    html = out.read_text()
    assert "<b>bold</b>" not in html
    assert "&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; &amp; &#39;quotes&#39;" in html
    body = re.search(r'id="rc-data">(.*?)</script>', html, re.S)[1]  # type: ignore[index]
    assert "</" not in body and "<" not in body
    assert "not measured (the report was written without the model)" in html


def test_a_counting_counterexample_shows_the_activation_by_count(tmp_path):
    """A failed counting claim's record (as the check writes it) on the card: the prompt with
    its inserted copies marked, the activation at each count."""
    from rulecheck.html import build_report
    from rulecheck.html.outcomes import Outcome

    (tmp_path / "L0H0.yaml").write_text(BOOK)
    cx = {"tokens": ["a", "x", "b", "x", "c"], "inserted": [1, 3], "t": 4}
    cx |= {"by_count": [0.0, 0.25, 0.125], "first_count": 0}
    record = {"rule": "counting", "passed": False, "counterexample": cx}
    run = [Outcome("L0H0.yaml::feature[1]::counting[x]", "failed", record, "falsified")]
    html = build_report([(tmp_path / "L0H0.yaml", "L0H0.yaml")], run, root=tmp_path)
    card = html[html.index('id="L0H0-f1"') :]
    assert card.count('<mark class="tok ins">x</mark>') == 2
    assert '<span class="tok query">c</span>' in card
    assert "0: <b>0.0000</b>, 1: <b>0.2500</b>, 2: <b>0.1250</b>" in card
    assert '<a href="#L0H0-f1">' in html[html.index('<section id="failed">') :]


def test_a_stated_strength_is_shown_with_its_rule(tmp_path):
    from rulecheck.html import build_report

    text = BOOK + (
        '    absence:\n      - "[if] ... [then] unless [unless] (drop >= 0.3)"\n'
        "    counting:\n      - {key: if, threshold_count: 2, min_spearman: 0.55}\n"
    )
    (tmp_path / "L0H0.yaml").write_text(text)
    html = build_report([(tmp_path / "L0H0.yaml", "L0H0.yaml")], [], root=tmp_path)
    card = html[html.index('id="L0H0-f1"') :]
    assert "[if] ... [then] unless [unless] (drop &gt;= 0.3)" in card
    assert "count [if] &gt;= 2 (spearman &gt;= 0.55)" in card


def test_bad_input_is_one_line(tmp_path, capsys):
    def error(*args: str) -> str:
        assert main(["report", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    out = str(tmp_path / "r.html")
    assert "no such file or directory" in error(str(tmp_path / "missing"), "-o", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    line = error(str(empty), "-o", out)
    assert "holds no rulebook" in line and "fix:" in line
    books = tmp_path / "books"
    books.mkdir()
    (books / "L0H0.yaml").write_text(BOOK)
    (books / "L0H0.measured.json").write_text("{not json")
    line = error(str(books), "--exemplars", "0", "-o", out)
    assert "L0H0.measured.json" in line and "cannot read the measurements" in line
    for bad in ("51", "-1", "five"):
        line = error(str(books), "--exemplars", bad, "-o", out)
        assert "--exemplars" in line and "[0, 50]" in line
    assert "is a directory" in error(str(books), "-o", str(books))
    assert "no such directory" in error(str(books), "-o", str(tmp_path / "no" / "r.html"))
    (tmp_path / "run.json").write_text('{"a": 1}')
    line = error(str(books), "--run", str(tmp_path / "run.json"), "-o", out)
    assert "is not a run report" in line and "--run" in line
    assert not Path(out).exists()


def gate_page(run: Path) -> tuple[str, int, int]:
    """The report of a gate run's records (a failed verdict, a changed and a lost feature),
    and the two features' ids."""
    from rulecheck.config import GateConfig
    from rulecheck.core.verdict import FeatureChange, gate_statistics, judge
    from rulecheck.html import build_report
    from rulecheck.html.outcomes import Outcome

    book = load_rulebook(run / "books" / "L0H0.yaml")
    a, b = (rules.feature for rules in book.features[:2])
    head = "planted L0H0"
    changes = [
        FeatureChange(a, 9, True, 0.9, 0.9, 0.9),
        FeatureChange(b, None, False, 0.9, None, None),
        FeatureChange(2, 4, True, 0.9, 0.2, 0.9),
    ]
    verdict = judge(gate_statistics(changes), GateConfig())
    outcomes = [
        Outcome("books/L0H0.yaml::gate", "failed", dict(verdict.record(head), rule="gate")),
        Outcome(
            f"books/L0H0.yaml::feature[{a}]::f1",
            "passed",
            {"head": head, "remapped_to": 9, "f1": 0.5},
        ),
        Outcome(
            f"books/L0H0.yaml::feature[{a}]::recall", "xfailed", {"head": head, "remapped_to": 9}
        ),
        Outcome(f"books/L0H0.yaml::feature[{b}]::f1", "xfailed", {"head": head, "lost": True}),
    ]
    html = build_report([(run / "books" / "L0H0.yaml", "L0H0.yaml")], outcomes, root=run)
    return html, a, b


def test_a_gate_run_shows_the_verdict_then_kept_changed_and_lost_features(run):
    """The gate's section from a run's records: the head's verdict and its statistics against
    their thresholds first; then re-identified features whose claims hold are kept, those with
    a claim that no longer holds (xfailed in a gate run) changed, those without a partner
    lost."""
    html, a, b = gate_page(run)
    start = html.index('<section id="gate">')
    gate = html[start : html.index("</section>", start)]
    assert '<span class="badge failed">gate failed</span>' in gate
    reason = "f1_change -0.350 &lt; -0.25 (by 0.100), holding 0.333 &lt; 0.385 (by 0.052): "
    assert f'<p class="reason">{reason}' in gate
    assert '<tr class="failed"><td>holding</td><td>0.333 &lt; 0.385</td></tr>' in gate
    assert "<td>reidentified</td><td>0.667</td>" in gate
    assert gate.index("gate-statistics") < gate.index('<tr class="kept">')
    row = r"(?:(?!</tr>).)*"  # within the row
    assert '<tr class="kept"><td>kept</td><td>0</td>' in gate
    changed = rf'<tr class="changed"><td>changed</td><td>1</td>{row}>{a}&rarr;9</a>'
    assert re.search(changed, gate, re.S)
    assert re.search(rf'<tr class="lost"><td>lost</td><td>1</td>{row}>{b}</a>', gate, re.S)
    # the card says what the run measured on the new SAE beside what the book records
    card = html[html.index(f'id="L0H0-f{a}"') :]
    assert "&rarr; 0.50 in this run" in card[: card.index("</summary>")]
    assert "now 9" in card[: card.index("</summary>")]


# ------------------------------------------------------------------------------ the browser


def _browser():
    """Playwright's Chromium on Debian's executable, or a skip with the reason (a failure
    where ``RULECHECK_REQUIRE_BROWSER`` is set, as CI sets it)."""
    missing = pytest.fail if os.environ.get("RULECHECK_REQUIRE_BROWSER") else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).exists():
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_api


def test_the_report_in_a_browser(run, data, tmp_path):
    sync_api = _browser()
    n_cards = sum(len(load_rulebook(p).features) for p in sorted((run / "books").glob("*.yaml")))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors: list[str] = []
            leaving: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on(
                "request",
                lambda r: (
                    r.url.startswith(("file:", "data:", "blob:", "about:")) or leaving.append(r.url)
                ),
            )
            page.goto((run / "report.html").as_uri(), wait_until="load")
            # the overview's figures: heat map, Fig. 9, Fig. 4a and 4b
            # (waits through locators: a string predicate is eval, which the page's CSP forbids)
            page.locator(".js-plotly-plot").nth(3).wait_for(state="attached")
            assert page.locator("#overview .js-plotly-plot").count() == 2
            assert page.locator("#figures .js-plotly-plot").count() == 2
            assert page.locator("details.card").count() == n_cards
            page.screenshot(path=str(tmp_path / "overview.png"))

            # an extracted feature's card: exemplars shaded, keys boxed, its curves drawn
            card = page.locator("#L0H0-f0")
            card.locator("summary").click()
            card.locator(".js-plotly-plot").first.wait_for(state="attached")
            tokens = card.locator(".exemplars .tok")
            assert tokens.count() > 20
            shaded = page.evaluate(
                "[...document.querySelectorAll('#L0H0-f0 .exemplars .tok')]"
                ".filter(s => !/, 0(\\.0+)?\\)$/.test(s.style.backgroundColor)).length"
            )
            assert shaded >= 5  # at least the query of each exemplar
            assert card.locator(".tok.key").count() >= 5
            assert card.locator(".tok.query").count() == 5
            n_figs = 1 + sum(1 for k in data["figs"] if k.startswith("L0H0-f0-"))
            assert card.locator(".js-plotly-plot").count() == n_figs - 1
            card.screenshot(path=str(tmp_path / "feature.png"))

            # the failed claim, from the list of failed claims
            page.locator("#failed a[href='#L0H0-2-f0']").first.click()
            failed = page.locator("#L0H0-2-f0")
            # the page opens it on hashchange, which the browser fires after the click returns
            sync_api.expect(failed).to_have_attribute("open", re.compile(".*"))
            assert failed.locator("mark.ins").first.inner_text() == "the"
            assert float(failed.locator(".acts .before").inner_text()) > 0
            assert "falsified" in failed.locator("pre.message").last.inner_text()

            # searching a head's features
            section = page.locator("section.head#L0H0")
            section.locator(".search input").fill("no such feature at all")
            assert section.locator(".search .count").inner_text().startswith("0 of ")
            section.locator(".search input").fill("")
            assert section.locator("details.card:visible").count() >= 1
        finally:
            browser.close()
    assert errors == []
    assert leaving == []
    assert (tmp_path / "overview.png").stat().st_size > 10_000
    assert (tmp_path / "feature.png").stat().st_size > 10_000


def test_the_gate_section_in_a_browser(run, tmp_path):
    """The gate's section as a reader sees it: reached from the header, the verdict before
    the statistics, the statistic past its threshold marked, a feature's link opening its
    card."""
    sync_api = _browser()
    html, a, _ = gate_page(run)
    page_file = tmp_path / "gate.html"
    page_file.write_text(html, encoding="utf-8")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri(), wait_until="load")
            page.locator("header a[href='#gate']").click()
            gate = page.locator("section#gate")
            badge = gate.locator(".badge.failed")
            assert badge.inner_text() == "gate failed" and badge.is_visible()
            first_table = gate.locator("table").first
            assert first_table.get_attribute("class") == "gate-statistics"
            assert first_table.locator("tr.failed td").first.inner_text() == "holding"
            color = first_table.locator("tr.failed td").first.evaluate(
                "e => getComputedStyle(e).color"
            )
            assert color == "rgb(198, 40, 40)"
            assert gate.locator("p.reason").inner_text().startswith("f1_change -0.350 < -0.25")
            gate.locator(f"tr.changed a[href='#L0H0-f{a}']").click()
            card = page.locator(f"#L0H0-f{a}")
            sync_api.expect(card).to_have_attribute("open", re.compile(".*"))
            assert card.is_visible()
        finally:
            browser.close()
    assert errors == []


def test_the_layer_table_counts_bounds_and_both_precisions(run, html, data):
    """Per layer: features with absence, counting and distance-bounded rules (also Fig. 9's
    bars) and the median precision on the protocol, over the corpus and as checked, read
    against the paper's figures."""
    import statistics

    paths = [run / "books" / f"L0H{h}.yaml" for h in (0, 1)] + [run / "books" / FAILURE.name]
    features = [r for p in paths for r in load_rulebook(p, measurements=True).features]
    measured = [r for r in features if r.source == "extracted"]  # the false claim: by hand
    n = len(features)
    counts = [
        sum(bool(r.absence) for r in features),
        sum(bool(r.counting) for r in features),
        sum(any(t.max_distance is not None for t in r.skipgrams) for r in features),
    ]
    bars = {t["name"]: t["y"] for t in data["figs"]["planted-fig9"]["data"]}
    assert bars == {
        "absence": [counts[0] / n],
        "counting": [counts[1] / n],
        "distance-bounded": [counts[2] / n],
    }
    table = html[html.index('<table class="layers">') :]
    table = table[: table.index("</table>")]
    cells = [c.split("<")[0] for c in table.split("<td>")[1:]]
    assert cells[:5] == ["0", str(n), *(f"{c} ({c / n:.0%})" for c in counts)]
    keys = ("protocol_precision", "corpus_precision", "precision")
    for cell, key in zip(cells[5:8], keys, strict=True):
        assert cell == f"{statistics.median(r.measured[key] for r in measured):.3f}"
    assert "over a quarter of layer-0 features" in html and "carry no distance" in html
