"""Hand-written attention (``attnscope.adapters.softmax``): the softmax a module computes itself
is recorded as it is, exactly what the model's eager ``output_attentions`` returns."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import attnscope

transformers = pytest.importorskip("transformers")


def _tiny(family: str) -> nn.Module:
    t = transformers
    torch.manual_seed(0)
    bert_like = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=36,
        vocab_size=99,
        max_position_embeddings=64,
    )
    configs: dict[str, Any] = {
        "deberta-v2": (t.DebertaV2Config, t.DebertaV2Model, bert_like),
        "mpnet": (t.MPNetConfig, t.MPNetModel, bert_like),
        "xlm": (
            t.XLMConfig,
            t.XLMModel,
            dict(emb_dim=32, n_layers=2, n_heads=4, vocab_size=99, max_position_embeddings=64),
        ),
        "openai-gpt": (
            t.OpenAIGPTConfig,
            t.OpenAIGPTModel,
            dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64),
        ),
        "xlnet": (
            t.XLNetConfig,
            t.XLNetModel,
            dict(d_model=32, n_layer=2, n_head=4, d_inner=36, vocab_size=99),
        ),
    }
    config_cls, model_cls, sizes = configs[family]
    return model_cls(config_cls(**sizes)).eval()


@pytest.mark.parametrize("family", ["deberta-v2", "mpnet", "xlm", "openai-gpt", "xlnet"])
def test_hand_written_softmax_is_the_models_own_weights(family: str) -> None:
    model = _tiny(family)
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        plain = model(input_ids=ids, attention_mask=mask)
        with attnscope.capture(model) as attn:
            out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(out[0], plain[0])
    assert attn.skipped == {}
    expected = [r[0] if isinstance(r, tuple) else r for r in reference.attentions]
    assert len(attn.names) == len(expected) == 2
    real = mask.bool()
    for name, own in zip(attn.names, expected, strict=True):
        got = attn[name]
        assert got.shape == own.shape
        valid = real[:, None, :, None].expand_as(got)
        torch.testing.assert_close(got[valid], own[valid], atol=1e-6, rtol=0)
        assert torch.all(got[~valid] == 0), "padded query rows are zeros"
    assert attn.kind(attn.names[0]) == ("causal" if family == "openai-gpt" else "self")


class _ByHandAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).view(x.size(0), -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        weights = nn.functional.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
        return (weights @ v).transpose(1, 2).reshape(x.size(0), -1, 8)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _ByHandAttention()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.head(self.attention(x)).unsqueeze(1)  # 4-D, but not attention
        return torch.softmax(scores, dim=-1)


def test_a_users_hand_written_attention_is_captured_and_other_softmaxes_are_not() -> None:
    torch.manual_seed(0)
    model, x = _Classifier(), torch.randn(2, 5, 8)
    with torch.no_grad():
        expected_out = model(x)
        with attnscope.capture(model) as attn:
            out = model(x)
        q, k, _ = model.attention.qkv(x).view(2, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
    assert torch.equal(out, expected_out)
    assert attn.names == ["attention"] and len(attn.calls("attention")) == 1
    by_hand = torch.exp(q @ k.transpose(-2, -1) / 2.0)
    torch.testing.assert_close(
        attn["attention"], by_hand / by_hand.sum(-1, keepdim=True), atol=1e-6, rtol=0
    )
    assert torch.Tensor.softmax is torch._C.TensorBase.softmax  # nothing left in its place
    assert "softmax" not in vars(torch.Tensor)
