"""The report's figures as plotly.js figure specs (``{"data": [...], "layout": {...}}``):
plain values, drawn in the browser by the plotly.js the report carries inline. Each function
draws only what it is given; the report says when a curve was not measured. A claim's own
figures are its kind's (``RuleKind.figure``); the layout and colours are shared with them
(``rulecheck.kinds.card``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rulecheck.kinds.card import BLUE, GREEN, GREY, ORANGE, Figure
from rulecheck.kinds.card import layout as _layout

RANKING_COLOURS = {"gradient": BLUE, "weight": ORANGE}
LAYER_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def f1_heatmap(model: str, cells: Mapping[tuple[int, int], float | None]) -> Figure:
    """Median F1 per head: layers down, heads across (empty cells: no features)."""
    layers = sorted({layer for layer, _ in cells})
    heads = sorted({head for _, head in cells})
    z = [[cells.get((layer, head)) for head in heads] for layer in layers]
    text = [["" if v is None else f"{v:.2f}" for v in row] for row in z]
    return {
        "data": [
            {
                "type": "heatmap",
                "z": z,
                "x": [f"H{h}" for h in heads],
                "y": [f"L{layer}" for layer in layers],
                "text": text,
                "texttemplate": "%{text}",
                "zmin": 0,
                "zmax": 1,
                "colorscale": "Viridis",
                "colorbar": {"title": {"text": "F1"}},
                "hovertemplate": "%{y}%{x}: median F1 %{z:.3f}<extra></extra>",
            }
        ],
        "layout": _layout(
            f"{model}: median F1 per head", "head", "layer", yaxis={"autorange": "reversed"}
        ),
    }


def rule_shares(model: str, shares: Mapping[int, tuple[float, float, int, float]]) -> Figure:
    """Fig. 9: per layer, the share of features with absence rules, with counting rules and
    with a distance-bounded skip-gram (``shares[layer] = (absence, counting, n_features,
    bounded)``)."""
    layers = sorted(shares)
    x = [f"L{layer} ({shares[layer][2]} features)" for layer in layers]
    bars = [
        {
            "type": "bar",
            "name": name,
            "x": x,
            "y": [shares[layer][i] for layer in layers],
            "marker": {"color": colour},
            "hovertemplate": "%{x}: %{y:.1%}<extra>" + name + "</extra>",
        }
        for i, (name, colour) in (
            (0, ("absence", ORANGE)),
            (1, ("counting", GREEN)),
            (3, ("distance-bounded", BLUE)),
        )
    ]
    layout = _layout(
        f"{model}: features with absence, counting and distance-bounded rules (Fig. 9)",
        "layer",
        "share of features",
        barmode="group",
    )
    layout["yaxis"]["tickformat"] = ".1%"
    return {"data": bars, "layout": layout}


def _counts_axis(counts: Sequence[int]) -> dict[str, Any]:
    """A log axis with a tick at each term count of the grid."""
    return {
        "title": {"text": "number of terms"},
        "type": "log",
        "tickvals": list(counts),
        "ticktext": [str(n) for n in counts],
    }


def f1_by_terms_layers(
    model: str, ranking: str, curves: Mapping[int, Mapping[int, tuple[float | None, int]]]
) -> Figure:
    """Fig. 4a/4b: mean test F1 against the number of terms, one line per layer, for one
    ranking (``curves[layer][n] = (mean F1, features)``)."""
    data = []
    for i, layer in enumerate(sorted(curves)):
        counts = sorted(curves[layer])
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"layer {layer}",
                "x": counts,
                "y": [curves[layer][n][0] for n in counts],
                "customdata": [curves[layer][n][1] for n in counts],
                "line": {"color": LAYER_COLOURS[i % len(LAYER_COLOURS)]},
                "hovertemplate": "%{x} terms: mean F1 %{y:.3f} over %{customdata} features"
                f"<extra>layer {layer}</extra>",
            }
        )
    figure = "4a" if ranking == "weight" else "4b"
    layout = _layout(
        f"{model}: F1 against terms, {ranking} ranking (Fig. {figure})", "", "mean test F1"
    )
    layout["xaxis"] = _counts_axis(sorted({n for c in curves.values() for n in c}))
    layout["yaxis"]["range"] = [0, 1.02]
    return {"data": data, "layout": layout}


def feature_f1(curves: Mapping[str, Mapping[int, float]], chosen: int | None) -> Figure:
    """One feature's test F1 against the number of terms, per ranking; the chosen count
    marked."""
    data = []
    for method in sorted(curves):
        counts = sorted(curves[method])
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"{method} ranking",
                "x": counts,
                "y": [curves[method][n] for n in counts],
                "line": {"color": RANKING_COLOURS.get(method, GREY)},
                "hovertemplate": "%{x} terms: F1 %{y:.3f}<extra>" + method + "</extra>",
            }
        )
    if chosen:
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"kept: {chosen} terms",
                "x": [chosen, chosen],
                "y": [0, 1],
                "line": {"color": GREY, "dash": "dot"},
                "hoverinfo": "skip",
            }
        )
    layout = _layout("F1 against terms", "", "test F1")
    layout["xaxis"] = _counts_axis(sorted({n for c in curves.values() for n in c}))
    layout["yaxis"]["range"] = [0, 1.02]
    return {"data": data, "layout": layout}
