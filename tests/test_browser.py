"""The page in a real headless Chromium (Debian's, driven by Playwright; nothing downloaded)."""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.view import AttentionPage, safe_json
from watched import watch

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium (apt-get install chromium)")
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

XSS = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "plain"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
            ],
        )
        yield instance
        instance.close()


class Opened:
    def __init__(self, browser: object, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1300, "height": 1000})  # type: ignore[attr-defined]
        self.errors, self.dialogs, self.requests = watch(
            self.page, self.page, ("file:", "data:", "blob:")
        )
        self.page.goto(path.as_uri())
        self.page.wait_for_selector(".attnscope-root[data-ready=true]", timeout=30_000)

    def ink(self, selector: str) -> int:
        """Non-white, non-transparent pixels of a canvas."""
        return self.page.eval_on_selector(
            selector,
            """c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4)
                if (d[i+3] > 0 && Math.min(d[i], d[i+1], d[i+2]) < 250) n++;
            return n; }""",
        )

    def pixels(self, selector: str) -> list[int]:
        return self.page.eval_on_selector(
            selector,
            "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)",
        )


def demo_like_maps() -> AttentionMaps:
    generator = torch.Generator().manual_seed(0)
    enc = torch.softmax(torch.randn(2, 4, 6, 6, generator=generator) * 3, -1)
    dec = torch.softmax(
        torch.randn(2, 4, 5, 5, generator=generator) * 3 + torch.triu(torch.full((5, 5), -1e9), 1),
        -1,
    )
    cross = torch.softmax(torch.randn(2, 4, 5, 6, generator=generator) * 3, -1)
    maps = AttentionMaps.from_tensors(
        {"encoder.0": enc, "decoder.0.self": dec, "decoder.0.cross": cross},
        kinds={"encoder.0": "self", "decoder.0.self": "causal", "decoder.0.cross": "cross"},
    )
    return maps.with_tokens(["a", "b", "c", "d", "e", "f"], ["<s>", "v", "w", "x", "y"])


def test_page_renders_and_clicks_change_the_view(browser: object, tmp_path: Path) -> None:
    path = attnscope.view(demo_like_maps(), element_id="t").save(tmp_path / "page.html")
    opened = Opened(browser, path)
    page = opened.page
    assert opened.ink(".attnscope-matrix") > 0
    assert opened.ink(".attnscope-lines") > 0
    assert all(opened.ink(f".attnscope-thumb >> nth={i}") > 0 for i in range(12))
    before = opened.pixels(".attnscope-matrix")
    page.click(".attnscope-thumb[data-map='2'][data-head='3']")
    assert page.get_attribute(".attnscope-root", "data-selected") == "decoder.0.cross#3"
    assert opened.pixels(".attnscope-matrix") != before
    # cross attention: decoder tokens on the left (queries), encoder tokens on the right (keys)
    assert page.locator(".attnscope-left .attnscope-token").all_text_contents() == [
        "<s>",
        "v",
        "w",
        "x",
        "y",
    ]
    assert page.locator(".attnscope-right .attnscope-token").all_text_contents() == [
        "a",
        "b",
        "c",
        "d",
        "e",
        "f",
    ]
    lines_before = opened.pixels(".attnscope-lines")
    page.select_option(".attnscope-layer", "1")
    assert page.get_attribute(".attnscope-root", "data-selected") == "decoder.0.self#0"
    assert page.locator(".attnscope-left .attnscope-token").count() == 5
    page.uncheck(".attnscope-headtoggle input >> nth=0")
    assert opened.pixels(".attnscope-lines") != lines_before
    page.hover(".attnscope-matrix", position={"x": 5, "y": 5})
    assert "query 0" in page.text_content(".attnscope-tooltip")
    assert opened.errors == []
    assert opened.requests == []


def test_xss_tokens_stay_text(browser: object, tmp_path: Path) -> None:
    weights = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    maps = AttentionMaps.from_tensors({"layer": weights}).with_tokens(XSS)
    opened = Opened(browser, attnscope.view(maps, element_id="x").save(tmp_path / "xss.html"))
    assert opened.page.locator(".attnscope-left .attnscope-token").all_text_contents() == XSS
    assert opened.page.locator(".attnscope-root img").count() == 0
    opened.page.wait_for_timeout(200)
    assert opened.dialogs == []
    assert opened.errors == []
    assert opened.requests == []


