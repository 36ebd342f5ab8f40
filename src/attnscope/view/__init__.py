"""``attnscope.view``: one self-contained interactive HTML page for an ``AttentionMaps``.

Design note
-----------
The page is a fragment (a root ``div``, its style, a JSON data block and a script) that works
inside Jupyter (``_repr_html_``) and, wrapped in a document, as a file (``save``). The script
and style ship inside this package and are inlined: the page never touches the network.

Everything that comes from the caller or the maps (title, module names, kinds, token text,
the statistics table) takes one path into the page: JSON in ``<script type="application/json">``
through ``safe_json`` (``<``, ``>``, ``&``, U+2028 and U+2029 escaped), so nothing can close the
script or become markup, and the script only ever sets it with ``textContent`` or DOM
properties, never ``innerHTML``. Outside that block, the title is ``html.escape``d into the
document's ``<title>``, and the element id is validated to a plain token (see ``_root_id``) and
then escaped all the same: ``html.escape`` in attributes, ``safe_json`` as the script's argument.

Weights are quantised to one byte (``round(w * 255)``), base64-encoded per head; exact
float32 values ride along for hover while they fit ``exact_bytes``. Every head also gets a
max-pooled thumbnail (at most 64 x 64). When the full maps would pass ``max_bytes`` (default
64 MB), full resolution is kept only for the selected heads, and the page says so.

A capture with gradients or value norms adds their weighted maps (``attn.weighted``) as map
sets of the same modules (``weighting``), each quantised to its own maximum (``encoding``):
``max_bytes`` covers every set, and a head kept at full resolution is kept in each of them, so
switching sets never changes what is shown at what resolution.

The data itself (quantised maps of each map set, thumbnails, labels, the budget) is made by
``data.page_data``.
"""

from __future__ import annotations

import html
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

from ..errors import AttnScopeError
from ..maps import AttentionMaps
from .data import DEFAULT_EXACT_BYTES, DEFAULT_MAX_BYTES, page_data
from .importance import importance_panel

