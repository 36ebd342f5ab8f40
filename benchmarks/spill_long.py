"""Long sequences: peak memory of a spilled, a row-selected and a lazy capture at 8192 tokens.

A MiniLM-shaped BertModel (6 layers, 384 wide, 12 heads; random weights, max positions raised
to 8192) reads one 8192-token sequence. Holding its weights in memory would take
6 x 12 x 8192² x 4 bytes = 18 GiB. Each variant runs in a fresh process, which reports its
peak RSS (VmHWM) and wall time. Writes benchmarks/results/spill_long.json.

    python benchmarks/spill_long.py [--tokens 8192] [--folder /tmp/attnscope-spill]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import attnscope


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def model_and_ids(tokens: int):  # type: ignore[no-untyped-def]
    import transformers

    config = transformers.BertConfig(
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=tokens,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(1000, 20000, (1, tokens), generator=torch.Generator().manual_seed(1))
    return model, ids


def one(variant: str, tokens: int, folder: str) -> dict[str, float]:
    model, ids = model_and_ids(tokens)
    start = time.perf_counter()
    with torch.no_grad():
        if variant == "forward":
            model(input_ids=ids)
            held = 0
        elif variant == "spill":
            with attnscope.capture(model, spill=folder) as attn:
                model(input_ids=ids)
            held = attn.nbytes
            assert torch.isclose(attn[attn.names[-1]][0, 0, -1].sum(), torch.tensor(1.0))
        elif variant == "rows_last":
            with attnscope.capture(model, rows=[-1]) as attn:
                model(input_ids=ids)
            held = attn.nbytes
        elif variant == "lazy":
            with attnscope.capture(model, lazy=True) as attn:
                model(input_ids=ids)
            held = attn.nbytes
        else:
            raise SystemExit(variant)
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "held_mb": round(held / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--folder", default="/tmp/attnscope-spill")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "spill_long.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.folder)))
        return
    results = {}
    for variant in ("forward", "rows_last", "lazy", "spill"):
        shutil.rmtree(args.folder, ignore_errors=True)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                variant,
                "--tokens",
                str(args.tokens),
                "--folder",
                args.folder,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        if variant == "spill":
            results[variant]["on_disk_gb"] = round(
                sum(p.stat().st_size for p in Path(args.folder).iterdir()) / 2**30, 2
            )
        print(variant, results[variant], flush=True)
    shutil.rmtree(args.folder, ignore_errors=True)
    report = {
        "benchmark": "spill_long",
        "tokens": args.tokens,
        "model": "MiniLM-shaped BertModel (6 x 384, 12 heads), random weights, batch 1",
        "in_memory_weights_gb": round(6 * 12 * args.tokens**2 * 4 / 2**30, 1),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
