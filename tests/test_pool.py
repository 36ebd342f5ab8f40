"""The pool of warm blocks a lazy capture keeps its queries and keys in (attnscope.pool)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import attnscope
from attnscope import pool


@pytest.fixture(autouse=True)
def empty_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts from an empty pool: blocks still held by an earlier test's leftovers
    (a failed test's traceback keeps its maps alive) come back and are freed first. Every
    request is pooled (``SMALL`` = 0), so that blocks of a few bytes show the mechanism."""
    monkeypatch.setattr(pool, "SMALL", 0)
    gc.collect()
    pool.release()
    yield
    gc.collect()
    pool.release()


def test_a_block_comes_back_only_when_every_part_is_gone() -> None:
    q, k = pool.empty(*[((4, 8), torch.float32)] * 2)
    assert q.shape == k.shape == (4, 8) and q.dtype == torch.float32
    assert q.data_ptr() + q.nbytes == k.data_ptr()  # one block, cut in two
    address = q.data_ptr()
    del q
    gc.collect()
    assert pool.free_bytes() == 0  # k still uses the block
    del k
    gc.collect()
    assert pool.free_bytes() == 2 * 4 * 8 * 4
    again, _ = pool.empty(*[((4, 8), torch.float32)] * 2)
    assert again.data_ptr() == address  # the same warm block
    assert pool.free_bytes() == 0


def test_copies_keep_layout_values_and_their_block() -> None:
    x = torch.randn(3, 5, 4)
    mask = torch.rand(5, 5) < 0.5
    wide = mask.expand(6, 5, 5)  # one mask for every row
    transposed, broadcast, plain = pool.copies(x.transpose(0, 1), wide, x[1])
    assert torch.equal(transposed, x.transpose(0, 1)) and transposed.stride() == (4, 20, 1)
    assert torch.equal(broadcast, wide) and broadcast.stride() == (0, 5, 1)
    assert torch.equal(plain, x[1]) and plain.is_contiguous()
    x.zero_()
    mask.fill_(False)
    assert transposed.abs().sum() > 0 and broadcast.sum() > 0  # copies, not views of the input
    # every copy is a view of the block that the caller holds: while one lives, the block is
    # in use and never handed out again
    del broadcast, plain
    gc.collect()
    assert pool.free_bytes() == 0
    before = transposed.clone()
    pool.copies(torch.ones_like(x).transpose(0, 1), wide, torch.ones(5, 4))
    assert torch.equal(transposed, before)
    del transposed
    gc.collect()
    assert pool.free_bytes() > 0


def test_blocks_in_use_are_never_handed_out_twice() -> None:
    first = pool.empty(*[((16,), torch.float64)] * 2)
    second = pool.empty(*[((16,), torch.float64)] * 2)
    starts = {t.data_ptr() for t in (*first, *second)}
    assert len(starts) == 4


def test_a_much_larger_block_is_not_taken_for_a_small_request() -> None:
    big = pool.empty(((1024,), torch.float32))
    del big
    gc.collect()
    assert pool.free_bytes() == 4096
    small = pool.empty(((800,), torch.float32))  # a quarter more than that at most
    assert small[0].numel() == 800 and pool.free_bytes() == 4096
    close = pool.empty(((1000,), torch.float32))
    assert close[0].numel() == 1000 and pool.free_bytes() == 0


def test_the_pool_keeps_at_most_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "LIMIT", 100)
    parts = [pool.empty(((20,), torch.float32)) for _ in range(3)]  # 80 bytes each
    del parts
    gc.collect()
    assert pool.free_bytes() == 80
    pool.release()
    assert pool.free_bytes() == 0


def test_the_oldest_free_blocks_make_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "LIMIT", 100)
    old = pool.empty(((15,), torch.float32))  # 60 bytes
    new = pool.empty(((10,), torch.float32))  # 40 bytes
    young = pool.empty(((12,), torch.float32))  # 48 bytes
    del old
    gc.collect()
    del new
    gc.collect()
    assert pool.free_bytes() == 100
    del young
    gc.collect()
    assert pool.free_bytes() == 88  # the 60-byte block, the oldest, made room


def test_a_block_returned_while_the_pool_is_locked_does_not_deadlock() -> None:
    """The garbage collector may finalize a block on a thread inside the pool's lock."""
    piece = pool.empty(((8,), torch.float32))
    with pool._lock:
        del piece
        gc.collect()  # the finalizer runs here, under the lock
    assert pool.free_bytes() == 32


def test_lazy_captures_in_a_loop_reuse_blocks_and_stay_exact() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    inputs = [torch.randn(1, 6, 16) for _ in range(3)]
    kept: list[attnscope.AttentionMaps] = []
    with torch.no_grad():
        for x in inputs:
            with attnscope.capture(model, lazy=True) as lazy:
                model(x)
            kept.append(lazy)  # alive: its blocks stay its own
        assert pool.free_bytes() == 0
        held = kept[0].nbytes
        del lazy
        kept.clear()
        gc.collect()
        assert pool.free_bytes() == 3 * held
        with attnscope.capture(model, lazy=True) as lazy:
            model(inputs[0])
        assert pool.free_bytes() == 2 * held  # one capture's blocks taken again
        with attnscope.capture(model) as eager:  # the native kernel's weights: not pooled
            model(inputs[0])
    for name in eager.names:  # (weights computed on reading come from the pool)
        torch.testing.assert_close(lazy[name], eager[name], atol=1e-5, rtol=0)


def test_a_block_stays_lent_while_any_view_of_its_memory_lives() -> None:
    """What a capture hands out may be sliced, detached or put in an autograd graph: the block
    comes back only when nothing refers to its memory (a token on the tensor did not: a view
    outlived it and the block was handed out again under it)."""
    (weights,) = pool.empty(((4, 8), torch.float32))
    weights.fill_(1.0)
    row, detached = weights[1], weights.detach()
    graph = (detached.requires_grad_(False) * 2).sum()  # no view: a plain result
    leaf = weights[2:].clone().requires_grad_()
    (leaf * weights[2:]).sum().backward()  # saves weights[2:] for its backward, then frees it
    del weights, detached
    gc.collect()
    assert pool.free_bytes() == 0  # ``row`` still reads it
    (other,) = pool.empty(((4, 8), torch.float32))
    other.fill_(5.0)
    assert float(row.sum()) == 8.0 and float(graph) == 64.0
    del row
    gc.collect()
    assert pool.free_bytes() == 4 * 8 * 4


def test_requests_under_small_are_plain_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "SMALL", 1 << 16)
    (small,) = pool.empty(((4, 4095), torch.float32))  # 65,520 bytes
    (large,) = pool.empty(((4, 4096), torch.float32))  # 65,536
    assert not pool.owns(small) and pool.owns(large)
    source = torch.arange(6.0).view(2, 3).t()
    (copied,) = pool.copies(source)
    assert copied.stride() == (1, 3) and torch.equal(copied, source) and not pool.owns(copied)
    copied, kept = pool.copies(source, torch.ones(16384))  # one block of both: over 64 KiB
    assert copied.stride() == (1, 3) and pool.owns(copied) and pool.owns(kept)


def test_small_requests_stay_on_the_cpu_whatever_the_default_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pool, "SMALL", 1 << 16)
    torch.set_default_device("meta")  # stands in for a GPU default
    try:
        (small,) = pool.empty(((2, 3), torch.float32))
        (copied,) = pool.copies(torch.ones(2, 3, device="cpu"))
    finally:
        torch.set_default_device(None)
    assert small.device.type == copied.device.type == "cpu"
