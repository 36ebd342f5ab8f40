"""Capture of nn.MultiheadAttention and nn.Transformer* against PyTorch's own slow path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnscope
from models import D_MODEL, HEADS, MODES, encoder, mode, padding, sequence, transformer
from reference import assert_weights_match, slow_path_weights

MASKS = ("none", "padding", "bool", "float", "causal", "padding+bool")
B, L = 3, 6


def encoder_inputs(mask: str, batch_first: bool) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    x = sequence(B, L, batch_first)
    kwargs: dict = {}
    pad = None
    generator = torch.Generator().manual_seed(7)
    if "padding" in mask:
        pad = padding([L, 4, 5], L)
        kwargs["src_key_padding_mask"] = pad
    if "bool" in mask:
        blocked = torch.rand(L, L, generator=generator) > 0.6
        kwargs["mask"] = blocked & ~torch.eye(L, dtype=torch.bool)
    if mask == "float":
        values = torch.randn(L, L, generator=generator)
        kwargs["mask"] = values.masked_fill(
            torch.rand(L, L, generator=generator) > 0.7, float("-inf")
        )
        kwargs["mask"].fill_diagonal_(0.0)
    if mask == "causal":
        kwargs["mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        kwargs["is_causal"] = True
    return x, kwargs, pad


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_weights_and_output(
    batch_first: bool, norm_first: bool, mask: str, run_mode: str
) -> None:
    model = encoder(batch_first, norm_first)
    x, kwargs, pad = encoder_inputs(mask, batch_first)
    with mode(model, run_mode):
        expected_out = model(x, **kwargs)
        with attnscope.capture(model) as attn:
            out = model(x, **kwargs)
    assert torch.equal(out, expected_out)
    fused = run_mode in ("no_grad", "inference_mode") and batch_first
    reference_kwargs = dict(kwargs)
    if fused and mask == "float":  # the fused kernel reads float masks as bool, see below
        reference_kwargs["mask"] = kwargs["mask"] != 0
    reference = slow_path_weights(model, lambda m: m(x, **reference_kwargs))
    assert attn.names == ["layers.0.self_attn", "layers.1.self_attn"]
    valid = None if pad is None else ~pad
    for name in attn.names:
        assert attn.kind(name) == ("causal" if mask == "causal" else "self")
        got = attn[name]
        assert got.shape == (B, HEADS, L, L)
        assert not got.requires_grad
        assert_weights_match(got, reference[name][0], valid)


@pytest.mark.parametrize("run_mode", ["train", "eval", "no_grad", "inference_mode", "autocast"])
def test_output_bit_identical_with_dropout(run_mode: str) -> None:
    model = transformer(dropout=0.1)
    src, tgt = sequence(2, 7), sequence(2, 5, seed=3)
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
        src_key_padding_mask=padding([7, 5], 7),
    )
    with mode(model, run_mode):
        torch.manual_seed(11)
        expected = model(src, tgt, **kwargs)
        torch.manual_seed(11)
        with attnscope.capture(model) as attn:
            out = model(src, tgt, **kwargs)
    assert torch.equal(out, expected)
    assert len(attn.names) == 6


def test_fused_kernel_reads_float_masks_as_bool() -> None:
    """PyTorch's own behaviour that attnscope mirrors: if this fails, the kernel changed."""
    model = encoder(layers=1).eval()
    x, kwargs, _ = encoder_inputs("float", True)
    with torch.no_grad():
        fused = model(x, **kwargs)
    model.train()
    assert torch.allclose(fused, model(x, mask=kwargs["mask"] != 0), atol=1e-5)
    assert not torch.allclose(fused, model(x, **kwargs), atol=1e-2)


def test_fused_fast_path_stays_in_use(count_calls) -> None:
    fused = count_calls("_transformer_encoder_layer_fwd")
    nested = count_calls("_nested_tensor_from_mask")
    model = encoder().eval()
    x, pad = sequence(B, L), padding([L, 4, 5], L)
    with torch.no_grad():
        model(x)
        model(x, src_key_padding_mask=pad)
        without = (fused[0], nested[0])
        with attnscope.capture(model) as attn:
            # counted inside the capture: the layers still call the fused entry point, which
            # the capture runs op for op itself (attnscope.adapters.torch_native)
            fused_inside = count_calls("_transformer_encoder_layer_fwd")
            model(x)
            model(x, src_key_padding_mask=pad)
    assert without == (4, 1)
    assert (fused_inside[0], nested[0]) == (4, 2)
    assert [len(attn.calls(n)) for n in attn.names] == [2, 2]


