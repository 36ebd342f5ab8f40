"""A joint [self; cross] call (issue #14, point 4): one sdpa call over the decoder's own keys
followed by the encoder's, as T5Gemma2's merged attention makes, is recorded as its causal part
and its cross part, each the columns of the one softmax over both."""

from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import attnscope


class MergedAttention(nn.Module):
    def __init__(self, width: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.dim = num_heads, width // num_heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))

    def heads(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), x.size(1), self.num_heads, self.dim).transpose(1, 2)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        both = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q, k, v = (
            self.heads(self.q(hidden_states)),
            self.heads(self.k(both)),
            self.heads(self.v(both)),
        )
        own, other = hidden_states.size(1), encoder_hidden_states.size(1)
        causal = torch.ones(own, own, dtype=torch.bool).tril()
        mask = torch.cat([causal, torch.ones(own, other, dtype=torch.bool)], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).flatten(2)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = MergedAttention()

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        return self.attn(x, encoder_hidden_states=memory)


def test_a_joint_self_and_cross_call_is_split_into_its_causal_and_cross_parts() -> None:
    torch.manual_seed(0)
    model, x, memory = Decoder().eval(), torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = model(x, memory)
        with attnscope.capture(model) as attn:
            out = model(x, memory)
        m = model.attn
        q = m.heads(m.q(x)).double()
        k = m.heads(m.k(torch.cat([x, memory], 1))).double()
    assert torch.equal(out, expected)
    assert attn.names == ["attn.self", "attn.cross"]
    assert (attn.kind("attn.self"), attn.kind("attn.cross")) == ("causal", "cross")
    scores = q @ k.transpose(-2, -1) / m.dim**0.5
    scores[..., :4] = scores[..., :4].masked_fill(torch.ones(4, 4).triu(1).bool(), float("-inf"))
    joint = torch.softmax(scores, -1)
    torch.testing.assert_close(attn["attn.self"].double(), joint[..., :4], atol=1e-6, rtol=0)
    torch.testing.assert_close(attn["attn.cross"].double(), joint[..., 4:], atol=1e-6, rtol=0)
    total = attn["attn.self"].sum(-1) + attn["attn.cross"].sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


class _Watched(MergedAttention):
    """The merged attention, keeping weak references to its values and sdpa output."""

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
        both = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        q = self.heads(self.q(hidden_states))
        k, v = self.heads(self.k(both)), self.heads(self.v(both))
        own, other = hidden_states.size(1), encoder_hidden_states.size(1)
        causal = torch.ones(own, own, dtype=torch.bool).tril()
        mask = torch.cat([causal, torch.ones(own, other, dtype=torch.bool)], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        self.seen = [weakref.ref(v), weakref.ref(out)]
        return out.transpose(1, 2).flatten(2)


def test_a_lazy_capture_of_a_joint_call_keeps_its_queries_and_keys_not_its_values() -> None:
    torch.manual_seed(0)
    decoder = Decoder().eval()
    decoder.attn = _Watched()
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    with torch.no_grad(), attnscope.capture(decoder) as full:
        decoder(x, memory)
    with torch.no_grad(), attnscope.capture(decoder, lazy=True) as lazy:
        decoder(x, memory)
    gc.collect()
    assert [ref() for ref in decoder.attn.seen] == [None, None], "values or output still held"
    for name in ("attn.self", "attn.cross"):
        torch.testing.assert_close(lazy[name], full[name], atol=1e-6, rtol=0)
