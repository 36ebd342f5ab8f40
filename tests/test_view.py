"""The interactive page's content: self-contained, safe, compact, within its budget."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.view import page_data, safe_json

XSS = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "a&b", "\"'"]


def maps_with_tokens(tokens: list[str], heads: int = 2) -> AttentionMaps:
    n = len(tokens)
    weights = torch.softmax(
        torch.randn(1, heads, n, n, generator=torch.Generator().manual_seed(0)), -1
    )
    return AttentionMaps.from_tensors({"layer.0": weights}).with_tokens(tokens)


def embedded_json(fragment: str) -> dict:
    match = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', fragment, re.S)
    assert match is not None
    return json.loads(match.group(1))


def test_tokens_are_data_never_markup() -> None:
    page = attnscope.view(maps_with_tokens(XSS), element_id="x")
    fragment = page._repr_html_()
    # the only </script> closings are the page's own two scripts
    assert fragment.count("</script>") == 2
    assert "<img" not in fragment
    data = embedded_json(fragment)
    assert data["maps"][0]["qlabels"] == XSS


def test_no_network_reference_in_the_page() -> None:
    document = attnscope.view(maps_with_tokens(["a", "b"]), element_id="x").document()
    # the SVG export names the SVG namespace, an identifier that is never fetched
    document = document.replace('"http://www.w3.org/2000/svg"', "SVG_NS")
    assert not re.search(r"https?://|//cdn|<link|src=\"http|import\(", document)


def test_quantised_data_round_trips_within_half_a_step() -> None:
    maps = maps_with_tokens(["a", "b", "c", "d"])
    data = page_data(maps)
    entry = data["maps"][0]
    original = maps["layer.0"][0]
    for head in range(2):
        raw = base64.b64decode(entry["data"][head])
        values = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().view(4, 4) / 255
        assert (values - original[head]).abs().max() <= 0.5 / 255 + 1e-7
        exact = torch.frombuffer(
            bytearray(base64.b64decode(entry["exact"][head])), dtype=torch.float32
        )
        assert torch.equal(exact.view(4, 4), original[head])


def test_budget_keeps_thumbnails_and_selected_heads_and_says_so() -> None:
    weights = torch.softmax(torch.randn(1, 4, 200, 200), -1)
    maps = AttentionMaps.from_tensors({"a": weights, "b": weights})
    data = page_data(maps, max_bytes=100_000, full_heads=[("b", 2)])
    assert "over this page's budget" in data["note"]
    assert [d is None for d in data["maps"][1]["data"]] == [True, True, False, True]
    assert all(d is None for d in data["maps"][0]["data"])
    assert data["maps"][0]["thumb"]["q"] == 64
    assert not data["exact"]
    with pytest.raises(AttnScopeError, match="no head 9"):
        page_data(maps, max_bytes=100_000, full_heads=[("b", 9)])


def test_page_object_protocols_and_atomic_save(tmp_path: Path) -> None:
    page = attnscope.view(maps_with_tokens(["a", "b"]), element_id="fixed", title="T <1>")
    assert page.__html__() == page._repr_html_()
    assert str(page).startswith("<!DOCTYPE html>")
    assert "<title>T &lt;1&gt;</title>" in str(page)
    assert 'id="attnscope-fixed"' in page._repr_html_()
    again = attnscope.view(maps_with_tokens(["a", "b"]), element_id="fixed", title="T <1>")
    assert again._repr_html_() == page._repr_html_()  # deterministic with a given id
    path = page.save(tmp_path / "page.html")
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]
    assert path.read_text(encoding="utf-8") == page.document()
    with pytest.raises(AttnScopeError, match="does not exist"):
        page.save(tmp_path / "missing" / "page.html")


def test_safe_json_escapes() -> None:
    assert "<" not in safe_json({"a": "</script>"}) and ">" not in safe_json({"a": ">"})
    assert json.loads(safe_json({"a": "</script>&"})) == {"a": "</script>&"}


def test_bad_input() -> None:
    with pytest.raises(AttnScopeError, match="takes an AttentionMaps"):
        attnscope.view({"a": torch.zeros(1)})  # type: ignore[arg-type]
    with pytest.raises(AttnScopeError, match=r"batch=3 .* pick one of 0 to 0"):
        attnscope.view(maps_with_tokens(["a"]), batch=3)


def one(shape: tuple[int, ...], name: str = "layer.0", kind: str = "self") -> AttentionMaps:
    return AttentionMaps.from_tensors({name: torch.full(shape, 0.5)}, kinds=kind)


@pytest.mark.parametrize(
    ("maps", "kwargs", "advice"),
    [
        (AttentionMaps(), {}, r"empty\. Call the model inside `with attnscope\.capture"),
        (one((1, 2, 0, 3)), {}, r"0 query positions .*at least one token.*select\(exclude="),
        (one((1, 2, 3, 0), kind="cross"), {}, r"0 key positions .*at least one token"),
        (one((1, 2, 0, 0), kind="causal"), {}, r"0 query positions"),
        (one((1, 0, 3, 3)), {}, r"no heads .*heads= keeping at least one"),
        (one((0, 2, 3, 3)), {}, r"0 batch items: capture a forward pass on at least one input"),
        (one((2, 2, 3, 3)), {"batch": -1}, r"batch=-1 .* pick one of 0 to 1"),
        (one((2, 2, 3, 3)), {"batch": 1.0}, r"batch must be an int"),
        (one((1, 2, 3, 3)), {"max_bytes": -1}, r"max_bytes=-1: give a whole number .* at least 1"),
        (one((1, 2, 3, 3)), {"max_bytes": 0}, r"max_bytes=0: .* at least 1"),
        (one((1, 2, 3, 3)), {"max_bytes": 1e6}, r"max_bytes=1000000\.0: give a whole number"),
        (one((1, 2, 3, 3)), {"exact_bytes": -5}, r"exact_bytes=-5: .* at least 0"),
        (one((1, 2, 3, 3)), {"full_heads": [("layer.0", 2)]}, r"no head 2 .* heads 0 to 1"),
        (one((1, 2, 3, 3)), {"full_heads": [("layer.0", -1)]}, r"no head -1"),
        (one((1, 2, 3, 3)), {"full_heads": [("nope", 0)]}, r"no module 'nope'; available: layer"),
        (one((1, 2, 3, 3)), {"full_heads": ("layer.0", 0)}, r"not a \(name, head\) pair; e\.g\."),
        (one((1, 2, 3, 3)), {"full_heads": "layer.0"}, r"list of \(name, head\) pairs"),
        (one((1, 2, 3, 3)), {"title": None}, r"title must be a str"),
        (one((1, 2, 3, 3)), {"stats": [1, 2]}, r"stats must be rows of \{column: value\}"),
        (one((1, 2, 3, 3)), {"stats": [("a", 1)]}, r"stats=attnscope\.head_stats\(attn\)"),
    ],
)
def test_degenerate_inputs_are_refused_with_advice(
    maps: AttentionMaps, kwargs: dict, advice: str
) -> None:
    with pytest.raises(AttnScopeError, match=advice):
        attnscope.view(maps, element_id="x", **kwargs)


def test_nan_weights_are_refused_rather_than_drawn_as_noise() -> None:
    weights = torch.full((2, 1, 3, 3), 1 / 3)
    weights[1, 0, 1, 2] = float("nan")
    maps = AttentionMaps.from_tensors({"layer.0": weights})
    attnscope.view(maps, batch=0)  # the clean batch item is fine
    refusal = r"NaN or infinite weights in batch item 1; .*nan_to_num"
    with pytest.raises(AttnScopeError, match=refusal):
        attnscope.view(maps, batch=1)


def test_a_real_capture_of_an_empty_sequence_is_refused_with_advice() -> None:
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with torch.no_grad(), attnscope.capture(encoder) as attn:
        encoder(torch.randn(1, 0, 8))
    assert [tuple(attn[name].shape)[2:] for name in attn.names] == [(0, 0)]
    with pytest.raises(AttnScopeError, match=r"0 query positions .*at least one token"):
        attnscope.view(attn)


def test_full_heads_are_checked_even_when_every_head_fits() -> None:
    maps = one((1, 2, 3, 3))
    assert page_data(maps, full_heads=[("layer.0", 1)])["note"] == ""  # fits: no note
    with pytest.raises(AttnScopeError, match="no head 7"):
        page_data(maps, full_heads=[("layer.0", 7)])


def test_stats_cells_become_plain_json_values() -> None:
    stats: list[dict] = [
        {"module": "m", "head": 0, "entropy": float("nan"), "first": 1 / 3, "ok": True},
        {"module": "m", "head": 1, "entropy": torch.tensor(0.25), "first": float("inf"), 7: [1]},
    ]
    data = embedded_json(attnscope.view(one((1, 2, 3, 3)), stats=stats)._repr_html_())
    assert data["table"] == [
        {"module": "m", "head": 0, "entropy": None, "first": 0.3333, "ok": True},
        {"module": "m", "head": 1, "entropy": 0.25, "first": None, "7": "[1]"},
    ]


def test_interop_formats() -> None:
    single = maps_with_tokens(["a", "b", "c"])
    bertviz = single.to_bertviz()
    assert bertviz["tokens"] == ["a", "b", "c"]
    assert bertviz["attention"][0].shape == (1, 2, 3, 3)
    pair = AttentionMaps.from_tensors(
        {"enc": torch.rand(1, 2, 3, 3), "dec": torch.rand(1, 2, 2, 2), "x": torch.rand(1, 2, 2, 3)},
        kinds={"enc": "self", "dec": "causal", "x": "cross"},
    ).with_tokens(["a", "b", "c"], ["<s>", "y"])
    kwargs = pair.to_bertviz()
    assert kwargs["encoder_tokens"] == ["a", "b", "c"]
    assert kwargs["decoder_tokens"] == ["<s>", "y"]
    assert torch.equal(kwargs["cross_attention"][0], pair["x"])
    assert torch.equal(single.to_circuitsvis()["attention"], single["layer.0"][0])
    circuits = single.to_circuitsvis("layer.0")
    assert circuits["tokens"] == ["a", "b", "c"]
    assert torch.equal(circuits["attention"], single["layer.0"][0])


def test_reading_aids_in_the_data_words_and_lazy_queries_keys() -> None:
    layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with torch.no_grad(), attnscope.capture(model, lazy=True) as attn:
        model(torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(0)))
    labelled = attn.with_tokens(["[CLS]", "play", "##ing", "[SEP]"])
    entry = page_data(labelled)["maps"][0]
    assert entry["kwords"] == {
        "groups": [[0], [1, 2], [3]],
        "labels": ["[CLS]", "playing", "[SEP]"],
    }
    assert entry["qwords"] == entry["kwords"]
    q, k = attn.queries_keys("layers.0.self_attn")
    for head in range(2):
        got_q = torch.frombuffer(
            bytearray(base64.b64decode(entry["qk"]["q"][head])), dtype=torch.float32
        )
        got_k = torch.frombuffer(
            bytearray(base64.b64decode(entry["qk"]["k"][head])), dtype=torch.float32
        )
        assert torch.equal(got_q.view(4, -1), q[0, head]) and torch.equal(
            got_k.view(4, -1), k[0, head]
        )
    assert entry["qk"]["dim"] == 4
    # left out, and said so, when they pass their budget; eager captures have none
    data = page_data(labelled, qk_bytes=10)
    assert "qk" not in data["maps"][0] and "query/key budget" in data["note"]
    assert "qk" not in page_data(maps_with_tokens(["a", "b"]))["maps"][0]
    assert "kwords" not in page_data(maps_with_tokens(["a", "b"]))["maps"][0]
    with pytest.raises(AttnScopeError, match="qk_bytes"):
        page_data(labelled, qk_bytes=-1)
