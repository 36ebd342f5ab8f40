"""Seed-compatible layers: drop-in, weights in every mode, fused path kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnscope import TransformerDecoderLayerWithAttn, TransformerEncoderLayerWithAttn
from attnscope.layers import set_store_attn_weights
from models import D_MODEL, HEADS, MODES, encoder, mode, padding, sequence
from reference import assert_weights_match, slow_path_weights


def test_same_constructor_and_state_dict_keys() -> None:
    kwargs = dict(
        d_model=D_MODEL,
        nhead=HEADS,
        dim_feedforward=32,
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
        bias=False,
    )
    for ours, theirs in [
        (TransformerEncoderLayerWithAttn, nn.TransformerEncoderLayer),
        (TransformerDecoderLayerWithAttn, nn.TransformerDecoderLayer),
    ]:
        torch.manual_seed(0)
        a = ours(**kwargs)
        torch.manual_seed(0)
        b = theirs(**kwargs)
        assert list(a.state_dict()) == list(b.state_dict())
        a.load_state_dict(b.state_dict())
        assert isinstance(a, theirs)


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_weights_in_every_mode(run_mode: str, norm_first: bool, count_calls) -> None:
    fused = count_calls("_transformer_encoder_layer_fwd")
    model = encoder(norm_first=norm_first, layer_cls=TransformerEncoderLayerWithAttn)
    plain = encoder(norm_first=norm_first)
    plain.load_state_dict(model.state_dict())
    x, pad = sequence(3, 6), padding([6, 4, 5], 6)
    with mode(model, run_mode), mode(plain, run_mode):
        out = model(x, src_key_padding_mask=pad)
        assert torch.equal(out, plain(x, src_key_padding_mask=pad))
    if run_mode in ("no_grad", "inference_mode"):
        # both took the fused path (with a counter installed on it, attnscope does not stand in
        # for the kernel: it recomputes instead)
        assert fused[0] == 4
        assert not any(layer._sa_ran for layer in model.layers)
    reference = slow_path_weights(plain, lambda m: m(x, src_key_padding_mask=pad))
    for index, layer in enumerate(model.layers):
        assert layer.attn_weights.shape == (3, HEADS, 6, 6)
        assert not layer.attn_weights.requires_grad
        assert_weights_match(layer.attn_weights, reference[f"layers.{index}.self_attn"][0], ~pad)


@pytest.mark.parametrize("run_mode", MODES)
def test_decoder_layer_weights_in_every_mode(run_mode: str) -> None:
    torch.manual_seed(0)
    layer = TransformerDecoderLayerWithAttn(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    tgt, memory = sequence(2, 4), sequence(2, 6, seed=3)
    mem_pad = padding([6, 5], 6)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with mode(layer, run_mode):
        layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    reference = slow_path_weights(
        layer,
        lambda m: m(
            tgt, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_pad
        ),
    )
    assert_weights_match(layer.self_attn_weights, reference["self_attn"][0])
    assert_weights_match(layer.cross_attn_weights, reference["multihead_attn"][0])
    assert layer.cross_attn_weights.shape == (2, HEADS, 4, 6)


def test_storing_can_be_switched_off() -> None:
    model = encoder(layer_cls=TransformerEncoderLayerWithAttn)
    set_store_attn_weights(model, False)
    model(sequence(1, 3))
    assert all(layer.attn_weights is None for layer in model.layers)
    model.layers[0].store_attn_weights = True
    model(sequence(1, 3))
    assert model.layers[0].attn_weights is not None and model.layers[1].attn_weights is None
