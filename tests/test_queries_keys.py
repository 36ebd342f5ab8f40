"""``attn.queries_keys(name)``: a lazy capture's scaled per-head queries and keys, against the
model's own projections computed by hand and against its eager weights."""

from __future__ import annotations

import math

import pytest
import torch

import attnscope
from hf_models import build, eager_attentions
from models import D_MODEL, HEADS, encoder, sequence


def _masked_softmax(scores: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(hidden, float("-inf")).softmax(-1)


def _split(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.view(t.size(0), t.size(1), heads, -1).transpose(1, 2)


def test_bert_queries_keys_are_its_projections_scaled() -> None:
    family = build("bert")
    model = family.model
    with torch.no_grad():
        hidden = model(**family.inputs, output_hidden_states=True).hidden_states
        with attnscope.capture(model, lazy=True) as attn:
            model(**family.inputs)
    for layer_index, name in enumerate(attn.names):
        q, k = attn.queries_keys(name)
        self_attn = model.encoder.layer[layer_index].attention.self
        x = hidden[layer_index]
        with torch.no_grad():
            q_ref = _split(self_attn.query(x), 4) / math.sqrt(8)
            k_ref = _split(self_attn.key(x), 4)
        torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_scores_give_the_eager_weights(name: str) -> None:
    family = build(name)
    with torch.no_grad(), attnscope.capture(family.model, lazy=True) as attn:
        family.model(**family.inputs)
    reference = eager_attentions(family)
    padding = family.inputs["attention_mask"] == 0
    for module, eager in zip(attn.names, reference, strict=True):
        q, k = attn.queries_keys(module)
        assert q.shape == (2, family.heads, 9, q.size(-1)) and k.shape[:3] == (2, family.heads, 9)
        causal = torch.ones(9, 9, dtype=torch.bool).triu(1)
        hidden = causal | padding[:, None, None, :]
        weights = _masked_softmax(q @ k.transpose(-1, -2), hidden)
        valid = ~padding  # left-padded rows: eager and attnscope differ by convention there
        torch.testing.assert_close(
            weights[valid[:, None, :, None].expand_as(weights)],
            eager[valid[:, None, :, None].expand_as(eager)],
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("batch", [1, 8])  # the kernel's q and k kept; input copies
def test_torch_encoder_queries_keys(batch: int) -> None:
    model = encoder().eval()
    x = sequence(batch, 5)
    dim = D_MODEL // HEADS
    with torch.no_grad(), attnscope.capture(model, lazy=True) as attn:
        model(x)
    first = model.layers[0].self_attn
    q, k = attn.queries_keys("layers.0.self_attn")
    with torch.no_grad():
        w_q, w_k, _ = first.in_proj_weight.chunk(3)
        b_q, b_k, _ = first.in_proj_bias.chunk(3)
        q_ref = (x @ w_q.T + b_q).view(batch, 5, HEADS, dim).transpose(1, 2) / math.sqrt(dim)
        k_ref = (x @ w_k.T + b_k).view(batch, 5, HEADS, dim).transpose(1, 2)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-6)
    second = (q @ k.transpose(-1, -2)).softmax(-1)
    torch.testing.assert_close(second, attn["layers.0.self_attn"], rtol=1e-5, atol=1e-6)


def test_selected_heads_and_rows() -> None:
    family = build("bert")
    with torch.no_grad():
        with attnscope.capture(family.model, lazy=True) as every:
            family.model(**family.inputs)
        with attnscope.capture(family.model, lazy=True, heads=[1, 3], rows=[0, -1]) as some:
            family.model(**family.inputs)
    name = every.names[0]
    q, k = every.queries_keys(name)
    q_some, k_some = some.queries_keys(name)
    torch.testing.assert_close(q_some, q[:, [1, 3]][:, :, [0, 8]])
    torch.testing.assert_close(k_some, k[:, [1, 3]])


def test_refused_without_lazy() -> None:
    family = build("bert")
    with torch.no_grad(), attnscope.capture(family.model) as attn:
        family.model(**family.inputs)
    with pytest.raises(attnscope.AttnScopeError, match="lazy=True"):
        attn.queries_keys(attn.names[0])
    with pytest.raises(attnscope.AttnScopeError, match="no attention module"):
        attn.queries_keys("nope")
