"""The page's head-importance panel: a layers x heads grid of ``attnscope.head_importance``.

Each cell is one head of one module, its value shown on hover; a click opens that module and
head in the other views, so the table's modules are matched to the page's by name (a module
of the table that the page does not show gets cells that open nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from ..errors import AttnScopeError

MAX_HEADS = 4096
_EXAMPLE = "e.g. importance=attnscope.head_importance(model, batches, loss)"


def importance_panel(table: object, names: list[str]) -> dict[str, object]:
    """The panel's data from an ``ImportanceTable`` (or its rows) and the page's module names:
    ``{"modules", "heads", "values" (modules x heads, None where absent), "lo", "hi"}``.

    >>> rows = [{"module": "a", "head": 1, "importance": 2.0},
    ...         {"module": "a", "head": 0, "importance": 0.5}]
    >>> importance_panel(rows, ["a"])["values"]
    [[0.5, 2.0]]
    """
    rows = getattr(table, "rows", table)
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise AttnScopeError(
            f"importance must be an ImportanceTable or its rows, {_EXAMPLE}; got "
            f"{type(table).__name__}"
        )
    cells: dict[str, dict[int, float | None]] = {}
    for row in rows:
        module, head, value = _row(row)
        per_module = cells.setdefault(module, {})
        if head in per_module:
            raise AttnScopeError(f"importance: two rows for {module!r} head {head}")
        per_module[head] = value
    if not cells:
        raise AttnScopeError(f"importance has no rows: {_EXAMPLE}")
    if not any(module in names for module in cells):
        raise AttnScopeError(
            f"importance: none of its modules ({', '.join(list(cells)[:3])}, ...) is in this "
            f"page ({', '.join(names[:3])}, ...): compute it on the model the maps come from"
        )
    width = 1 + max(max(heads) for heads in cells.values())
    if width > MAX_HEADS:
        raise AttnScopeError(f"importance: head {width - 1} is more heads than the page draws")
    values = [[cells[module].get(head) for head in range(width)] for module in cells]
    finite = [v for line in values for v in line if v is not None]
    return {
        "modules": list(cells),
        "heads": width,
        "values": values,
        "lo": min([0.0, *finite]),
        "hi": max([0.0, *finite]),
    }


def _row(row: object) -> tuple[str, int, float | None]:
    if not isinstance(row, Mapping) or not {"module", "head", "importance"} <= set(row):
        raise AttnScopeError(
            f"importance rows need 'module', 'head' and 'importance', {_EXAMPLE}; got {row!r}"
        )
    module, head, value = row["module"], row["head"], row["importance"]
    if not isinstance(module, str):
        raise AttnScopeError(f"importance: module must be a str, got {module!r}")
    if isinstance(head, bool) or not isinstance(head, int) or head < 0:
        raise AttnScopeError(f"importance: head must be an int >= 0, got {head!r} in {module!r}")
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise AttnScopeError(
            f"importance: {module!r} head {head} has importance {value!r}, not a number"
        ) from error
    return module, head, number if math.isfinite(number) else None
