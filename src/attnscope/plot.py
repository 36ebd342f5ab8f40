"""Static matplotlib figures of ``AttentionMaps`` (extra ``attnscope[plot]``).

Figures are built with ``matplotlib.figure.Figure`` directly: no pyplot state, no window, never
``show()``; save them with ``fig.savefig(path)``. Every map has a colour bar and token ticks on
both axes (thinned on long sequences; in a grid, on its outer axes); padded positions
(all-zero query rows, and keys no query attends to in self-attention) are greyed out.

Options shared by ``plot_head``, ``plot_heads`` and ``plot_layers``:

- ``scale``: ``"head"`` (default) colours each head from 0 to its own maximum; ``"shared"``
  one scale, 0 to the figure's maximum, to compare heads with each other; ``"fixed"`` 0 to 1;
  a number, 0 to that number. The default is per head because attention maps differ in range
  by an order of magnitude: a diffuse head (maximum about 0.3) is a flat wash on a 0-1 scale,
  while its colour bar still gives every value.
- ``cmap``: a matplotlib colour map or its name (default ``"Blues"``).
- ``transpose``: queries on x and keys on y (default: queries on y, as rows of the matrix).
- ``head_labels``: how heads are titled: None gives "head 0", "head 1", ...; an int is the
  number of the first head (``head_labels=1`` numbers them from 1); a sequence of str or a
  function of the head index gives the titles. ``head`` arguments stay 0-based indices.

A module called several times in the capture is shown as ``AttentionMaps.display`` chooses:
incremental decoding joined (``concat``), any other repetition its last call, with a warning,
and the figure's title says which.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .errors import AttnScopeError
from .maps import AttentionMaps

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

MAX_LABELS = 40
_PADDING_COLOR = (0.82, 0.82, 0.82, 0.85)
SCALES = ("head", "shared", "fixed")

HeadLabels = Sequence[str] | Callable[[int], str] | int | None


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise AttnScopeError("figures need matplotlib: pip install 'attnscope[plot]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _shown(attn: AttentionMaps, name: str, batch: int) -> tuple[Tensor, str]:
    """(heads, query, key) float32 CPU weights of one batch item, and the display note."""
    weights, note = attn.display(name)
    if not 0 <= batch < weights.size(0):
        raise AttnScopeError(f"batch={batch} but {name!r} has {weights.size(0)} batch items")
    return weights[batch].detach().to("cpu", torch.float32), note


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


def _head_title(head_labels: HeadLabels, head: int, heads: int) -> str:
    if head_labels is None:
        return f"head {head}"
    if isinstance(head_labels, int):
        return f"head {head + head_labels}"
    if callable(head_labels):
        return str(head_labels(head))
    if isinstance(head_labels, str) or len(head_labels) < heads:
        raise AttnScopeError(
            f"head_labels must give one label per head ({heads}), e.g. head_labels=1 to number "
            "heads from 1"
        )
    return str(head_labels[head])


def _check_options(scale: str | float, transpose: bool) -> None:
    if isinstance(scale, str):
        if scale not in SCALES:
            raise AttnScopeError(f"scale must be one of {SCALES} or a number, got {scale!r}")
    elif not isinstance(scale, int | float) or isinstance(scale, bool) or not scale > 0:
        raise AttnScopeError(f"a fixed scale must be a positive number, got {scale!r}")
    if not isinstance(transpose, bool):
        raise AttnScopeError(f"transpose must be True or False, got {transpose!r}")


def _vmax(scale: str | float, head: Tensor, figure_max: float) -> float:
    """The top of the colour scale for one head's map."""
    if scale == "head":
        top = float(head.max()) if head.numel() else 0.0
    elif scale == "shared":
        top = figure_max
    elif scale == "fixed":
        top = 1.0
    else:
        top = float(scale)
    return top if top > 0 else 1.0  # an all-zero map (all padding) still gets a scale


def _ticks(ax: Axes, labels: list[str] | None, size: int, axis: str, max_labels: int) -> None:
    step = max(1, math.ceil(size / max_labels))
    positions = list(range(0, size, step))
    texts = [labels[i] if labels is not None and i < len(labels) else str(i) for i in positions]
    if axis == "x":
        ax.set_xticks(positions, texts, rotation=90, fontsize=7)
    else:
        ax.set_yticks(positions, texts, fontsize=7)


