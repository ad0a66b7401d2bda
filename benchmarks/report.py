"""The HTML report's cost: generation time, size, and load time in headless Chromium, for a
directory of rulebooks (``make demo``'s ``build/demo`` by default); optionally the README's
screenshots of its overview and of one feature's card.

    python -m benchmarks.report build/demo --run build/demo/run.json --screenshots docs

Generation is timed in this process after the imports (the model, SAEs and exemplars are
loaded from the cache the run left, as ``--rulecheck-html`` finds them); the page's load is
the navigation's ``loadEventEnd`` and the time until every overview figure is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

CHROMIUM = os.environ.get("RULECHECK_CHROMIUM", "/usr/bin/chromium")
ARGS = [  # headless, and nothing that reaches for the network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def generate(books: Path, run: Path | None, cache: Path, out: Path) -> float:
    from rulecheck.html import build_report, write_report
    from rulecheck.html.outcomes import read_run
    from rulecheck.rulebook import rulebook_files
    from rulecheck.session import Workbench

    paths = sorted(rulebook_files([books]))
    start = time.perf_counter()
    bench = Workbench(cache_dir=cache)
    html = build_report(
        [(p, str(p)) for p in paths], None if run is None else read_run(run), bench=bench
    )
    write_report(out, html)
    return time.perf_counter() - start


def load_times(page_path: Path, repeats: int, screenshots: Path | None) -> list[dict]:
    from playwright.sync_api import sync_playwright

    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for i in range(repeats):
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            start = time.perf_counter()
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            n = page.locator("#overview .plot[data-fig], #figures .plot[data-fig]").count()
            # locators, not a string predicate: that is eval, which the page's CSP forbids
            plots = page.locator("#overview .js-plotly-plot, #figures .js-plotly-plot")
            plots.nth(n - 1).wait_for(state="attached")
            drawn = time.perf_counter() - start
            nav = json.loads(
                page.evaluate(
                    "JSON.stringify(performance.getEntriesByType('navigation')[0].toJSON())"
                )
            )
            out.append({"load_s": nav["loadEventEnd"] / 1000, "figures_drawn_s": drawn})
            if screenshots is not None and i == 0:
                _screenshots(page, screenshots)
            page.close()
        browser.close()
    return out


def _screenshots(page, directory: Path) -> None:
    """The overview, and the card of the first feature with exemplars, absence or counting
    rules and an F1 curve."""
    directory.mkdir(parents=True, exist_ok=True)
    bottom = page.evaluate(
        "document.querySelector('#figures').getBoundingClientRect().bottom + window.scrollY"
    )
    clip = {"x": 0, "y": 0, "width": 1280, "height": bottom + 8}
    page.screenshot(path=str(directory / "report-overview.png"), clip=clip, full_page=True)
    key = page.evaluate(
        """() => {
        const cards = [...document.querySelectorAll('details.card')];
        const rich = cards.find(c => c.querySelector('.exemplars')
            && c.querySelectorAll('.plot[data-fig]').length >= 2);
        return (rich || cards.find(c => c.querySelector('.exemplars')) || cards[0]).id;
    }"""
    )
    card = page.locator(f"#{key}")
    card.locator("summary").click()
    card.locator(".js-plotly-plot").first.wait_for(state="attached")
    page.wait_for_timeout(500)
    card.screenshot(path=str(directory / "report-feature.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("books", type=Path, nargs="?", default=Path("build/demo"))
    parser.add_argument("--run", type=Path, default=None, help="a run's --rulecheck-report JSON")
    parser.add_argument("--cache", type=Path, default=Path(".rulecheck_cache"))
    parser.add_argument("--out", type=Path, default=Path("build/report-bench.html"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshots", type=Path, default=None, help="directory for the PNGs")
    args = parser.parse_args()
    seconds = generate(args.books, args.run, args.cache, args.out)
    size = args.out.stat().st_size
    print(f"generation: {seconds:.2f} s, {size / 1e6:.2f} MB ({args.out})")
    times = load_times(args.out, args.repeats, args.screenshots)
    for name in ("load_s", "figures_drawn_s"):
        values = [t[name] for t in times]
        print(f"{name}: median {statistics.median(values):.2f} s, best {min(values):.2f} s")


if __name__ == "__main__":
    main()
