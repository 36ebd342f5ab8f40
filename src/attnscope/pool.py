"""Warm memory for the tensors a lazy capture keeps.

Design note
-----------
A lazy capture keeps O(L) per call (the kernel's queries and keys) while the model runs on.
Taken from the C allocator, that memory is often new to the process: the capture holds it
while the model's temporaries come and go, so the heap grows, and when the capture is dropped
the allocator may hand the pages back to the system. Then each page is faulted in and zeroed
again by the next capture (measured on a BERT-base-shaped encoder, batch 1, 512 tokens: from
a few to 12k page faults per lazily captured forward, none for the plain forward; writing
3 MB into fresh pages took 1.0 ms, into pages already touched 0.17 ms).

So a lazy capture cuts what it keeps from blocks of this pool, and a block comes back when
every tensor cut from it is gone (each carries one shared token, which a
``weakref.finalize`` watches; a tensor that C++ still references keeps its Python object,
and so the token). A loop of captures, one per batch, then writes into warm pages. These
tensors never leave attnscope (``LazyWeights`` computes fresh weights from them), so no view
of a block outlives them. The pool keeps at most ``LIMIT`` bytes of free blocks;
``release()`` hands them all back to the allocator.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch
from torch import Tensor

LIMIT = 256 << 20

_lock = threading.Lock()
_free: dict[int, list[Tensor]] = {}  # uint8 CPU blocks no tensor uses, by size
_free_total = 0


def parts(count: int, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``count`` empty CPU tensors of ``shape`` and ``dtype``, cut from one pooled block that
    returns to the pool when all of them are gone.

    >>> q, k = parts(2, (3, 4), torch.float32)
    >>> q.shape, k.dtype
    (torch.Size([3, 4]), torch.float32)
    """
    size = math.prod(shape) * dtype.itemsize
    block = _take(count * size)
    whole = block[: count * size].view(dtype).view(count, *shape)
    pieces = tuple(whole[i] for i in range(count))
    # every piece carries the same token: it dies, and the block comes back, with the last
    token = _Token()
    for piece in pieces:
        piece._attnscope_pool_token = token  # type: ignore[attr-defined]
    weakref.finalize(token, _give, block)
    return pieces


class _Token:
    """Lives as long as the longest-lived tensor cut from one block."""


def _give(block: Tensor) -> None:
    global _free_total
    with _lock:
        if _free_total + block.numel() <= LIMIT:
            _free.setdefault(block.numel(), []).append(block)
            _free_total += block.numel()


def _take(size: int) -> Tensor:
    """The smallest free block of at least ``size`` bytes (and not a quarter more), or a new
    one."""
    global _free_total
    with _lock:
        fitting = [n for n in _free if size <= n <= size + size // 4]
        if fitting:
            best = min(fitting)
            blocks = _free[best]
            block = blocks.pop()
            if not blocks:
                del _free[best]
            _free_total -= best
            return block
    return torch.empty(max(size, 1), dtype=torch.uint8)


def free_bytes() -> int:
    """Bytes of the blocks the pool holds for the next capture."""
    with _lock:
        return _free_total


def release() -> None:
    """Give every free block back to the allocator."""
    global _free_total
    with _lock:
        _free.clear()
        _free_total = 0