class _Panel:
    """One module's map as drawn: axes swapped when transposed, labels and padding along."""

    def __init__(
        self, attn: AttentionMaps, name: str, batch: int, transpose: bool, max_labels: int
    ) -> None:
        self.kind = attn.kind(name)
        self.weights, self.note = _shown(attn, name, batch)
        self.rows, self.cols = padded_positions(self.weights, self.kind)
        query_labels, key_labels = attn.labels(name, batch)
        cross = self.kind == "cross"
        query_axis = "query" + (" (decoder)" if cross else "")
        key_axis = "key" + (" (encoder)" if cross else "")
        queries, keys = self.weights.size(1), self.weights.size(2)
        # (labels, size, axis title) along x, then along y
        self.x = (key_labels, keys, key_axis)
        self.y = (query_labels, queries, query_axis)
        self.transpose = transpose
        if transpose:
            self.x, self.y = self.y, self.x
        self.max_labels = max_labels

    @property
    def heads(self) -> int:
        return self.weights.size(0)

    def title(self, name: str) -> str:
        return f"{name} ({self.kind})" + (f", {self.note}" if self.note else "")

    def draw(self, ax: Axes, head: int, cmap: Any, vmax: float) -> Any:
        matrix = self.weights[head]
        shade = torch.zeros(*matrix.shape, 4)
        shade[self.rows] = torch.tensor(_PADDING_COLOR)
        shade[:, self.cols] = torch.tensor(_PADDING_COLOR)
        if self.transpose:
            matrix, shade = matrix.t(), shade.transpose(0, 1)
        image = ax.imshow(
            matrix.numpy(),
            cmap=cmap,
            vmin=0.0,
            vmax=vmax,
            interpolation="nearest",
            aspect="auto",
        )
        if bool(self.rows.any() or self.cols.any()):
            ax.imshow(shade.numpy(), interpolation="nearest", aspect="auto")
        return image

    def ticks(self, ax: Axes, x: bool, y: bool, max_labels: int | None = None) -> None:
        limit = max_labels or self.max_labels
        ax.set_xticks([])
        ax.set_yticks([])
        if x:
            _ticks(ax, self.x[0], self.x[1], "x", limit)
        if y:
            _ticks(ax, self.y[0], self.y[1], "y", limit)

    def axis_titles(self, ax: Axes, x: bool = True, y: bool = True, size: float = 9) -> None:
        if x:
            ax.set_xlabel(self.x[2], fontsize=size)
        if y:
            ax.set_ylabel(self.y[2], fontsize=size)


def _colorbar(
    fig: Figure, image: Any, ax: Any, small: bool = False, label: str = "attention weight"
) -> None:
    bar = fig.colorbar(
        image,
        ax=ax,
        shrink=0.8 if not small else 0.9,
        fraction=0.15 if not small else 0.08,
        label=None if small else label,
    )
    if small:
        bar.ax.tick_params(labelsize=6)


def plot_head(
    attn: AttentionMaps,
    name: str,
    head: int = 0,
    *,
    batch: int = 0,
    max_labels: int = MAX_LABELS,
    cmap: str | Colormap = "Blues",
    scale: str | float = "head",
    transpose: bool = False,
    head_labels: HeadLabels = None,
) -> Figure:
    """One head (0-based index ``head``) as a labelled heatmap with a colour bar.

    See the module's note for ``cmap``, ``scale`` (default: per head), ``transpose`` and
    ``head_labels``.

    >>> maps = AttentionMaps.from_tensors({"enc": torch.softmax(torch.randn(1, 2, 4, 4), -1)})
    >>> fig = plot_head(maps, "enc", 1, transpose=True, head_labels=1, cmap="viridis")
    >>> fig.axes[0].get_title(), fig.axes[0].get_xlabel()
    ('enc (self), head 2', 'query')
    """
    _check_options(scale, transpose)
    panel = _Panel(attn, name, batch, transpose, max_labels)
    if not 0 <= head < panel.heads:
        raise AttnScopeError(f"{name!r} has {panel.heads} heads; head={head} is out of range")
    fig = _figure(7, 6)
    ax = fig.add_subplot()
    top = _vmax(scale, panel.weights[head], float(panel.weights.max()))
    image = panel.draw(ax, head, cmap, top)
    panel.ticks(ax, x=True, y=True)
    panel.axis_titles(ax)
    ax.set_title(f"{panel.title(name)}, {_head_title(head_labels, head, panel.heads)}", fontsize=9)
    _colorbar(fig, image, ax)
    return fig


