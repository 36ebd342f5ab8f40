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

Inputs the page cannot show (no modules, an empty axis, no heads, NaN weights, a budget or
``full_heads`` that make no sense) are refused up front with an ``AttnScopeError`` that says
what to do (all but NaN before any weight is computed), never with a broken page.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..errors import AttnScopeError
from ..maps import AttentionMaps
from .aids import query_keys, word_entry

DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_EXACT_BYTES = 8 * 2**20
THUMB = 64
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
) -> AttentionPage:
    """An interactive page of ``attn`` for one batch item: head view, model view, matrix view.

    ``stats`` (e.g. ``attnscope.head_stats(attn)``) adds a table of per-head statistics.

    ``full_heads`` chooses the (name, head) pairs kept at full resolution when the maps would
    pass ``max_bytes`` (default: every head of the first module, then as many as fit).

    Reading aids: a "words" switch merges sub-word tokens as ``attn.merge_tokens()`` does; a
    lazy capture (``capture(model, lazy=True)``) adds the query/key view, its q and k embedded
    while they fit ``qk_bytes``; the matrix view exports as PNG and SVG.

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
    )
    data["title"] = title
    if stats is not None:
        data["table"] = _table(stats)
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


def page_data(
    attn: AttentionMaps,
    *,
    batch: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
    full_heads: Iterable[tuple[str, int]] | None = None,
    qk_bytes: int = DEFAULT_EXACT_BYTES,
) -> dict[str, object]:
    """The page's data: quantised maps, thumbnails, labels, and what was left out."""
    _check(attn, batch, max_bytes, exact_bytes)
    if isinstance(qk_bytes, bool) or not isinstance(qk_bytes, int) or qk_bytes < 0:
        raise AttnScopeError(f"qk_bytes={qk_bytes!r}: give a whole number of bytes, at least 0")
    qk_left, qk_missing = qk_bytes, []
    wanted = None if full_heads is None else _full_heads(attn, full_heads)
    shown = {name: attn.display(name) for name in attn.names}
    tensors = {name: displayed.weights for name, displayed in shown.items()}
    sizes = {name: w.size(1) * w.size(2) * w.size(3) for name, w in tensors.items()}
    total = sum(sizes.values())
    fits = total * 4 // 3 <= max_bytes
    chosen = _choose_full(tensors, sizes, max_bytes, wanted) if not fits else None
    exact = fits and total * 4 * 4 // 3 <= exact_bytes
    maps = []
    for name, weights in tensors.items():
        single = weights[batch].detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(single).all()):  # NaN would quantise to arbitrary bytes
            raise AttnScopeError(
                f"{name!r} has NaN or infinite weights in batch item {batch}; the page shows "
                "probabilities in [0, 1]. Clean them first, e.g. "
                "torch.nan_to_num(weights, nan=0.0, posinf=1.0)"
            )
        single = single.clamp(0, 1)
        query_labels, key_labels = attn.labels(name, batch)
        heads = single.size(0)
        entry: dict[str, object] = {
            "name": name,
            "kind": attn.kind(name),
            "heads": heads,
            "q": single.size(1),
            "k": single.size(2),
            "qlabels": _labels(query_labels, single.size(1)),
            "klabels": _labels(key_labels, single.size(2)),
            "thumb": _thumbnails(single),
            "data": [
                _b64(_quantise(single[h])) if fits or (name, h) in (chosen or set()) else None
                for h in range(heads)
            ],
        }
        if exact:
            entry["exact"] = [_b64(single[h].contiguous().numpy().tobytes()) for h in range(heads)]
        for axis, labels in (("qwords", entry["qlabels"]), ("kwords", entry["klabels"])):
            words = word_entry(labels)  # type: ignore[arg-type]
            if words is not None:
                entry[axis] = words
        qk, cost, missing = query_keys(attn, name, batch, qk_left)
        if qk is not None:
            entry["qk"], qk_left = qk, qk_left - cost
        elif missing:
            qk_missing.append(missing)
        maps.append(entry)
    note = ""
    if not fits:
        kept = len(chosen or ())
        note = (
            f"The full maps need {total * 4 // 3 / 2**20:.1f} MB, over this page's budget of "
            f"{max_bytes / 2**20:.1f} MB: every head is shown as a pooled thumbnail, and "
            f"{kept} selected head(s) at full resolution."
        )
    repeated = [f"{name}: {d.note}" for name, d in shown.items() if d.note.startswith("last")]
    if repeated:  # said on the page too, not only as a warning in the notebook
        note = " ".join(
            [
                *([note] if note else []),
                "Called several times, not incremental decoding; "
                f"showing the last call ({'; '.join(repeated)}).",
            ]
        )
    if qk_missing:
        note = " ".join(
            [*([note] if note else []), "No query/key view for " + "; ".join(qk_missing) + "."]
        )
    return {"version": 1, "batch": batch, "maps": maps, "note": note, "exact": exact}


