"""The page inside a notebook run by nbclient: its output carries the whole page, and that
output, embedded the way Jupyter embeds HTML, renders in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

CELL = """
import torch, attnscope
weights = torch.softmax(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)), -1)
maps = attnscope.AttentionMaps.from_tensors({"layer.0": weights}).with_tokens(
    ["[CLS]", "<b>bold</b>", "play", "##ing"])
attnscope.view(maps, element_id="nb", stats=attnscope.head_stats(maps))
"""


@pytest.fixture(scope="module")
def output_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(CELL)]
    folder = tmp_path_factory.mktemp("nb")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()
    outputs = notebook.cells[0].outputs
    results = [o for o in outputs if o.output_type == "execute_result"]
    assert len(results) == 1, outputs
    html = results[0].data["text/html"]
    nbformat.write(notebook, folder / "executed.ipynb")  # a saved notebook keeps the page too
    saved = json.loads((folder / "executed.ipynb").read_text(encoding="utf-8"))
    assert "attnscopeRender" in "".join(saved["cells"][0]["outputs"][0]["data"]["text/html"])
    return str(html)


def test_the_output_carries_the_whole_page_and_no_external_script(output_html: str) -> None:
    assert 'id="attnscope-nb"' in output_html
    assert 'id="attnscope-nb-data"' in output_html
    assert "function attnscopeRender" in output_html  # the script itself, inlined
    assert ".attnscope-root" in output_html  # and the style
    assert not re.search(
        r"<script[^>]*\bsrc=|<link|https?://(?!www\.w3\.org/2000/svg)", output_html
    )
    assert "<b>bold</b>" not in output_html  # token text is JSON data, escaped


def test_the_output_renders_in_chromium_as_jupyter_embeds_it(
    output_html: str, tmp_path: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed")
    from attnscope.view import safe_json

    host = tmp_path / "notebook.html"
    host.write_text(  # innerHTML, then each script re-created so that it runs (as Jupyter does)
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><div id="out"></div>'
        "<script>var out = document.getElementById('out');"
        f"out.innerHTML = {safe_json(output_html)};"
        "out.querySelectorAll('script').forEach(function (old) {"
        "  var fresh = document.createElement('script');"
        "  if (old.type) fresh.type = old.type;"
        "  if (old.id) fresh.id = old.id;"
        "  fresh.textContent = old.textContent;"
        "  old.replaceWith(fresh); });</script></body></html>",
        encoding="utf-8",
    )
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        errors: list[str] = []
        outside: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def route(r: object) -> None:
            url = r.request.url  # type: ignore[attr-defined]
            if url.startswith(("file:", "data:", "blob:")):
                r.continue_()  # type: ignore[attr-defined]
            else:
                outside.append(url)
                r.abort()  # type: ignore[attr-defined]

        page.route("**/*", route)
        page.goto(host.as_uri())
        page.wait_for_selector("#attnscope-nb[data-ready=true]", timeout=30_000)
        tokens = page.locator(".attnscope-left .attnscope-token").all_text_contents()
        assert tokens == ["[CLS]", "<b>bold</b>", "play", "##ing"]
        assert page.locator(".attnscope-thumb").count() == 2
        assert page.locator(".attnscope-stats tr").count() == 3
        page.check(".attnscope-wordtoggle input")
        assert page.locator(".attnscope-xtick").all_text_contents() == [
            "[CLS]",
            "<b>bold</b>",
            "playing",
        ]
        assert page.locator("b").count() == 0
        assert errors == [] and outside == []
        browser.close()
