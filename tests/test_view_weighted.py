"""The page's grad- and norm-weighted map sets and its head-importance panel (issue #16
point 6): the data decodes to ``attn.weighted(...)`` and ``head_importance``'s table, and in
headless Chromium the selector and the panel show those values."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.view import page_data, safe_json
from hf_models import build

LAYER1 = "encoder.layer.1.attention.self"


def _loss(out: Any) -> torch.Tensor:
    return out.last_hidden_state[:, 0].norm()


@pytest.fixture(scope="module")
def bert() -> dict[str, Any]:
    """A tiny random BERT (2 layers x 4 heads, batch 2, 9 tokens, item 1 padded to 6),
    captured with gradients and value norms, and its head-importance table."""
    family = build("bert")
    with attnscope.capture(family.model, grads=True, norms=True) as attn:
        _loss(family.model(**family.inputs)).backward()
    table = attnscope.head_importance(family.model, [family.inputs], lambda o, b: _loss(o))
    return {"family": family, "attn": attn, "table": table}


def _bytes(b64: str, shape: tuple[int, ...]) -> torch.Tensor:
    raw = bytearray(base64.b64decode(b64))
    return torch.frombuffer(raw, dtype=torch.uint8).float().view(shape)


def _floats(b64: str, shape: tuple[int, ...]) -> torch.Tensor:
    raw = bytearray(base64.b64decode(b64))
    return torch.frombuffer(raw, dtype=torch.float32).view(shape)


@pytest.mark.parametrize("batch", [0, 1])
def test_weighted_sets_decode_to_attn_weighted(bert: dict[str, Any], batch: int) -> None:
    attn = bert["attn"]
    data = page_data(attn, batch=batch)
    assert [v["by"] for v in data["views"]] == ["attention", "grads", "norms"]
    assert [v["label"] for v in data["views"]] == ["attention", "grad × attention", "norm-weighted"]
    assert all(v["exact"] for v in data["views"])
    for view in data["views"][1:]:
        expected_maps = attn.weighted(view["by"])
        for name, entry in zip(attn.names, view["maps"], strict=True):
            expected = expected_maps[name][batch].float()
            heads, q, k = expected.shape
            assert set(entry) == {"data", "thumb", "scale", "exact"}  # values only: names shared
            for h in range(heads):
                peak = float(expected[h].max())  # 0 for a head whose relevance is all <= 0
                assert entry["scale"][h] == pytest.approx(peak, rel=1e-6, abs=0)
                decoded = _bytes(entry["data"][h], (q, k)) / 255 * entry["scale"][h]
                # within half a step of this map's own maximum
                assert (decoded - expected[h]).abs().max() <= peak / 510 * (1 + 1e-5)
                torch.testing.assert_close(_floats(entry["exact"][h], (q, k)), expected[h])
                # the thumbnail (9 x 9: no pooling) is the map relative to its peak, which it names
                assert entry["thumb"]["peak"][h] == pytest.approx(peak, rel=1e-6)
                thumb = _bytes(entry["thumb"]["data"][h], (q, k)) / 255 * peak
                assert (thumb - expected[h]).abs().max() <= peak / 510 * (1 + 1e-5)
    # norm-weighted maps are not in [0, 1] (the reason for a scale per map)
    norms = attn.weighted("norms")[LAYER1][batch]
    assert float(norms.max()) != pytest.approx(1.0, abs=0.05)
    # padded query rows of item 1 are zeros in every set
    if batch == 1:
        for view in data["views"][1:]:
            rows = _bytes(view["maps"][1]["data"][0], (9, 9))
            assert rows[6:].abs().sum() == 0


def test_a_plain_capture_has_one_set_and_explicit_sets_need_their_capture(
    bert: dict[str, Any],
) -> None:
    family = bert["family"]
    with torch.no_grad(), attnscope.capture(family.model) as plain:
        family.model(**family.inputs)
    data = page_data(plain)
    assert [v["by"] for v in data["views"]] == ["attention"] and data["note"] == ""
    with pytest.raises(AttnScopeError, match=r"grads=True"):
        attnscope.view(plain, weights=("grads",))
    with pytest.raises(AttnScopeError, match=r"norms=True"):
        page_data(plain, weights=("attention", "norms"))
    with pytest.raises(AttnScopeError, match=r"unknown map set 'values'"):
        page_data(plain, weights=("values",))
    with pytest.raises(AttnScopeError, match=r"empty"):
        page_data(plain, weights=())
    with pytest.raises(AttnScopeError, match=r"twice"):
        page_data(bert["attn"], weights=("norms", "norms"))


def test_only_the_named_sets_in_the_named_order(bert: dict[str, Any]) -> None:
    attn = bert["attn"]
    data = page_data(attn, weights="norms")
    assert [v["by"] for v in data["views"]] == ["norms"]
    entry = data["maps"][1]  # the first set is the maps' own entries, scales and all
    assert entry["name"] == LAYER1 and len(entry["scale"]) == 4
    expected = attn.weighted("norms")[LAYER1][0, 3]
    decoded = _bytes(entry["data"][3], (9, 9)) / 255 * entry["scale"][3]
    assert (decoded - expected).abs().max() <= float(expected.max()) / 510 * (1 + 1e-5)
    data = page_data(attn, weights=("norms", "attention"))
    assert [v["by"] for v in data["views"]] == ["norms", "attention"]
    weights = _bytes(data["views"][1]["maps"][0]["data"][0], (9, 9)) / 255
    assert (weights - attn[attn.names[0]][0, 0]).abs().max() <= 0.5 / 255 + 1e-7


def test_grads_kept_without_a_backward_are_left_out_and_said(bert: dict[str, Any]) -> None:
    family = bert["family"]
    with attnscope.capture(family.model, grads=True, norms=True) as attn:
        family.model(**family.inputs)  # no backward inside the block
    data = page_data(attn)
    assert [v["by"] for v in data["views"]] == ["attention", "norms"]
    assert "No grad × attention view" in data["note"] and "backward" in data["note"]
    with pytest.raises(AttnScopeError, match=r"loss.backward\(\)"):
        page_data(attn, weights=("attention", "grads"))


def test_one_budget_covers_every_set_and_keeps_the_same_heads_in_each(
    bert: dict[str, Any],
) -> None:
    attn = bert["attn"]
    one_set = 2 * 4 * 9 * 9 * 4 // 3  # bytes of the attention maps in base64
    assert page_data(attn, weights="attention", max_bytes=one_set)["note"] == ""
    data = page_data(attn, max_bytes=one_set)  # fits one set, not three
    assert "of the 3 views (attention, grad × attention, norm-weighted)" in data["note"]
    assert "over this page's budget" in data["note"] and "in each view" in data["note"]
    full = [[h is not None for h in m["data"]] for m in data["maps"]]
    # each kept head costs its bytes in 3 sets: 81 * 3 * 4 / 3 = 324 of 432
    assert sum(map(sum, full)) == one_set // (81 * 3 * 4 // 3)
    for view in data["views"][1:]:
        assert [[h is not None for h in m["data"]] for m in view["maps"]] == full
    assert not any(v["exact"] for v in data["views"])
    # exact values set by set while they fit: attention's 2 x 4 x 81 floats, not three sets'
    exact = page_data(attn, exact_bytes=2 * 4 * 81 * 4 * 4 // 3)
    assert [v["exact"] for v in exact["views"]] == [True, False, False]
    assert "exact" not in exact["views"][2]["maps"][0]


def test_importance_panel_data_is_the_table(bert: dict[str, Any]) -> None:
    attn, table = bert["attn"], bert["table"]
    fragment = attnscope.view(attn, importance=table, element_id="imp")._repr_html_()
    match = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', fragment, re.S)
    assert match is not None
    panel = json.loads(match.group(1))["importance"]
    assert panel["modules"] == attn.names and panel["heads"] == 4
    torch.testing.assert_close(torch.tensor(panel["values"], dtype=torch.float64), table.matrix())
    assert panel["hi"] == pytest.approx(float(table.matrix().max()))
    # rows work as well as the table; a head without a row is an empty cell
    rows = [r for r in table if not (r["module"] == LAYER1 and r["head"] == 2)]
    from attnscope.view.importance import importance_panel

    values = importance_panel(rows, attn.names)["values"]
    assert values[1][2] is None and values[1][3] == table.matrix()[1, 3].item()


@pytest.mark.parametrize(
    ("importance", "match"),
    [
        ("table", r"ImportanceTable or its rows"),
        ([{"module": "x", "head": 0}], r"'module', 'head' and 'importance'"),
        ([{"module": "x", "head": -1, "importance": 1.0}], r"head must be an int >= 0"),
        ([{"module": "x", "head": 0, "importance": "big"}], r"not a number"),
        ([], r"no rows"),
        ([{"module": "elsewhere", "head": 0, "importance": 1.0}], r"none of its modules"),
    ],
)
def test_importance_bad_input_is_refused(importance: object, match: str) -> None:
    maps = AttentionMaps.from_tensors({"layer": torch.full((1, 2, 3, 3), 1 / 3)})
    with pytest.raises(AttnScopeError, match=match):
        attnscope.view(maps, importance=importance)
    twice = [{"module": "layer", "head": 0, "importance": 1.0}] * 2
    with pytest.raises(AttnScopeError, match="two rows"):
        attnscope.view(maps, importance=twice)


# -- in headless Chromium ------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed")
    with api.sync_playwright() as p:
        instance = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"]
        )
        yield instance
        instance.close()


def _open(browser: Any, path: Path) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
    page.goto(path.as_uri())
    page.wait_for_selector(".attnscope-root[data-ready=true]", timeout=30_000)
    return page, errors


def _tooltip_at(page: Any, query: int, key: int, size: int = 9) -> float:
    box = page.locator(".attnscope-matrix").bounding_box()
    x = box["x"] + (key + 0.5) * box["width"] / size
    page.mouse.move(x, box["y"] + (query + 0.5) * box["height"] / size)
    tip = page.text_content(".attnscope-tooltip") or ""
    assert re.match(rf"query (word )?{query} .* key (word )?{key} ", tip), tip
    return float(tip.rsplit(": ", 1)[1].lstrip("≈"))


def test_selector_and_importance_panel_in_chromium(
    browser: Any, bert: dict[str, Any], tmp_path: Path
) -> None:
    attn, table = bert["attn"], bert["table"]
    # exact_bytes=0: the tooltips read the one-byte values, so quantisation is what is tested
    page_file = attnscope.view(attn, importance=table, exact_bytes=0, element_id="wv")
    page, errors = _open(browser, page_file.save(tmp_path / "weighted.html"))
    assert page.locator(".attnscope-weights option").all_text_contents() == [
        "attention",
        "grad × attention",
        "norm-weighted",
    ]
    # the importance panel: a cell per head, the table's value on hover, a click opens it
    cells = page.locator(".attnscope-imp-cell")
    assert cells.count() == len(table) == 2 * 4
    cell = f".attnscope-imp-cell[data-module='{LAYER1}'][data-head='2']"
    page.hover(cell)
    tip = page.text_content(".attnscope-imp-tooltip") or ""
    row = next(r for r in table if r["module"] == LAYER1 and r["head"] == 2)
    assert tip.startswith(f"{LAYER1}, head 2: ")
    assert float(tip.rsplit(": ", 1)[1]) == pytest.approx(row["importance"], rel=1e-5)
    page.click(cell)
    assert page.get_attribute(".attnscope-root", "data-selected") == f"{LAYER1}#2"
    assert "attnscope-selected" in (page.get_attribute(cell, "class") or "")
    assert page.input_value(".attnscope-layer") == "1"
    weight = _tooltip_at(page, 1, 2)
    assert weight == pytest.approx(float(attn[LAYER1][0, 2, 1, 2]), abs=0.5 / 255 + 5e-4)
    before = (
        page.eval_on_selector(".attnscope-matrix", "c => c.toDataURL()"),
        page.eval_on_selector(
            ".attnscope-thumb[data-map='0'][data-head='0']", "c => c.toDataURL()"
        ),
    )
    # norm-weighted: the same module and head, the values of attn.weighted("norms")
    page.select_option(".attnscope-weights", "2")
    assert page.get_attribute(".attnscope-root", "data-weights") == "norms"
    assert page.get_attribute(".attnscope-root", "data-selected") == f"{LAYER1}#2"
    assert "norm-weighted" in (page.text_content(".attnscope-matrixview h3") or "")
    after = (
        page.eval_on_selector(".attnscope-matrix", "c => c.toDataURL()"),
        page.eval_on_selector(
            ".attnscope-thumb[data-map='0'][data-head='0']", "c => c.toDataURL()"
        ),
    )
    assert after[0] != before[0] and after[1] != before[1]  # matrix and model view repainted
    norms = attn.weighted("norms")[LAYER1][0, 2]
    peak = float(norms.max())
    for query, key in ((1, 2), (4, 7), (0, 0)):
        shown = _tooltip_at(page, query, key)
        expected = float(norms[query, key])
        assert shown == pytest.approx(expected, abs=peak / 510 * 1.001 + 5e-4 * abs(expected))
    legend = float(page.text_content(".attnscope-legend-top") or "nan")
    assert legend == pytest.approx(peak, rel=5e-3)  # the colour scale is this map's own
    # the exports follow the set
    with page.expect_download() as download:
        page.click(".attnscope-export-svg")
    assert download.value.suggested_filename.startswith("norms-weighted-encoder.layer.1")
    svg = Path(download.value.path()).read_text(encoding="utf-8")
    assert "norm-weighted" in svg
    # grad x attention
    page.select_option(".attnscope-weights", "1")
    grads = attn.weighted("grads")[LAYER1][0, 2]
    peak = float(grads.max())
    shown = _tooltip_at(page, 1, 2)
    assert shown == pytest.approx(float(grads[1, 2]), abs=peak / 510 * 1.001 + 5e-4 * shown)
    assert errors == []


def test_without_weighted_sets_there_is_no_selector_and_served_data_gets_one(
    browser: Any, bert: dict[str, Any], tmp_path: Path
) -> None:
    family = bert["family"]
    with torch.no_grad(), attnscope.capture(family.model) as plain:
        family.model(**family.inputs)
    page, errors = _open(browser, attnscope.view(plain).save(tmp_path / "plain.html"))
    assert page.locator(".attnscope-weights").count() == 0
    assert page.locator(".attnscope-importance").count() == 0
    assert errors == []
    # the live explorer hands the renderer the data object itself (serve.js): same selector
    data = page_data(bert["attn"])
    assets = Path(importlib.import_module("attnscope.view").__file__ or "").parent
    served = tmp_path / "served.html"
    served.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<div id="attnscope-live-0" class="attnscope-root"></div>'
        f"<style>{(assets / 'page.css').read_text()}</style>"
        f"<script>{(assets / 'page.js').read_text()}\n"
        f'attnscopeRender("attnscope-live-0", {safe_json(data)});</script></body></html>',
        encoding="utf-8",
    )
    page, errors = _open(browser, served)
    page.select_option(".attnscope-weights", "2")
    page.click(".attnscope-thumb[data-map='1'][data-head='2']")
    norms = bert["attn"].weighted("norms")[LAYER1][0, 2]
    # exact values embedded: the tooltip shows the float32 value to 6 significant digits
    assert _tooltip_at(page, 1, 2) == pytest.approx(float(norms[1, 2]), rel=1e-5)
    assert errors == []


def test_weighted_maps_given_as_attention_keep_their_values() -> None:
    """view(attn.weighted("norms")) (README) passes maps that are not probabilities: above 1
    they get each head's own scale rather than being clipped to 1."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with torch.no_grad(), attnscope.capture(model, norms=True) as attn:
        model(torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(1)) * 4)
    weighted = attn.weighted("norms")
    expected = weighted["layers.0.self_attn"][0]
    assert float(expected.max()) > 1  # the case at hand
    data = page_data(weighted)
    assert "layers.0.self_attn: weights above 1" in data["note"]
    entry = data["maps"][0]
    for h in range(2):
        peak = float(expected[h].max())
        decoded = _bytes(entry["data"][h], (5, 5)) / 255 * entry["scale"][h]
        assert (decoded - expected[h]).abs().max() <= peak / 510 * (1 + 1e-5)
    # true attention maps keep the fixed [0, 1] scale, and no such note
    plain = page_data(attn)
    assert "scale" not in plain["maps"][0] and "above 1" not in plain["note"]


