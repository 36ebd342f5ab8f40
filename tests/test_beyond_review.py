"""Interventions and gradients where a review found them wrong: a KV cache's absolute query
positions, nested edits of one module, other threads, grouped-query decoding steps, modules
whose attention the edits cannot reach, attention dropout, an encoder-decoder's paddings."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import attnscope
import beyond_reference as br
import models
from attnscope import AttnScopeError
from hf_models import _ids, _left_padding, _right_padding, build

transformers = pytest.importorskip("transformers")


def _gpt2_lm() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def test_knockout_names_absolute_positions_in_a_kv_cache_step() -> None:
    """A decoding step's one query is the last position: the edge of that position applies
    to it (as in one forward over the whole sequence), an earlier query's edge does not."""
    model = _gpt2_lm()
    ids = _ids(99, 1, 6)
    layer = "transformer.h.0.attn"
    with torch.no_grad():
        for edges in ([(5, 1), (5, 3)], [(2, 1)]):
            with attnscope.knockout(model, {layer: edges}):
                whole = model(ids, use_cache=False).logits[:, -1]
                past = model(ids[:, :5], use_cache=True).past_key_values
                step = model(ids[:, 5:], past_key_values=past).logits[:, -1]
            torch.testing.assert_close(step, whole, rtol=1e-5, atol=1e-6)
        plain = model(ids, use_cache=False).logits[:, -1]
        with attnscope.knockout(model, {layer: [(5, 1)]}):
            assert (model(ids, use_cache=False).logits[:, -1] - plain).abs().max() > 1e-4
        with attnscope.knockout(model, {layer: [(2, 1)]}):
            generated = model.generate(
                ids[:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        assert generated.shape == (1, 8)


def test_nested_edits_of_one_module_all_apply() -> None:
    f = build("bert")
    f.inputs["attention_mask"] = _right_padding(2, 9, [9, 6])
    layer = "encoder.layer.0.attention.self"
    with (
        torch.no_grad(),
        br.eager_knockout(f.eager, {layer: [(3, 1)]}),
        br.head_hook(f.eager, {"encoder.layer.0.attention.output.dense": br.zero_heads([2])}, 4),
    ):
        expected = f.eager(**f.inputs).last_hidden_state
    for outer, inner in (
        (attnscope.ablate(f.model, {layer: [2]}), attnscope.knockout(f.model, {layer: [(3, 1)]})),
        (attnscope.knockout(f.model, {layer: [(3, 1)]}), attnscope.ablate(f.model, {layer: [2]})),
    ):
        with torch.no_grad(), outer, inner:
            got = f.model(**f.inputs).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_an_intervention_leaves_other_threads_alone() -> None:
    """PyTorch's fast paths stay on for other threads, and their forwards are unedited."""
    model = models.encoder().eval()
    x = models.sequence(2, 5)
    with torch.no_grad():
        plain = model(x)
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def hold() -> None:
        with torch.no_grad(), attnscope.ablate(model, {"layers.0.self_attn": [0, 1]}):
            seen["inside"] = model(x)
            entered.set()
            release.wait(30)

    worker = threading.Thread(target=hold)
    worker.start()
    assert entered.wait(30)
    try:
        with torch.no_grad():
            seen["other"] = model(x)
        seen["fast path"] = torch.backends.mha.get_fastpath_enabled()
    finally:
        release.set()
        worker.join(30)
    assert seen["fast path"] is True
    assert torch.equal(seen["other"], plain)  # type: ignore[arg-type]
    assert (seen["inside"] - plain).abs().max() > 1e-3  # type: ignore[operator]


def test_ablate_a_grouped_query_decoding_step() -> None:
    """Llama with 4 query heads on 2 key/value heads: a cached step's heads are the query
    heads, as in the prefill, against the head-mask hook on o_proj."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        vocab_size=99,
        max_position_embeddings=64,
        head_dim=8,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids, mask = _ids(99, 2, 5), _left_padding(2, 5, [5, 3])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    nxt = _ids(99, 2, 1, seed=4)
    layer = "model.layers.0.self_attn"

    def decode() -> torch.Tensor:
        past = model(ids, attention_mask=mask, use_cache=True).past_key_values
        return model(nxt, attention_mask=step_mask, past_key_values=past).logits

    with torch.no_grad():
        with br.head_hook(model, {layer + ".o_proj": br.zero_heads([3])}, 4):
            expected = decode()
        with attnscope.ablate(model, {layer: [3]}):
            got = decode()
        plain = decode()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (plain - expected).abs().max() > 1e-4


def test_edits_that_cannot_reach_the_kernel_raise() -> None:
    """An eager implementation computes its attention itself, as does nn.MultiheadAttention
    asked for its weights: editing nothing silently would pass an unedited result off."""
    f = build("bert")
    layer = "encoder.layer.0.attention.self"
    with (
        pytest.raises(AttnScopeError, match="attn_implementation='sdpa'"),
        torch.no_grad(),
        attnscope.ablate(f.eager, {layer: [0]}),
    ):
        f.eager(**f.inputs)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 4, 8)
    with (
        pytest.raises(AttnScopeError, match="need_weights=False"),
        torch.no_grad(),
        attnscope.knockout(mha, {"": [(2, 0)]}),
    ):
        mha(x, x, x)
    with torch.no_grad(), attnscope.knockout(mha, {"": [(2, 0)]}):
        knocked = mha(x, x, x, need_weights=False)[0]
        with attnscope.capture(mha) as attn:
            mha(x, x, x, need_weights=False)
    mask = torch.zeros(4, 4)
    mask[2, 0] = float("-inf")
    with torch.no_grad():
        expected = mha(x, x, x, attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(knocked, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(attn[""][:, :, 2, 0] == 0)


def test_grads_under_attention_dropout_are_refused() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True).train()
    x = torch.randn(1, 4, 8)
    with attnscope.capture(mha, grads=True) as attn:
        mha(x, x, x, need_weights=False)[0].sum().backward()
    with pytest.raises(AttnScopeError, match="dropout"):
        attn.grad("")


def test_mean_ablation_of_a_decoder_uses_the_decoder_padding() -> None:
    """BART, encoder padded, decoder not: the decoder's heads average over every decoder
    position, the encoder's over its real tokens."""
    f = build("bart")
    encoder_mask = f.inputs["attention_mask"]
    targets = {
        "decoder.layers.0.self_attn": ("decoder.layers.0.self_attn.out_proj", None),
        "encoder.layers.0.self_attn": ("encoder.layers.0.self_attn.out_proj", encoder_mask.bool()),
    }
    with torch.no_grad():
        for name, (projection, valid) in targets.items():
            where = (
                torch.ones(2, 5 if valid is None else 9, dtype=torch.bool)
                if valid is None
                else valid
            )
            with br.head_hook(f.model, {projection: br.mean_heads([1], where)}, 4):
                expected = f.model(**f.inputs).last_hidden_state
            with attnscope.ablate(f.model, {name: [1]}, how="mean"):
                got = f.model(**f.inputs).last_hidden_state
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(f.model)
    assert torch.equal(twin(**f.inputs).last_hidden_state, f.model(**f.inputs).last_hidden_state)
