"""Speed and peak memory of attnscope against the alternatives, at 512 tokens.

Cases (random weights, eval + no_grad, seeded):
  enc256      nn.TransformerEncoder, 4 layers, d=256, 8 heads, batch 8 (PyTorch's fused path)
  nnbert-b1/8 nn.TransformerEncoder shaped like BERT-base (12 layers, 768, 12 heads), batch 1 / 8
  hfbert-b1/8 Hugging Face BertModel with BERT-base's config (sdpa), batch 1 / 8
  gpt2        GPT-2-shaped models: HF GPT2Model (sdpa) and, when installed, TransformerLens
Variants per case: the plain forward; attnscope full, lazy and selected (last layer, rows=[0]);
for PyTorch models the seed-compatible layers and the seed's way (fast path off,
need_weights=True); for HF models eager + output_attentions; TransformerLens run_with_cache
(attention patterns only) next to its own plain forward.
Timings: interleaved rounds in one process, each starting one variant later (at least
--repeats, more for fast cases, up to --budget seconds per case). The JSON has each variant's
median and minimum and their ratios to the baseline's (the minimum is the figure least
disturbed by other load on the machine), the paired ratio (the median of the per-round ratios
to the baseline), and release_ms: the median time to drop what a call returned, outside the
timed call (a full capture's maps are handed back to the system then).
Memory: peak RSS of a fresh process that builds the case and runs the variant twice
(subprocess per variant).
Writes benchmarks/results/perf.json.

    python benchmarks/perf.py [--repeats 15] [--budget 120] [--cases enc256 ...] [--no-memory]
                              [--device cuda]   (on a GPU: peak memory is then the device's)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import attnscope

L = 512
DEVICE = torch.device("cpu")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class SeedEncoderLayer(nn.TransformerEncoderLayer):
    """The seed idea: keep the weights from _sa_block with need_weights=True."""

    attn_weights: Tensor | None = None

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):  # type: ignore[no-untyped-def]
        out, self.attn_weights = self.self_attn(
            x,
            x,
            x,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=True,
            average_attn_weights=False,
            is_causal=is_causal,
        )
        return self.dropout1(out)


def _nn_encoder(layer_cls: type, layers: int, d: int, heads: int, ff: int) -> nn.Module:
    torch.manual_seed(0)
    layer = layer_cls(d, heads, dim_feedforward=ff, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval().to(DEVICE)


def _capture(
    model: nn.Module, run: Callable[[], object], **options: object
) -> Callable[[], object]:
    def variant() -> object:
        with attnscope.capture(model, **options) as attn:  # type: ignore[arg-type]
            run()
        return attn

    return variant


def _seed_way(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def variant() -> object:
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)

    return variant


def build_case(case: str) -> dict[str, Callable[[], object]]:
    """The variants of one case, each a no-argument callable; the first is the baseline."""
    if case == "enc256" or case.startswith("nnbert"):
        shape = (4, 256, 8, 1024) if case == "enc256" else (12, 768, 12, 3072)
        batch = 8 if case in ("enc256", "nnbert-b8") else 1
        plain = _nn_encoder(nn.TransformerEncoderLayer, *shape)
        ours = _nn_encoder(attnscope.TransformerEncoderLayerWithAttn, *shape)
        seed = _nn_encoder(SeedEncoderLayer, *shape)
        x = torch.randn(batch, L, shape[1], generator=torch.Generator().manual_seed(1)).to(DEVICE)
        last = f"layers.{shape[0] - 1}.self_attn"
        return {
            "fused": lambda: plain(x),
            "attnscope_full": _capture(plain, lambda: plain(x)),
            "attnscope_lazy": _capture(plain, lambda: plain(x), lazy=True),
            "attnscope_selected": _capture(plain, lambda: plain(x), include=last, rows=[0]),
            "seed_compatible_layers": lambda: ours(x),
            "seed_way_fastpath_off_need_weights": _seed_way(seed, x),
        }
    import transformers

    if case.startswith("hfbert"):
        batch = 8 if case == "hfbert-b8" else 1
        config = transformers.BertConfig()  # BERT-base: 12 layers, 768, 12 heads
        torch.manual_seed(0)
        sdpa = transformers.BertModel(config).eval().to(DEVICE)
        eager = copy.deepcopy(sdpa)
        eager.set_attn_implementation("eager")
        ids = torch.randint(1000, 20000, (batch, L), generator=torch.Generator().manual_seed(1))
        ids = ids.to(DEVICE)
        last = "encoder.layer.11.attention.self"
        return {
            "sdpa": lambda: sdpa(input_ids=ids),
            "attnscope_full": _capture(sdpa, lambda: sdpa(input_ids=ids)),
            "attnscope_lazy": _capture(sdpa, lambda: sdpa(input_ids=ids), lazy=True),
            "attnscope_selected": _capture(
                sdpa, lambda: sdpa(input_ids=ids), include=last, rows=[0]
            ),
            "eager_output_attentions": lambda: eager(input_ids=ids, output_attentions=True),
        }
    if case == "gpt2":
        gpt2_config = transformers.GPT2Config()
        torch.manual_seed(0)
        model = transformers.GPT2Model(gpt2_config).eval().to(DEVICE)
        ids = torch.randint(0, 50000, (1, L), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        variants: dict[str, Callable[[], object]] = {
            "hf_sdpa": lambda: model(input_ids=ids),
            "attnscope_full": _capture(model, lambda: model(input_ids=ids)),
            "attnscope_lazy": _capture(model, lambda: model(input_ids=ids), lazy=True),
        }
        try:
            from transformer_lens import HookedTransformer, HookedTransformerConfig
        except ImportError:
            return variants
        tl_config = HookedTransformerConfig(
            n_layers=12,
            d_model=768,
            n_ctx=1024,
            d_head=64,
            n_heads=12,
            d_mlp=3072,
            d_vocab=50257,
            act_fn="gelu_new",
            normalization_type="LN",
            seed=0,
        )
        tl = HookedTransformer(tl_config).eval().to(DEVICE)
        variants["transformerlens_forward"] = lambda: tl(ids)
        variants["transformerlens_run_with_cache"] = lambda: tl.run_with_cache(
            ids, names_filter=lambda name: name.endswith("hook_pattern")
        )
        return variants
    raise SystemExit(f"unknown case {case}")


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, budget_s: float = 0.0
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per call of every variant, under no_grad, interleaved round by round (the
    order rotating) after one warm-up round; and seconds to drop what the call returned (a full
    capture's maps go back to the system then, after the timed call, as they would when a user
    drops them).

    At least ``repeats`` rounds, more for fast cases until ``budget_s`` is spent: this machine's
    neighbours make single timings swing by 10% and more, so short cases get many rounds.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    releases: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        start = time.perf_counter()
        for fn in variants.values():
            fn()
        per_round = time.perf_counter() - start
        rounds = max(repeats, min(60, int(budget_s / max(per_round, 1e-3))))
        order = list(variants.items())
        for round_ in range(rounds):
            # each round starts one variant later: none always runs after the same one (after
            # a full capture has handed a gigabyte back, say), nor always first
            shift = round_ % len(order)
            for name, fn in order[shift:] + order[:shift]:
                synchronize()
                start = time.perf_counter()
                result = fn()
                synchronize()
                samples[name].append(time.perf_counter() - start)
                start = time.perf_counter()
                del result
                releases[name].append(time.perf_counter() - start)
    return samples, releases


def median_ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """``{name}_s`` medians of every variant and ``{name}_ratio`` to the baseline's median."""
    medians = {name: statistics.median(values) for name, values in samples.items()}
    row = {f"{name}_s": round(value, 5) for name, value in medians.items()}
    row.update(
        {
            f"{name}_ratio": round(medians[name] / medians[baseline], 3)
            for name in medians
            if name != baseline
        }
    )
    return row


