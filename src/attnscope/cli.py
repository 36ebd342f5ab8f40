"""The ``attnscope`` command."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

from ._version import __version__
from .errors import AttnScopeError

FORCE_HELP = "replace output files that already exist; without it, the command stops and names them"


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

    result = run_model(
        args.text, args.out, args.model, args.text_pair, args.target, force=args.force
    )
    print(summary(result))
    from .report import write_report

    for path in write_report(result.maps, args.out, f"attnscope run: {result.model_path}"):
        print(f"wrote {path}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .maps import load
    from .outputs import check_file, check_folder, figure_names, refuse_replacing
    from .view import view

    max_bytes = _max_bytes(args.max_mb)
    out, png = Path(args.out), None if args.png is None else Path(args.png)
    check_file(out, "--out", "attention.html")
    if png is not None:
        check_folder(png, "--png")
    if Path(args.capture).resolve() == out.resolve():
        raise AttnScopeError(f"--out {out} is the capture itself; give another page path")
    maps = load(args.capture)
    planned = [out, *([] if png is None else [png / name for name in figure_names(maps)])]
    refuse_replacing(planned, args.force)
    page = view(maps, batch=args.batch, title=Path(args.capture).name, max_bytes=max_bytes)
    written = page.save(out)
    print(f"page written to {written}")
    if png is not None:
        from .plot import save_figures

        for path in save_figures(maps, str(png), batch=args.batch):
            print(f"figure written to {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, token=args.token, max_tokens=args.max_tokens)
    return 0


def _max_bytes(max_mb: float) -> int:
    """``--max-mb`` as bytes: a positive, finite size (argparse's float also takes nan, inf)."""
    if not (math.isfinite(max_mb) and max_mb * 2**20 >= 1):
        raise AttnScopeError(
            f"--max-mb must be a positive number of megabytes (e.g. 64), got {max_mb}"
        )
    return int(max_mb * 2**20)


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
    run.add_argument("--force", action="store_true", help=FORCE_HELP)
    run.set_defaults(run=_run)

    show = commands.add_parser("view", help="render a saved capture as an interactive HTML page")
    show.add_argument("capture", help="a .safetensors file (or spill folder) written by attnscope")
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
    show.add_argument("--force", action="store_true", help=FORCE_HELP)
    show.set_defaults(run=_view)

    live = commands.add_parser(
        "serve", help="a local web app: type a text and see every head (attnscope[serve])"
    )
    live.add_argument(
        "model", nargs="?", default=None, help="local model folder (default: packaged MiniLM)"
    )
    live.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    live.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    live.add_argument(
        "--token",
        default=None,
        help="access token every request must carry (default: none on localhost, a fresh one "
        "printed at start on any other address)",
    )
    live.add_argument(
        "--max-tokens", type=int, default=None, help="longest input (default: the model's limit)"
    )
    live.set_defaults(run=_serve)

    from .scan.cli import add_parser as add_scan

    add_scan(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except AttnScopeError as error:
        print(f"attnscope: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the disk, not the input: full, read-only, permissions
        print(f"attnscope: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attnscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
