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
    with pytest.raises(AttnScopeError, match="batch=3"):
        attnscope.view(maps_with_tokens(["a"]), batch=3)


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
