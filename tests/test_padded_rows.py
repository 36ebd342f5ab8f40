"""One convention for rows that carry no information (``attnscope.padded_rows``): a row is zero
only where its query is padding or sees no key, on every path, eager or sdpa."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import attnscope

transformers = pytest.importorskip("transformers")


class _MaskedAttention(nn.Module):
    """A user module calling sdpa with a mask it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj(x).view(x.size(0), -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _by_hand(module: _MaskedAttention, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    q, k, _ = module.proj(x).view(x.size(0), -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / 2.0  # sqrt(head dim 4)
    return scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)


def test_a_key_hidden_from_every_query_leaves_its_query_row_alone() -> None:
    torch.manual_seed(0)
    module, x = _MaskedAttention(), torch.randn(2, 5, 8)
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[:, 0] = False  # nobody attends to key 0; query 0 is real
    with torch.no_grad(), attnscope.capture(module) as attn:
        module(x, keep)
        expected = _by_hand(module, x, keep)
    got = attn[""]
    assert got[:, :, 0].sum(-1).allclose(torch.ones(2, 2))  # not zeroed: 0.65 away before
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_query_that_sees_no_key_is_a_zero_row() -> None:
    torch.manual_seed(0)
    module, x = _MaskedAttention(), torch.randn(1, 4, 8)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[2] = False
    float_mask = torch.zeros(4, 4).masked_fill(~keep, torch.finfo(torch.float32).min)
    for mask in (keep, float_mask):  # bool, and Hugging Face's float minimum
        with torch.no_grad(), attnscope.capture(module) as attn:
            module(x, mask)
        got = attn[""]
        assert torch.all(got[:, :, 2] == 0)
        torch.testing.assert_close(got, _by_hand(module, x, keep), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("family", "side"), [("gpt2", "left"), ("gpt2", "right"), ("bert", "right"), ("bert", "left")]
)
def test_eager_and_sdpa_give_one_map_with_padded_rows_zero(family: str, side: str) -> None:
    from hf_models import build  # the suite's tiny models: sdpa, and a copy loaded eager

    built = build(family)
    sdpa, eager = built.model, built.eager
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 4])
    real = torch.arange(7)[None, :] < lengths[:, None]
    if side == "left":
        real = real.flip(-1)
    mask = real.long()
    with torch.no_grad():
        own = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with attnscope.capture(sdpa) as from_sdpa:
            sdpa(input_ids=ids, attention_mask=mask)
        with attnscope.capture(eager) as from_eager:
            eager(input_ids=ids, attention_mask=mask)
    assert from_sdpa.names == from_eager.names and len(from_sdpa.names) == 2
    for name, reference in zip(from_sdpa.names, own, strict=True):
        a, b = from_sdpa[name], from_eager[name]
        for weights in (a, b):
            assert torch.all(weights.permute(0, 2, 1, 3)[~real] == 0), "padded rows are zeros"
            valid = real[:, None, :].expand(-1, weights.size(1), -1)
            torch.testing.assert_close(weights[valid], reference[valid], atol=1e-5, rtol=0)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pooled_queries_are_not_taken_for_a_cache_step() -> None:
    """Funnel pools 7 positions into 4 queries over all 7 keys: no query row is padding by
    position, so only what the mask says blanks a row."""
    torch.manual_seed(0)
    config = transformers.FunnelConfig(
        d_model=32, n_head=4, d_head=8, d_inner=36, block_sizes=[1, 1], vocab_size=99
    )
    model = transformers.FunnelBaseModel(config).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        with attnscope.capture(model) as attn:
            model(input_ids=ids, attention_mask=mask)
    pooled = attn["encoder.blocks.1.0.attention"]
    assert pooled.shape[-2:] == (4, 7)
    torch.testing.assert_close(pooled[1, :, :3], own[1][1, :, :3], atol=1e-6, rtol=0)


def test_train_mode_weights_are_before_dropout_even_when_dropout_empties_a_row() -> None:
    """An eager module returns its weights after dropout; in training the capture keeps the
    module's own softmax instead, whose rows are distributions."""
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=36,
        vocab_size=99,
        max_position_embeddings=64,
        attention_probs_dropout_prob=0.5,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).train()
    model.set_attn_implementation("eager")
    ids = torch.randint(3, 99, (1, 2), generator=torch.Generator().manual_seed(0))
    for seed in range(100):
        torch.manual_seed(seed)
        with attnscope.capture(model) as attn:
            model(input_ids=ids)
        sums = attn[attn.names[0]].sum(-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
