"""Nothing a caller or a capture supplies can become markup or script in the page (no browser).

The browser half, where Chromium runs the page, is in test_browser.py.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from importlib import resources

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnscope
from attnscope import AttentionMaps, AttnScopeError
from attnscope.view import safe_json

# Each would run script, or open an element, if it reached the page as markup.
HOSTILE = [
    "</script><script>window.__pwned=1</script>",
    "<img src=x onerror=window.__pwned=1>",
    "</SCRIPT ><svg onload=window.__pwned=1>",
    "<!--<script>",
    '" onmouseover="window.__pwned=1',
    "' onmouseover='window.__pwned=1",
    "&lt;b&gt; &amp;",
    "</style><style>*{display:none}</style>",
    "\u2028\u2029",
]


class Elements(HTMLParser):
    """The elements and attributes an HTML tokenizer sees, and each script's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes += attrs
        self._in_script = tag == "script"
        if self._in_script:
            self.scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data


def hostile_maps() -> AttentionMaps:
    generator = torch.Generator().manual_seed(0)
    names = {HOSTILE[0]: "self", HOSTILE[1]: "causal", HOSTILE[2]: "cross"}
    tensors = {
        HOSTILE[0]: torch.softmax(torch.randn(1, 2, 4, 4, generator=generator), -1),
        HOSTILE[1]: torch.softmax(torch.randn(1, 2, 5, 5, generator=generator), -1),
        HOSTILE[2]: torch.softmax(torch.randn(1, 2, 5, 4, generator=generator), -1),
    }
    return AttentionMaps.from_tensors(tensors, kinds=names).with_tokens(HOSTILE[3:7], HOSTILE[4:])


def test_hostile_strings_reach_the_page_only_as_json_data() -> None:
    stats = [{HOSTILE[0]: HOSTILE[1], "module": HOSTILE[2], "head": 0}]
    page = attnscope.view(hostile_maps(), title=HOSTILE[0], element_id="safe", stats=stats)
    parsed = Elements()
    parsed.feed(page.document())
    parsed.close()
    # A tokenizer finds the page's own elements and attributes, nothing the data brought in.
    document = ["html", "head", "meta", "title", "meta", "body"]
    assert parsed.tags == [*document, "div", "style", "script", "script"]
    assert sorted({name for name, _ in parsed.attributes}) == [
        "charset",
        "class",
        "content",
        "id",
        "lang",
        "name",
        "style",
        "type",
    ]
    assert ("id", "attnscope-safe") in parsed.attributes
    assert ("id", "attnscope-safe-data") in parsed.attributes
    data = json.loads(parsed.scripts[0])
    assert data["title"] == HOSTILE[0]
    assert [m["name"] for m in data["maps"]] == HOSTILE[:3]
    assert data["maps"][0]["qlabels"] == HOSTILE[3:7]
    assert data["maps"][2]["qlabels"] == HOSTILE[4:9] and data["maps"][2]["klabels"] == HOSTILE[3:7]
    assert data["table"] == stats
    assert parsed.scripts[1].rstrip().endswith('attnscopeRender("attnscope-safe");')
    # Raw U+2028/U+2029 would end a line of JavaScript; none is left anywhere in the page.
    assert "\u2028" not in page.document() and "\u2029" not in page.document()


def test_title_is_escaped_in_the_document_title() -> None:
    page = attnscope.view(hostile_maps(), title="</title><script>x</script>", element_id="t")
    assert "<title>&lt;/title&gt;&lt;script&gt;x&lt;/script&gt;</title>" in page.document()


@pytest.mark.parametrize(
    "element_id",
    [
        "</script><script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "a b",
        "a.b",
        "a#b",
        "",
        "é",
        "x" * 65,
        "a\u2028b",
        3,
    ],
)
def test_element_id_outside_the_safe_pattern_is_refused(element_id: object) -> None:
    with pytest.raises(AttnScopeError, match="letters, digits, '-' or '_'"):
        attnscope.view(hostile_maps(), element_id=element_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("element_id", "root"),
    [("fig-1", "attnscope-fig-1"), ("A_b9", "attnscope-A_b9"), ("attnscope-x", "attnscope-x")],
)
def test_safe_element_ids_are_kept(element_id: str, root: str) -> None:
    fragment = attnscope.view(hostile_maps(), element_id=element_id)._repr_html_()
    assert f'<div id="{root}" class="attnscope-root">' in fragment
    assert f'id="{root}-data"' in fragment
    assert f'attnscopeRender("{root}");' in fragment


def test_page_assets_cannot_end_their_own_element_nor_write_markup() -> None:
    files = resources.files("attnscope.view")
    script = files.joinpath("page.js").read_text(encoding="utf-8")
    style = files.joinpath("page.css").read_text(encoding="utf-8")
    assert not re.search(r"</script|<!--", script, re.I)
    assert not re.search(r"</style|<!--", style, re.I)
    # every string from the data is set as text: no API that parses markup is used at all
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", script)


# Plain st.text() seldom draws the few characters that matter: mix them in on purpose.
MARKUP_TEXT = st.text(st.one_of(st.sampled_from("<>&/!-\u2028\u2029"), st.characters()))


@given(MARKUP_TEXT)
def test_safe_json_round_trips_and_holds_no_markup_characters(text: str) -> None:
    encoded = safe_json({"value": text, text: [text]})
    assert not set(encoded) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(encoded) == {"value": text, text: [text]}
