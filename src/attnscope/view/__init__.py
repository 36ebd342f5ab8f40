"""``attnscope.view``: one self-contained interactive HTML page for an ``AttentionMaps``.

Design note
-----------
The page is a fragment (a root ``div``, its style, a JSON data block and a script) that works
inside Jupyter (``_repr_html_``) and, wrapped in a document, as a file (``save``). The script
and style ship inside this package and are inlined: the page never touches the network.

Data goes in as JSON in ``<script type="application/json">`` with ``<``, ``>`` and ``&``
escaped, so no token text can close the script or become markup; the script only ever sets
token text through ``textContent``. Weights are quantised to one byte (``round(w * 255)``),
base64-encoded per head; exact float32 values ride along for hover while they fit
``exact_bytes``. Every head also gets a max-pooled thumbnail (at most 64 x 64). When the full
maps would pass ``max_bytes`` (default 64 MB), full resolution is kept only for the selected
heads, and the page says so.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from ..errors import AttnScopeError
from ..maps import AttentionMaps

DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_EXACT_BYTES = 8 * 2**20
THUMB = 64
_ids = itertools.count()


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
) -> AttentionPage:
    """An interactive page of ``attn`` for one batch item: head view, model view, matrix view.

    ``stats`` (e.g. ``attnscope.head_stats(attn)``) adds a table of per-head statistics.

    ``full_heads`` chooses the (name, head) pairs kept at full resolution when the maps would
    pass ``max_bytes`` (default: every head of the first module, then as many as fit).

    >>> maps = AttentionMaps.from_tensors({"layer": torch.full((1, 2, 3, 3), 1 / 3)})
    >>> page = view(maps.with_tokens(["a", "b", "c"]), element_id="demo")
    >>> "attnscope-demo" in page._repr_html_()
    True
    """
    if not isinstance(attn, AttentionMaps):
        raise AttnScopeError(f"view() takes an AttentionMaps, got {type(attn).__name__}")
    if len(attn) == 0:
        raise AttnScopeError("nothing to show: this AttentionMaps is empty")
    root = element_id or f"attnscope-{next(_ids)}-{os.getpid()}"
    root = root if root.startswith("attnscope-") else f"attnscope-{root}"
    data = page_data(
        attn, batch=batch, max_bytes=max_bytes, exact_bytes=exact_bytes, full_heads=full_heads
    )
    data["title"] = title
    if stats is not None:
        data["table"] = [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in stats
        ]
    fragment = (
        f'<div id="{html.escape(root)}" class="attnscope-root"></div>'
        f"<style>{_asset('page.css')}</style>"
        f'<script type="application/json" id="{html.escape(root)}-data">{safe_json(data)}</script>'
        f"<script>{_asset('page.js')}\nattnscopeRender({json.dumps(root)});</script>"
    )
    return AttentionPage(fragment, title)


def safe_json(value: object) -> str:
    """JSON that cannot end a ``<script>`` element or open markup inside one.

    >>> safe_json({"t": "</script><b>&"})
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def page_data(
    attn: AttentionMaps,
    *,
    batch: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
    full_heads: Iterable[tuple[str, int]] | None = None,
) -> dict[str, object]:
    """The page's data: quantised maps, thumbnails, labels, and what was left out."""
    tensors = {name: attn._single(name) for name in attn.names}
    for name, weights in tensors.items():
        if not 0 <= batch < weights.size(0):
            raise AttnScopeError(f"batch={batch} but {name!r} has {weights.size(0)} batch items")
    sizes = {name: w.size(1) * w.size(2) * w.size(3) for name, w in tensors.items()}
    total = sum(sizes.values())
    fits = total * 4 // 3 <= max_bytes
    chosen = _choose_full(tensors, sizes, max_bytes, full_heads) if not fits else None
    exact = fits and total * 4 * 4 // 3 <= exact_bytes
    maps = []
    for name, weights in tensors.items():
        single = weights[batch].detach().to("cpu", torch.float32).clamp(0, 1)
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
        maps.append(entry)
    note = ""
    if not fits:
        kept = len(chosen or ())
        note = (
            f"The full maps need {total * 4 // 3 / 2**20:.1f} MB, over this page's budget of "
            f"{max_bytes / 2**20:.1f} MB: every head is shown as a pooled thumbnail, and "
            f"{kept} selected head(s) at full resolution."
        )
    return {"version": 1, "batch": batch, "maps": maps, "note": note, "exact": exact}


def _choose_full(
    tensors: dict[str, Tensor],
    sizes: dict[str, int],
    max_bytes: int,
    full_heads: Iterable[tuple[str, int]] | None,
) -> set[tuple[str, int]]:
    if full_heads is not None:
        wanted = [(n, int(h)) for n, h in full_heads]
        for name, head in wanted:
            if name not in tensors or not 0 <= head < tensors[name].size(1):
                raise AttnScopeError(f"full_heads: no head {head} in {name!r}")
    else:
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
