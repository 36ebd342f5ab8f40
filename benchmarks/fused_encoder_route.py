"""Fused encoder layer: the composition that takes the kernel's weights vs a recompute beside it.

In eval + no_grad, ``nn.TransformerEncoderLayer`` calls ``torch._transformer_encoder_layer_fwd``,
which never returns its attention weights. attnscope gets them one of two ways:

  composition  (what ``attnscope.capture`` does on the CPU) the layer runs as its op-for-op
               Python composition (``torch_native.encoder_layer_forward``), whose native
               attention kernel is asked for the per-head weights it computes anyway; output
               bit-identical to the fused call (``tests/test_native_weights.py``)
  recompute    the simpler route: the fused kernel runs untouched and the weights are
               recomputed from the layer's input and its in_proj weights
               (``torch_nn.mha_call``, the route taken off the CPU and whenever someone else's
               function stands in front of the kernel). Forced here that way: a pass-through
               installed before the capture, which attnscope calls and never bypasses

Variants, interleaved round by round (each round starts one variant later), eval + no_grad,
``nn.TransformerEncoder`` of --layers layers (8 heads, feed-forward 4 x d_model), every call
timed with its maps dropped:

  plain, plain_again   the model alone, twice: plain_again / plain is this machine's noise
  composition, recompute   ``attnscope.capture`` (eager) by either route
  recompute_floor      plain, then per layer only the least any recompute does (one q/k
                       projection, q kᵀ, masked softmax in place, padded rows zeroed, the maps
                       kept to the end): a lower bound for the recompute route, whatever its code
  lazy_composition, lazy_recompute   ``capture(lazy=True)``, forward only (weights not read);
                       the composition keeps its kernel's q and k where they are smaller than
                       the input plus a copy of the q/k projection (dense input, batch x length
                       <= 2 (d_model + 1)); elsewhere both routes are the same code. The bytes
                       each holds are in the JSON (lazy_held_bytes)

Each shape runs without a mask and, "padded" in --padding (both by default), with a
``src_key_padding_mask`` (lengths drawn from [L/2, L], the first L): the encoder then takes
PyTorch's nested-tensor path. Each shape is checked before timing: every output bit-identical to the
plain forward, and the two routes' weights within 1e-5 of each other (padded rows zero).

Per variant: the median over rounds of its time over plain's in the same round (paired
ratio), with the 25th-75th percentile of those per-round ratios as the spread. Writes
benchmarks/results/fused_encoder_route.json. Timings are measured, never asserted in tests.

    python benchmarks/fused_encoder_route.py [--rounds 21] [--d-models 256 512]
        [--lengths 128 512] [--batches 1 8] [--padding none padded] [--layers 2] [--threads 1]

(--threads defaults to torch's own count; the figures in benchmarks/README.md are at one
thread, steadier on a shared 2-core machine.)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import attnscope

HEADS = 8
VARIANTS = (
    "plain",
    "plain_again",
    "composition",
    "recompute",
    "recompute_floor",
    "lazy_composition",
    "lazy_recompute",
)


def build(d_model: int, layers: int) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, HEADS, 4 * d_model, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers).eval()


@contextmanager
def fused_kernel_untouched() -> Iterator[None]:
    """A pass-through in front of ``torch._transformer_encoder_layer_fwd``: a capture opened
    inside calls it (and so the fused kernel) instead of standing in for it, and recomputes."""
    kernel = torch._transformer_encoder_layer_fwd

    def passthrough(*args: Any, **kwargs: Any) -> Tensor:
        return kernel(*args, **kwargs)

    torch._transformer_encoder_layer_fwd = passthrough
    try:
        yield
    finally:
        torch._transformer_encoder_layer_fwd = kernel


def floor_weights(layer: nn.TransformerEncoderLayer, x: Tensor, padding: Tensor | None) -> Tensor:
    """The least a recompute of one layer's weights does: one projection for q and k from the
    batch-first input, q kᵀ, the padded keys hidden, softmax in place, padded queries zeroed."""
    attention = layer.self_attn
    embed, head_dim = attention.embed_dim, attention.head_dim
    assert attention.in_proj_weight is not None and attention.in_proj_bias is not None
    qk = F.linear(x, attention.in_proj_weight[: 2 * embed], attention.in_proj_bias[: 2 * embed])
    batch, length, _ = x.shape
    q, k = qk.view(batch, length, 2, HEADS, head_dim).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-2, -1))
    if padding is not None:
        scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1, out=scores)
    if padding is not None:
        weights.masked_fill_(padding[:, None, :, None], 0.0)
    return weights


def variants(
    model: nn.TransformerEncoder, x: Tensor, padding: Tensor | None
) -> dict[str, Callable[[], None]]:
    kwargs = {} if padding is None else {"src_key_padding_mask": padding}
    layers = [layer for layer in model.layers if isinstance(layer, nn.TransformerEncoderLayer)]

    def plain() -> None:
        model(x, **kwargs)

    def captured(lazy: bool) -> None:
        with attnscope.capture(model, lazy=lazy):
            model(x, **kwargs)

    def untouched(lazy: bool) -> None:
        with fused_kernel_untouched():
            captured(lazy)

    def floor() -> None:
        model(x, **kwargs)
        # timing only, the inputs' values do not matter; the maps are kept to the end, as a
        # capture keeps them
        kept = [floor_weights(layer, x, padding) for layer in layers]
        del kept

    return {
        "plain": plain,
        "plain_again": plain,
        "composition": lambda: captured(False),
        "recompute": lambda: untouched(False),
        "recompute_floor": floor,
        "lazy_composition": lambda: captured(True),
        "lazy_recompute": lambda: untouched(True),
    }


def check(
    model: nn.TransformerEncoder, x: Tensor, padding: Tensor | None
) -> tuple[float, list[int]]:
    """Both routes give the plain output bit for bit and the same weights within 1e-5 (each
    is checked against PyTorch's slow path by the tests); returns their largest difference and
    the bytes the lazy captures held (composition, recompute)."""
    kwargs = {} if padding is None else {"src_key_padding_mask": padding}
    with torch.no_grad():
        expected = model(x, **kwargs)
        outputs, maps = [], []
        for lazy in (False, True):
            with attnscope.capture(model, lazy=lazy) as composed:
                outputs.append(model(x, **kwargs))
            with fused_kernel_untouched(), attnscope.capture(model, lazy=lazy) as recomputed:
                outputs.append(model(x, **kwargs))
            maps += [composed, recomputed]
    for out in outputs:
        assert torch.equal(out, expected), "a capture changed the output"
    worst = 0.0
    for name in maps[0].names:
        reference = maps[0][name]
        if padding is not None:
            assert torch.all(reference.masked_select(padding[:, None, :, None]) == 0)
        for other in maps[1:]:
            worst = max(worst, float((other[name] - reference).abs().max()))
    assert worst <= 1e-5, f"the routes' weights differ by {worst:.3g}"
    return worst, [maps[2].nbytes, maps[3].nbytes]


def timed(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, interleaved: each round starts one variant later, so none always runs
    first or after the same one. One warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for round_ in range(rounds):
            shift = round_ % len(order)
            for name, fn in order[shift:] + order[:shift]:
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return samples


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(samples: dict[str, list[float]]) -> dict[str, Any]:
    """Per variant: median seconds, and the paired ratio to plain (median of per-round ratios)
    with its 25th-75th percentile spread."""
    plain = samples["plain"]
    row: dict[str, Any] = {"plain_ms": round(1e3 * statistics.median(plain), 2)}
    for name, values in samples.items():
        if name == "plain":
            continue
        ratios = [v / p for v, p in zip(values, plain, strict=True)]
        row[name] = {
            "ms": round(1e3 * statistics.median(values), 2),
            "ratio": round(statistics.median(ratios), 3),
            "p25": round(quantile(ratios, 0.25), 3),
            "p75": round(quantile(ratios, 0.75), 3),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--d-models", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--padding", nargs="+", choices=["none", "padded"], default=["none", "padded"]
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "fused_encoder_route.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results: dict[str, Any] = {}
    started = time.perf_counter()
    for d_model in args.d_models:
        model = build(d_model, args.layers)
        for length in args.lengths:
            for batch in args.batches:
                for pad in args.padding:
                    generator = torch.Generator().manual_seed(1)
                    x = torch.randn(batch, length, d_model, generator=generator)
                    padding = None
                    if pad == "padded":
                        lengths = torch.randint(
                            length // 2, length + 1, (batch,), generator=generator
                        )
                        lengths[0] = length
                        padding = torch.arange(length)[None, :] >= lengths[:, None]
                    case = f"d{d_model} L{length} b{batch} {pad}"
                    difference, held = check(model, x, padding)
                    row = summary(timed(variants(model, x, padding), args.rounds))
                    row["lazy_keeps_queries"] = pad == "none" and batch * length <= 2 * (
                        d_model + 1
                    )
                    row["weights_max_difference"] = difference
                    row["lazy_held_bytes"] = {"composition": held[0], "recompute": held[1]}
                    results[case] = row
                    print(
                        f"{case}: plain {row['plain_ms']} ms; "
                        + ", ".join(
                            f"{name} {row[name]['ratio']} [{row[name]['p25']}, {row[name]['p75']}]"
                            for name in VARIANTS[1:]
                        ),
                        flush=True,
                    )

    report = {
        "benchmark": "fused_encoder_route",
        "model": f"nn.TransformerEncoder: {args.layers} layers, 8 heads, feed-forward 4 x d_model",
        "mode": "eval + no_grad",
        "rounds": args.rounds,
        "ratio": "median over rounds of variant / plain in the same round; p25-p75 the spread",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.platform(),
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
