"""The record an adapter hands to a capture: one attention computation, weights on demand.

Design note
-----------
Every adapter, built in or a user's, describes each attention computation it sees as one
``AttentionCall``: its kind (``"self"``, ``"causal"`` or ``"cross"``), its (batch, heads, query,
key) shape, the dtype it is computed in, and ``compute(rows)``, which gives the weights. The
capture decides what to do with it (refuse by ``max_bytes`` before anything is allocated, keep
it lazily, compute now, spill to disk), so an adapter never allocates a map itself unless the
kernel already did (``AttentionCall.of_weights``). Rows follow ``attnscope.padded_rows``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("self", "causal", "cross")


@dataclass
class AttentionCall:
    """One attention computation, ready to produce its weights on demand.

    ``compute(rows)`` gives (batch, heads, query, key) weights, for the query positions
    ``rows`` (a LongTensor) only when given. ``held`` are the tensors it reads, which a lazy
    capture keeps instead of the weights.
    """

    kind: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    compute: Callable[[Tensor | None], Tensor]
    held: tuple[Tensor, ...] = ()

    @classmethod
    def of_weights(cls, kind: str, weights: Tensor) -> AttentionCall:
        """A call whose (batch, heads, query, key) weights the kernel already returned."""
        batch, heads, queries, keys = weights.shape
        return cls(
            kind,
            (batch, heads, queries, keys),
            weights.dtype,
            lambda rows: weights if rows is None else weights[:, :, rows],
            (weights,),
        )
