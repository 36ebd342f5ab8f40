"""Which map sets the page shows: the attention weights and their weighted views.

Design note
-----------
``attn.weighted("grads")`` and ``attn.weighted("norms")`` are maps of the same modules and
shapes as ``attn`` (issue #16: "gradient- and norm-weighted maps as alternative views of the
same modules"). The page carries each as a set of its own, names, kinds and labels shared
with the first, and a selector switches every view between them. By default a set is shown
when the capture kept what it needs for every module (``capture(model, grads=True)`` with a
backward in the block, ``capture(model, norms=True)``); one that is kept for only some
modules, or cannot be computed, is left out and the page says why. Asked for by name
(``view(attn, weights=("attention", "grads"))``), a set that cannot be made is an error that
says how to capture it.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import AttnScopeError
from ..maps import AttentionMaps

LABELS = {"attention": "attention", "grads": "grad \u00d7 attention", "norms": "norm-weighted"}
"""The selector's label of each set."""

_OPTION = {"grads": "grads=True", "norms": "norms=True"}
_HOW = {
    "grads": "capture with attnscope.capture(model, grads=True) and call loss.backward() inside "
    "the block",
    "norms": "capture with attnscope.capture(model, norms=True)",
}


def weight_sets(
    attn: AttentionMaps, weights: str | Iterable[str] | None
) -> tuple[list[tuple[str, AttentionMaps]], list[str]]:
    """``[(by, maps)]`` in the page's order, and why a set available by default was left out.

    >>> import torch
    >>> maps = AttentionMaps.from_tensors({"layer": torch.full((1, 2, 3, 3), 1 / 3)})
    >>> [by for by, _ in weight_sets(maps, None)[0]]
    ['attention']
    >>> try:
    ...     weight_sets(maps, ("norms",))
    ... except AttnScopeError as error:
    ...     print("norms=True" in str(error))
    True
    """
    if weights is None:
        return _available(attn)
    wanted = _checked(weights)
    sets = []
    for by in wanted:
        if by == "attention":
            sets.append((by, attn))
            continue
        kept = attn._grads if by == "grads" else attn._norms
        what = "gradients" if by == "grads" else "value norms"
        if not any(name in kept for name in attn.names):
            raise AttnScopeError(
                f"view(weights={wanted!r}): this capture kept no {what} ({_OPTION[by]} was not "
                f"given): {_HOW[by]}, or leave {by!r} out of weights"
            )
        try:
            sets.append((by, attn.weighted(by)))
        except AttnScopeError as error:
            raise AttnScopeError(f"view(weights={wanted!r}): {error}") from error
    return sets, []


def _available(attn: AttentionMaps) -> tuple[list[tuple[str, AttentionMaps]], list[str]]:
    sets: list[tuple[str, AttentionMaps]] = [("attention", attn)]
    notes = []
    for by in ("grads", "norms"):
        kept = attn._grads if by == "grads" else attn._norms
        have = [name for name in attn.names if name in kept]
        if not have:
            continue  # not captured: no selector entry, nothing to say
        if len(have) < len(attn.names):
            missing = [name for name in attn.names if name not in kept]
            notes.append(
                f"No {LABELS[by]} view: only {len(have)} of {len(attn.names)} modules have "
                f"{'gradients' if by == 'grads' else 'value norms'} (none for "
                f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})."
            )
            continue
        try:
            sets.append((by, attn.weighted(by)))
        except AttnScopeError as error:
            notes.append(f"No {LABELS[by]} view: {error}.")
    return sets, notes


def _checked(weights: str | Iterable[str]) -> tuple[str, ...]:
    example = "e.g. weights=('attention', 'norms')"
    if isinstance(weights, str):
        weights = (weights,)
    if not isinstance(weights, Iterable):
        raise AttnScopeError(f"weights must be names of map sets, {example}; got {weights!r}")
    wanted = tuple(weights)
    if not wanted:
        raise AttnScopeError(f"weights is empty: name at least one map set, {example}")
    for by in wanted:
        if by not in LABELS:
            raise AttnScopeError(
                f"weights: unknown map set {by!r}; choose from {', '.join(map(repr, LABELS))}"
            )
    if len(set(wanted)) != len(wanted):
        raise AttnScopeError(f"weights names a map set twice: {wanted!r}")
    return wanted
