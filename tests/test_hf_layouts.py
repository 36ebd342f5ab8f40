"""Hugging Face attention of unusual shapes (issue #14, points 3 and 4): each either matches the
model's own eager ``output_attentions`` or is listed in ``attn.skipped`` with what was seen."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import attnscope

transformers = pytest.importorskip("transformers")


def _ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def _eager(model: nn.Module) -> nn.Module:
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    return eager


def _compare(model: nn.Module, reference: nn.Module, **inputs: Any) -> attnscope.AttentionMaps:
    with torch.no_grad():
        plain = model(**inputs)
        own = reference(**inputs, output_attentions=True).attentions
        with attnscope.capture(model) as attn:
            out = model(**inputs)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert attn.skipped == {}
    assert len(attn.names) == len(own)
    valid = inputs["attention_mask"].bool()
    for name, expected in zip(attn.names, own, strict=True):
        got = attn[name]
        assert got.shape == expected.shape
        rows = valid[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[rows], expected[rows], atol=1e-6, rtol=0)
    return attn


def test_a_module_calling_sdpa_twice_on_the_same_query_and_key_gives_one_map() -> None:
    """DiffLlama attends twice per layer, over two halves of the values."""
    torch.manual_seed(0)
    config = transformers.DiffLlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=36,
        vocab_size=99,
        max_position_embeddings=64,
    )
    model = transformers.DiffLlamaModel(config).eval()
    ids, mask = _ids_and_mask()
    attn = _compare(model, _eager(model), input_ids=ids, attention_mask=mask)
    assert [attn.kind(n) for n in attn.names] == ["causal", "causal"]


def test_weights_masked_with_a_masked_fill_convention_bool_mask_keep_their_rows() -> None:
    """MPT gives its attention a bool mask where True hides a key (masked_fill's convention),
    not sdpa's; rows that see every key must not be blanked as fully hidden."""
    torch.manual_seed(0)
    config = transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=99)
    model = transformers.MptModel(config).eval()
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
        # MPT's own weights are returned by its attention on every call: the eager reference
        own = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with attnscope.capture(model) as attn:
            out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    for name, expected in zip(attn.names, own, strict=True):
        torch.testing.assert_close(attn[name][0], expected[0], atol=1e-6, rtol=0)
        assert bool((attn[name][0, :, -1].sum(-1) > 0.99).all()), "the last row sees every key"


def test_no_softmax_attention_is_listed_in_skipped_and_the_capture_goes_on() -> None:
    torch.manual_seed(0)
    config = transformers.RwkvConfig(
        hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, vocab_size=99
    )
    model = transformers.RwkvModel(config).eval()
    ids, _ = _ids_and_mask()
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(input_ids=ids)
    assert attn.names == []
    assert set(attn.skipped) == {"blocks.0.attention", "blocks.1.attention"}
    assert all("computed no softmax" in why for why in attn.skipped.values())


def _longformer() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LongformerConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=36,
        vocab_size=99,
        attention_window=4,
        max_position_embeddings=64,
    )
    return transformers.LongformerModel(config).eval()


def test_a_sliding_window_band_is_laid_out_as_batch_heads_query_key() -> None:
    """Longformer's softmax is over a band of window offsets, (batch, query, heads, 2w + 1);
    the map puts offset j of query i at key i + j - w, against the model's own eager band."""
    model = _longformer()
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask)
        (band,) = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with attnscope.capture(model) as attn:
            out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert attn.skipped == {} and attn.names == ["encoder.layer.0.attention.self"]
    dense = attn["encoder.layer.0.attention.self"]
    batch, heads, rows, width = band.shape  # rows: the unpadded length, 7 of 8
    w = width // 2
    assert dense.shape == (batch, heads, 8, 8)
    expected = torch.zeros(batch, heads, 8, 8)
    for i in range(rows):
        for j in range(width):
            if 0 <= i + j - w < 8:
                expected[:, :, i, i + j - w] = band[:, :, i, j]
    torch.testing.assert_close(dense[:, :, :rows], expected[:, :, :rows], atol=1e-6, rtol=0)
    real = mask.bool()
    sums = dense[:, :, :7].sum(-1)
    torch.testing.assert_close(
        sums[real[:, None, :].expand_as(sums)],
        torch.ones(()).expand(int(real.sum()) * heads),
        atol=1e-5,
        rtol=0,
    )


def test_a_band_with_global_attention_is_listed_with_its_layout() -> None:
    """With global attention the band gains leading global-key columns and the global rows come
    from a second softmax: the global rows' map is kept, and skipped says what was left out."""
    model = _longformer()
    ids, mask = _ids_and_mask()
    global_mask = torch.zeros_like(mask)
    global_mask[:, 0] = 1
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask)
    (name,) = attn.skipped
    assert name == "encoder.layer.0.attention.self" and attn.names == [name]
    assert attn[name].shape == (2, 4, 1, 8)  # the one global query's row over every key
    assert "left out: (2, 8, 4, 6) over axis 3" in attn.skipped[name]


