"""Rows that carry no information, one convention for every path: zeros, never NaN.

A query row of a map is zero when, and only when,

- every key is hidden from that query by the mask the kernel was given (a fully masked row:
  PyTorch's slow path gives NaN there, an eager Hugging Face model a uniform row, since it
  adds the dtype's minimum instead of ``-inf``), or
- the model was told that the query is padding: a Hugging Face model's ``attention_mask``
  (batch, keys), 0 at padded positions, for self and causal attention; PyTorch's
  ``key_padding_mask`` of a self-attention.

A key hidden from every query does not make its query row padding: a mask may hide key 0
from everyone while query 0 is real. So sdpa, eager and PyTorch's own kernels give the same
map for the same model, padded or not, left or right.
"""

from __future__ import annotations

from torch import Tensor


def padding_of(attention_mask: object) -> Tensor | None:
    """(batch, length) bool, True at padding, from a Hugging Face style 2-D mask (1 = keep).

    >>> import torch
    >>> padding_of(torch.tensor([[1, 1, 0]]))
    tensor([[False, False,  True]])
    >>> padding_of(torch.ones(1, 1, 3, 3)) is None  # a 4-D mask says nothing of padding
    True
    """
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2:
        return None
    return attention_mask == 0


def query_padding(
    padding: Tensor | None, batch: int, queries: int, keys: int, cached: bool = False
) -> Tensor | None:
    """The padding of a call's query positions, as (batch or 1, queries), when ``padding``
    covers exactly its keys: the same positions for a square call; for fewer queries than
    keys, only when ``cached`` (a causal KV-cache step, whose queries are the last keys);
    pooled or latent queries are no key positions at all, so None."""
    if padding is None or padding.size(-1) != keys or padding.size(0) not in (1, batch):
        return None
    if queries > keys or (queries < keys and not cached):
        return None
    return padding[:, keys - queries :]


def blank_rows(
    weights: Tensor,
    hidden: Tensor | None = None,
    padded_queries: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """``weights`` (batch, heads, query, key) with the convention's rows set to zero.

    ``hidden`` (bool, True = hidden, broadcasting to the weights) is the mask for the query
    rows the weights have; ``padded_queries`` (batch or 1, all queries) marks padding, of which
    ``rows`` picks the weights' query positions (all if None).

    >>> import torch
    >>> w = torch.full((1, 1, 2, 2), 0.5)
    >>> hidden = torch.tensor([[False, False], [True, True]])  # query 1 sees no key
    >>> blank_rows(w, hidden)[0, 0]
    tensor([[0.5000, 0.5000],
            [0.0000, 0.0000]])
    >>> blank_rows(w, torch.tensor([[True, False], [True, False]]))[0, 0]  # key 0 hidden: kept
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    """
    blank = _blank(hidden, padded_queries, rows)
    return weights if blank is None else weights.masked_fill(blank, 0.0)


def blank_rows_(
    weights: Tensor,
    hidden: Tensor | None = None,
    padded_queries: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """``blank_rows`` in place, for weights the caller owns (a kernel's buffer, a fresh
    recompute): a copy of a large map costs more than the zeroing (8 x 8 x 512 x 512 on 2
    cores: 35 ms against 8 ms in place, and less now that only the blank rows are written).

    >>> import torch
    >>> w = torch.full((1, 1, 2, 2), 0.5)
    >>> blank_rows_(w, padded_queries=torch.tensor([[False, True]])) is w, w[0, 0, 1]
    (True, tensor([0., 0.]))
    """
    blank = _blank(hidden, padded_queries, rows)
    if blank is None:
        return weights
    # only the blank rows are written: a masked_fill_ over the whole map reads and writes
    # every entry (32 x 12 x 71 x 71 with 14% of the rows blank, 2 cores: 0.25 against 0.05
    # ns an entry)
    rows_at = blank.expand(*weights.shape[:-1], 1)[..., 0].nonzero(as_tuple=True)
    weights.index_put_(rows_at, weights.new_zeros(()))
    return weights


def _blank(
    hidden: Tensor | None, padded_queries: Tensor | None, rows: Tensor | None
) -> Tensor | None:
    """The rows to zero, broadcasting to the weights (..., query, 1), or None when none are."""
    blank: Tensor | None = None
    if hidden is not None:
        blank = hidden.all(dim=-1, keepdim=True)  # (..., query, 1): every key hidden
    if padded_queries is not None:
        picked = padded_queries if rows is None else padded_queries[:, rows]
        padded = picked[:, None, :, None]
        blank = padded if blank is None else blank | padded
    if blank is None or not bool(blank.any()):
        return None
    return blank
