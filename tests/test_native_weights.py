"""Weights taken from PyTorch's native CPU attention kernel (attnscope.adapters.torch_native).

Two facts about PyTorch that the mechanism rests on are checked first, against PyTorch
itself: if one fails, the kernel changed and the mechanism must follow. Then the captured
weights are checked against PyTorch's slow path, with recomputation switched off so the
kernel's weights are the only ones that can appear.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import attnscope
from attnscope.adapters import torch_native, torch_nn
from models import padding
from reference import assert_weights_match, slow_path_weights


@st.composite
def layer_case(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([2, 4, 8]))  # the fused path takes even head counts only
    return {
        "embed": heads * draw(st.sampled_from([4, 8, 16])),
        "heads": heads,
        "ffn": draw(st.sampled_from([8, 32])),
        "batch": draw(st.integers(1, 3)),
        "length": draw(st.integers(1, 33)),
        "norm_first": draw(st.booleans()),
        "activation": draw(st.sampled_from(["relu", "gelu"])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        "mask": draw(st.sampled_from(["none", "causal", "bool", "padding", "both", "nested"])),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(case: dict[str, Any]) -> tuple[nn.TransformerEncoder, torch.Tensor, dict[str, Any]]:
    torch.manual_seed(case["seed"])
    layer = nn.TransformerEncoderLayer(
        case["embed"],
        case["heads"],
        case["ffn"],
        dropout=0.0,
        activation=case["activation"],
        batch_first=True,
        norm_first=case["norm_first"],
    )
    nested = case["mask"] == "nested"
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval().to(case["dtype"])
    batch, length = case["batch"], case["length"]
    x = torch.randn(batch, length, case["embed"], dtype=case["dtype"])
    lengths = torch.randint(1, length + 1, (batch,)).tolist()
    lengths[0] = length
    kwargs: dict[str, Any] = {}
    if case["mask"] in ("padding", "both", "nested"):
        kwargs["src_key_padding_mask"] = padding(lengths, length)
    if case["mask"] == "causal":
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(length, dtype=case["dtype"])
    if case["mask"] in ("bool", "both"):
        # every query keeps itself: a fully masked row would turn the next layer's input NaN
        kwargs["mask"] = (torch.rand(length, length) < 0.3) & ~torch.eye(length, dtype=torch.bool)
    return model, x, kwargs


@settings(max_examples=60, deadline=None)
@given(case=layer_case(), keeping_queries=st.booleans())
def test_the_composition_is_the_fused_layer_bit_for_bit(
    case: dict[str, Any], keeping_queries: bool
) -> None:
    """PyTorch fact 1: transformer.cpp's ops, run one by one, give the fused layer's bits;
    so do they with attention.cpp's ops run one by one in place of the native attention."""
    model, x, kwargs = build(case)
    fused = torch._transformer_encoder_layer_fwd
    checked = []

    def compare(*args: Any) -> torch.Tensor:
        out = fused(*args)
        if keeping_queries and not args[0].is_nested:
            attention = torch_native._attention_keeping_queries
            mine, _ = torch_native.encoder_layer_forward(*args, attention=attention)
        else:
            mine, _ = torch_native.encoder_layer_forward(*args)
        if out.is_nested:
            assert mine.is_nested
            pairs = list(zip(out.unbind(), mine.unbind(), strict=True))
        else:
            pairs = [(out, mine)]
        for a, b in pairs:  # exactly equal; a fully masked row is NaN in both
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        checked.append(True)
        return out

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(torch, "_transformer_encoder_layer_fwd", compare)
        model(x, **kwargs)
    assert len(checked) == 2