def plot_heads(
    attn: AttentionMaps,
    name: str,
    *,
    batch: int = 0,
    max_labels: int = MAX_LABELS,
    cmap: str | Colormap = "Blues",
    scale: str | float = "head",
    transpose: bool = False,
    head_labels: HeadLabels = None,
) -> Figure:
    """Every head of one module in a grid, with token labels on the outer axes.

    Each head has its own colour bar with ``scale="head"`` (the default), the figure one
    otherwise. See the module's note for the options.
    """
    _check_options(scale, transpose)
    panel = _Panel(attn, name, batch, transpose, max_labels)
    heads = panel.heads
    columns = math.ceil(math.sqrt(heads))
    lines = math.ceil(heads / columns)
    fig = _figure(2.9 * columns + 1, 2.6 * lines + 1)
    axes = fig.subplots(lines, columns, squeeze=False)
    thin = max(8, max_labels // max(columns, lines))
    figure_max = float(panel.weights.max())
    image = None
    for index, ax in enumerate(axes.flat):
        if index >= heads:
            ax.set_axis_off()
            continue
        image = panel.draw(ax, index, cmap, _vmax(scale, panel.weights[index], figure_max))
        ax.set_title(_head_title(head_labels, index, heads), fontsize=8)
        bottom = index // columns == lines - 1 or index + columns >= heads
        left = index % columns == 0
        panel.ticks(ax, x=bottom, y=left, max_labels=thin)
        panel.axis_titles(ax, x=bottom, y=left, size=8)
        if scale == "head":
            _colorbar(fig, image, ax, small=True)
    if scale != "head" and image is not None:
        _colorbar(fig, image, [a for a in axes.flat if a.images])
    fig.suptitle(panel.title(name), fontsize=10)
    return fig


def plot_layers(
    attn: AttentionMaps,
    *,
    kind: str | None = None,
    batch: int = 0,
    max_labels: int = 12,
    cmap: str | Colormap = "Blues",
    scale: str | float = "head",
    transpose: bool = False,
    head_labels: HeadLabels = None,
) -> Figure:
    """A grid of modules (rows) by heads (columns): the model at a glance.

    Token ticks (at most ``max_labels`` per axis) label the first column of every row and the
    bottom of every block of rows that share their keys. Each map has a small colour bar with
    ``scale="head"`` (the default), the figure one otherwise. See the module's note.
    """
    _check_options(scale, transpose)
    maps = attn.select(kind=kind) if kind is not None else attn
    names = maps.names
    panels = [_Panel(maps, n, batch, transpose, max_labels) for n in names]
    heads = max(panel.heads for panel in panels)
    fig = _figure(1.6 * heads + 2.8, 1.5 * len(names) + 1.2)
    axes = fig.subplots(len(names), heads, squeeze=False)
    figure_max = max(float(panel.weights.max()) for panel in panels)
    image = None
    for row, (name, panel) in enumerate(zip(names, panels, strict=True)):
        below = panels[row + 1] if row + 1 < len(panels) else None
        # x ticks wherever the row below does not share this row's x axis
        x_ticks = below is None or below.x[:2] != panel.x[:2]
        for head in range(heads):
            ax = axes[row][head]
            if head >= panel.heads:
                ax.set_axis_off()
                continue
            top = _vmax(scale, panel.weights[head], figure_max)
            image = panel.draw(ax, head, cmap, top)
            panel.ticks(ax, x=x_ticks, y=head == 0)
            for label in ax.get_xticklabels() + ax.get_yticklabels():
                label.set_fontsize(5)
            if row == 0:
                ax.set_title(_head_title(head_labels, head, panel.heads), fontsize=7)
            if scale == "head":
                _colorbar(fig, image, ax, small=True)
        title = name + (f" ({panel.note})" if panel.note else "")
        axes[row][0].set_ylabel(title, fontsize=6)
    if scale != "head" and image is not None:
        _colorbar(fig, image, [a for a in axes.flat if a.images])
    axis = "x: query, y: key" if transpose else "x: key, y: query"
    fig.suptitle(f"attention by layer and head ({kind or 'all kinds'}; {axis})", fontsize=10)
    return fig


def plot_head_importance(
    table: Iterable[Mapping[str, object]], *, cmap: str | Colormap = "Reds"
) -> Figure:
    """Head importance (``attnscope.head_importance``) as a modules × heads heatmap, each
    cell annotated, modules (layers) as rows in the table's order.

    >>> rows = [{"module": f"l{m}", "head": h, "importance": float(m + h)}
    ...         for m in range(2) for h in range(3)]
    >>> fig = plot_head_importance(rows)
    >>> fig.axes[0].get_xlabel(), [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ('head', ['l0', 'l1'])
    """
    rows = list(table)
    if not rows or not all({"module", "head", "importance"} <= set(r) for r in rows):
        raise AttnScopeError(
            "plot_head_importance takes attnscope.head_importance(...)'s table: rows with "
            "module, head and importance"
        )
    from .importance import ImportanceTable

    importance = ImportanceTable([dict(r) for r in rows])
    modules, grid = importance.modules, importance.matrix()
    heads = grid.size(1)
    fig = _figure(2.5 + 0.6 * heads, 1.2 + 0.4 * len(modules))
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), cmap=cmap, aspect="auto")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(len(modules)), modules, fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("module")
    top = float(torch.nan_to_num(grid, nan=0.0).max()) or 1.0
    if heads <= 16 and len(modules) <= 48:  # room for a number in every cell
        for (m, h), value in ((index, float(grid[index])) for index in _cells(grid)):
            ax.text(
                h,
                m,
                f"{value:.2g}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if value > 0.6 * top else "black",
            )
    ax.set_title("head importance, sum of |dL/dξ|", fontsize=8)
    _colorbar(fig, image, ax, label="importance")
    return fig


def _cells(grid: Tensor) -> list[tuple[int, int]]:
    return [
        (m, h) for m in range(grid.size(0)) for h in range(grid.size(1)) if not grid[m, h].isnan()
    ]


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
