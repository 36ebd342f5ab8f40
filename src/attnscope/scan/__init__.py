"""Head statistics over a corpus: ``attnscope.scan`` and ``attnscope scan``.

Design note
-----------
Reader (``reader``) -> shards of records -> ``engine.ShardRunner`` (tokenize, batch by
length, ``capture.stream`` into an ``aggregate.Accumulator``) -> per-shard sums, written by
``store`` as each shard completes -> merged in shard order into ``heads.parquet``,
``top.parquet`` and ``report.html``. The sums merge exactly (counts, float64 means and ``M2``,
top-k), so the table does not depend on the batch size, the padding side or the engine
(``local`` here, ``ray`` in ``ray_engine``) beyond the kernels' rounding, and a scan stopped at
any moment resumes from its completed shards. pyarrow (``attnscope[scan]``) is imported only
when a table is built.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable
from typing import Any

from ..errors import AttnScopeError
from ..filters import NamesFilter
from .aggregate import Accumulator
from .engine import ShardResult, ShardRunner

__all__ = ["scan"]


def scan(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    batch_size: int = 32,
    max_length: int = 128,
    top_k: int = 10,
    include: NamesFilter | None = None,
    exclude: NamesFilter | None = None,
) -> Any:
    """Per-head statistics of ``model`` over ``texts``: a ``pyarrow.Table``, one row per
    (module, head), as ``heads.parquet`` of ``attnscope scan``.

    Columns: ``module``, ``head``, ``kind``, ``count`` (valid query rows), the means over
    every valid query row of every text of ``entropy`` (nats), ``distance``, ``first`` (the
    attention-sink share), ``previous`` and ``self`` (``head_stats``' definitions, positions
    counted over the valid tokens), and their population standard deviations
    ``entropy_std``, ... ``self_std``. Texts longer than ``max_length`` tokens are cut to it;
    the schema's metadata counts them (``truncated``), with ``texts``, ``tokens`` and
    ``empty`` (texts of only whitespace, skipped). ``include``/``exclude`` select modules as
    in ``attnscope.capture``.

    >>> import attnscope, transformers
    >>> from attnscope.run import default_model_path
    >>> folder = default_model_path()  # the packaged all-MiniLM-L6-v2
    >>> model = transformers.AutoModel.from_pretrained(folder).eval()
    >>> tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    >>> table = attnscope.scan(model, tokenizer, ["The cat sat on the mat.", "Hi"], batch_size=2)
    >>> table.num_rows, table.column_names[:5]
    (72, ['module', 'head', 'kind', 'count', 'entropy'])
    >>> table.slice(0, 1).to_pylist()[0]["count"]  # 9 + 3 tokens: every valid query row
    12
    """
    runner = ShardRunner(
        model,
        tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        top_k=top_k,
        include=include,
        exclude=exclude,
    )
    if isinstance(texts, str):
        raise AttnScopeError("texts must be a list of strings, got one string; wrap it: [text]")
    records: list[tuple[int, str | None]] = []
    total = ShardResult(Accumulator(max_length, top_k))
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise AttnScopeError(f"texts[{index}] is a {type(text).__name__}, not a string")
        records.append((index, text if text.strip() else None))
        if len(records) == 1024:  # bounded memory for a long iterator
            total.merge(runner.run(records))
            records = []
    if records:
        total.merge(runner.run(records))
    if total.texts == 0:
        raise AttnScopeError("no texts to scan (all are empty, or none were given)")
    from .tables import heads_table

    return heads_table(total.sums, total.counts())


class _CallablePackage(types.ModuleType):
    """``attnscope.scan`` is the function above, and this package shares its name: an importer
    that binds the package over it (pytest's doctest collection does) must not break
    ``attnscope.scan(model, tokenizer, texts)``, so the package calls the function too."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return scan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