@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
def test_native_attention_output_does_not_depend_on_need_weights(mask: str) -> None:
    """PyTorch fact 2: on the CPU, asking the native kernel for weights changes no bit."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 40, 32)
    merged, mask_type = None, None
    if mask == "padding":
        merged, mask_type = padding([40, 17, 3], 40), 1
    elif mask == "causal":
        merged, mask_type = nn.Transformer.generate_square_subsequent_mask(40) != 0, 0
    args = (x, x, x, 32, 4, mha.in_proj_weight, mha.in_proj_bias)
    args += (mha.out_proj.weight, mha.out_proj.bias, merged)
    with torch.no_grad():
        plain, none = torch._native_multi_head_attention(*args, False, True, mask_type)
        asked, weights = torch._native_multi_head_attention(*args, True, False, mask_type)
    assert none is None and tuple(weights.shape) == (3, 4, 40, 40)
    assert torch.equal(plain, asked)


@settings(max_examples=80, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 40),
    heads=st.sampled_from([1, 2, 4, 6]),
    head_dim=st.sampled_from([1, 3, 8, 16, 33]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    mask_type=st.sampled_from([None, 0, 1, 2]),
    layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=st.integers(0, 2**16),
)
@example(1, 2, 2, 4, torch.float32, None, "transposed", 0)  # strides where matmul can fold
@example(2, 1, 2, 4, torch.float32, 1, "transposed", 0)
def test_native_attention_is_the_kernel_op_for_op(
    batch: int,
    length: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    mask_type: int | None,
    layout: str,
    seed: int,
) -> None:
    """PyTorch fact 3: attention.cpp's ops, run one by one, give the native kernel's bits
    (for strided queries too, and a projection weight that requires grad, as a module's
    does); and the queries and keys they keep give its weights."""
    generator = torch.Generator().manual_seed(seed)
    embed = heads * head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    if layout == "transposed":
        x = rand(length, batch, embed).transpose(0, 1)
    elif layout == "sliced":
        x = rand(batch, length + 3, embed)[:, 1 : length + 1]
    else:
        x = rand(batch, length, embed)
    qkv_weight = (rand(3 * embed, embed) / embed**0.5).requires_grad_()
    params = (embed, heads, qkv_weight, rand(3 * embed))
    params += (rand(embed, embed) / embed**0.5, rand(embed))
    shapes = {0: (length, length), 1: (batch, length), 2: (batch, heads, length, length)}
    mask = None if mask_type is None else torch.rand(*shapes[mask_type], generator=generator) < 0.3
    with torch.no_grad():
        out, weights = torch._native_multi_head_attention(
            x, x, x, *params, mask, True, False, mask_type
        )
        mine, q, k = torch_native.native_attention(x, *params, mask, mask_type)
    torch.testing.assert_close(mine, out, rtol=0, atol=0, equal_nan=True)
    assert q.shape == k.shape == (batch, heads, length, head_dim)
    scores = (q.double() @ k.double().transpose(-1, -2)).float()
    if mask is not None:
        hidden = mask if mask_type != 1 else mask[:, None, None, :]
        scores = scores.masked_fill(hidden, float("-inf"))
    atol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    expected = scores.softmax(-1).nan_to_num(0.0)
    torch.testing.assert_close(weights.float().nan_to_num(0.0), expected, atol=atol, rtol=0)


def _refuse(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("weights were recomputed, not taken from the kernel")


@pytest.fixture
def no_recompute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any recomputation fail: only the kernel's own weights can reach the maps."""
    monkeypatch.setattr(torch_nn, "softmax_weights", _refuse)


@settings(max_examples=60, deadline=None)
@given(case=layer_case())
def test_eval_no_grad_capture_takes_the_kernel_weights(case: dict[str, Any]) -> None:
    model, x, kwargs = build(case)
    with torch.no_grad():
        expected_out = model(x, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch_nn, "softmax_weights", _refuse)
        with torch.no_grad(), attnscope.capture(model) as attn:
            out = model(x, **kwargs)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0, equal_nan=True)
    reference = slow_path_weights(model, lambda m: m(x, **kwargs))
    valid = ~kwargs["src_key_padding_mask"] if "src_key_padding_mask" in kwargs else None
    atol = 1e-2 if case["dtype"] == torch.bfloat16 else 1e-5
    for name in attn.names:
        assert_weights_match(attn[name], reference[name][0], valid, atol=atol)


def test_multihead_attention_fast_path_gives_its_weights(no_recompute: None) -> None:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 16)
    pad = padding([9, 5], 9)
    with torch.no_grad():
        expected = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        with attnscope.capture(mha) as attn:
            out, returned = mha(x, x, x, key_padding_mask=pad, need_weights=False)
    assert returned is None and torch.equal(out, expected)
    reference = slow_path_weights(mha, lambda m: m(x, x, x, key_padding_mask=pad))
    assert_weights_match(attn[""], reference[""][0], ~pad)


