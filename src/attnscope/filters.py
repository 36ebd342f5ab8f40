"""One filter type for module names: a glob, a list of globs, or a predicate."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence

from .errors import AttnScopeError

NamesFilter = str | Sequence[str] | Callable[[str], bool]


def matcher(names_filter: NamesFilter) -> Callable[[str], bool]:
    """A predicate on names from a glob pattern, a list of them, or a callable.

    >>> matcher("encoder.*")("encoder.layers.0.self_attn")
    True
    >>> matcher(["a", "b*"])("c")
    False
    """
    if callable(names_filter):
        return names_filter
    patterns = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    if not all(isinstance(p, str) for p in patterns):
        raise AttnScopeError(
            f"a names filter is a glob string, a list of them or a callable, got {names_filter!r}"
        )
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def filter_names(
    names: Iterable[str],
    include: NamesFilter | None = None,
    exclude: NamesFilter | None = None,
) -> list[str]:
    """The names kept by ``include`` and not dropped by ``exclude``; raises if none is left.

    >>> filter_names(["enc.0", "enc.1", "dec.0"], include="enc.*", exclude="*.1")
    ['enc.0']
    """
    names = list(names)
    kept = names
    if include is not None:
        keep = matcher(include)
        kept = [n for n in kept if keep(n)]
        if not kept:
            raise AttnScopeError(
                f"include={include!r} matches none of the attention modules; available: "
                + _listing(names)
            )
    if exclude is not None:
        drop = matcher(exclude)
        kept = [n for n in kept if not drop(n)]
        if not kept:
            raise AttnScopeError(
                f"exclude={exclude!r} leaves no attention module; available: " + _listing(names)
            )
    return kept


def _listing(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
