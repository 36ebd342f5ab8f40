"""Bad input gets an AttnScopeError that says what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnscope
from attnscope import AttnScopeError
from models import encoder, sequence, transformer


def test_not_a_module() -> None:
    with (
        pytest.raises(AttnScopeError, match=r"takes a torch.nn.Module, got function"),
        attnscope.capture(lambda x: x),
    ):  # type: ignore[arg-type]
        pass


def test_model_without_attention_names_what_is_recognised() -> None:
    with (
        pytest.raises(
            AttnScopeError, match=r"no attention module in Sequential.*MultiheadAttention"
        ),
        attnscope.capture(nn.Sequential(nn.Linear(2, 2))),
    ):
        pass


def test_include_matching_nothing_lists_available_names() -> None:
    with (
        pytest.raises(
            AttnScopeError, match=r"matches none.*layers\.0\.self_attn, layers\.1\.self_attn"
        ),
        attnscope.capture(encoder(), include="decoder.*"),
    ):
        pass


def test_unknown_name_suggests_close_names() -> None:
    model = encoder().eval()
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(sequence(1, 3))
    with pytest.raises(AttnScopeError, match=r"Did you mean 'layers\.0\.self_attn'"):
        attn["layers.0.selfattn"]


def test_module_called_several_times_points_to_calls_and_concat() -> None:
    model = encoder().eval()
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(sequence(1, 3))
        model(sequence(1, 4))
    with pytest.raises(
        AttnScopeError, match=r"called 2 times.*calls\('layers\.0\.self_attn'\).*concat"
    ):
        attn["layers.0.self_attn"]


def test_max_bytes_refuses_before_allocating_with_estimate() -> None:
    model = transformer().eval()
    # each map here is 2 x 4 x 5 x 5 float32 = 800 bytes; the third one would pass the limit
    with (
        pytest.raises(
            AttnScopeError,
            match=r"refused before allocating.*800 bytes.*1,600 are held.*max_bytes=2,000",
        ),
        torch.no_grad(),
        attnscope.capture(model, max_bytes=2000) as attn,
    ):
        model(sequence(2, 5), sequence(2, 5, seed=2))
    assert attn.nbytes == 1600 and len(attn.names) == 2


def test_bad_options() -> None:
    model = encoder()
    for kwargs, pattern in [
        ({"dtype": torch.int8}, "cannot hold attention weights"),
        ({"dtype": torch.float8_e4m3fn}, "cannot hold attention weights"),
        ({"max_bytes": -1}, "non-negative"),
        ({"to": "no-such-device"}, "not a torch device"),
        ({"to": "meta"}, "shapes only"),
        ({"heads": []}, "non-empty"),
    ]:
        with pytest.raises(AttnScopeError, match=pattern), attnscope.capture(model, **kwargs):
            pass
    with (
        pytest.raises(AttnScopeError, match=r"heads=\[9\].*4 heads"),
        attnscope.capture(model, heads=[9]),
    ):
        model.eval()
        with torch.no_grad():
            model(sequence(1, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_storage_device_this_machine_lacks_is_refused_before_the_forward() -> None:
    model = encoder().eval()
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with (
        pytest.raises(AttnScopeError, match=r"to='cuda'.*not available here"),
        attnscope.capture(model, to="cuda"),
    ):
        model(sequence(1, 3))
    assert calls == []


@pytest.mark.parametrize(
    "expected",
    [
        torch.arange(4),
        torch.zeros(3, 3, dtype=torch.long),
        [[0, 1, 2]] * 3,
        torch.zeros(2, 3, 1, dtype=torch.long),
        torch.tensor([True, False, True]),
        "abc",
    ],
    ids=["too many queries", "too many items", "nested list", "3-D", "booleans", "text"],
)
def test_alignment_with_expected_of_the_wrong_shape_says_which_fit(expected: object) -> None:
    maps = attnscope.AttentionMaps.from_tensors(
        {"x": torch.eye(3).expand(2, 2, 3, 3)}, kinds="cross"
    )
    with pytest.raises(
        AttnScopeError, match=r"give \(query,\) = \(3,\) or \(batch, query\) = \(2, 3\) key"
    ):
        attnscope.alignment(maps, "x", expected)  # type: ignore[arg-type]
    assert attnscope.alignment(maps, "x", torch.arange(3)).score == 1.0
    score = attnscope.alignment(maps, "x", torch.tensor([[0, 1, 2], [0, 1, 0]])).score
    assert score == pytest.approx(5 / 6)