def paired_ratio(values: list[float], baseline: list[float]) -> float:
    """Median over rounds of this variant's time over the baseline's in the same round: the
    machine's slow drifts (a neighbour's load for a minute) cancel within a round."""
    return statistics.median(v / b for v, b in zip(values, baseline, strict=True))


def peak_rss_mb(case: str, variant: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--one", case, variant, "--device", str(DEVICE)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="at least this many rounds")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds of timing per case (more rounds)"
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["enc256", "nnbert-b1", "nnbert-b8", "hfbert-b1", "hfbert-b8", "gpt2"],
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--one", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "perf.json"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.one:
        variants = build_case(args.one[0])
        with torch.no_grad():
            for _ in range(2):
                variants[args.one[1]]()
        on_gpu = DEVICE.type == "cuda"
        print(torch.cuda.max_memory_allocated() / 2**20 if on_gpu else peak_rss_bytes() / 2**20)
        return
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    report: dict[str, object] = {
        "benchmark": "perf",
        "tokens": L,
        "min_rounds": args.repeats,
        "budget_s": args.budget,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": str(DEVICE),
        "cases": dict(previous.get("cases", {})),  # cases not rerun keep their last figures
    }
    for case in args.cases:
        samples, releases = interleaved(build_case(case), args.repeats, args.budget)
        baseline = next(iter(samples.values()))
        rows = {}
        for name, values in samples.items():
            median = statistics.median(values)
            row: dict[str, float] = {
                "median_s": round(median, 4),
                "ratio": round(median / statistics.median(baseline), 3),
                "paired_ratio": round(paired_ratio(values, baseline), 3),
                "min_s": round(min(values), 4),
                "min_ratio": round(min(values) / min(baseline), 3),
                "rounds": len(values),
                "release_ms": round(statistics.median(releases[name]) * 1e3, 2),
            }
            if not args.no_memory:
                row["peak_rss_mb"] = round(peak_rss_mb(case, name), 1)
            rows[name] = row
            print(case, name, row, flush=True)
        report["cases"][case] = rows  # type: ignore[index]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
