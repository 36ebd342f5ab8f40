"""Warm memory for the tensors a capture keeps: the weights a recompute writes, the queries,
keys and masks a lazy capture copies.

Design note
-----------
A capture keeps what it computes while the model runs on. Memory that large comes from the
C allocator as fresh pages (glibc maps every request above its threshold anew), and is given
back to the system when the tensor dies; the next capture faults each page in and zeroes it
again. On two CPU cores that costs more than computing the weights: BERT-base at 512 tokens,
batch 1, writing q·kᵀ into fresh memory took 7.1 ms a layer, of which the matmul was 1.2-1.8
ms. A lazy capture's copies did the same on a smaller scale (3 MB into fresh pages 1.0 ms,
into pages already touched 0.17 ms), and holding the model's own activations instead pushed
its temporaries onto fresh pages too.

So a capture cuts what it keeps from blocks of this pool (requests of ``SMALL`` bytes or more:
below that the C allocator serves them from its heap, warm already, and the pool's own
bookkeeping was most of the cost of a decoding step's capture): each block is an anonymous memory
mapping (below ``MAPPED`` bytes a ``bytearray`` on the heap); a request gets a tensor over a
fresh ``memoryview`` of one (``torch.frombuffer``), and the tensor's storage is then the only
holder of that view. When the last tensor sharing that storage dies, whichever view, slice or
``detach()`` it was, the storage releases the view, a ``weakref.finalize`` on it fires and
the block comes back. A loop of captures, one per batch, then writes into warm pages. Free
blocks are kept up to ``LIMIT`` bytes, the oldest making room for newer ones; ``release()``
hands them all back to the system. Nothing global changes: this is memory the pool owns, and
only tensors attnscope creates live in it.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections import deque
from queue import Empty, SimpleQueue

import torch
from torch import Tensor

LIMIT = 1 << 30
"""Bytes of free blocks kept for the next capture: a BERT-base capture at 512 tokens keeps
151 MB of weights at batch 1 and 1.2 GB at batch 8."""
ALIGN = 64  # bytes: every piece of a block starts on a cache line
MAPPED = 1 << 20  # bytes: blocks from this size on are memory mappings of their own
SMALL = 1 << 16
"""Bytes below which ``empty`` and ``copies`` give plain tensors: glibc serves requests under
its mmap threshold (128 KiB at first) from the heap, warm, and the pool's bookkeeping (a lock,
a ``memoryview``, a ``weakref.finalize``) cost about 30 us a call; one step of GPT-2 decoding
captures 12 maps of 12 x 1 x L floats (full capture of 128 new tokens: 1.19x the plain
``generate`` pooled, 1.14x not)."""

Block = bytearray | mmap.mmap

_lock = threading.Lock()
_free: dict[int, list[Block]] = {}  # blocks no tensor uses, by size
_order: deque[int] = deque()  # the sizes of the free blocks, oldest first
_free_total = 0
_lent: dict[int, int] = {}  # address -> size of the blocks tensors use now
# Blocks come back from weakref callbacks, which the garbage collector may run on a thread
# that holds ``_lock`` already: they only queue (no lock), and the queue is drained under it.
_returned: SimpleQueue[tuple[Block, int]] = SimpleQueue()


def empty(*layouts: tuple[tuple[int, ...], torch.dtype]) -> tuple[Tensor, ...]:
    """Empty contiguous CPU tensors of the given (shape, dtype), cut from one pooled block
    that returns to the pool when every tensor sharing its memory is gone (each piece starts
    ``ALIGN``-aligned); plain ``torch.empty`` tensors when they take under ``SMALL`` bytes.

    >>> x, mask = empty(((256, 64), torch.float32), ((3,), torch.bool))
    >>> x.shape, mask.dtype, owns(x), owns(torch.ones(1))
    (torch.Size([256, 64]), torch.bool, True, False)
    >>> owns(empty(((2, 3), torch.float32))[0])  # small: the heap's
    False
    """
    offsets, end = [], 0
    for shape, dtype in layouts:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + math.prod(shape) * dtype.itemsize
    if end < SMALL:
        return tuple(torch.empty(shape, dtype=dtype, device="cpu") for shape, dtype in layouts)
    block = _take(max(end, 1))
    view = memoryview(block)
    flat = torch.frombuffer(view, dtype=torch.uint8, count=max(end, 1))
    address = flat.data_ptr()
    # the storage holds the view now, and only it: the view dies with the last tensor
    weakref.finalize(view, _returned.put, (block, address)).atexit = False
    del view
    with _lock:
        _lent[address] = len(block)
    return tuple(
        flat[start : start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for start, (shape, dtype) in zip(offsets, layouts, strict=True)
    )


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
        owned.append(
            piece.permute([order.index(dim) for dim in range(len(order))]).expand(tensor.shape)
        )
    return tuple(owned)


def owns(tensor: Tensor) -> bool:
    """Whether ``tensor`` lives in a block of this pool (a copy made already)."""
    if tensor.device.type != "cpu":
        return False
    with _lock:
        _drain()
        return tensor.untyped_storage().data_ptr() in _lent


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


def _drain() -> None:
    """File the returned blocks, the oldest free ones making room (under ``_lock``)."""
    global _free_total
    while True:
        try:
            block, address = _returned.get_nowait()
        except Empty:
            return
        _lent.pop(address, None)
        size = len(block)
        if size > LIMIT:
            _close(block)
            continue
        while _free_total + size > LIMIT and _order:
            oldest = _order.popleft()
            blocks = _free.get(oldest)
            if blocks:
                _close(blocks.pop(0))
                _free_total -= oldest
            if not blocks:
                _free.pop(oldest, None)
        _free.setdefault(size, []).append(block)
        _order.append(size)
        _free_total += size


def _take(size: int) -> Block:
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
    if size < MAPPED:
        return bytearray(size)
    if hasattr(mmap, "MAP_ANONYMOUS"):  # private pages: nothing shared, nothing on disk
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, size)


def _close(block: Block) -> None:
    if isinstance(block, mmap.mmap):
        block.close()  # unmapped now, not when the garbage collector gets to it


def free_bytes() -> int:
    """Bytes of the blocks the pool holds for the next capture."""
    with _lock:
        _drain()
        return _free_total


def release() -> None:
    """Give every free block back to the system."""
    global _free_total
    with _lock:
        _drain()
        for blocks in _free.values():
            for block in blocks:
                _close(block)
        _free.clear()
        _order.clear()
        _free_total = 0
