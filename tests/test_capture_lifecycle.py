"""Nothing stays behind: hooks, forward attributes and references, whatever the exit."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import attnscope
from attnscope import intercept
from models import encoder, padding, sequence, transformer


def assert_pristine(model: nn.Module) -> None:
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert not any(intercept.is_observed(m) for m in model.modules())
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_forward_pre_hooks


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_everything_removed_on_exception(error: type[BaseException]) -> None:
    model = transformer().eval()
    with pytest.raises(error), attnscope.capture(model):
        model(sequence(1, 4), sequence(1, 3))
        raise error("stop")
    assert_pristine(model)


def test_everything_removed_on_normal_exit_and_output_after_is_unchanged() -> None:
    model = encoder().eval()
    x = sequence(2, 5)
    with torch.no_grad():
        before = model(x)
        with attnscope.capture(model):
            model(x)
        after = model(x)
    assert_pristine(model)
    assert torch.equal(before, after)


def test_error_inside_forward_removes_everything() -> None:
    model = encoder().eval()
    with pytest.raises((RuntimeError, AssertionError)), attnscope.capture(model):
        model(torch.randn(2, 5, 7))  # wrong embedding size: PyTorch raises inside the layers
    assert_pristine(model)


def test_nested_captures_of_one_model_and_out_of_order_exit() -> None:
    model = encoder().eval()
    x = sequence(2, 5)
    with torch.no_grad(), attnscope.capture(model) as outer:
        with attnscope.capture(model, include="layers.1.*") as inner:
            model(x)
        model(x)
    assert [len(outer.calls(n)) for n in outer.names] == [2, 2]
    assert inner.names == ["layers.1.self_attn"]
    assert torch.equal(inner["layers.1.self_attn"], outer.calls("layers.1.self_attn")[0])
    assert_pristine(model)

    first, second = attnscope.capture(model), attnscope.capture(model)
    a = first.__enter__()
    b = second.__enter__()
    first.__exit__(None, None, None)  # the first one ends first
    with torch.no_grad():
        model(x)
    second.__exit__(None, None, None)
    assert len(a) == 0 and len(b) == 2
    assert_pristine(model)


def test_two_models_at_once() -> None:
    one, two = encoder(seed=0).eval(), encoder(seed=1).eval()
    x = sequence(2, 5)
    with torch.no_grad(), attnscope.capture(one) as a, attnscope.capture(two) as b:
        one(x, src_key_padding_mask=padding([5, 3], 5))
        two(x)
    assert a.names == b.names == ["layers.0.self_attn", "layers.1.self_attn"]
    assert not torch.allclose(a["layers.0.self_attn"], b["layers.0.self_attn"])
    assert_pristine(one)
    assert_pristine(two)


def test_maps_hold_no_reference_to_the_model() -> None:
    model = transformer().eval()
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(sequence(1, 4), sequence(1, 3))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert len(attn.names) == 6


def test_user_instance_forward_is_restored() -> None:
    mha = nn.MultiheadAttention(8, 2)
    custom = mha.forward
    mha.forward = custom  # an instance attribute the user (or another tool) set
    with attnscope.capture(mha) as attn:
        mha(torch.randn(3, 1, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8))
    assert mha.__dict__["forward"] is custom
    assert attn[""].shape == (1, 2, 3, 3)


class _SdpaModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_sdpa_wrapper_restored_out_of_order_by_someone_else_keeps_working() -> None:
    """A spy on top of the capture's sdpa wrapper, taken off after the capture ended."""
    kernel = nn.functional.scaled_dot_product_attention
    torch.manual_seed(0)
    model, x = _SdpaModule(), torch.randn(1, 5, 8)
    expected = model(x)
    patch = pytest.MonkeyPatch()
    try:
        with attnscope.capture(model) as attn:
            ours = nn.functional.scaled_dot_product_attention
            patch.setattr(nn.functional, "scaled_dot_product_attention", lambda *a: ours(*a))
            assert torch.equal(model(x), expected)
        patch.undo()  # the capture's wrapper is back, with no capture active
        assert torch.equal(model(x), expected)
        patch.setattr(nn.functional, "scaled_dot_product_attention", lambda *a: ours(*a))
        with attnscope.capture(model) as again:  # ours, over the lambda, over ours
            assert torch.equal(model(x), expected)
        assert torch.equal(again[again.names[0]], attn[attn.names[0]])
    finally:
        patch.undo()
        nn.functional.scaled_dot_product_attention = kernel