@settings(max_examples=60, deadline=None)
@given(case=layer_case(), rows=st.sampled_from([None, [0], [-1, 0]]))
def test_lazy_eval_no_grad_capture_holds_the_kernels_queries_and_keys(
    case: dict[str, Any], rows: list[int] | None
) -> None:
    """Lazy, the fused path keeps the scaled queries and keys its kernel computed (nothing of
    the module, no recomputed projection) where they are smaller than the input and a copy of
    the projection, and gives the eager capture's weights either way."""
    model, x, kwargs = build(case)
    embed = case["embed"]
    nested = case["mask"] == "nested"
    keeps_queries = not nested and x.numel() <= 2 * embed * (embed + 1)
    with torch.no_grad():
        expected_out = model(x, **kwargs)
        with attnscope.capture(model, rows=rows) as eager:
            model(x, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        if keeps_queries:
            patch.setattr(torch_nn._Projection, "of", _refuse)
        with torch.no_grad(), attnscope.capture(model, lazy=True, rows=rows) as lazy:
            out = model(x, **kwargs)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0, equal_nan=True)
    # each against PyTorch's slow path, within a tolerance: lazy and eager read different
    # kernels (a softmax over kept q/k, the native kernel's own), whose bits differ by CPU
    reference = slow_path_weights(model, lambda m: m(x, **kwargs))
    with torch.no_grad():  # an optimizer step after the capture changes nothing held
        for parameter in model.parameters():
            parameter.mul_(2.0)
    valid = ~kwargs["src_key_padding_mask"] if "src_key_padding_mask" in kwargs else None
    atol = 1e-2 if case["dtype"] == torch.bfloat16 else 1e-5
    for name in eager.names:
        expected = reference[name][0]
        valid_rows = valid
        if rows is not None:
            picked = torch.tensor([r % x.size(1) for r in rows])
            expected = expected[:, :, picked]
            valid_rows = None if valid is None else valid[:, picked]
        assert_weights_match(lazy[name], expected, valid_rows, atol=atol)
        assert_weights_match(eager[name], expected, valid_rows, atol=atol)
    if not nested:  # held per layer: q and k, or the input and q/k projections; the masks
        size = x.element_size()
        held = 2 * min(2 * x.numel(), x.numel() + 2 * embed * (embed + 1)) * size
        masks = sum(2 * t.numel() * t.element_size() for t in kwargs.values())
        assert held <= lazy.nbytes <= held + masks


def test_kernels_are_restored_after_nested_captures_and_errors() -> None:
    originals = (torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False
    ).eval()
    x = torch.randn(1, 5, 16)
    with (
        pytest.raises(RuntimeError, match="boom"),
        torch.no_grad(),
        attnscope.capture(model) as outer,
    ):
        with attnscope.capture(model) as inner:
            model(x)
        assert torch._transformer_encoder_layer_fwd is not originals[1]
        raise RuntimeError("boom")
    assert (torch._native_multi_head_attention, torch._transformer_encoder_layer_fwd) == originals
    assert torch.equal(outer[outer.names[0]], inner[inner.names[0]])


def test_someone_else_patching_the_kernel_keeps_working() -> None:
    """A spy put on top of the capture's wrapper and taken off out of order: nothing breaks,
    no call goes round in circles, and a function installed before a capture is never
    bypassed."""
    kernel = torch._transformer_encoder_layer_fwd
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False
    ).eval()
    x = torch.randn(1, 5, 16)
    seen = []
    patch = pytest.MonkeyPatch()
    try:
        with torch.no_grad():
            expected = model(x)
            with attnscope.capture(model) as attn:
                ours = torch._transformer_encoder_layer_fwd

                def spy(*args: Any) -> torch.Tensor:
                    seen.append(1)
                    return ours(*args)

                patch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
                assert torch.equal(model(x), expected)
            # the capture ended under the spy: the spy stays, and still works
            assert torch._transformer_encoder_layer_fwd is spy
            assert torch.equal(model(x), expected)
            patch.undo()  # puts the capture's wrapper back, after the capture ended
            counting = []

            def counter(*args: Any) -> torch.Tensor:
                counting.append(1)
                return ours(*args)

            patch.setattr(torch, "_transformer_encoder_layer_fwd", counter)
            with attnscope.capture(model) as again:  # wraps the counter, which wraps ours
                assert torch.equal(model(x), expected)
            assert torch.equal(model(x), expected)
        assert len(seen) == 2 and len(attn.calls(attn.names[0])) == 1
        # the second capture found the counter installed first: it called it and recomputed
        torch.testing.assert_close(again[again.names[0]], attn[attn.names[0]], atol=1e-6, rtol=0)
        assert len(counting) >= 2  # a stale wrapper may route one call through it twice
    finally:
        patch.undo()
        torch._transformer_encoder_layer_fwd = kernel


