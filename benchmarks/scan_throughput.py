"""Throughput of ``attnscope.scan`` against the plain batched forward on the same texts.

Both sides tokenize and run the same texts in the same batches (sorted by length, as scan
batches them), the packaged all-MiniLM-L6-v2 by default, in float32 on the CPU. Runs are
interleaved (plain, stream only, scan, plain, ...) and each round gives a ratio: the machine
may be shared and noisy, so the rounds' median and best are reported, with every timing.
"Stream only" is ``capture.stream`` with a consumer that does nothing, as scan runs it
(``exact_outputs=False``): what the capture costs before scan's statistics. Writes
``benchmarks/results/scan_throughput.json``.

    python benchmarks/scan_throughput.py [--texts 512] [--batch-size 32] [--max-length 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

_COMMON = (
    "the of and a to in is was he for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these "
    "two may then do first any my now such like our over man me even most made after also did "
    "many before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year"
)
WORDS = _COMMON.split()


def corpus(count: int, seed: int = 0) -> list[str]:
    """Sentences of 4 to 80 words (most short, some long), a fixed seed."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        length = min(80, max(4, int(rng.lognormvariate(3.0, 0.6))))
        words = [rng.choice(WORDS) for _ in range(length)]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time plain forward and scan, interleaved ``args.repeats`` times; the result as a dict."""
    import transformers

    from attnscope.capture import stream as attnscope_stream
    from attnscope.run import default_model_path
    from attnscope.scan.engine import ShardRunner

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.model or default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    texts = corpus(args.texts)
    records = list(enumerate(texts))
    runner = ShardRunner(
        model, tokenizer, batch_size=args.batch_size, max_length=args.max_length, top_k=10
    )
    lengths = [
        len(ids)
        for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    ]
    order = sorted(range(len(texts)), key=lambda n: (lengths[n], n))
    batches = [
        [texts[n] for n in order[i : i + args.batch_size]]
        for i in range(0, len(order), args.batch_size)
    ]

    def forward_all() -> None:  # every batch, tokenized and run through the model
        for batch in batches:
            encoded = tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            model(**encoded)

    def plain() -> None:
        with torch.no_grad():
            forward_all()

    def stream_only() -> None:  # the capture alone: what scan costs before its statistics
        with (
            torch.no_grad(),
            attnscope_stream(model, lambda name, kind, weights: None, exact_outputs=False),
        ):
            forward_all()

    def scan() -> None:
        runner.run(records)

    plain()
    stream_only()
    scan()  # warm all three
    pairs = []
    for _ in range(args.repeats):
        times = {}
        for name, step in (("plain", plain), ("stream", stream_only), ("scan", scan)):
            start, cpu = time.perf_counter(), time.process_time()
            step()
            times[f"{name}_s"] = time.perf_counter() - start
            times[f"{name}_cpu_s"] = time.process_time() - cpu
        pairs.append(times)
    ratios = [p["plain_s"] / p["scan_s"] for p in pairs]  # throughput of scan / plain's
    capture = [p["plain_s"] / p["stream_s"] for p in pairs]
    cpu_ratios = [p["plain_cpu_s"] / p["scan_cpu_s"] for p in pairs]
    cpu_capture = [p["plain_cpu_s"] / p["stream_cpu_s"] for p in pairs]
    return {
        "benchmark": "scan_throughput",
        "model": str(folder),
        "texts": len(texts),
        "tokens": sum(lengths),
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "pairs": pairs,
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_best": max(ratios),
        "ratios": ratios,
        "stream_only_ratio_median": statistics.median(capture),
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "stream_only_cpu_ratio_median": statistics.median(cpu_capture),
        "plain_texts_per_s_best": len(texts) / min(p["plain_s"] for p in pairs),
        "scan_texts_per_s_best": len(texts) / min(p["scan_s"] for p in pairs),
        "note": "ratio = scan throughput / plain batched forward throughput, per interleaved "
        "run (plain, stream only, scan), in wall time and in the process's CPU time (steady "
        "on a shared machine with --threads 1); stream only = capture.stream with a consumer that "
        "does nothing, the capture's own cost; the machine may be shared, so read the median "
        "and the spread",
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: packaged MiniLM)")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's); with 1, CPU time is a steady measure on a "
        "shared machine (no thread waits for another)",
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "scan_throughput.json")
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(
        f"scan/plain throughput: median {result['throughput_ratio_median']:.3f}, best "
        f"{result['throughput_ratio_best']:.3f} over {len(result['pairs'])} rounds; in CPU "
        f"time {result['cpu_ratio_median']:.3f} (capture alone "
        f"{result['stream_only_cpu_ratio_median']:.3f}); {result['texts']} texts, "
        f"{result['tokens']} tokens, {result['threads']} threads; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
