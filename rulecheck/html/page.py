"""The report as one HTML file: the Jinja2 template (autoescaped) with the page's style,
script, plotly.js and data inline, so that it opens offline and makes no request."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup

TEMPLATE = "report.html.j2"
CARDS_TEMPLATE = "cards.html.j2"
CARDS_SCOPE = ".rulecheck-cards"


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("rulecheck.html", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _asset(name: str) -> str:
    return resources.files("rulecheck.html").joinpath("templates", name).read_text("utf-8")


def script_json(data: Any) -> Markup:
    """``data`` as JSON to sit inside a ``<script>`` element: keys sorted, no NaN, and ``<``,
    ``>``, ``&`` written as escapes so that no text can close the element."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escaped)
    return Markup(text)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value:.0%}"


@cache
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _filtered() -> jinja2.Environment:
    env = _environment()
    env.filters["fmt"] = _fmt
    env.filters["pct"] = _pct
    return env


def scoped_css(css: str, scope: str = CARDS_SCOPE) -> str:
    """The report's style applied inside ``scope`` only (a notebook's page keeps its own): each
    rule's selectors prefixed with it, the page-wide ones (``:root``, ``body``) become it."""

    def selector(text: str) -> str:
        text = text.strip()
        return scope if text in (":root", "body") else f"{scope} {text}"

    out = []
    for line in css.splitlines():
        head, brace, body = line.partition("{")
        if not brace or head.lstrip().startswith("@"):
            out.append(line)
            continue
        out.append(", ".join(selector(s) for s in head.split(",")) + " {" + body)
    return "\n".join(out)


def render_cards(title: str, cards: list[dict[str, Any]]) -> str:
    """The feature cards of one book as an HTML fragment (the report's card template and its
    style, scoped), for a notebook; figures and exemplars are the full report's."""
    template = _filtered().get_template(CARDS_TEMPLATE)
    return template.render(title=title, cards=cards, style=Markup(scoped_css(_asset("report.css"))))


def render_page(context: dict[str, Any], data: dict[str, Any]) -> str:
    """The report's HTML text."""
    template = _filtered().get_template(TEMPLATE)
    return template.render(
        **context,
        style=Markup(_asset("report.css")),
        script=Markup(_asset("report.js")),
        plotly=Markup(_plotly_js()),
        data=script_json(data),
    )