def _check(attn: AttentionMaps, batch: int, max_bytes: int, exact_bytes: int) -> None:
    """Refuse, before computing anything, what would end in an internal error or a broken page."""
    if not isinstance(attn, AttentionMaps):
        raise AttnScopeError(f"view() takes an AttentionMaps, got {type(attn).__name__}")
    if len(attn) == 0:
        raise AttnScopeError(
            "nothing to show: this AttentionMaps is empty. Call the model inside "
            "`with attnscope.capture(model) as attn:`, and check that include/exclude keep at "
            "least one attention module"
        )
    for what, value, least in (("max_bytes", max_bytes, 1), ("exact_bytes", exact_bytes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise AttnScopeError(
                f"{what}={value!r}: give a whole number of bytes, at least {least} "
                f"(default {DEFAULT_MAX_BYTES if what == 'max_bytes' else DEFAULT_EXACT_BYTES})"
            )
    if isinstance(batch, bool) or not isinstance(batch, int):
        raise AttnScopeError(f"batch must be an int (a batch item's index), got {batch!r}")
    for name in attn.names:
        size, heads, queries, keys = attn._shape(name)
        if not 0 <= batch < size:
            raise AttnScopeError(
                f"batch={batch} but {name!r} has {size} batch items"
                + (
                    f": pick one of 0 to {size - 1}"
                    if size
                    else ": capture a forward pass on at least one input"
                )
            )
        if heads == 0:
            raise AttnScopeError(
                f"{name!r} has no heads (shape {(size, heads, queries, keys)}): capture with "
                f"heads= keeping at least one, or leave it out: attn.select(exclude={name!r})"
            )
        for axis, count in (("query", queries), ("key", keys)):
            if count == 0:
                raise AttnScopeError(
                    f"{name!r} has 0 {axis} positions (shape {(size, heads, queries, keys)}): "
                    "there is no attention to draw for an empty sequence. Run the model on at "
                    f"least one token, or leave this module out: attn.select(exclude={name!r})"
                )


def _full_heads(
    attn: AttentionMaps, full_heads: Iterable[tuple[str, int]]
) -> list[tuple[str, int]]:
    """``full_heads`` as checked (name, head) pairs, whether or not the budget needs them."""
    example = f"e.g. full_heads=[({attn.names[0]!r}, 0)]"
    if isinstance(full_heads, (str, bytes)) or not isinstance(full_heads, Iterable):
        raise AttnScopeError(f"full_heads must be a list of (name, head) pairs, {example}")
    wanted = []
    for pair in full_heads:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise AttnScopeError(f"full_heads: {pair!r} is not a (name, head) pair; {example}")
        name, head = pair
        if not isinstance(name, str) or name not in attn:
            raise AttnScopeError(
                f"full_heads: no module {name!r}; available: {', '.join(attn.names[:20])}"
            )
        heads = attn._shape(name)[1]
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
            raise AttnScopeError(
                f"full_heads: no head {head!r} in {name!r}, which has heads 0 to {heads - 1}"
            )
        wanted.append((name, head))
    return wanted


def _choose_full(
    tensors: dict[str, Tensor],
    sizes: dict[str, int],
    max_bytes: int,
    wanted: list[tuple[str, int]] | None,
) -> set[tuple[str, int]]:
    if wanted is None:
        wanted = [(n, h) for n in tensors for h in range(tensors[n].size(1))]
    chosen: set[tuple[str, int]] = set()
    used = 0
    for name, head in wanted:
        cost = sizes[name] // tensors[name].size(1) * 4 // 3
        if used + cost > max_bytes and chosen:
            break
        chosen.add((name, head))
        used += cost
    return chosen


def _labels(labels: list[str] | None, size: int) -> list[str]:
    labels = list(labels) if labels is not None else []
    labels = labels[:size]
    labels += [str(i) for i in range(len(labels), size)]
    return labels


def _quantise(weights: Tensor) -> bytes:
    return bytes(torch.round(weights * 255).to(torch.uint8).contiguous().numpy().tobytes())


def _thumbnails(single: Tensor) -> dict[str, object]:
    heads, queries, keys = single.shape
    size = (min(THUMB, queries), min(THUMB, keys))
    pooled = F.adaptive_max_pool2d(single.unsqueeze(0), size)[0]
    peak = pooled.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return {
        "q": size[0],
        "k": size[1],
        "data": [_b64(_quantise(pooled[h] / peak[h])) for h in range(heads)],
    }


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


__all__ = ["AttentionPage", "page_data", "safe_json", "view"]
