"""``report.html`` of a scan: layers x heads heatmaps per statistic, per-head distributions.

One self-contained file: inline SVG and CSS, no script, nothing fetched. Module names and
settings are escaped text; every number is rounded.
"""

from __future__ import annotations

import html
from typing import Any

from ..head_stats import STATISTICS
from .aggregate import BINS, bin_ranges
from .engine import ShardResult

CELL = 22
LABELS = {
    "entropy": "entropy (nats)",
    "distance": "mean distance (tokens)",
    "first": "share on the first token (attention sink)",
    "previous": "share on the previous token",
    "self": "share on the token itself",
}


def _colour(value: float) -> str:
    """0 -> pale yellow, 1 -> dark blue (a viridis-like ramp, by hand)."""
    stops = [(253, 231, 37), (94, 201, 98), (33, 145, 140), (59, 82, 139), (68, 1, 84)]
    value = min(1.0, max(0.0, value)) * (len(stops) - 1)
    low = int(value)
    high = min(low + 1, len(stops) - 1)
    t = value - low
    rgb = [round(a + (b - a) * t) for a, b in zip(stops[low], stops[high], strict=True)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _heatmap(total: ShardResult, stat: str) -> str:
    modules = list(total.sums.modules.items())
    index = STATISTICS.index(stat)
    heads = max(s.heads for _, s in modules)
    values = [float(v) for _, s in modules for v in s.mean[index].tolist()]
    low, high = min(values), max(values)
    span = high - low or 1.0
    label_width = 12 + 7 * max(len(name) for name, _ in modules)
    width, height = label_width + CELL * heads + 10, CELL * (len(modules) + 1) + 10
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{stat}">']
    for head in range(heads):
        x = label_width + head * CELL + CELL / 2
        parts.append(f'<text x="{x}" y="14" class="h">{head}</text>')
    for row, (name, sums) in enumerate(modules):
        y = CELL * (row + 1)
        parts.append(
            f'<text x="{label_width - 6}" y="{y + 15}" class="m">{html.escape(name)}</text>'
        )
        std = sums.std()[index].tolist()
        for head, value in enumerate(sums.mean[index].tolist()):
            colour = _colour((value - low) / span)
            parts.append(
                f'<rect x="{label_width + head * CELL}" y="{y}" width="{CELL - 1}" '
                f'height="{CELL - 1}" fill="{colour}"><title>{html.escape(name)} head {head}: '
                f"{value:.4g} ± {std[head]:.3g}</title></rect>"
            )
    parts.append("</svg>")
    return (
        f"<h3>{html.escape(LABELS[stat])}</h3><p class='scale'>{low:.4g} (pale) to "
        f"{high:.4g} (dark)</p>" + "".join(parts)
    )


def _distributions(total: ShardResult, stat: str, max_length: int) -> str:
    index = STATISTICS.index(stat)
    low, high = bin_ranges(max_length)[stat]
    rows = []
    for name, sums in total.sums.modules.items():
        cells = []
        for head in range(sums.heads):
            counts = sums.hist[index, head].tolist()
            top = max(counts) or 1
            bars = "".join(
                f'<rect x="{b * 2}" y="{30 - 30 * c / top:.1f}" width="2" '
                f'height="{30 * c / top:.1f}"/>'
                for b, c in enumerate(counts)
                if c
            )
            cells.append(
                f'<td><svg width="{2 * BINS}" height="30" class="d"><title>{html.escape(name)} '
                f"head {head}: {stat} from {low:.3g} to {high:.3g}</title>{bars}</svg></td>"
            )
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return (
        f"<details><summary>{html.escape(LABELS[stat])}: per-head distribution over query rows "
        f"({low:.3g} to {high:.3g})</summary><table>{''.join(rows)}</table></details>"
    )


def report_html(total: ShardResult, settings: dict[str, Any]) -> str:
    counts = total.counts()
    max_length = int(settings["max_length"])
    facts = [
        f"model: {settings['model']}",
        f"texts: {counts['texts']} ({counts['tokens']} tokens)",
        f"truncated to {max_length} tokens: {counts['truncated']}",
        f"empty, skipped: {counts['empty']}",
    ]
    body = ["<h1>attnscope scan</h1>", "<ul>"]
    body += [f"<li>{html.escape(fact)}</li>" for fact in facts]
    body.append("</ul><h2>Means over every valid query row (layers x heads)</h2>")
    body += [_heatmap(total, stat) for stat in STATISTICS]
    body.append("<h2>Distributions</h2>")
    body += [_distributions(total, stat, max_length) for stat in STATISTICS]
    style = (
        "body{font-family:sans-serif;margin:1.5em}text{font-size:11px}"
        "text.h{text-anchor:middle}text.m{text-anchor:end}.scale{color:#555;margin:0}"
        "svg.d rect{fill:#3b528b}td{padding:1px;border-bottom:1px solid #eee}"
        "th{text-align:right;font-weight:normal;font-size:11px;padding-right:6px}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>attnscope scan</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
