"""The ``attnscope`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._version import __version__
from .errors import AttnScopeError


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo, summary

    if args.steps is not None and args.steps < 1:
        raise AttnScopeError(f"--steps must be at least 1, got {args.steps}")
    config = DemoConfig(seed=args.seed)
    if args.steps is not None:
        config.steps = args.steps
    start = time.perf_counter()
    result = run_demo(args.out, config, progress=not args.quiet)
    print(summary(result))
    from .report import write_report

    for path in write_report(result.maps, args.out, "attnscope demo: copy task"):
        print(f"wrote {path}")
    print(f"total wall time: {time.perf_counter() - start:.1f} s")
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import run_model, summary

    result = run_model(args.text, args.out, args.model, args.text_pair, args.target)
    print(summary(result))
    from .report import write_report

    for path in write_report(result.maps, args.out, f"attnscope run: {result.model_path}"):
        print(f"wrote {path}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .maps import load
    from .view import view

    maps = load(args.capture)
    page = view(
        maps, batch=args.batch, title=Path(args.capture).name, max_bytes=int(args.max_mb * 2**20)
    )
    out = page.save(args.out)
    print(f"page written to {out}")
    if args.png:
        from .plot import save_figures

        for path in save_figures(maps, args.png, batch=args.batch):
            print(f"figure written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnscope", description="See and measure the attention of PyTorch Transformers."
    )
    parser.add_argument("--version", action="version", version=f"attnscope {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a tiny copy-task Transformer on the CPU and report its attention"
    )
    demo.add_argument(
        "--out", default="attnscope-demo", help="output folder (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: 1200)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)

    run = commands.add_parser(
        "run", help="capture a local Hugging Face model's attention on text (nothing downloaded)"
    )
    run.add_argument(
        "model",
        nargs="?",
        default=None,
        help="local model folder (default: the packaged all-MiniLM-L6-v2)",
    )
    run.add_argument(
        "--text", action="append", required=True, help="input text; repeat for a padded batch"
    )
    run.add_argument(
        "--text-pair",
        action="append",
        default=None,
        help="second segment for each --text (e.g. a question/answer pair)",
    )
    run.add_argument(
        "--target",
        default=None,
        help="decoder text for encoder-decoder models (default: start token)",
    )
    run.add_argument("--out", default="attnscope-run", help="output folder (default: %(default)s)")
    run.set_defaults(run=_run)

    show = commands.add_parser("view", help="render a saved capture as an interactive HTML page")
    show.add_argument("capture", help="a .safetensors file written by attnscope")
    show.add_argument(
        "--out", default="attention.html", help="page to write (default: %(default)s)"
    )
    show.add_argument("--png", default=None, metavar="DIR", help="also write PNG figures here")
    show.add_argument("--batch", type=int, default=0, help="batch item to show (default: 0)")
    show.add_argument(
        "--max-mb",
        type=float,
        default=64.0,
        help="size budget of the page in MB (default: %(default)s)",
    )
    show.set_defaults(run=_view)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except AttnScopeError as error:
        print(f"attnscope: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
