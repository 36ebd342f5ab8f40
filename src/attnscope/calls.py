"""The record an adapter hands to a capture: one attention computation, weights on demand.

Design note
-----------
Every adapter, built in or a user's, describes each attention computation it sees as one
``AttentionCall``: its kind (``"self"``, ``"causal"`` or ``"cross"``), its (batch, heads, query,
key) shape, the dtype it is computed in, and ``compute(rows)``, which gives the weights. The
capture decides what to do with it (refuse by ``max_bytes`` before anything is allocated, keep
it lazily, compute now, spill to disk), so an adapter never allocates a map itself unless the
kernel already did (``AttentionCall.of_weights``). Rows follow ``attnscope.padded_rows``.

One mask convention inside attnscope: a bool tensor, True where a query does not see a key
(PyTorch MHA's and ``masked_fill``'s), or an additive float mask. Kernels' own conventions are
turned into it where they come in (``hidden_keys`` for sdpa's, where True keeps a key); the
kind rule (``kind_of``), padded rows and recomputes all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

KINDS = ("self", "causal", "cross")

Compute = Callable[[Tensor | None], Tensor]  # rows (None: all) -> (batch, heads, query, key)
Terms = Callable[[], tuple[Tensor, Tensor]]  # -> scaled per-head queries, keys


class Reader(Protocol):
    """What computes one call's weights and terms from the tensors it holds, and gives the
    same computation from others of the same values (``AttentionCall.reader``)."""

    def compute(self, rows: Tensor | None = None) -> Tensor: ...

    def terms(self) -> tuple[Tensor, Tensor]: ...

    def reading(self, held: tuple[Tensor | None, ...]) -> Reader:
        """The same computation from ``held`` in place of its own held tensors, one for one,
        with the same values (a None: not read until given again)."""
        ...


def hidden_keys(mask: Tensor | None) -> Tensor | None:
    """An sdpa ``attn_mask`` in attnscope's convention: True where it hides a key (bool: where
    False; float: at -inf, or below half the dtype's minimum, which Hugging Face's float masks
    use).

    >>> hidden_keys(torch.tensor([True, False])), hidden_keys(torch.tensor([0.0, float("-inf")]))
    (tensor([False,  True]), tensor([False,  True]))
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return mask <= torch.finfo(mask.dtype).min / 2


def kind_of(*, cross: bool = False, causal: bool = False, hidden: Tensor | None = None) -> str:
    """The kind of one call, the one rule every adapter uses: ``"cross"`` when it attends to
    another sequence, ``"causal"`` when the call or its module says so or when the keys it
    hides (``hidden``: True where a query does not see a key, (..., query, key)) are exactly
    the later ones (``is_causal_mask``), else ``"self"``.

    >>> kind_of(hidden=torch.ones(3, 3, dtype=torch.bool).triu(1)), kind_of(cross=True)
    ('causal', 'cross')
    """
    if cross:
        return "cross"
    if causal or is_causal_mask(hidden):
        return "causal"
    return "self"


def is_causal_mask(mask: Tensor | None) -> bool:
    """True when ``mask`` hides every key after its query, and not every key before it.

    >>> is_causal_mask(torch.ones(3, 3, dtype=torch.bool).triu(1))
    True
    >>> is_causal_mask(torch.zeros(3, 3))
    False
    """
    if mask is None or mask.dim() < 2 or mask.size(-1) != mask.size(-2) or mask.size(-1) < 2:
        return False
    size = mask.size(-1)
    upper = torch.ones(size, size, dtype=torch.bool, device=mask.device).triu(1)
    hidden = mask if mask.dtype == torch.bool else mask == float("-inf")
    lower = upper.transpose(0, 1)  # a mask that hides the past too is not a causal one
    return bool(hidden[..., upper].all()) and not bool(hidden[..., lower].all())


@dataclass
class AttentionCall:
    """One attention computation, ready to produce its weights on demand.

    ``compute(rows)`` gives (batch, heads, query, key) weights, for the query positions
    ``rows`` (a LongTensor) only when given. ``held`` are the tensors it reads, which a lazy
    capture keeps instead of the weights. ``terms()``, where the adapter has them, gives the
    per-head queries, already multiplied by the kernel's scale, and keys, (batch, heads,
    query, dim) and (batch, heads, key, dim), heads expanded for grouped-query attention: their
    product ``q @ kᵀ`` is the scores before the mask (``AttentionMaps.queries_keys``).
    ``values()`` gives the per-head values the weights multiply, (batch, heads, key, dim), and
    ``output`` is the kernel's per-head output (batch, heads, query, dim), on the autograd
    graph when the forward builds one: what gradients (``∂L/∂A = ∂L/∂O · Vᵀ``) and norms need.
    ``grad_of`` is, where the model formed the weights itself, that tensor on the graph: its
    gradient is ∂L/∂A. ``reader``, where the adapter gives one, is what ``compute`` and
    ``terms`` belong to: ``reader.reading(tensors)`` computes the same from tensors of the same
    values as ``held`` in other memory, which lets a lazy capture keep one KV cache a layer
    rather than one per decoding step (``attnscope.lazy``).
    """

    kind: str
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    compute: Compute
    held: tuple[Tensor, ...] = ()
    terms: Terms | None = None
    values: Callable[[], Tensor] | None = None
    output: Tensor | None = None
    grad_of: Tensor | None = None
    grad_note: str | None = None  # why this call has no gradient, where it is known
    reader: Reader | None = None

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
