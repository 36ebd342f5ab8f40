"""Capture speed: fused forward vs attnscope.capture vs the seed's subclass way.

Model: 4-layer nn.TransformerEncoder, d_model=256, 8 heads, batch 8, eval + no_grad.
Variants, run interleaved in one process (medians of REPEATS rounds):
  fused      the plain model: PyTorch's fused encoder kernel, no weights
  capture    attnscope.capture around the same call (fused path kept; on the CPU the weights
             come from its own attention kernel, elsewhere they are recomputed)
  layers     attnscope.TransformerEncoderLayerWithAttn (seed-compatible layers)
  seed       the seed's way: fast path off, _sa_block calls self_attn with need_weights=True
Writes benchmarks/results/capture_speed.json. Timings are measured, never asserted in tests.

    python benchmarks/capture_speed.py [--repeats 15] [--lengths 128 512]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import attnscope
from perf import SeedEncoderLayer, interleaved, median_ratios  # shared with perf.py


def build(layer_cls: type[nn.TransformerEncoderLayer]) -> nn.Module:
    torch.manual_seed(0)
    layer = layer_cls(256, 8, dim_feedforward=1024, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "capture_speed.json")
    )
    args = parser.parse_args()

    plain = build(nn.TransformerEncoderLayer)
    ours = build(attnscope.TransformerEncoderLayerWithAttn)
    seed = build(SeedEncoderLayer)
    results: dict[str, dict[str, float]] = {}
    for length in args.lengths:
        x = torch.randn(8, length, 256, generator=torch.Generator().manual_seed(1))

        def fused(x: Tensor = x) -> object:
            return plain(x)

        def captured(x: Tensor = x) -> object:
            with attnscope.capture(plain) as attn:
                plain(x)
            return attn

        def layers(x: Tensor = x) -> object:
            return ours(x)

        def seed_way(x: Tensor = x) -> object:
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return seed(x)
            finally:
                torch.backends.mha.set_fastpath_enabled(True)

        variants: dict[str, Callable[[], object]] = {
            "fused": fused,
            "capture": captured,
            "layers": layers,
            "seed": seed_way,
        }
        row = median_ratios(interleaved(variants, args.repeats)[0], "fused")
        results[f"L={length}"] = row
        print(f"L={length}: " + ", ".join(f"{k} {v}" for k, v in row.items()))

    report = {
        "benchmark": "capture_speed",
        "model": "nn.TransformerEncoder: 4 layers, d_model 256, 8 heads, ff 1024, batch 8",
        "mode": "eval + no_grad",
        "repeats": args.repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
