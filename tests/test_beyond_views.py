"""Gradient- and norm-weighted maps as views of the same modules (``attn.weighted``), the
head-importance figure, and the options' bad input: against eager autograd and hand tables."""

from __future__ import annotations

import pytest
import torch

import attnscope
import beyond_reference as br
from attnscope import AttnScopeError
from hf_models import _right_padding, build

BATCH, SEQ, HIDDEN = 2, 9, 32


def _bert(dtype: torch.dtype = torch.float64):  # type: ignore[no-untyped-def]
    family = build("bert")
    family.inputs["attention_mask"] = _right_padding(BATCH, SEQ, [9, 6])
    family.model.to(dtype)
    family.eager.to(dtype)
    return family


def _loss(out):  # type: ignore[no-untyped-def]
    return br.projection_loss((BATCH, SEQ, HIDDEN))(out.last_hidden_state)


def test_grad_weighted_maps_are_the_positive_relevance_of_eager_autograd() -> None:
    f = _bert()
    _, weights, grads = br.eager_attention_grads(f.eager, f.inputs, _loss)
    with attnscope.capture(f.model, grads=True) as attn:
        _loss(f.model(**f.inputs)).backward()
    view = attn.weighted("grads")
    assert view.names == attn.names
    mask = f.inputs["attention_mask"]
    for name, w, g in zip(attn.names, weights, grads, strict=True):
        expected = (g * br.zero_padded_rows(w, mask)).clamp(min=0)
        torch.testing.assert_close(view[name].double(), expected, rtol=1e-5, atol=1e-9)
        assert view.kind(name) == attn.kind(name)
    # the weighted maps feed every analysis: rollout of them runs and differs from plain
    assert not torch.allclose(attnscope.rollout(view), attnscope.rollout(attn))


def test_norm_weighted_view_is_attn_norms() -> None:
    f = _bert()
    with torch.no_grad(), attnscope.capture(f.model, norms=True) as attn:
        f.model(**f.inputs)
    view = attn.weighted("norms")
    for name in attn.names:
        assert torch.equal(view[name], attn.norms(name))


def test_weighted_and_options_bad_input() -> None:
    f = _bert(torch.float32)
    with torch.no_grad(), attnscope.capture(f.model) as attn:
        f.model(**f.inputs)
    with pytest.raises(AttnScopeError, match="grads=True"):
        attn.weighted("grads")
    with pytest.raises(AttnScopeError, match="norms=True"):
        attn.weighted("norms")
    with pytest.raises(AttnScopeError, match="'grads' or 'norms'"):
        attn.weighted("values")
    with pytest.raises(AttnScopeError, match="norms="):
        attnscope.capture(f.model, norms="yes").__enter__()
    with pytest.raises(AttnScopeError, match="grads="):
        attnscope.capture(f.model, grads=1).__enter__()  # type: ignore[arg-type]
    with pytest.raises(AttnScopeError, match="'attention' or 'norms'"):
        attnscope.rollout(attn, weights="grads")


def test_norms_with_a_named_output_projection() -> None:
    """A projection named by the user is used as named: naming the right one gives the same
    norms as finding it; naming a wrong-shaped one is refused with the fix."""
    f = _bert()
    layer = "encoder.layer.0.attention.self"
    named = {layer: "encoder.layer.0.attention.output.dense"}
    with torch.no_grad():
        with attnscope.capture(f.model, norms=True) as found:
            f.model(**f.inputs)
        with attnscope.capture(f.model, norms=named) as given:
            f.model(**f.inputs)
        wrong = {layer: "encoder.layer.0.output.dense"}  # the feed-forward's: 37 inputs
        with attnscope.capture(f.model, norms=wrong) as bad:
            f.model(**f.inputs)
    torch.testing.assert_close(given.norms(layer), found.norms(layer))
    with pytest.raises(AttnScopeError, match="does not take"):
        bad.norms(layer)


def test_head_importance_figure_shows_the_table() -> None:
    pytest.importorskip("matplotlib")
    rows = [
        {"module": name, "head": head, "importance": float(3 * index + head)}
        for index, name in enumerate(["a.0", "a.1"])
        for head in range(3)
    ]
    fig = attnscope.plot_head_importance(rows)
    shown = fig.axes[0].images[0].get_array()
    assert shown.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    with pytest.raises(AttnScopeError, match="head_importance"):
        attnscope.plot_head_importance([{"module": "a"}])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_grads_of_an_eager_implementation_are_its_own_weights_gradient(name: str) -> None:
    """An eager model forms A itself: the gradient reaching that very tensor is ∂L/∂A."""
    f = build(name)
    f.eager.double()
    mask = f.inputs["attention_mask"] = _right_padding(BATCH, SEQ, [9, 6])
    _, _, reference = br.eager_attention_grads(f.eager, f.inputs, _loss)
    with attnscope.capture(f.eager, grads=True) as attn:
        _loss(f.eager(**f.inputs)).backward()
    assert len(attn.names) == len(reference) == 2
    for layer, expected in zip(attn.names, reference, strict=True):
        torch.testing.assert_close(attn.grad(layer), expected, rtol=1e-7, atol=1e-12)
        assert expected[mask.bool()[:, None, :, None].expand_as(expected)].abs().max() > 1e-4


def test_grads_of_hand_written_attention() -> None:
    """A module that computes softmax(q kᵀ) itself and multiplies by it (found by what runs):
    its gradient is autograd's through the same computation."""

    class Hand(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).view(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            weights = (q @ k.transpose(-1, -2) / 2.0).softmax(dim=-1)
            self.seen = weights
            return (weights @ v).sum()

    torch.manual_seed(0)
    model = Hand().double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    out = model(x)
    (expected,) = torch.autograd.grad(out, model.seen)
    with attnscope.capture(model, grads=True) as attn:
        model(x).backward()
    (name,) = attn.names
    torch.testing.assert_close(attn.grad(name), expected, rtol=1e-10, atol=1e-12)
