"""A greedy loop that re-runs the whole prefix at each step (no KV cache), under capture.

Its calls are not incremental decoding: ``concat`` refuses them and names the last call,
views and figures show that last call (the whole sequence) and say so.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor, nn

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from models import D_MODEL, HEADS, sequence, transformer
from reference import assert_weights_match, slow_path_weights

STEPS, SOURCE = 5, 6
SELF, CROSS = "decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"


def greedy(model: nn.Transformer, src: Tensor) -> Tensor:
    """Continuous greedy decoding: each step re-runs the decoder on the whole prefix."""
    memory = model.encoder(src)
    out = torch.zeros(src.size(0), 1, D_MODEL)
    for _ in range(STEPS):
        mask = nn.Transformer.generate_square_subsequent_mask(out.size(1))
        hidden = model.decoder(out, memory, tgt_mask=mask, tgt_is_causal=True)
        out = torch.cat([out, hidden[:, -1:]], dim=1)
    return out[:, :-1]  # what the last step was given


@pytest.fixture(scope="module")
def rerun() -> tuple[nn.Transformer, Tensor, Tensor, AttentionMaps]:
    model = transformer().eval()
    src = sequence(2, SOURCE)
    with torch.no_grad(), attnscope.capture(model) as attn:
        prefix = greedy(model, src)
    return model, src, prefix, attn


def test_the_calls_are_recognised_as_not_incremental(rerun) -> None:
    _, _, _, attn = rerun
    assert [tuple(c.shape[2:]) for c in attn.calls(SELF)] == [(t, t) for t in range(1, 6)]
    assert [tuple(c.shape[2:]) for c in attn.calls(CROSS)] == [(t, SOURCE) for t in range(1, 6)]
    assert not attn.incremental(SELF) and not attn.incremental(CROSS)
    assert attn.incremental("encoder.layers.0.self_attn")  # called once
    for name in (SELF, CROSS):
        with pytest.raises(AttnScopeError, match=re.escape(f"attn.calls({name!r})[-1]")):
            attn.concat(name)
        with pytest.raises(AttnScopeError, match=re.escape(f"attn.calls({name!r})[-1]")):
            attn[name]


def test_display_is_the_last_call_which_equals_one_pass_over_the_prefix(rerun) -> None:
    model, src, prefix, attn = rerun
    mask = nn.Transformer.generate_square_subsequent_mask(STEPS)
    reference = slow_path_weights(
        model, lambda m: m.decoder(prefix, m.encoder(src), tgt_mask=mask, tgt_is_causal=True)
    )
    for name in (SELF, CROSS):
        with pytest.warns(UserWarning, match=re.escape(f"attn.calls({name!r})[-1]")):
            weights, note = attn.display(name)
        assert note == f"last of {STEPS} calls"
        assert torch.equal(weights, attn.calls(name)[-1])
        assert_weights_match(weights, reference[name][0])
    assert attn.display("encoder.layers.0.self_attn", warn=False).note == ""
    labelled = attn.with_tokens([list("abcdef")] * 2, [["<s>", "1", "2", "3", "4"]] * 2)
    assert labelled.labels(SELF) == (["<s>", "1", "2", "3", "4"], ["<s>", "1", "2", "3", "4"])


def test_figures_and_the_page_show_the_last_call_and_say_so(rerun) -> None:
    pytest.importorskip("matplotlib")
    _, _, _, attn = rerun
    with pytest.warns(UserWarning, match="last call"):
        fig = attnscope.plot_heads(attn, CROSS)
    assert f"last of {STEPS} calls" in fig._suptitle.get_text()
    assert fig.axes[0].images[0].get_array().shape == (STEPS, SOURCE)
    with pytest.warns(UserWarning, match="last call"):
        one = attnscope.plot_head(attn, SELF, 1)
    assert f"last of {STEPS} calls" in one.axes[0].get_title()
    with pytest.warns(UserWarning, match="last call"):
        layers = attnscope.plot_layers(attn, kind="causal")
    assert any(f"last of {STEPS} calls" in ax.get_ylabel() for ax in layers.axes)
    with pytest.warns(UserWarning, match="last call"):
        page = attnscope.view(attn, element_id="rerun")
    assert "attnscope-rerun" in page._repr_html_()
    from attnscope.view import page_data

    with pytest.warns(UserWarning, match="last call"):
        data = page_data(attn)
    assert f"{SELF}: last of {STEPS} calls" in str(data["note"])  # said on the page itself


def test_kv_cache_steps_are_still_joined() -> None:
    """The same model decoding with the cache's shapes: each step only its new query."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).eval()
    x, memory = sequence(2, 4), sequence(2, SOURCE, seed=3)
    cross = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True).eval()
    model = nn.ModuleDict({"self": mha, "cross": cross})
    with torch.no_grad(), attnscope.capture(model) as steps:
        for t in range(4):
            mha(x[:, t : t + 1], x[:, : t + 1], x[:, : t + 1], need_weights=False)
            cross(x[:, t : t + 1], memory, memory, need_weights=False)
    assert steps.incremental("self") and steps.incremental("cross")
    weights, note = steps.display("self")
    assert note == "4 incremental calls joined" and weights.shape == (2, HEADS, 4, 4)
    assert steps.concat("cross").shape == (2, HEADS, 4, SOURCE)
