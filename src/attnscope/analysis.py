"""Measurements on attention weights. (Rollout, flow and head statistics build on this.)"""

from __future__ import annotations

import torch
from torch import Tensor


def row_entropy(weights: Tensor) -> Tensor:
    """Entropy in nats of each attention row: (..., query, key) -> (..., query).

    >>> row_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    tensor([0.6931, 0.0000])
    """
    weights = weights.float()
    return torch.special.entr(weights).sum(dim=-1)


def valid_rows(weights: Tensor) -> Tensor:
    """Rows that carry attention (zero rows are padding or fully masked queries)."""
    return weights.float().sum(dim=-1) > 0.5


def mean_entropy(weights: Tensor) -> float:
    """Mean row entropy (nats) over all heads and valid query rows of a (batch, heads, q, k) map.

    >>> mean_entropy(torch.full((1, 2, 4, 4), 0.25))
    1.3862943649291992
    """
    rows = valid_rows(weights)
    if not bool(rows.any()):
        return float("nan")
    return float(row_entropy(weights)[rows].mean())