def test_lazy_fast_path_keeps_output_bits_for_strided_input() -> None:
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    inputs = [torch.randn(length, batch, 32).transpose(0, 1) for length, batch in [(5, 2), (2, 1)]]
    inputs += [torch.randn(1, 2, 32).transpose(0, 1), torch.randn(2, 9, 32)[:, 2:7]]
    for x in inputs:
        with torch.no_grad():
            expected = mha(x, x, x, need_weights=False)[0], layer(x)
            with attnscope.capture(mha, lazy=True) as attn, attnscope.capture(layer, lazy=True):
                got = mha(x, x, x, need_weights=False)[0], layer(x)
            with attnscope.capture(mha) as eager:
                mha(x, x, x, need_weights=False)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        torch.testing.assert_close(attn[""], eager[""], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("batch", [2, 8])  # lazy: the kernel's q/k up to 2(D+1) = 34 rows
def test_is_causal_hint_with_another_mask_reports_the_mask_the_fast_path_used(
    lazy: bool, batch: int
) -> None:
    """The fast path applies ``attn_mask`` as given and ignores ``is_causal``."""
    from test_capture_sweep import output_from_weights

    torch.manual_seed(7)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(batch, 6, 16)
    mask = torch.rand(6, 6) < 0.3  # not causal
    mask.fill_diagonal_(False)
    with torch.no_grad(), attnscope.capture(mha, lazy=lazy) as attn:
        out = mha(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)[0]
    assert attn.kind("") == "self"
    assert float(attn[""][..., mask].abs().max()) == 0.0
    rebuilt = output_from_weights(mha, attn[""], x, batch_first=True)
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lazy", [False, True])
def test_is_causal_hint_without_mask_reports_what_the_fast_path_computed(lazy: bool) -> None:
    """PyTorch's fast path ignores ``is_causal`` when no mask is given (the slow path refuses
    such a call): the weights that made the output attend to every key."""
    from test_capture_sweep import output_from_weights

    torch.manual_seed(5)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), attnscope.capture(mha, lazy=lazy) as attn:
        out = mha(x, x, x, need_weights=False, is_causal=True)[0]
    assert attn.kind("") == "self"
    assert float(attn[""].triu(1).sum()) > 0.5  # keys after the query are attended to
    rebuilt = output_from_weights(mha, attn[""], x, batch_first=True)
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=0)


def test_a_function_installed_before_the_capture_is_called_not_bypassed() -> None:
    """A profiler or custom kernel on the fused entry point keeps running under a capture
    (attnscope then recomputes the weights instead of standing in for the kernel)."""
    kernel = torch._transformer_encoder_layer_fwd
    calls = []

    def custom(*args: Any) -> torch.Tensor:
        calls.append(1)
        return kernel(*args) * 2.0

    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2, enable_nested_tensor=False
    ).eval()
    x = torch.randn(2, 7, 16)
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(torch, "_transformer_encoder_layer_fwd", custom)
        expected = model(x)
        with attnscope.capture(model) as attn:
            out = model(x)
    assert torch.equal(out, expected) and len(calls) == 4
    assert torch._transformer_encoder_layer_fwd is kernel
    reference = slow_path_weights(model, lambda m: m(x))
    assert_weights_match(attn["layers.0.self_attn"], reference["layers.0.self_attn"][0])


@settings(max_examples=30, deadline=None)
@given(case=layer_case(), lazy=st.booleans())
def test_recompute_beside_the_untouched_fused_kernel(case: dict[str, Any], lazy: bool) -> None:
    """The other route (off the CPU, or behind someone else's function on the fused entry
    point): the fused kernel runs as it is and the weights are recomputed from the layer's
    input, nested and padded input included; the same weights as the slow path."""
    model, x, kwargs = build(case)
    kernel = torch._transformer_encoder_layer_fwd
    ran = []

    def passthrough(*args: Any) -> torch.Tensor:
        ran.append(1)
        return kernel(*args)

    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        expected_out = model(x, **kwargs)
        patch.setattr(torch, "_transformer_encoder_layer_fwd", passthrough)
        with attnscope.capture(model, lazy=lazy) as attn:
            out = model(x, **kwargs)
    assert len(ran) == 2  # both layers ran the fused kernel itself
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0, equal_nan=True)
    reference = slow_path_weights(model, lambda m: m(x, **kwargs))
    valid = ~kwargs["src_key_padding_mask"] if "src_key_padding_mask" in kwargs else None
    atol = 1e-2 if case["dtype"] == torch.bfloat16 else 1e-5
    for name in attn.names:
        assert_weights_match(attn[name], reference[name][0], valid, atol=atol)