_ids = itertools.count()
_ELEMENT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_ESCAPES = (
    ("<", "\\u003c"),
    (">", "\\u003e"),
    ("&", "\\u0026"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
)


class AttentionPage:
    """An interactive attention page: shows itself in Jupyter, saves as one HTML file."""

    def __init__(self, fragment: str, title: str) -> None:
        self._fragment = fragment
        self.title = title

    def _repr_html_(self) -> str:
        return self._fragment

    def __html__(self) -> str:
        return self._fragment

    def __str__(self) -> str:
        return self.document()

    def document(self) -> str:
        """The whole HTML document."""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(self.title)}</title>"
            '<meta name="viewport" content="width=device-width, initial-scale=1"></head>'
            f'<body style="margin:0">{self._fragment}</body></html>\n'
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page as one self-contained HTML file (atomically); return its path."""
        target = Path(path)
        if not target.parent.is_dir():
            raise AttnScopeError(f"cannot save to {target}: folder {target.parent} does not exist")
        temp = target.with_name(f".{target.name}.tmp")
        try:
            temp.write_text(self.document(), encoding="utf-8")
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        return target


def view(
    attn: AttentionMaps,
    *,
    batch: int = 0,
    title: str = "attnscope",
    element_id: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
    full_heads: Iterable[tuple[str, int]] | None = None,
    stats: Iterable[dict[str, object]] | None = None,
    qk_bytes: int = DEFAULT_EXACT_BYTES,
    weights: str | Iterable[str] | None = None,
    importance: object = None,
) -> AttentionPage:
    """An interactive page of ``attn`` for one batch item: head view, model view, matrix view.

    ``stats`` (e.g. ``attnscope.head_stats(attn)``) adds a table of per-head statistics;
    ``importance`` (``attnscope.head_importance(...)``, or its rows) a layers x heads heatmap
    whose cells open their head in the other views.

    ``weights`` chooses the map sets a selector switches every view between: ``"attention"``,
    ``"grads"`` (``attn.weighted("grads")``, needs ``capture(model, grads=True)`` and a
    backward) and ``"norms"`` (``attn.weighted("norms")``, needs ``norms=True``); default:
    attention and every weighted set the capture kept. Weighted maps are quantised to each
    head's maximum; tooltips show their true values.

    ``full_heads`` chooses the (name, head) pairs kept at full resolution when the maps would
    pass ``max_bytes`` (default: every head of the first module, then as many as fit).

    Reading aids: a "words" switch merges sub-word tokens as ``attn.merge_tokens()`` does; a
    lazy capture (``capture(model, lazy=True)``) adds the query/key view, its q and k embedded
    while they fit ``qk_bytes``; the matrix view exports as PNG and SVG.

    >>> import torch
    >>> maps = AttentionMaps.from_tensors({"layer": torch.full((1, 2, 3, 3), 1 / 3)})
    >>> page = view(maps.with_tokens(["a", "b", "c"]), element_id="demo")
    >>> "attnscope-demo" in page._repr_html_()
    True
    """
    if not isinstance(title, str):
        raise AttnScopeError(f"title must be a str, got {type(title).__name__}")
    root = _root_id(element_id)
    data = page_data(
        attn,
        batch=batch,
        max_bytes=max_bytes,
        exact_bytes=exact_bytes,
        full_heads=full_heads,
        qk_bytes=qk_bytes,
        weights=weights,
    )
    data["title"] = title
    if stats is not None:
        data["table"] = _table(stats)
    if importance is not None:
        data["importance"] = importance_panel(importance, attn.names)
    return AttentionPage(_fragment(root, data), title)


def _root_id(element_id: str | None) -> str:
    """The root element's id: ``attnscope-<element_id>``, or a fresh one when None.

    A caller's id is validated rather than escaped. It lands in an HTML attribute, in the
    script (``getElementById(id + "-data")``) and in the CSS selectors and snapshot tools that
    callers point at it; each of those needs its own escaping, and one forgotten context is a
    hole. An id exists to be a stable hook, for which letters, digits, ``-`` and ``_`` are
    plenty, so refusing anything else costs callers nothing and leaves nothing to get wrong.
    (The page still escapes the id like any other value, as a second wall.)

    >>> _root_id("demo"), _root_id("attnscope-demo")
    ('attnscope-demo', 'attnscope-demo')
    """
    if element_id is None:
        return f"attnscope-{next(_ids)}-{os.getpid()}"
    if not isinstance(element_id, str) or not _ELEMENT_ID.fullmatch(element_id):
        raise AttnScopeError(
            f"element_id={element_id!r} is not allowed: use 1 to 64 ASCII letters, digits, '-' "
            "or '_' (e.g. element_id='fig-1'); the page's root element gets 'attnscope-' + it"
        )
    return element_id if element_id.startswith("attnscope-") else f"attnscope-{element_id}"


def _fragment(root: str, data: dict[str, object]) -> str:
    # The one way in for values: html.escape in attributes, safe_json for data and for the
    # script's argument. The style and script are this package's own files, checked in tests.
    attribute = html.escape(root, quote=True)
    return (
        f'<div id="{attribute}" class="attnscope-root"></div>'
        f"<style>{_asset('page.css')}</style>"
        f'<script type="application/json" id="{attribute}-data">{safe_json(data)}</script>'
        f"<script>{_asset('page.js')}\nattnscopeRender({safe_json(root)});</script>"
    )


def _table(stats: Iterable[dict[str, object]]) -> list[dict[str, object]]:
    """Statistics rows as JSON-ready cells: finite floats rounded, NaN/inf as empty cells."""
    rows = []
    for row in stats:
        if not isinstance(row, Mapping):
            raise AttnScopeError(
                "stats must be rows of {column: value}, e.g. stats=attnscope.head_stats(attn); "
                f"got a row of type {type(row).__name__}"
            )
        rows.append({str(column): _cell(value) for column, value in row.items()})
    return rows


def _cell(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:  # floats, and numpy or one-element torch numbers
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return round(number, 4) if math.isfinite(number) else None


def safe_json(value: object) -> str:
    """JSON that cannot end a ``<script>`` element or open markup inside one.

    >>> safe_json({"t": "</script><b>&"})
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    # ensure_ascii already writes U+2028/U+2029 as escapes; the last two replaces keep that
    # true should anyone turn it off, since raw, they end a JavaScript line.
    for raw, escaped in _JSON_ESCAPES:
        text = text.replace(raw, escaped)
    return text


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


__all__ = ["AttentionPage", "page_data", "safe_json", "view"]
