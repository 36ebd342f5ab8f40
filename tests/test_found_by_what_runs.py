"""Attention found by what runs, not by class names (issue #14, point 3): a module that
computes its own softmax over q·kᵀ and multiplies values by it is recorded, whatever it is
called; a softmax nothing multiplies is not; a model with no attention at all is refused."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import attnscope


class Mixer(nn.Module):
    """Hand-written attention under a name that says nothing about attention."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.split(x)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.dim)
        weights = scores.softmax(dim=-1)
        mixed = torch.einsum("bhqk,bhkd->bhqd", weights, v)
        return self.out(mixed.transpose(1, 2).flatten(2))


class Stack(nn.Module):
    """A fused PyTorch encoder layer, then the hand-written block, then a classifier softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.block = nn.Sequential(nn.LayerNorm(16), Mixer())
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.block(self.fused(x))
        return self.head(hidden).unsqueeze(1).softmax(dim=-1)  # 4-D, multiplies nothing


def _by_hand(mixer: Mixer, x: Tensor) -> Tensor:
    q, k, _ = mixer.split(x)
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(mixer.dim)
    return torch.exp(scores - scores.amax(-1, keepdim=True)).div_(
        torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1, keepdim=True)
    )


def test_hand_written_attention_with_any_name_is_found_beside_a_fused_block() -> None:
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = model(x)
        with attnscope.capture(model) as attn:
            out = model(x)
        mixer_input = model.block[0](model.fused(x))
    assert torch.equal(out, expected)
    assert attn.names == ["fused.self_attn", "block.1"]
    assert attn.kind("block.1") == "self" and attn.skipped == {}
    torch.testing.assert_close(
        attn["block.1"].double(), _by_hand(model.block[1], mixer_input), atol=1e-6, rtol=0
    )
    assert "__matmul__" not in vars(torch.Tensor) and torch.einsum.__module__ == "torch.functional"


def test_a_model_whose_only_attention_is_hand_written_is_captured() -> None:
    torch.manual_seed(1)
    model, x = nn.Sequential(nn.Linear(16, 16), Mixer(), nn.ReLU()).train(), torch.randn(3, 5, 16)
    with attnscope.capture(model) as attn:  # training, with autograd: the same numbers
        model(x).sum().backward()
    with torch.no_grad():
        reference = _by_hand(model[1], model[0](x))
    assert attn.names == ["1"]
    torch.testing.assert_close(attn["1"].double(), reference, atol=1e-6, rtol=0)


class _Probabilities(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).view(x.size(0), 2, -1, 4).softmax(dim=-1)  # nothing multiplied


def test_a_model_with_no_attention_is_refused_after_it_ran() -> None:
    model = _Probabilities()
    with (
        pytest.raises(attnscope.AttnScopeError, match="no attention module in _Probabilities"),
        torch.no_grad(),
        attnscope.capture(model),
    ):
        model(torch.randn(2, 6, 8))
    assert "softmax" not in vars(torch.Tensor)


def test_a_model_of_pytorch_modules_only_is_refused_before_it_runs() -> None:
    with pytest.raises(attnscope.AttnScopeError, match="found no attention module in Sequential"):
        attnscope.capture(nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1))).__enter__()


def test_include_may_name_a_module_found_only_while_the_model_runs() -> None:
    torch.manual_seed(2)
    model, x = Stack().eval(), torch.randn(1, 4, 16)
    with torch.no_grad(), attnscope.capture(model, include="block.*") as attn:
        model(x)
    assert attn.names == ["block.1"]
    with pytest.raises(attnscope.AttnScopeError, match="matches none"):
        attnscope.capture(model, include="nowhere*").__enter__()


class Flattened(nn.Module):
    """The older layout: heads folded into the batch axis, multiplied with ``bmm``."""

    def __init__(self, width: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.dim = num_heads, width // num_heads
        self.qkv = nn.Linear(width, 3 * width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        q, k, v = (
            t.reshape(b, n, self.num_heads, self.dim).transpose(1, 2).reshape(-1, n, self.dim)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        weights = nn.functional.softmax(torch.bmm(q, k.transpose(1, 2)) * self.dim**-0.5, dim=-1)
        probs = nn.functional.dropout(weights, p=0.1, training=self.training)
        return (
            torch.bmm(probs, v)
            .view(b, self.num_heads, n, self.dim)
            .transpose(1, 2)
            .reshape(b, n, w)
        )


def test_a_flattened_batch_times_heads_softmax_is_read_as_batch_heads_query_key() -> None:
    torch.manual_seed(3)
    model, x = nn.Sequential(Flattened()).eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
        with attnscope.capture(model) as attn:
            out = model(x)
        q, k, _ = (
            t.reshape(2, 5, 4, 4).transpose(1, 2).double() for t in model[0].qkv(x).chunk(3, -1)
        )
    assert torch.equal(out, expected)
    assert attn.names == ["0"] and attn["0"].shape == (2, 4, 5, 5)
    torch.testing.assert_close(
        attn["0"].double(), torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1), atol=1e-6, rtol=0
    )