def test_words_merge_a_scaled_set_as_merge_tokens_does(browser: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with torch.no_grad(), attnscope.capture(model, norms=True) as attn:
        model(torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1)) * 4)
    tokens = ["[CLS]", "un", "##believ", "##able", "day", "[SEP]"]
    weighted = attn.weighted("norms").with_tokens(tokens)  # values above 1: a scaled set
    page, errors = _open(browser, attnscope.view(weighted).save(tmp_path / "words.html"))
    page.check(".attnscope-wordtoggle input")
    words = weighted.merge_tokens()["layers.0.self_attn"][0, 0]
    # query "unbelievable" (3 rows averaged), key "unbelievable" (3 columns summed): each
    # column off by up to half a step of the token-level map's maximum
    step = float(weighted["layers.0.self_attn"][0, 0].max()) / 510
    for query, key in ((1, 1), (0, 1), (3, 1)):
        shown = _tooltip_at(page, query, key, size=4)
        expected = float(words[query, key])
        assert shown == pytest.approx(expected, abs=3 * step + 5e-4 * expected)
    legend = float(page.text_content(".attnscope-legend-top") or "nan")
    assert legend == pytest.approx(float(words.max()), rel=5e-3)  # merged map, own maximum
    assert errors == []


def test_hostile_module_names_in_the_importance_panel_stay_data() -> None:
    name = "</script><img src=x onerror=alert(1)>"
    maps = AttentionMaps.from_tensors({name: torch.full((1, 2, 3, 3), 1 / 3)})
    rows = [{"module": name, "head": h, "importance": float(h)} for h in range(2)]
    fragment = attnscope.view(maps, importance=rows, element_id="hostile")._repr_html_()
    assert fragment.count("</script>") == 2 and "<img" not in fragment
    match = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', fragment, re.S)
    assert match is not None
    assert json.loads(match.group(1))["importance"]["modules"] == [name]
