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
tensors never leave attnscope (``LazyWeights`` computes fresh weights from them), and a view
of one (a mask reshaped for the recompute) is only used while the tensor itself is held, so
no view of a block outlives its token. The pool keeps at most ``LIMIT`` bytes of free
blocks, the oldest making room for newer ones; ``release()`` hands them all back to the
allocator.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from queue import Empty, SimpleQueue

import torch
from torch import Tensor

LIMIT = 256 << 20
ALIGN = 64  # bytes: every piece of a block starts on a cache line

_lock = threading.Lock()
_free: dict[int, list[Tensor]] = {}  # uint8 CPU blocks no tensor uses, by size
_order: deque[int] = deque()  # the sizes of the free blocks, oldest first
_free_total = 0
# Blocks come back from weakref callbacks, which the garbage collector may run on a thread
# that holds ``_lock`` already: they only queue (no lock), and the queue is drained under it.
_returned: SimpleQueue[Tensor] = SimpleQueue()


def empty(*layouts: tuple[tuple[int, ...], torch.dtype]) -> tuple[Tensor, ...]:
    """Empty contiguous CPU tensors of the given (shape, dtype), cut from one pooled block
    that returns to the pool when all of them are gone (each starts ``ALIGN``-aligned).

    >>> x, mask = empty(((2, 3), torch.float32), ((3,), torch.bool))
    >>> x.shape, mask.dtype
    (torch.Size([2, 3]), torch.bool)
    """
    offsets, end = [], 0
    for shape, dtype in layouts:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + math.prod(shape) * dtype.itemsize
    block = _take(end)
    pieces = tuple(
        block[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for start, (shape, dtype) in zip(offsets, layouts, strict=True)
    )
    # every piece carries the same token: it dies, and the block comes back, with the last
    token = _Token()
    for piece in pieces:
        piece._attnscope_pool_token = token  # type: ignore[attr-defined]
    weakref.finalize(token, _returned.put, block).atexit = False
    return pieces


def copies(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Detached copies of ``tensors``, each in its original's memory layout (the order of its
    strides; a broadcast dimension stays a broadcast of one copy): on the CPU cut from one
    pooled block (see ``empty``), elsewhere plain clones.

    >>> x = torch.arange(6.0).view(2, 3)
    >>> copy, row = copies(x.t(), x[0].expand(4, 3))
    >>> torch.equal(copy, x.t()), copy.stride(), row.stride(), copy.data_ptr() != x.data_ptr()
    (True, (1, 3), (0, 1), True)
    """
    if not tensors:
        return ()
    if any(t.device.type != "cpu" for t in tensors):
        return tuple(t.detach().clone() for t in tensors)
    layouts = [_dense_layout(t) for t in tensors]
    pieces = empty(*[(tuple(dense.shape), dense.dtype) for dense, _ in layouts])
    owned = []
    for piece, tensor, (dense, order) in zip(pieces, tensors, layouts, strict=True):
        piece.copy_(dense.detach())
        view = piece.permute([order.index(dim) for dim in range(len(order))]).expand(tensor.shape)
        # the view, not the piece, is what the caller keeps: it carries the block's token
        view._attnscope_pool_token = piece._attnscope_pool_token  # type: ignore[attr-defined]
        owned.append(view)
    return tuple(owned)


def _dense_layout(t: Tensor) -> tuple[Tensor, list[int]]:
    """``t`` without its broadcast (stride 0) dimensions, permuted so that its strides fall
    (contiguous when ``t`` is dense in some order), and that permutation."""
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None)
        for size, stride in zip(t.shape, t.stride(), strict=True)
    )
    base = t[index]
    strides = base.stride()
    order = sorted(range(base.dim()), key=lambda dim: -strides[dim])
    return base.permute(order), order


class _Token:
    """Lives as long as the longest-lived tensor cut from one block."""


def _drain() -> None:
    """File the returned blocks, the oldest free ones making room (under ``_lock``)."""
    global _free_total
    while True:
        try:
            block = _returned.get_nowait()
        except Empty:
            return
        size = block.numel()
        if size > LIMIT:
            continue
        while _free_total + size > LIMIT and _order:
            oldest = _order.popleft()
            blocks = _free.get(oldest)
            if blocks:
                blocks.pop(0)
                _free_total -= oldest
            if not blocks:
                _free.pop(oldest, None)
        _free.setdefault(size, []).append(block)
        _order.append(size)
        _free_total += size


def _take(size: int) -> Tensor:
    """The smallest free block of at least ``size`` bytes (and not a quarter more), or a new
    one."""
    global _free_total
    with _lock:
        _drain()
        # empty lists and stale order entries may be left by a KeyboardInterrupt between two
        # of these steps: they are skipped, never trusted
        fitting = [n for n, blocks in _free.items() if blocks and size <= n <= size + size // 4]
        if fitting:
            best = min(fitting)
            blocks = _free[best]
            block = blocks.pop()
            _free_total -= best
            if not blocks:
                del _free[best]
            if best in _order:
                _order.remove(best)
            return block
    # a normal tensor even under inference_mode: a block made there would be an inference
    # tensor, which no capture outside inference_mode could write into when it is reused
    with torch.inference_mode(False):
        return torch.empty(max(size, 1), dtype=torch.uint8, device="cpu")


def free_bytes() -> int:
    """Bytes of the blocks the pool holds for the next capture."""
    with _lock:
        _drain()
        return _free_total


def release() -> None:
    """Give every free block back to the allocator."""
    global _free_total
    with _lock:
        _drain()
        _free.clear()
        _order.clear()
        _free_total = 0
