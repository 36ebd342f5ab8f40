"""The page's data: each map set's quantised maps, thumbnails and labels, within budget.

Design note
-----------
Everything the page draws is one JSON object. ``maps`` holds one entry per module: its name,
kind, labels (and word groups, and a lazy capture's q and k) and the values of the first map
set; ``views`` names each set, and each set after the first carries only its values per
module, since the modules and shapes are the same (``weighting``). The byte budget
``max_bytes`` covers all sets: when they do not fit, every head is a pooled thumbnail and the
chosen heads are kept at full resolution in every set; float32 values for tooltips ride along,
set by set, while they fit ``exact_bytes``.

Inputs the page cannot show (no modules, an empty axis, no heads, NaN weights, a budget or
``full_heads`` that make no sense) are refused up front with an ``AttnScopeError`` that says
what to do (all but NaN before any weight is computed), never with a broken page.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..errors import AttnScopeError
from ..maps import AttentionMaps
from .aids import query_keys, word_entry
from .encoding import floats, peaks, quantise, thumbnails
from .weighting import LABELS, weight_sets

DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_EXACT_BYTES = 8 * 2**20


def page_data(
    attn: AttentionMaps,
    *,
    batch: int = 0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
    full_heads: Iterable[tuple[str, int]] | None = None,
    qk_bytes: int = DEFAULT_EXACT_BYTES,
    weights: str | Iterable[str] | None = None,
) -> dict[str, object]:
    """The page's data: quantised maps, thumbnails, labels, and what was left out.

    ``maps`` holds the first map set whole (names, labels, values); ``views`` names every set
    (``by``, ``label``, ``exact``), and each set after the first carries only its values per
    map (``data``, ``thumb``, ``scale``, ``exact``): the modules and shapes are the same.
    """
    _check(attn, batch, max_bytes, exact_bytes)
    if isinstance(qk_bytes, bool) or not isinstance(qk_bytes, int) or qk_bytes < 0:
        raise AttnScopeError(f"qk_bytes={qk_bytes!r}: give a whole number of bytes, at least 0")
    qk_left, qk_missing = qk_bytes, []
    wanted = None if full_heads is None else _full_heads(attn, full_heads)
    sets, left_out = weight_sets(attn, weights)
    shown = {name: attn.display(name) for name in attn.names}
    tensors = {name: displayed.weights for name, displayed in shown.items()}
    sizes = {name: w.size(1) * w.size(2) * w.size(3) for name, w in tensors.items()}
    total = sum(sizes.values()) * len(sets)  # bytes of every set's maps, before base64
    fits = total * 4 // 3 <= max_bytes
    chosen = _choose_full(tensors, sizes, max_bytes, wanted, len(sets)) if not fits else None
    full = None if fits else chosen or set()
    exact_left = exact_bytes if fits else -1
    views: list[dict[str, object]] = []
    maps: list[dict[str, object]] = []
    for by, source in sets:
        exact = exact_left >= total // len(sets) * 4 * 4 // 3
        exact_left -= total // len(sets) * 4 * 4 // 3 if exact else 0
        values = [
            _values(
                name,
                by,
                tensors[name] if by == "attention" else source.display(name, warn=False).weights,
                batch,
                full,
                exact,
            )
            for name in attn.names
        ]
        view_entry: dict[str, object] = {"by": by, "label": LABELS[by], "exact": exact}
        if maps:
            view_entry["maps"] = values
        else:
            maps = values
        views.append(view_entry)
    for name, entry in zip(attn.names, maps, strict=True):
        query_labels, key_labels = attn.labels(name, batch)
        _, heads, queries, keys = tensors[name].shape
        entry.update(
            name=name,
            kind=attn.kind(name),
            heads=heads,
            q=queries,
            k=keys,
            qlabels=_labels(query_labels, queries),
            klabels=_labels(key_labels, keys),
        )
        for axis, labels in (("qwords", entry["qlabels"]), ("kwords", entry["klabels"])):
            words = word_entry(labels)  # type: ignore[arg-type]
            if words is not None:
                entry[axis] = words
        qk, cost, missing = query_keys(attn, name, batch, qk_left)
        if qk is not None:
            entry["qk"], qk_left = qk, qk_left - cost
        elif missing:
            qk_missing.append(missing)
    notes = []
    if not fits:
        what = (
            "The full maps need"
            if len(sets) == 1
            else f"The full maps of the {len(sets)} views ("
            + ", ".join(LABELS[by] for by, _ in sets)
            + ") need"
        )
        notes.append(
            f"{what} {total * 4 // 3 / 2**20:.1f} MB, over this page's budget of "
            f"{max_bytes / 2**20:.1f} MB: every head is shown as a pooled thumbnail, and "
            f"{len(chosen or ())} selected head(s) at full resolution"
            + ("." if len(sets) == 1 else " in each view.")
        )
    repeated = [f"{name}: {d.note}" for name, d in shown.items() if d.note.startswith("last")]
    if repeated:  # said on the page too, not only as a warning in the notebook
        notes.append(
            "Called several times, not incremental decoding; "
            f"showing the last call ({'; '.join(repeated)})."
        )
    above = [m["name"] for m in maps if "scale" in m and views[0]["by"] == "attention"]
    if above:
        notes.append(
            f"{', '.join(map(str, above[:5]))}{', ...' if len(above) > 5 else ''}: weights above "
            "1, not probabilities (weighted maps?); each head is coloured to its own maximum."
        )
    if qk_missing:
        notes.append("No query/key view for " + "; ".join(qk_missing) + ".")
    return {
        "version": 1,
        "batch": batch,
        "maps": maps,
        "note": " ".join([*notes, *left_out]),
        "exact": bool(views[0]["exact"]),
        "views": views,
    }


def _values(
    name: str,
    by: str,
    weights: Tensor,
    batch: int,
    full: set[tuple[str, int]] | None,
    exact: bool,
) -> dict[str, object]:
    """One map set's values of one module: bytes per head (None for a head kept only as a
    thumbnail), thumbnails, float32 values when ``exact``, and the scales of a weighted set."""
    single = weights[batch].detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(single).all()):  # NaN would quantise to arbitrary bytes
        if by == "attention":
            raise AttnScopeError(
                f"{name!r} has NaN or infinite weights in batch item {batch}; the page shows "
                "probabilities in [0, 1]. Clean them first, e.g. "
                "torch.nan_to_num(weights, nan=0.0, posinf=1.0)"
            )
        raise AttnScopeError(
            f"the {LABELS[by]} map of {name!r} has NaN or infinite values in batch item "
            f"{batch}; leave it out of the page with view(attn, weights=('attention',))"
        )
    # Maps given as attention that exceed 1 are not probabilities (view(attn.weighted(...))
    # passes weighted maps as they are): they get their own scale too, rather than clipping.
    own_scale = by != "attention" or float(single.max()) > 1 + 1e-3
    single = single.clamp(min=0) if own_scale else single.clamp(0, 1)
    scales = peaks(single) if own_scale else [1.0] * single.size(0)
    keep = [h for h in range(single.size(0)) if full is None or (name, h) in full]
    kept = dict(zip(keep, quantise(single[keep], [scales[h] for h in keep]), strict=True))
    data = [kept.get(h) for h in range(single.size(0))]
    entry: dict[str, object] = {"thumb": thumbnails(single), "data": data}
    if own_scale:
        entry["scale"] = scales
    if exact:
        entry["exact"] = floats(single)
    return entry


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
    copies: int = 1,
) -> set[tuple[str, int]]:
    """Heads kept at full resolution: ``wanted`` in order while the budget lasts, each head
    costing its bytes in each of ``copies`` map sets (at least one head, whatever it costs)."""
    if wanted is None:
        wanted = [(n, h) for n in tensors for h in range(tensors[n].size(1))]
    chosen: set[tuple[str, int]] = set()
    used = 0
    for name, head in wanted:
        cost = sizes[name] // tensors[name].size(1) * copies * 4 // 3
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
