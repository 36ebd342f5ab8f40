"""Static matplotlib figures of ``AttentionMaps`` (extra ``attnscope[plot]``).

Figures are built with ``matplotlib.figure.Figure`` directly: no pyplot state, no window, never
``show()``; save them with ``fig.savefig(path)``. Labels are thinned on long sequences, and
padded positions (all-zero query rows, and keys no query attends to in self-attention) are
greyed out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import AttnScopeError
from .maps import AttentionMaps

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_LABELS = 40
_PADDING_COLOR = (0.82, 0.82, 0.82, 0.85)


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AttnScopeError("figures need matplotlib: pip install 'attnscope[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _single(attn: AttentionMaps, name: str, batch: int) -> Tensor:
    weights = attn._single(name)
    if not 0 <= batch < weights.size(0):
        raise AttnScopeError(f"batch={batch} but {name!r} has {weights.size(0)} batch items")
    return weights[batch].detach().to("cpu", torch.float32)


def padded_positions(weights: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """(query, key) bool masks of padding in a (heads, query, key) map.

    Query rows that are zero in every head are padding (attnscope zeroes them); in self and
    causal maps, a key no real query attends to in any head is padding too.
    """
    rows = weights.sum(dim=-1).amax(dim=0) == 0
    cols = torch.zeros(weights.size(-1), dtype=torch.bool)
    if kind != "cross" and bool(rows.any()):
        cols = weights[:, ~rows].sum(dim=(0, 1)) == 0
    return rows, cols


def _ticks(ax: Axes, labels: list[str] | None, size: int, axis: str, max_labels: int) -> None:
    step = max(1, math.ceil(size / max_labels))
    positions = list(range(0, size, step))
    texts = [labels[i] if labels is not None and i < len(labels) else str(i) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, texts, rotation=90, fontsize=7)
    else:
        ax.set_yticks(positions, texts, fontsize=7)


def _draw(ax: Axes, matrix: Tensor, rows: Tensor, cols: Tensor, vmax: float | None = None) -> Any:
    image = ax.imshow(
        matrix.numpy(),
        cmap="Blues",
        vmin=0.0,
        vmax=vmax or 1.0,
        interpolation="nearest",
        aspect="auto",
    )
    shade = torch.zeros(*matrix.shape, 4)
    shade[rows] = torch.tensor(_PADDING_COLOR)
    shade[:, cols] = torch.tensor(_PADDING_COLOR)
    if bool(rows.any() or cols.any()):
        ax.imshow(shade.numpy(), interpolation="nearest", aspect="auto")
    return image


def plot_head(
    attn: AttentionMaps, name: str, head: int = 0, *, batch: int = 0, max_labels: int = MAX_LABELS
) -> Figure:
    """One head as a labelled heatmap with a colour bar."""
    weights = _single(attn, name, batch)
    if not 0 <= head < weights.size(0):
        raise AttnScopeError(f"{name!r} has {weights.size(0)} heads; head={head} is out of range")
    rows, cols = padded_positions(weights, attn.kind(name))
    query_labels, key_labels = attn.labels(name, batch)
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    image = _draw(ax, weights[head], rows, cols)
    _ticks(ax, key_labels, weights.size(2), "x", max_labels)
    _ticks(ax, query_labels, weights.size(1), "y", max_labels)
    ax.set_xlabel("key" + (" (encoder)" if attn.kind(name) == "cross" else ""))
    ax.set_ylabel("query" + (" (decoder)" if attn.kind(name) == "cross" else ""))
    ax.set_title(f"{name} ({attn.kind(name)}), head {head}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    return fig


def plot_heads(
    attn: AttentionMaps, name: str, *, batch: int = 0, max_labels: int = MAX_LABELS
) -> Figure:
    """Every head of one module in a grid, with token labels on the outer axes."""
    weights = _single(attn, name, batch)
    heads = weights.size(0)
    columns = math.ceil(math.sqrt(heads))
    lines = math.ceil(heads / columns)
    rows, cols = padded_positions(weights, attn.kind(name))
    query_labels, key_labels = attn.labels(name, batch)
    fig = _figure(2.6 * columns + 1, 2.6 * lines + 1)
    axes = fig.subplots(lines, columns, squeeze=False)
    thin = max(8, max_labels // max(columns, lines))
    for index, ax in enumerate(axes.flat):
        if index >= heads:
            ax.set_axis_off()
            continue
        _draw(ax, weights[index], rows, cols)
        ax.set_title(f"head {index}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if index // columns == lines - 1 or index + columns >= heads:
            _ticks(ax, key_labels, weights.size(2), "x", thin)
        if index % columns == 0:
            _ticks(ax, query_labels, weights.size(1), "y", thin)
    fig.suptitle(f"{name} ({attn.kind(name)})", fontsize=10)
    return fig


def plot_layers(attn: AttentionMaps, *, kind: str | None = None, batch: int = 0) -> Figure:
    """A grid of modules (rows) by heads (columns): the model at a glance."""
    maps = attn.select(kind=kind) if kind is not None else attn
    names = maps.names
    heads = max(_single(maps, n, batch).size(0) for n in names)
    fig = _figure(1.2 * heads + 2.5, 1.2 * len(names) + 0.8)
    axes = fig.subplots(len(names), heads, squeeze=False)
    for row, name in enumerate(names):
        weights = _single(maps, name, batch)
        padded_rows, padded_cols = padded_positions(weights, maps.kind(name))
        for head in range(heads):
            ax = axes[row][head]
            ax.set_xticks([])
            ax.set_yticks([])
            if head >= weights.size(0):
                ax.set_axis_off()
                continue
            _draw(ax, weights[head], padded_rows, padded_cols)
            if row == 0:
                ax.set_title(f"head {head}", fontsize=7)
        axes[row][0].set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(f"attention by layer and head ({kind or 'all kinds'})", fontsize=10)
    return fig


def save_figures(attn: AttentionMaps, folder: str, *, batch: int = 0) -> list[str]:
    """PNG figures of every attention kind present (layers grid + last module's heads)."""
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in ("self", "causal", "cross"):
        names = [n for n in attn.names if attn.kind(n) == kind]
        if not names:
            continue
        for stem, fig in (
            (f"layers-{kind}", plot_layers(attn, kind=kind, batch=batch)),
            (f"heads-{kind}", plot_heads(attn, names[-1], batch=batch)),
        ):
            path = out / f"{stem}.png"
            fig.savefig(path, dpi=110)
            written.append(str(path))
    return written
