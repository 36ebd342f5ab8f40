"""The page in a real headless Chromium (Debian's, driven by Playwright; nothing downloaded)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import attnscope
from attnscope import AttentionMaps

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