def test_budgeted_page_shows_thumbnails_and_says_so(browser: object, tmp_path: Path) -> None:
    weights = torch.softmax(torch.randn(1, 3, 120, 120), -1)
    maps = AttentionMaps.from_tensors({"a": weights, "b": weights})
    page = attnscope.view(maps, max_bytes=20_000, full_heads=[("a", 0)], element_id="b")
    opened = Opened(browser, page.save(tmp_path / "budget.html"))
    assert "over this page's budget" in opened.page.text_content(".attnscope-note")
    opened.page.click(".attnscope-thumb[data-map='1'][data-head='2']")
    assert "pooled thumbnail" in opened.page.text_content(".attnscope-matrixview h3")
    assert opened.ink(".attnscope-matrix") > 0
    # the 64 x 64 thumbnail is shown as large as the full map, its ticks still on tokens
    box = opened.page.locator(".attnscope-matrix").bounding_box()
    assert box is not None and round(box["width"]) == round(box["height"]) == 360
    ticks = axis_ticks(opened.page, "y")
    assert [t["text"] for t in ticks] == [str(t["index"]) for t in ticks]
    assert_on_their_rows(ticks, box, 120, "y")
    assert opened.errors == []


def test_demo_sized_real_capture_page(browser: object, tmp_path: Path) -> None:
    model = torch.nn.Transformer(32, 4, 2, 2, 64, batch_first=True).eval()
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(torch.randn(2, 30, 32), torch.randn(2, 20, 32))
    opened = Opened(browser, attnscope.view(attn).save(tmp_path / "real.html"))
    assert opened.page.locator(".attnscope-thumb").count() == 6 * 4
    assert opened.errors == []


# Each payload, run as script, sets window.__pwned and opens a dialog; neither may happen.
PWN = "window.__pwned=1;alert(1)"
HOSTILE_TITLE = f"</title></script><script>{PWN}</script>"
HOSTILE_NAMES = [f"</script><img src=x onerror={PWN}>", f"<svg onload={PWN}>"]
HOSTILE_TOKENS = [
    f"<img src=x onerror={PWN}>",
    f"</script><script>{PWN}</script>",
    f"<!--<script>{PWN}//",
    f'" onmouseover="{PWN}',
]
HOSTILE_TARGETS = [f"<iframe src=javascript:{PWN}>", "&lt;b&gt;", "\u2028"]
HOSTILE_CELL = f"<img src=y onerror={PWN}>"


def hostile_page() -> AttentionPage:
    generator = torch.Generator().manual_seed(0)
    maps = AttentionMaps.from_tensors(
        {
            HOSTILE_NAMES[0]: torch.softmax(torch.randn(1, 2, 4, 4, generator=generator), -1),
            HOSTILE_NAMES[1]: torch.softmax(torch.randn(1, 2, 3, 4, generator=generator), -1),
        },
        kinds={HOSTILE_NAMES[0]: "self", HOSTILE_NAMES[1]: "cross"},
    ).with_tokens(HOSTILE_TOKENS, HOSTILE_TARGETS)
    stats = [{"module": HOSTILE_NAMES[0], "head": 0, HOSTILE_TITLE: HOSTILE_CELL}]
    return attnscope.view(maps, title=HOSTILE_TITLE, element_id="hostile", stats=stats)