def test_blocked_local_attention_is_laid_out_as_batch_heads_query_key() -> None:
    """LongT5's local attention: each block of L queries over the blocks before, its own and
    after, (batch, blocks, heads, L, 3L); key c of block n is position (n - 1) L + c."""
    torch.manual_seed(0)
    config = transformers.LongT5Config(
        d_model=32,
        d_kv=8,
        d_ff=36,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        vocab_size=99,
        local_radius=2,
        encoder_attention_type="local",
    )
    encoder = transformers.LongT5EncoderModel(config).eval()
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = encoder(input_ids=ids)
        (blocked,) = encoder(input_ids=ids, output_attentions=True).attentions
        with attnscope.capture(encoder) as attn:
            out = encoder(input_ids=ids)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    (name,) = attn.names
    assert attn.skipped == {}
    batch, blocks, heads, size, _ = blocked.shape
    expected = torch.zeros(batch, heads, 7, 7)
    for n in range(blocks):
        for i in range(size):
            for c in range(3 * size):
                query, key = n * size + i, (n - 1) * size + c
                if query < 7 and 0 <= key < 7:
                    expected[:, :, query, key] = blocked[:, n, :, i, c]
    assert attn[name].shape == (batch, heads, 7, 7)
    torch.testing.assert_close(attn[name], expected, atol=1e-6, rtol=0)


def test_global_and_block_local_attention_is_laid_out_over_globals_and_sequence() -> None:
    """PEGASUS-X: its global tokens attend over [globals; sequence], and each block of the
    sequence over the globals and its own block, (batch, heads, blocks, L, G + L); the second
    map lays that out over the same [globals; sequence] keys, against its own eager weights."""
    torch.manual_seed(0)
    config = transformers.PegasusXConfig(
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=36,
        decoder_ffn_dim=36,
        vocab_size=99,
        block_size=4,
        num_global_tokens=2,
        max_position_embeddings=64,
    )
    encoder = transformers.PegasusXModel(config).get_encoder().eval()
    ids = torch.randint(3, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = encoder(input_ids=ids)
        (own,) = encoder(input_ids=ids, output_attentions=True).attentions
        with attnscope.capture(encoder) as attn:
            out = encoder(input_ids=ids)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)
    assert attn.skipped == {} and attn.names == ["layers.0.self_attn"]
    global_rows, local_rows = attn.calls("layers.0.self_attn")
    torch.testing.assert_close(global_rows, own["global"], atol=1e-6, rtol=0)
    blocked = own["local"]  # (batch, heads, blocks, L, G + L)
    batch, heads, blocks, size, keys = blocked.shape
    extra = keys - size
    expected = torch.zeros(batch, heads, blocks * size, extra + blocks * size)
    for n in range(blocks):
        for i in range(size):
            expected[:, :, n * size + i, :extra] = blocked[:, :, n, i, :extra]
            for j in range(size):
                expected[:, :, n * size + i, extra + n * size + j] = blocked[:, :, n, i, extra + j]
    torch.testing.assert_close(local_rows, expected, atol=1e-6, rtol=0)


def test_xlnet_two_streams_are_two_calls_equal_to_its_own_weights() -> None:
    """XLNet with a permutation mask and targets runs a content and a query stream: each layer's
    module gives two (batch, heads, query, key) maps, equal to eager's pair."""
    torch.manual_seed(0)
    config = transformers.XLNetConfig(d_model=32, n_layer=2, n_head=4, d_inner=36, vocab_size=99)
    model = transformers.XLNetLMHeadModel(config).eval()
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    perm = torch.zeros(2, 7, 7)
    perm[:, :, -1] = 1.0  # no position sees the last token
    targets = torch.zeros(2, 1, 7)
    targets[:, 0, -1] = 1.0  # predict it
    inputs = dict(input_ids=ids, perm_mask=perm, target_mapping=targets)
    with torch.no_grad():
        plain = model(**inputs)
        own = model(**inputs, output_attentions=True).attentions
        with attnscope.capture(model) as attn:
            out = model(**inputs)
    assert torch.equal(out.logits, plain.logits)
    assert attn.skipped == {} and len(attn.names) == 2
    for name, (content, query) in zip(attn.names, own, strict=True):
        got = attn.calls(name)
        assert len(got) == 2
        torch.testing.assert_close(got[0], content, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[1], query, atol=1e-6, rtol=0)
