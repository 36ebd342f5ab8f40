"""The page in a real headless Chromium (Debian's, driven by Playwright; nothing downloaded)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.view import AttentionPage, safe_json

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
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def dialog(d: object) -> None:
            self.dialogs.append(d.message)  # type: ignore[attr-defined]
            d.dismiss()  # type: ignore[attr-defined]

        self.page.on("dialog", dialog)

        def route(r: object) -> None:
            url = r.request.url  # type: ignore[attr-defined]
            if url.startswith(("file:", "data:", "blob:")):
                r.continue_()  # type: ignore[attr-defined]
            else:
                self.requests.append(url)
                r.abort()  # type: ignore[attr-defined]

        self.page.route("**/*", route)
        self.page.goto(path.as_uri())
        self.page.wait_for_selector(".attnscope-root[data-ready=true]", timeout=30_000)

    def ink(self, selector: str) -> int:
        """Non-white pixels of a canvas."""
        return self.page.eval_on_selector(
            selector,
            """c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (Math.min(d[i], d[i+1], d[i+2]) < 250) n++;
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