def assert_inert_and_literal(opened: Opened) -> None:
    """No payload ran, no element came from the data, and every string shows as typed."""
    page = opened.page
    # touch everything that reacts to the mouse, so that handlers run over the hostile text
    page.hover(".attnscope-left .attnscope-token >> nth=1")
    page.hover(".attnscope-matrix", position={"x": 3, "y": 3})
    page.select_option(".attnscope-layer", "1")
    page.hover(".attnscope-matrix", position={"x": 3, "y": 3})
    page.wait_for_timeout(300)  # a failed image load fires onerror asynchronously
    assert opened.dialogs == []
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.evaluate("document.scripts.length") == 2  # the page's own two
    stray = "img, svg, iframe, object, embed, a, form, input:not([type=checkbox])"
    assert page.locator(stray).count() == 0
    assert page.text_content(".attnscope-title") == HOSTILE_TITLE
    assert page.locator(".attnscope-layer option").all_text_contents() == [
        f"{HOSTILE_NAMES[0]} (self)",
        f"{HOSTILE_NAMES[1]} (cross)",
    ]
    assert page.locator(".attnscope-rowlabel").all_text_contents() == HOSTILE_NAMES
    assert page.get_attribute(".attnscope-root", "data-selected") == f"{HOSTILE_NAMES[1]}#0"
    assert HOSTILE_NAMES[1] in page.text_content(".attnscope-matrixview h3")
    assert page.locator(".attnscope-left .attnscope-token").all_text_contents() == HOSTILE_TARGETS
    assert page.locator(".attnscope-right .attnscope-token").all_text_contents() == HOSTILE_TOKENS
    assert page.locator(".attnscope-ytick").all_text_contents() == HOSTILE_TARGETS
    assert page.locator(".attnscope-xtick").all_text_contents() == HOSTILE_TOKENS
    tooltip = page.text_content(".attnscope-tooltip")
    assert f"{HOSTILE_TARGETS[0]} → key 0 {HOSTILE_TOKENS[0]}" in tooltip
    assert page.locator(".attnscope-table th").all_text_contents() == [
        "module",
        "head",
        HOSTILE_TITLE,
    ]
    assert HOSTILE_CELL in page.locator(".attnscope-table td").all_text_contents()
    assert opened.errors == []
    assert opened.requests == []


def test_hostile_element_ids_are_refused_before_any_page_exists() -> None:
    maps = AttentionMaps.from_tensors({"layer": torch.full((1, 1, 2, 2), 0.5)})
    for element_id in ("</script><script>alert(1)</script>", f'x" onclick="{PWN}'):
        with pytest.raises(AttnScopeError, match="letters, digits"):
            attnscope.view(maps, element_id=element_id)


def test_hostile_strings_in_a_saved_page_run_nothing_and_read_as_text(
    browser: object, tmp_path: Path
) -> None:
    opened = Opened(browser, hostile_page().save(tmp_path / "hostile.html"))
    assert opened.page.title() == HOSTILE_TITLE
    assert_inert_and_literal(opened)


def test_hostile_strings_in_a_notebook_style_embedding_run_nothing(
    browser: object, tmp_path: Path
) -> None:
    # Jupyter puts _repr_html_ into the page with innerHTML and then re-creates each script
    # so that it runs; any markup the fragment carried would come alive here.
    host = tmp_path / "notebook.html"
    host.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><div id="cell"></div>'
        "<script>var cell = document.getElementById('cell');"
        f"cell.innerHTML = {safe_json(hostile_page()._repr_html_())};"
        "cell.querySelectorAll('script').forEach(function (old) {"
        "  var fresh = document.createElement('script');"
        "  if (old.type) fresh.type = old.type;"
        "  if (old.id) fresh.id = old.id;"
        "  fresh.textContent = old.textContent;"
        "  old.replaceWith(fresh); });"
        "document.querySelector('body > script').remove();</script></body></html>",
        encoding="utf-8",
    )
    assert_inert_and_literal(Opened(browser, host))


def axis_ticks(page: object, axis: str) -> list[dict[str, float | str]]:
    """The matrix view's tick labels on one axis ("x": keys, "y": queries), with their boxes."""
    return page.eval_on_selector_all(  # type: ignore[attr-defined, no-any-return]
        f".attnscope-{axis}tick",
        """ticks => ticks.map(t => { const r = t.getBoundingClientRect();
            return {text: t.textContent, index: Number(t.dataset.index), left: r.left,
                    right: r.right, top: r.top, bottom: r.bottom,
                    size: parseFloat(getComputedStyle(t).fontSize)}; })""",
    )


def assert_on_their_rows(
    ticks: list[dict[str, float | str]], box: dict[str, float], n: int, axis: str
) -> None:
    """Each label is centred on the row (y) or column (x) of its token, within a pixel."""
    start, length = (box["y"], box["height"]) if axis == "y" else (box["x"], box["width"])
    for tick in ticks:
        low, high = ("top", "bottom") if axis == "y" else ("left", "right")
        centre = (float(tick[low]) + float(tick[high])) / 2
        expected = start + (int(tick["index"]) + 0.5) / n * length
        assert abs(centre - expected) <= 1, (tick, expected)


