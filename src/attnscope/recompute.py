"""Attention weights from queries, keys and masks, the way PyTorch's slow path computes them.

Every adapter ends here: once it has the projected queries and keys a kernel saw, the weights
are ``softmax((q · scale) kᵀ + mask)``. The query is scaled *before* the matmul, exactly as
``torch.nn.functional.multi_head_attention_forward`` does, which reproduces PyTorch's own
weights to the last bit or within a few ulps.

Rows that carry no information (every key masked) come out as zeros, never NaN.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import sys
from typing import Any

import torch
from torch import Tensor

# PyTorch's softmax itself, bound at import: a capture stands in front of ``torch.softmax`` to
# see hand-written attention (``adapters.softmax``), and must not see its own recompute
_softmax = torch.softmax


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


def causal_additive_mask(
    query_len: int, key_len: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``-inf`` above the diagonal (top-left aligned, as ``scaled_dot_product_attention``)."""
    keep = torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril()
    return torch.zeros(query_len, key_len, dtype=dtype, device=device).masked_fill_(
        ~keep, float("-inf")
    )


def softmax_weights(
    q: Tensor, k: Tensor, scale: float, mask: Tensor | None, hidden: Tensor | None = None
) -> Tensor:
    """Per-head attention weights ``softmax((q · scale) kᵀ + mask)``, NaN rows as zeros.

    ``q`` is (..., query, dim), ``k`` is (..., key, dim) and ``mask`` an additive float mask
    that broadcasts to (..., query, key). ``hidden`` (bool, broadcasting the same way) is the
    native kernel's way instead: a hidden key's score is replaced, not added to, so it counts
    for nothing even where it is NaN (PyTorch's slow path adds ``-inf`` and gets NaN).

    >>> q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> softmax_weights(q, q, 1.0, None).sum(-1)
    tensor([[1., 1.]])
    >>> blocked = torch.tensor([[0.0, 0.0], [float("-inf"), float("-inf")]])
    >>> softmax_weights(q, q, 1.0, blocked)[0, 1]
    tensor([0., 0.])
    """
    if _autocast(q):  # autocast chooses the matmul's dtype: let it allocate
        scores = torch.matmul(q * scale, k.transpose(-2, -1))
    else:
        shape = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.size(-2), k.size(-2))
        buffer = weights_buffer(shape, torch.result_type(q, k), q.device)
        scores = torch.matmul(q * scale, k.transpose(-2, -1), out=buffer)
    if mask is not None:
        scores.add_(mask.to(scores.dtype))
    if hidden is not None:
        scores.masked_fill_(hidden, float("-inf"))
    # In place where the dtype allows: a fresh (batch, heads, L, L) buffer costs more in page
    # faults than the softmax itself (measured: 21 ms vs 10 ms at 8x8x512x512 on 2 cores).
    if scores.dtype in (torch.float32, torch.float64) and not _autocast(scores):
        weights = _softmax(scores, dim=-1, out=scores)
    else:
        weights = _softmax(scores, dim=-1)
    masked = mask is not None or hidden is not None
    return torch.nan_to_num_(weights, nan=0.0) if masked else weights


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _load_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def weights_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An empty tensor for weights; large CPU ones get their own huge-page-backed mapping.

    A capture keeps every map it computes, so each needs fresh memory. From ``torch.empty``
    (the C heap) it comes in 4 KiB pages and, held while the model runs, pushes the model's own
    temporaries onto fresh pages too (measured on BERT-base at 512 tokens, batch 1: 37k page
    faults per captured forward instead of 3k). A private anonymous mapping per buffer, with
    ``madvise(MADV_HUGEPAGE)`` on its aligned 2 MiB blocks before first touch, is faulted in
    2 MiB pages and given back whole when the tensor dies (6k faults, capture 1.21x -> 1.19x
    of the forward). This is advice about memory the tensor owns: nothing global changes.

    >>> weights_buffer((2, 3), torch.float32, torch.device("cpu")).shape
    torch.Size([2, 3])
    """
    count = math.prod(shape)
    size = count * dtype.itemsize
    if device.type != "cpu" or size < 2 * _HUGE_PAGE or _madvise is None:
        return torch.empty(shape, dtype=dtype, device=device)
    mapping = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    start = -(-base // _HUGE_PAGE) * _HUGE_PAGE
    _madvise(start, size, _MADV_HUGEPAGE)
    # the tensor keeps the mapping alive (frombuffer holds the buffer); unmapped when it dies
    flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=start - base)
    return flat.view(shape)


def _autocast(tensor: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(tensor.device.type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