def test_nested_path_with_every_sequence_padded() -> None:
    # The nested tensor is shorter than the input here; weights keep the input's length.
    model = encoder().eval()
    x, pad = sequence(B, L), padding([3, 4, 5], L)
    with torch.no_grad(), attnscope.capture(model) as attn:
        out = model(x, src_key_padding_mask=pad)
    with torch.no_grad():
        assert torch.equal(out, model(x, src_key_padding_mask=pad))
    reference = slow_path_weights(model, lambda m: m(x, src_key_padding_mask=pad))
    for name in attn.names:
        assert_weights_match(attn[name], reference[name][0], ~pad)


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_decoder(batch_first: bool, norm_first: bool, run_mode: str) -> None:
    model = transformer(batch_first, norm_first)
    src, tgt = sequence(B, 7, batch_first), sequence(B, 5, batch_first, seed=3)
    src_pad, tgt_pad = padding([7, 6, 4], 7), padding([5, 3, 4], 5)
    kwargs = dict(
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5),
        tgt_is_causal=True,
        src_key_padding_mask=src_pad,
        tgt_key_padding_mask=tgt_pad,
        memory_key_padding_mask=src_pad,
    )
    with mode(model, run_mode):
        expected = model(src, tgt, **kwargs)
        with attnscope.capture(model) as attn:
            out = model(src, tgt, **kwargs)
    assert torch.equal(out, expected)
    assert attn.names == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
        "decoder.layers.0.self_attn",
        "decoder.layers.0.multihead_attn",
        "decoder.layers.1.self_attn",
        "decoder.layers.1.multihead_attn",
    ]
    reference = slow_path_weights(model, lambda m: m(src, tgt, **kwargs))
    expected_kinds = {"encoder": "self", "self_attn": "causal", "multihead_attn": "cross"}
    for name in attn.names:
        kind = expected_kinds["encoder" if name.startswith("encoder") else name.split(".")[-1]]
        assert attn.kind(name) == kind
        valid = {"self": ~src_pad, "causal": ~tgt_pad, "cross": None}[kind]
        assert_weights_match(attn[name], reference[name][0], valid)
    assert attn["decoder.layers.0.multihead_attn"].shape == (B, HEADS, 5, 7)


