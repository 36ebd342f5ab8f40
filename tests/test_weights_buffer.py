"""The buffers captured weights are computed into: their own mapping for large CPU ones."""

from __future__ import annotations

import gc
import io

import pytest
import torch

from attnscope.recompute import softmax_weights, weights_buffer

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_buffer_is_an_ordinary_contiguous_tensor(dtype: torch.dtype) -> None:
    shape = (2, 3, 512, 700)  # over 4 MiB in every dtype here: takes the mapping path
    buffer = weights_buffer(shape, dtype, CPU)
    assert buffer.shape == shape and buffer.dtype == dtype and buffer.is_contiguous()
    assert buffer.data_ptr() % (2 << 20) == 0  # starts on a huge-page boundary
    buffer.fill_(0.5)
    view = buffer[1, 2]
    del buffer
    gc.collect()
    assert float(view.float().sum()) == 0.5 * 512 * 700  # the view keeps the mapping alive
    saved = io.BytesIO()
    torch.save(view, saved)
    saved.seek(0)
    assert torch.equal(torch.load(saved), view)


def test_small_buffer_comes_from_torch_empty() -> None:
    assert weights_buffer((3, 4), torch.float32, CPU).shape == (3, 4)


def test_weights_computed_into_the_buffer_match_softmax() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 400, 16, generator=generator)
    k = torch.randn(2, 4, 400, 16, generator=generator)
    expected = torch.softmax((q * 0.25) @ k.transpose(-1, -2), dim=-1)
    got = softmax_weights(q, k, 0.25, None)  # 5 MB: a mapped buffer
    assert got.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
