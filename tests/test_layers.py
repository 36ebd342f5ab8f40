"""Seed-compatible layers: drop-in, weights in every mode, fused path kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnscope import (
    AttnScopeError,
    TransformerDecoderLayerWithAttn,
    TransformerEncoderLayerWithAttn,
)
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


def test_storing_can_be_switched_off_and_reading_then_says_so() -> None:
    model = encoder(layer_cls=TransformerEncoderLayerWithAttn)
    assert model.layers[0].attn_weights is None  # before any forward, as the original
    set_store_attn_weights(model, False)
    model(sequence(1, 3))
    for layer in model.layers:
        with pytest.raises(AttnScopeError, match=r"store_attn_weights is False.*True"):
            _ = layer.attn_weights
    model.layers[0].store_attn_weights = True
    model(sequence(1, 3))
    assert model.layers[0].attn_weights.shape == (1, HEADS, 3, 3)
    with pytest.raises(AttnScopeError, match="store_attn_weights"):
        _ = model.layers[1].attn_weights
    decoder = TransformerDecoderLayerWithAttn(D_MODEL, HEADS, 32, batch_first=True)
    decoder.store_attn_weights = False
    decoder(sequence(1, 3), sequence(1, 4))
    for attribute in ("attn_weights", "self_attn_weights", "cross_attn_weights"):
        with pytest.raises(AttnScopeError, match=f"{attribute} is not kept"):
            getattr(decoder, attribute)


def test_decoder_attn_weights_is_its_masked_self_attention() -> None:
    torch.manual_seed(0)
    layer = TransformerDecoderLayerWithAttn(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    tgt, memory = sequence(2, 4), sequence(2, 6, seed=3)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    layer(tgt, memory, tgt_mask=causal)
    reference = slow_path_weights(layer, lambda m: m(tgt, memory, tgt_mask=causal))
    assert layer.attn_weights is layer.self_attn_weights
    assert_weights_match(layer.attn_weights, reference["self_attn"][0])
    assert torch.all(layer.attn_weights[..., 0, 1:] == 0)  # masked: the first query sees itself
    layer.attn_weights = None  # assignable, as the original's plain attribute
    assert layer.self_attn_weights is None


def _decoder_step(layer: nn.Module, tgt: torch.Tensor, memory: torch.Tensor) -> None:
    causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
    layer(tgt, memory, tgt_mask=causal, tgt_is_causal=True).square().sum().backward()


def _data_step(layer: nn.Module) -> None:
    for param in layer.parameters():  # old-style manual SGD: no version counter moves
        param.data.add_(param.grad.sign(), alpha=-0.1)


@pytest.mark.parametrize("update", ["adam", "fused adam", "through .data"])
def test_weights_read_after_an_optimizer_step_are_those_of_the_forward(update: str) -> None:
    torch.manual_seed(0)
    layer = TransformerDecoderLayerWithAttn(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    tgt, memory = sequence(2, 4), sequence(2, 6, seed=3)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    before = slow_path_weights(layer, lambda m: m(tgt, memory, tgt_mask=causal))
    params = list(layer.parameters())
    step = {
        "adam": torch.optim.Adam(params, lr=0.1).step,
        "fused adam": torch.optim.Adam(params, lr=0.1, fused=True).step,
        "through .data": lambda: _data_step(layer),
    }[update]
    _decoder_step(layer, tgt, memory)
    step()  # changes in_proj_weight in place before anything is read
    after = slow_path_weights(layer, lambda m: m(tgt, memory, tgt_mask=causal))
    assert (after["self_attn"][0] - before["self_attn"][0]).abs().max() > 1e-2
    assert_weights_match(layer.attn_weights, before["self_attn"][0])
    assert_weights_match(layer.cross_attn_weights, before["multihead_attn"][0])
    fresh = TransformerDecoderLayerWithAttn(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    _decoder_step(layer, tgt, memory)
    layer.load_state_dict(fresh.state_dict())  # load_state_dict copies in place too
    assert_weights_match(layer.attn_weights, after["self_attn"][0])


def test_an_input_changed_in_place_before_the_read_is_refused() -> None:
    torch.manual_seed(0)
    layer = TransformerEncoderLayerWithAttn(D_MODEL, HEADS, 32, dropout=0.0, batch_first=True)
    x = sequence(2, 5)
    layer(x)
    x.mul_(2.0)
    with pytest.raises(AttnScopeError, match="changed in place"):
        _ = layer.attn_weights
    layer(x)  # a new forward keeps the new input
    assert layer.attn_weights.shape == (2, HEADS, 5, 5)


def test_train_mode_weights_are_before_dropout_and_detached() -> None:
    torch.manual_seed(0)
    layer = TransformerEncoderLayerWithAttn(D_MODEL, HEADS, 32, dropout=0.5, batch_first=True)
    plain = nn.TransformerEncoderLayer(D_MODEL, HEADS, 32, dropout=0.5, batch_first=True)
    plain.load_state_dict(layer.state_dict())
    x, pad = sequence(3, 6).requires_grad_(), padding([6, 4, 5], 6)
    torch.manual_seed(1)
    out = layer(x, src_key_padding_mask=pad)
    torch.manual_seed(1)
    assert torch.equal(out, plain(x, src_key_padding_mask=pad))  # same kernel, same dropout
    weights = layer.attn_weights
    assert not weights.requires_grad
    torch.testing.assert_close(weights.sum(-1), (~pad).float()[:, None].expand(3, HEADS, 6))
    reference = slow_path_weights(plain, lambda m: m(x, src_key_padding_mask=pad))
    assert_weights_match(weights, reference["self_attn"][0], ~pad)


@pytest.mark.parametrize("layer_kind", ["encoder", "decoder"])
def test_keep_attn_graph_gives_weights_that_train(layer_kind: str) -> None:
    torch.manual_seed(0)
    x, pad = sequence(2, 5).requires_grad_(), padding([5, 3], 5)
    memory = sequence(2, 6, seed=3)
    if layer_kind == "encoder":
        layer = TransformerEncoderLayerWithAttn(D_MODEL, HEADS, 32, 0.3, batch_first=True)
        plain = nn.TransformerEncoderLayer(D_MODEL, HEADS, 32, 0.3, batch_first=True)

        def run(m: nn.Module) -> torch.Tensor:
            return m(x, src_key_padding_mask=pad)
    else:
        layer = TransformerDecoderLayerWithAttn(D_MODEL, HEADS, 32, 0.3, batch_first=True)
        plain = nn.TransformerDecoderLayer(D_MODEL, HEADS, 32, 0.3, batch_first=True)

        def run(m: nn.Module) -> torch.Tensor:
            return m(x, memory, tgt_key_padding_mask=pad)

    plain.load_state_dict(layer.state_dict())
    layer.keep_attn_graph = True
    torch.manual_seed(1)
    out = run(layer)
    torch.manual_seed(1)
    assert torch.equal(out, run(plain))  # the recompute takes nothing of dropout's random stream
    weights = layer.attn_weights
    assert weights.requires_grad
    # the reference: PyTorch's own slow path with need_weights=True on the same parameters
    mha = layer.self_attn.eval()  # no dropout on the reference's weights
    _, reference = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    valid = (~pad)[:, None, :, None].float()  # padded query rows are zeros in attnscope
    assert_weights_match(weights.detach(), reference.detach() * valid, ~pad)
    probe = torch.randn(weights.shape, generator=torch.Generator().manual_seed(2))
    params = [mha.in_proj_weight, mha.in_proj_bias, x]
    ours = torch.autograd.grad((weights * probe * valid).sum(), params)
    theirs = torch.autograd.grad((reference * probe * valid).sum(), params)
    for got, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    if layer_kind == "decoder":
        assert layer.cross_attn_weights.requires_grad
        layer.cross_attn_weights.sum().backward()
    with torch.no_grad():  # no graph to keep: computed on read as usual
        run(layer)
    assert not layer.attn_weights.requires_grad


def test_layers_pickle_and_deepcopy_after_a_forward() -> None:
    import copy
    import io

    model = encoder(layer_cls=TransformerEncoderLayerWithAttn)
    model(sequence(1, 4))
    expected = model.layers[1].attn_weights
    model(sequence(1, 4))  # weights kept, not read yet
    twin = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded, model):
        torch.testing.assert_close(other.layers[1].attn_weights, expected, atol=0, rtol=0)