MHA_OPTIONS = {
    "plain": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv+zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 12, "vdim": 10},
}


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("option", list(MHA_OPTIONS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_options(batch_first: bool, option: str, run_mode: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=batch_first, **MHA_OPTIONS[option])
    query = sequence(2, 5, batch_first)
    kdim = MHA_OPTIONS[option].get("kdim", D_MODEL)
    generator = torch.Generator().manual_seed(5)
    key = torch.randn(2, 6, kdim, generator=generator)
    value = torch.randn(2, 6, MHA_OPTIONS[option].get("vdim", D_MODEL), generator=generator)
    if not batch_first:
        key, value = key.transpose(0, 1), value.transpose(0, 1)
    pad = padding([6, 4], 6)
    calls = {"cross": (query, key, value, {"key_padding_mask": pad})}
    if option != "kdim_vdim":
        calls["self"] = (
            query,
            query,
            query,
            {"attn_mask": torch.rand(5, 5, generator=generator) > 0.7},
        )
    for kind, (q, k, v, kwargs) in calls.items():
        with mode(mha, run_mode):
            expected = mha(q, k, v, need_weights=False, **kwargs)[0]
            with attnscope.capture(mha) as attn:
                out = mha(q, k, v, need_weights=False, **kwargs)[0]
        assert torch.equal(out, expected)
        reference = slow_path_weights(mha, lambda m, q=q, k=k, v=v, kw=kwargs: m(q, k, v, **kw))
        assert attn.names == [""]
        assert attn.kind("") == kind
        assert_weights_match(attn[""], reference[""][0])


@pytest.mark.parametrize("run_mode", MODES)
def test_unbatched_inputs(run_mode: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS)
    x = torch.randn(5, D_MODEL)
    pad = torch.tensor([False, False, False, True, True])
    with mode(mha, run_mode), attnscope.capture(mha) as attn:
        mha(x, x, x, key_padding_mask=pad)
    reference = slow_path_weights(mha, lambda m: m(x, x, x, key_padding_mask=pad))
    assert attn[""].shape == (1, HEADS, 5, 5)  # unbatched input gets a batch of one
    assert_weights_match(attn[""], reference[""][0], ~pad[None])


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("rows", [None, [0, -1]])
def test_float_key_padding_mask_gives_zero_padded_query_rows(
    run_mode: str, rows: list[int] | None
) -> None:
    """A float ``key_padding_mask`` (-inf at padding) marks padded queries as a bool one does,
    on every path (slow, native kernel), for all rows or selected ones."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    x = sequence(3, 6)
    pad = padding([6, 4, 2], 6)
    float_pad = torch.zeros(3, 6).masked_fill(pad, float("-inf"))
    with mode(mha, run_mode), attnscope.capture(mha, rows=rows) as attn:
        mha(x, x, x, key_padding_mask=float_pad, need_weights=False)
    reference = slow_path_weights(mha, lambda m: m(x, x, x, key_padding_mask=float_pad))
    expected, valid = reference[""][0], ~pad
    if rows is not None:
        picked = torch.tensor([r % 6 for r in rows])
        expected, valid = expected[:, :, picked], valid[:, picked]
    assert_weights_match(attn[""], expected, valid)


def test_returned_weights_are_used_when_requested_and_untouched() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).eval()
    x = sequence(2, 5)
    pad = padding([5, 3], 5)
    with torch.no_grad():
        expected_out, expected_w = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
        with attnscope.capture(mha) as attn:
            out, weights = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    assert torch.equal(out, expected_out)
    assert torch.equal(weights, expected_w)
    assert_weights_match(attn[""], expected_w, ~pad)
    assert attn[""].data_ptr() != weights.data_ptr()


def test_is_causal_without_padding_uses_causal_kernel_semantics() -> None:
    model = encoder().eval()
    x = sequence(B, L)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(x, mask=causal, is_causal=True)
    upper = torch.ones(L, L, dtype=torch.bool).triu(1)
    for name in attn.names:
        assert attn.kind(name) == "causal"
        assert torch.all(attn[name][..., upper] == 0)
        torch.testing.assert_close(attn[name].sum(-1), torch.ones(B, HEADS, L))


def test_autocast_bfloat16() -> None:
    model = transformer()
    src, tgt = sequence(2, 6), sequence(2, 4, seed=3)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(4)
    with mode(model, "autocast"):
        expected = model(src, tgt, tgt_mask=tgt_mask)
        with attnscope.capture(model) as attn:
            out = model(src, tgt, tgt_mask=tgt_mask)
        reference = slow_path_weights(model, lambda m: m(src, tgt, tgt_mask=tgt_mask))
    assert torch.equal(out, expected)
    for name in attn.names:
        assert_weights_match(attn[name], reference[name][0], atol=3e-2)


def test_user_module_with_attention_inside() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attend = nn.MultiheadAttention(D_MODEL, 2, batch_first=True)
            self.cross = nn.MultiheadAttention(D_MODEL, 2, batch_first=True)

        def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            y = self.attend(x, x, x, need_weights=False)[0]
            return self.cross(y, memory, memory)[0]

    torch.manual_seed(0)
    block = Block().eval()
    x, memory = sequence(2, 4), sequence(2, 6, seed=2)
    with torch.no_grad(), attnscope.capture(block) as attn:
        out = block(x, memory)
    with torch.no_grad():
        assert torch.equal(out, block(x, memory))
    reference = slow_path_weights(block, lambda m: m(x, memory))
    assert attn.names == ["attend", "cross"]
    assert [attn.kind(n) for n in attn.names] == ["self", "cross"]
    for name in attn.names:
        assert_weights_match(attn[name], reference[name][0])


def test_options_heads_dtype_include_exclude() -> None:
    model = transformer().eval()
    src, tgt = sequence(2, 6), sequence(2, 4, seed=3)
    with torch.no_grad(), attnscope.capture(model) as full:
        model(src, tgt)
    with (
        torch.no_grad(),
        attnscope.capture(
            model, include="decoder.*", exclude="*.self_attn", heads=[3, 1], dtype=torch.float16
        ) as some,
    ):
        model(src, tgt)
    assert some.names == ["decoder.layers.0.multihead_attn", "decoder.layers.1.multihead_attn"]
    for name in some.names:
        assert some[name].dtype == torch.float16
        assert some[name].shape == (2, 2, 4, 6)
        torch.testing.assert_close(some[name].float(), full[name][:, [3, 1]], atol=1e-3, rtol=0)
    with (
        torch.no_grad(),
        attnscope.capture(model, include=lambda n: n.endswith("0.self_attn")) as one,
    ):
        model(src, tgt)
    assert one.names == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn"]


def test_multiple_calls_kept_and_concat_matches_full_forward() -> None:
    """Incremental decoding: each step's causal self-attention, joined, equals one full pass."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).eval()
    x = sequence(2, 5)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad(), attnscope.capture(mha) as steps:
        for t in range(5):
            prefix = x[:, : t + 1]
            mha(prefix[:, t:], prefix, prefix, need_weights=False)
    with torch.no_grad(), attnscope.capture(mha) as whole:
        mha(x, x, x, attn_mask=causal, need_weights=False)
    assert len(steps.calls("")) == 5
    torch.testing.assert_close(steps.concat(""), whole[""], atol=1e-6, rtol=0)
