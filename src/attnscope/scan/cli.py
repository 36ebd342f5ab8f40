"""The ``attnscope scan`` subcommand's options, and its entry point."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    """Add ``scan`` to the ``attnscope`` subcommands."""
    scan = commands.add_parser(
        "scan",
        help="head statistics of a local model over a corpus (attnscope[scan]; resumable)",
        description="Per-head statistics (entropy, distance, first/previous/self shares) over "
        "every text of a file, written to DIR/heads.parquet, DIR/top.parquet and "
        "DIR/report.html. Rerun the same command to resume an interrupted scan.",
    )
    scan.add_argument(
        "model", nargs="?", default=None, help="local model folder (default: packaged MiniLM)"
    )
    scan.add_argument(
        "--data", required=True, metavar="FILE", help=".txt, .jsonl, .csv or .parquet file"
    )
    scan.add_argument("--out", required=True, metavar="DIR", help="output folder")
    scan.add_argument(
        "--text-field",
        default="text",
        help="field (.jsonl) or column (.csv, .parquet) holding the text (default: %(default)s)",
    )
    scan.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    scan.add_argument(
        "--max-length",
        type=int,
        default=128,
        help="tokens per text; longer texts are truncated and counted (default: %(default)s)",
    )
    scan.add_argument("--limit", type=int, default=None, help="scan only the first N records")
    scan.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="records per shard, the unit of resumption (default: %(default)s)",
    )
    scan.add_argument(
        "--top-k", type=int, default=10, help="texts kept per head and statistic (default: 10)"
    )
    scan.add_argument(
        "--engine", choices=("local", "ray"), default="local", help="default: %(default)s"
    )
    scan.add_argument("--workers", type=int, default=2, help="Ray workers (default: %(default)s)")
    scan.add_argument(
        "--address",
        default=None,
        help="an existing Ray cluster (e.g. ray://head:10001 or auto); without it a local "
        "one is started and stopped",
    )
    scan.add_argument("--quiet", action="store_true", help="no progress bar")
    scan.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .command import ScanOptions, print_summary, run_scan

    options = ScanOptions(
        model=args.model,
        data=args.data,
        out=args.out,
        text_field=args.text_field,
        batch_size=args.batch_size,
        max_length=args.max_length,
        limit=args.limit,
        shard_size=args.shard_size,
        top_k=args.top_k,
        engine=args.engine,
        workers=args.workers,
        address=args.address,
        progress=not args.quiet,
    )
    print_summary(run_scan(options))
    return 0