def test_matrix_axes_are_labelled_with_query_and_key_tokens(
    browser: object, tmp_path: Path
) -> None:
    opened = Opened(
        browser, attnscope.view(demo_like_maps(), element_id="ax").save(tmp_path / "a.html")
    )
    page = opened.page
    source, target = ["a", "b", "c", "d", "e", "f"], ["<s>", "v", "w", "x", "y"]
    for index, queries, keys in ((0, source, source), (1, target, target), (2, target, source)):
        page.select_option(".attnscope-layer", str(index))
        box = page.locator(".attnscope-matrix").bounding_box()
        assert box is not None
        y, x = axis_ticks(page, "y"), axis_ticks(page, "x")
        assert [t["text"] for t in y] == queries  # few tokens: every one is labelled
        assert [t["text"] for t in x] == keys
        assert_on_their_rows(y, box, len(queries), "y")
        assert_on_their_rows(x, box, len(keys), "x")
        # query labels sit left of the matrix, key labels above it
        assert all(float(t["right"]) <= box["x"] + 0.5 for t in y)
        assert all(float(t["bottom"]) <= box["y"] + 0.5 for t in x)
    # a cross map says which sequence each axis is
    assert page.text_content(".attnscope-querycaption") == "queries (target tokens) →"
    assert page.text_content(".attnscope-keycaption") == "keys (source tokens) →"
    assert opened.errors == []


