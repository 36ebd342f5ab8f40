"""The scan's tables as pyarrow: ``heads`` (one row per head) and ``top`` (top-k texts)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import AttnScopeError
from ..head_stats import STATISTICS
from .aggregate import Accumulator

HEAD_COLUMNS = (
    "module",
    "head",
    "kind",
    "count",
    *STATISTICS,
    *(f"{s}_std" for s in STATISTICS),
)
TOP_COLUMNS = ("module", "head", "statistic", "rank", "id", "value", "text")


def import_pyarrow() -> Any:
    """``pyarrow``, or an error naming the extra that brings it."""
    try:
        import pyarrow
    except ImportError:
        raise AttnScopeError(
            "attnscope scan needs pyarrow: pip install 'attnscope[scan]'"
        ) from None
    return pyarrow


def heads_table(sums: Accumulator, counts: dict[str, int]) -> Any:
    """One row per (module, head); ``counts`` (texts, tokens, truncated, empty) as metadata."""
    pa = import_pyarrow()
    rows = list(sums.rows())
    schema = pa.schema(
        [
            ("module", pa.string()),
            ("head", pa.int64()),
            ("kind", pa.string()),
            ("count", pa.int64()),
            *((name, pa.float64()) for name in HEAD_COLUMNS[4:]),
        ],
        metadata={"attnscope": json.dumps(counts)},
    )
    return pa.Table.from_pylist(rows, schema=schema)


def top_table(sums: Accumulator, texts: dict[int, str] | None = None) -> Any:
    """Per (module, head, statistic) the top-k texts by their mean, rank 1 the highest:
    ``id`` the input record's index, ``value`` the text's mean, ``text`` the text (from
    ``texts``, by id; cut to 500 characters)."""
    pa = import_pyarrow()
    rows = list(sums.top_rows())
    for row in rows:
        row["text"] = None if texts is None else texts.get(row["id"], "")[:500]
    schema = pa.schema(
        [
            ("module", pa.string()),
            ("head", pa.int64()),
            ("statistic", pa.string()),
            ("rank", pa.int64()),
            ("id", pa.int64()),
            ("value", pa.float64()),
            ("text", pa.string()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def top_ids(sums: Accumulator) -> set[int]:
    """The ids of every text in some head's top-k."""
    return {int(i) for s in sums.modules.values() for i in s.top_text.flatten().tolist()}


def counts_of(table: Any) -> dict[str, int]:
    """The counts a heads table carries (texts, tokens, truncated, empty)."""
    metadata = table.schema.metadata or {}
    return dict(json.loads(metadata.get(b"attnscope", b"{}")))
