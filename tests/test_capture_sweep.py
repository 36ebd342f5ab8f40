"""Property-based sweep of nn.MultiheadAttention configurations against PyTorch's slow path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnscope
from models import mode
from reference import assert_weights_match, slow_path_weights


@st.composite
def mha_case(draw: st.DrawFn) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    separate_kv = draw(st.booleans())
    return {
        "embed": heads * head_dim,
        "heads": heads,
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "kdim": draw(st.sampled_from([3, 5])) if separate_kv else None,
        "self": draw(st.booleans()) and not separate_kv,
        "batch": draw(st.integers(1, 3)),
        "query_len": draw(st.integers(1, 6)),
        "key_len": draw(st.integers(1, 6)),
        "unbatched": draw(st.booleans()),
        "attn_mask": draw(st.sampled_from(["none", "bool", "float", "causal", "per_head"])),
        "padding": draw(st.sampled_from(["none", "bool", "float"])),
        "mode": draw(st.sampled_from(["train", "eval", "no_grad", "inference_mode"])),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("extra", [{"add_zero_attn": True}, {"add_bias_kv": True}])
def test_is_causal_with_appended_keys_matches_the_kernel_output(
    extra: dict, unbatched: bool
) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, **extra).eval()
    x = torch.randn(4, 8) if unbatched else torch.randn(4, 3, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with torch.no_grad(), attnscope.capture(mha) as attn:
        out = mha(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    assert attn.kind("") == "causal"
    rebuilt = output_from_weights(mha, attn[""], x, batch_first=False)
    torch.testing.assert_close(rebuilt.reshape(out.shape), out, atol=1e-5, rtol=0)


@settings(max_examples=150, deadline=None)
@given(case=mha_case())
def test_multihead_attention_matches_slow_path(case: dict) -> None:
    generator = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    mha = nn.MultiheadAttention(
        case["embed"],
        case["heads"],
        bias=case["bias"],
        add_bias_kv=case["add_bias_kv"],
        add_zero_attn=case["add_zero_attn"],
        kdim=case["kdim"],
        vdim=case["kdim"],
        batch_first=case["batch_first"],
    )
    batch, length = case["batch"], case["query_len"]
    key_len = length if case["self"] else case["key_len"]
    unbatched = case["unbatched"]
    if unbatched:
        batch = 1

    def make(n: int, dim: int) -> torch.Tensor:
        x = torch.randn(batch, n, dim, generator=generator)
        if unbatched:
            return x[0]
        return x if case["batch_first"] else x.transpose(0, 1)

    query = make(length, case["embed"])
    key = query if case["self"] else make(key_len, case["kdim"] or case["embed"])
    value = key
    kwargs: dict = {}
    if case["attn_mask"] == "bool":
        kwargs["attn_mask"] = torch.rand(length, key_len, generator=generator) > 0.6
    elif case["attn_mask"] == "float":
        kwargs["attn_mask"] = torch.randn(length, key_len, generator=generator)
    elif case["attn_mask"] == "causal" and case["self"]:
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(length)
        kwargs["is_causal"] = True
    elif case["attn_mask"] == "per_head":
        kwargs["attn_mask"] = torch.randn(
            batch * case["heads"], length, key_len, generator=generator
        )
        if unbatched:
            kwargs["attn_mask"] = kwargs["attn_mask"][: case["heads"]]
    if case["padding"] != "none":
        pad = torch.rand(batch, key_len, generator=generator) > 0.6
        if case["padding"] == "float":
            pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
        kwargs["key_padding_mask"] = pad[0] if unbatched else pad
        if "attn_mask" in kwargs and kwargs["attn_mask"].dtype != pad.dtype:
            mask = kwargs["attn_mask"]
            kwargs["attn_mask"] = (
                torch.zeros(mask.shape).masked_fill(mask, float("-inf"))
                if mask.dtype == torch.bool
                else mask
            )
            if pad.dtype == torch.bool:
                kwargs["key_padding_mask"] = torch.zeros(pad.shape).masked_fill(pad, float("-inf"))
                if unbatched:
                    kwargs["key_padding_mask"] = kwargs["key_padding_mask"][0]
    need_weights = bool(case["seed"] % 2)

    with mode(mha, case["mode"]):
        expected = mha(query, key, value, need_weights=need_weights, **kwargs)[0]
        with attnscope.capture(mha) as attn:
            out = mha(query, key, value, need_weights=need_weights, **kwargs)[0]
    # bit-identical; NaN only where every key is masked, in both
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    reference = slow_path_weights(mha, lambda m: m(query, key, value, **kwargs))[""][0]
    extra = int(case["add_bias_kv"]) + int(case["add_zero_attn"])
    assert attn[""].shape == (batch, case["heads"], length, key_len + extra)
    if kwargs.get("is_causal") and extra and not need_weights and "key_padding_mask" not in kwargs:
        # PyTorch's kernel applies is_causal over the appended bias/zero keys too, while the
        # need_weights path keeps them visible: check against the kernel's own output instead.
        rebuilt = output_from_weights(mha, attn[""], value, case["batch_first"] and not unbatched)
        torch.testing.assert_close(rebuilt.reshape(expected.shape), expected, atol=1e-5, rtol=0)
        return
    valid = None
    if case["self"] and "key_padding_mask" in kwargs:
        pad = kwargs["key_padding_mask"]
        pad = pad if pad.dtype == torch.bool else pad.isneginf()
        valid = ~(pad[None] if unbatched else pad)
    assert_weights_match(attn[""], reference, valid)
    expected_kind = (
        "cross" if not case["self"] else ("causal" if kwargs.get("is_causal") else "self")
    )
    if expected_kind == "self" and case["attn_mask"] == "bool" and length > 1:
        blocked = kwargs["attn_mask"]
        blocked = blocked if blocked.dtype == torch.bool else blocked.isneginf()
        upper = torch.ones(length, length, dtype=torch.bool).triu(1)
        lower = upper.T
        if bool(blocked[upper].all()) and not bool(blocked[lower].all()):
            expected_kind = "causal"
    assert attn.kind("") == expected_kind


def output_from_weights(
    mha: nn.MultiheadAttention, weights: torch.Tensor, value: torch.Tensor, batch_first: bool
) -> torch.Tensor:
    """MHA's output recomputed from captured weights: weights @ V, then the output projection."""
    with torch.no_grad():
        if value.dim() == 2:
            value = value.unsqueeze(1)
        elif batch_first:
            value = value.transpose(0, 1)
        embed, heads = mha.embed_dim, mha.num_heads
        w_v = mha.in_proj_weight[2 * embed :] if mha._qkv_same_embed_dim else mha.v_proj_weight
        b_v = None if mha.in_proj_bias is None else mha.in_proj_bias[2 * embed :]
        v = torch.nn.functional.linear(value, w_v, b_v)
        batch = v.size(1)
        if mha.bias_v is not None:
            v = torch.cat([v, mha.bias_v.repeat(1, batch, 1)])
        v = v.view(v.size(0), batch, heads, embed // heads).permute(1, 2, 0, 3)
        if mha.add_zero_attn:
            v = torch.cat([v, v.new_zeros(batch, heads, 1, embed // heads)], dim=2)
        out = (weights @ v).permute(2, 0, 1, 3).reshape(weights.size(2), batch, embed)
        out = mha.out_proj(out)
        return out.transpose(0, 1) if batch_first else out