@pytest.mark.parametrize(("queries", "keys"), [(60, 60), (300, 300), (40, 300)])
def test_many_tokens_thin_the_tick_labels_so_they_stay_legible(
    browser: object, tmp_path: Path, queries: int, keys: int
) -> None:
    generator = torch.Generator().manual_seed(1)
    source = [f"src{i}" for i in range(keys)]
    target = [f"tgt{i}" for i in range(queries)]
    weights = torch.softmax(torch.randn(1, 1, queries, keys, generator=generator), -1)
    kind = "self" if queries == keys else "cross"
    maps = AttentionMaps.from_tensors({"m": weights}, kinds=kind).with_tokens(source, target)
    opened = Opened(browser, attnscope.view(maps, element_id="many").save(tmp_path / "m.html"))
    box = opened.page.locator(".attnscope-matrix").bounding_box()
    assert box is not None
    for axis, labels, length, low, high in (
        ("y", source if kind == "self" else target, box["height"], "top", "bottom"),
        ("x", source, box["width"], "left", "right"),
    ):
        ticks = axis_ticks(opened.page, axis)
        indices = [int(t["index"]) for t in ticks]
        assert indices[0] == 0 and indices == sorted(set(indices))
        assert [t["text"] for t in ticks] == [labels[i] for i in indices]
        assert_on_their_rows(ticks, box, len(labels), axis)
        # legible: a readable size, no two labels overlapping, yet not thinned to nothing
        assert all(float(t["size"]) >= 10 for t in ticks)
        for before, after in itertools.pairwise(ticks):
            assert float(after[low]) >= float(before[high]) - 0.5, (before, after)
        assert len(labels) > len(ticks) >= max(1, int(length // 40))
    assert opened.errors == []


def lazy_encoder_capture() -> AttentionMaps:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad(), attnscope.capture(model, lazy=True) as attn:
        model(torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(1)))
    return attn.with_tokens(["[CLS]", "un", "##believ", "##able", "day", "[SEP]"])


def test_static_page_query_key_view_words_and_exports(browser: object, tmp_path: Path) -> None:
    attn = lazy_encoder_capture()
    opened = Opened(browser, attnscope.view(attn, element_id="aids").save(tmp_path / "aids.html"))
    page = opened.page
    # query/key view: a click on a matrix row chooses the query; the sums are q . k
    page.click(".attnscope-thumb[data-map='1'][data-head='1']")
    box = page.locator(".attnscope-matrix").bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + 5, box["y"] + (3 + 0.5) * box["height"] / 6)
    assert page.input_value(".attnscope-qk-query") == "3"
    q, k = attn.queries_keys("layers.1.self_attn")
    reference = q[0, 1, 3] @ k[0, 1].T
    scores = [float(s) for s in page.locator(".attnscope-qk-score").all_text_contents()]
    weights = [float(s) for s in page.locator(".attnscope-qk-weight").all_text_contents()]
    torch.testing.assert_close(torch.tensor(scores), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        torch.tensor(weights), attn["layers.1.self_attn"][0, 1, 3], atol=1e-4, rtol=0
    )
    # words: labels and values as merge_tokens gives them
    page.check(".attnscope-wordtoggle input")
    words = attn.merge_tokens()
    assert page.locator(".attnscope-ytick").all_text_contents() == words.tokens
    box = page.locator(".attnscope-matrix").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 2.5 * box["width"] / 4, box["y"] + 1.5 * box["height"] / 4)
    tip = page.text_content(".attnscope-tooltip") or ""
    assert "query word 1 unbelievable → key word 2 day" in tip
    expected = float(words["layers.1.self_attn"][0, 1, 1, 2])
    assert float(tip.rsplit("≈", 1)[1]) == pytest.approx(expected, abs=3e-3)
    # exports of the current (word-level) view
    with page.expect_download() as svg_download:
        page.click(".attnscope-export-svg")
    from xml.etree import ElementTree

    svg = ElementTree.fromstring(Path(svg_download.value.path()).read_text(encoding="utf-8"))
    namespace = "{http://www.w3.org/2000/svg}"
    assert svg.tag == f"{namespace}svg"
    assert len(list(svg.iter(f"{namespace}rect"))) == 1 + 4 * 4
    assert "unbelievable" in [t.text for t in svg.iter(f"{namespace}text")]
    with page.expect_download() as png_download:
        page.click(".attnscope-export-png")
    assert Path(png_download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert opened.errors == [] and opened.requests == []


def test_long_maps_draw_head_lines_for_the_hovered_token(browser: object, tmp_path: Path) -> None:
    n = 300  # 90 000 cells a head: lines wait for a hovered token, read from its row alone
    weights = torch.zeros(1, 2, n, n)
    weights[0, 0, torch.arange(n), (torch.arange(n) + 1) % n] = 1.0  # head 0: the next token
    weights[0, 1, :, 0] = 1.0  # head 1: the first token
    maps = AttentionMaps.from_tensors({"long": weights}).with_tokens([f"w{i}" for i in range(n)])
    opened = Opened(browser, attnscope.view(maps, element_id="long").save(tmp_path / "l.html"))
    drawn = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }"""
    assert opened.page.eval_on_selector(".attnscope-lines", drawn) == 0  # a transparent canvas
    opened.page.hover(".attnscope-left .attnscope-token >> nth=150")
    lit = opened.page.eval_on_selector(
        ".attnscope-lines",
        """c => { const d = c.getContext('2d').getImageData(c.width - 1, 0, 1, c.height).data;
        const rows = []; for (let y = 0; y < c.height; y++) if (d[4 * y + 3] > 0) rows.push(y);
        return rows; }""",
    )
    step = opened.page.eval_on_selector(".attnscope-left .attnscope-token", "t => t.offsetHeight")
    ends = sorted({y // step for y in lit})
    # the right-hand ends: key 0 (head 1; its steep line crosses a row or two more at the
    # edge) and key 151 (head 0), nothing in between
    assert ends[0] == 0 and ends[-1] == 151 and all(e <= 3 for e in ends[:-1])
    assert opened.errors == []


def test_head_view_exports_its_lines_and_tokens(browser: object, tmp_path: Path) -> None:
    maps = demo_like_maps()
    opened = Opened(browser, attnscope.view(maps, element_id="hx").save(tmp_path / "hx.html"))
    page = opened.page
    page.uncheck(".attnscope-headtoggle input >> nth=2")
    with page.expect_download() as svg_download:
        page.click(".attnscope-head-export-svg")
    from xml.etree import ElementTree

    svg = ElementTree.fromstring(Path(svg_download.value.path()).read_text(encoding="utf-8"))
    namespace = "{http://www.w3.org/2000/svg}"
    drawn = list(svg.iter(f"{namespace}line"))
    # one line per query, key and visible head whose one-byte weight reaches 3 (of 255)
    weights = torch.round(maps["encoder.0"][0] * 255)
    expected = int((weights[[0, 1, 3]] >= 3).sum())
    assert len(drawn) == expected > 0
    opacities = sorted(float(line.get("stroke-opacity", "0")) for line in drawn)
    wanted = sorted(float(v) / 255 for v in weights[[0, 1, 3]].flatten() if v >= 3)
    assert opacities == pytest.approx(wanted, abs=1e-3)
    texts = [t.text for t in svg.iter(f"{namespace}text")]
    assert texts[1:] == list("abcdef") * 2
    with page.expect_download() as png_download:
        page.click(".attnscope-head-export-png")
    assert Path(png_download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert opened.errors == []
