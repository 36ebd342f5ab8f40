"""Attention weights from queries, keys and masks, the way PyTorch's slow path computes them.

Every adapter ends here: once it has the projected queries and keys a kernel saw, the weights
are ``softmax((q · scale) kᵀ + mask)``. The query is scaled *before* the matmul, exactly as
``torch.nn.functional.multi_head_attention_forward`` does, which reproduces PyTorch's own
weights to the last bit or within a few ulps.

Rows that carry no information (every key masked) come out as zeros, never NaN.
Where the time goes (BERT-base, 512 tokens, 2 cores): the q·kᵀ matmul and the softmax are the
floor; writing into fresh pages cost more than both until the weights went to pooled memory,
and each extra pass over a (batch, heads, L, L) map (a float mask built and added,
``nan_to_num``, an out-of-place zeroing) costs about what the softmax does. So a causal call
hides its keys with one cached bool mask, and blocked rows are found from the mask, not by a
pass over the weights. ``benchmarks/perf.py`` measures each.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import pool
from .padded_rows import blank_rows_

# PyTorch's softmax and products themselves, bound at import: a capture stands in front of
# them to see hand-written attention (``adapters.softmax``), and must not see its own recompute
_softmax = torch.softmax
_bmm = torch.bmm
matmul = torch.matmul


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True`` = masked out, PyTorch's MHA convention) as ``-inf``/0 floats.

    Float masks are returned in ``dtype`` unchanged, like ``F._canonical_mask``.

    >>> additive_mask(torch.tensor([[False, True]]), torch.float32)
    tensor([[0., -inf]])
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise TypeError(f"attention masks must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


@functools.lru_cache(maxsize=32)
def causal_additive_mask(
    query_len: int, key_len: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``-inf`` above the diagonal (top-left aligned, as ``scaled_dot_product_attention``).
    Cached like ``causal_hidden``; callers never change it."""
    return torch.zeros(query_len, key_len, dtype=dtype, device=device).masked_fill_(
        causal_hidden(query_len, key_len, device), float("-inf")
    )


@functools.lru_cache(maxsize=32)
def causal_hidden(query_len: int, key_len: int, device: torch.device) -> Tensor:
    """(query, key) bool, True above the diagonal: the keys a causal call hides (top-left
    aligned, as ``scaled_dot_product_attention``). Cached: every layer of a forward, and every
    forward of the same length, asks for the same one; callers never change it.

    >>> causal_hidden(2, 3, torch.device("cpu"))
    tensor([[False,  True,  True],
            [False, False,  True]])
    """
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).triu_(1)


def softmax_weights(
    q: Tensor, k: Tensor, scale: float, mask: Tensor | None, hidden: Tensor | None = None
) -> Tensor:
    """Per-head attention weights ``softmax((q · scale) kᵀ + mask)``, blocked rows as zeros.

    ``q`` is (..., query, dim), ``k`` is (..., key, dim) and ``mask`` an additive float mask
    that broadcasts to (..., query, key). ``hidden`` (bool, broadcasting the same way) hides
    keys the way PyTorch's native kernels do: a hidden key's score is replaced by ``-inf``, not
    added to, so it counts for nothing even where it is NaN. ``mask`` is added, the way
    ``scaled_dot_product_attention`` applies a bool mask or causality (as ``-inf``/0 floats)
    and the slow path any mask; prefer it where that is the kernel's convention: an ``add_``
    over the map costs a quarter of a ``masked_fill_`` (0.10 against 0.40 ns an entry on 2
    cores). A row whose every key is hidden or ``-inf`` comes out as zeros (``padded_rows``),
    where PyTorch's slow path gives NaN.

    On the CPU the weights are computed in place in pooled memory (``attnscope.pool``): the
    scores, the softmax and the zeroed rows are one buffer, which a capture then keeps.

    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> softmax_weights(q, q, 1.0, None).sum(-1)
    tensor([[1., 1.]])
    >>> blocked = torch.tensor([[0.0, 0.0], [float("-inf"), float("-inf")]])
    >>> softmax_weights(q, q, 1.0, blocked)[0, 1]
    tensor([0., 0.])
    >>> softmax_weights(q, q, 1.0, None, causal_hidden(2, 2, q.device))[0]
    tensor([[1.0000, 0.0000],
            [0.2689, 0.7311]])
    """
    dtype = torch.result_type(q, k)
    in_place = q.device.type == "cpu" and not autocast_on(q) and dtype in _IN_PLACE
    lead = q.shape[:-2]
    if k.shape[:-2] != lead:  # torch.broadcast_shapes is Python: 25 us a call, when not needed
        lead = torch.broadcast_shapes(lead, k.shape[:-2])
    shape = (*lead, q.size(-2), k.size(-2))
    buffer = pool.empty((shape, dtype))[0] if in_place else None
    scores = _scores(q, k, scale, lead, buffer)
    if mask is not None:
        scores.add_(mask.to(scores.dtype))
    if hidden is not None:
        scores.masked_fill_(hidden, float("-inf"))
    if in_place and scores.dtype == dtype:
        weights = _softmax(scores, dim=-1, out=scores)
    else:
        weights = _softmax(scores, dim=-1)
    blocked = hidden
    if mask is not None and mask.is_floating_point():
        at_minus_inf = mask == float("-inf")
        blocked = at_minus_inf if blocked is None else blocked | at_minus_inf
    return blank_rows_(weights, blocked)


def _scores(q: Tensor, k: Tensor, scale: float, lead: torch.Size, out: Tensor | None) -> Tensor:
    """``(q · scale) kᵀ`` over the broadcast ``lead`` dims, into ``out`` where given.

    One ``bmm`` of row-major (n, length, dim) operands, as PyTorch's slow path runs it: a
    matmul of ``q`` against a ``kᵀ`` view first copies kᵀ into a (dim, key) layout, a strided
    copy that cost about half the matmul itself (32 x 12 x 71 x 71 on 2 cores: 0.59 of
    1.73 ms). The scaled queries are written row-major in the one pass that scales them.
    """
    batch = math.prod(lead)
    queries, keys, dim = q.size(-2), k.size(-2), q.size(-1)
    scaled = torch.empty((*lead, queries, dim), dtype=q.dtype, device=q.device)
    torch.mul(q.expand(*lead, queries, dim), scale, out=scaled)
    flat_k = k.expand(*lead, keys, dim).reshape(batch, keys, dim)
    flat_out = None if out is None else out.view(batch, queries, keys)
    scores = _bmm(scaled.view(batch, queries, dim), flat_k.transpose(1, 2), out=flat_out)
    return scores.view(*lead, queries, keys)


_IN_PLACE = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def autocast_on(tensor: Tensor) -> bool:
    """Whether autocast is on for ``tensor``'s device (its ops may then run in another dtype)."""
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
